"""What `moepress run` keys its stages by and how it tells a stage's output is still the one it wrote.

A stage is skipped only when its key is unchanged and its output is complete and as written
(moepress/pipeline/runner.py ``Runner.stage``). The keys hold what decides the output: the model's files
(``source_digest``) and moepress's code (moepress/codeid.py), the configs, the calibration and evaluation data's bytes
(``data_digest``), and for a check the consumers' versions and the verdict it recorded in the candidate's
manifest (``accuracy_digest``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moepress.compress.checkpoint import aux_files
from moepress.compress.checkpoint.auxiliary import check_inside
from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, file_stamp, read_manifest, resized, sha256_file


def stage_key(fields: dict) -> str:
    """sha256 of a stage's key fields (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _hashed(files: dict[str, Path]) -> dict[str, str]:
    """sha256 of each file, memoised by (size, mtime) in the calibration cache (big files hashed once)."""
    from moepress.calib.cache import load_hash_memo, save_hash_memo
    from moepress.calib.sources import _file_sha

    memo = load_hash_memo()
    n = len(memo)
    out = {name: _file_sha(p, memo) for name, p in files.items()}
    if len(memo) != n:
        save_hash_memo(memo)
    return out


def source_digest(model: Path) -> dict[str, str]:
    """sha256 of the model's files: weights, configs and each file a stage copies (aux_files: tokenizer*)."""
    files = {p.name: p for p in model.iterdir() if p.is_file() and p.name != MANIFEST_NAME and p.suffix in
             (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken", ".py")}
    for p in files.values():  # their digests travel in every manifest: none of a file outside the checkpoint
        if p.is_symlink():
            check_inside(model, p, f"{p}: resolves to")
    return _hashed(dict(sorted({**files, **{p.name: p for p in aux_files(model)}}.items())))


def output_complete(d: Path) -> bool:
    """The directory exists and holds every file its manifest lists, with the listed size."""
    if not (d / MANIFEST_NAME).is_file():
        return False
    return bool(read_manifest(d).get("files")) and not resized(d)


def listed(d: Path) -> dict[str, str] | None:
    """The sha256 of each file ``d``'s manifest lists (None: no manifest, e.g. a check's report directory)."""
    if not (d / MANIFEST_NAME).is_file():
        return None
    return {f: v.get("sha256") for f, v in (read_manifest(d).get("files") or {}).items() if isinstance(v, dict)}


def same_files(d: Path, recorded: dict[str, str] | None) -> bool:
    """Every file the stage wrote is still listed as it wrote it: another command writing into the run's
    directory (`moepress quantize -o RUN/quantize --force`) writes a new manifest, and the stage runs again.
    Files added since (the model card) do not count."""
    now = listed(d) or {}
    return recorded is None or all(now.get(f) == h for f, h in recorded.items())


def stamps(d: Path, files: dict[str, str] | None) -> dict[str, dict] | None:
    """Each listed file's stamp (size, mtime, inode change time, device, inode) as the stage leaves it."""
    return None if files is None else {f: file_stamp((d / f).stat()) for f in files if (d / f).is_file()}


def unedited(d: Path, files: dict[str, str] | None, stamped: dict[str, dict] | None) -> bool:
    """Every file the stage wrote still holds the bytes it wrote: a file whose stamp moved since (edited in place
    with its size kept, which the manifest's sizes cannot tell) is hashed again against the sha256 it was written
    with. Stamps alone decide nothing: a `touch` or a hard link costs one read, not the stage."""
    for f, h in (files or {}).items():
        p = d / f
        if not p.is_file():
            return False
        if (stamped or {}).get(f) != file_stamp(p.stat()) and h is not None and sha256_file(p) != h:
            return False
    return True


def accuracy_digest(cand: Path) -> str | None:
    """sha256 of the accuracy section of ``cand``'s manifest (None without one)."""
    acc = read_manifest(cand).get("accuracy")
    return None if acc is None else hashlib.sha256(json.dumps(acc, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data: str | None) -> dict | None:
    """What the check's evaluation data holds (a file or directory edited between runs is another check); data in
    the calibration sources' syntax (``FILE,field=text``, ``FILE@W``, several) as the calibration key hashes it."""
    from moepress.calib.data import DEFAULT_EVAL, source_hashes

    if data is not None and not Path(data).exists():
        try:
            return source_hashes((data,))  # None for a Hub dataset by name: its revision is the Hub's
        except MoepressError:
            return None  # not a source the calibration reader takes: the check itself says what it expected
    p = Path(data) if data is not None else DEFAULT_EVAL  # the bundled held-out text: package data, not code
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return _hashed({f.relative_to(p).as_posix() if p.is_dir() else p.name: f for f in files})


def sealing_key_id() -> str | None:
    """The public name of the key a check seals its verdict with (moepress/checks/seal.py; made now if there is
    none, as the check would): a verdict sealed with another key is one publish refuses, so the check runs again.
    None where it cannot be had: the check itself refuses in one line."""
    from moepress.checks import seal

    try:
        key = seal.load_key(create=True)
    except MoepressError:
        return None
    return None if key is None else seal.key_id(key)
