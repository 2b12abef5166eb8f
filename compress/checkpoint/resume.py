"""The resume key of an ``OUT.partial``: what the run that started it was asked to do.

A resumable stage (quantize) keeps the shards a killed run finished and writes only the rest, so
the new run must be the same run: same stage, same config, same input, same moepress. The writer
records the key in its journal when it creates the partial and continues a partial only when the
recorded key equals the new one; otherwise one line names what differs and the partial is kept.

The input's identity is cheap to compute on a 1 TB checkpoint: each ``*.safetensors`` file's name and
stamp (size, mtime, inode change time: :func:`moepress.manifest.file_stamp`; a file rewritten with its old
size and mtime kept, by ``cp -p`` or ``touch -r``, is another input) plus the sha256 of its config.json,
index and auxiliary files (the tokenizer decides the calibration tokens). A moepress output's
moepress-manifest.json is not taken for it: a shard edited beside an unchanged manifest is another input.

The shards a resume keeps are the killed run's own only while their bytes are those the journal recorded
(:func:`first_changed_shard`: sha256 against the journal's digests, hashed in parallel); from the first one
missing or changed on, the stage writes again, as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moepress.codeid import code_id
from moepress.compress.checkpoint.auxiliary import aux_files
from moepress.compress.checkpoint.safetensors_io import INDEX_NAME
from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, file_stamp, sha256_file

HINT = "rerun with the same options or without --resume"
LABELS = {"torch_threads": "torch threads (OMP_NUM_THREADS)"}  # key entries that are not options: how to set them


class ResumeRefused(MoepressError):
    """``OUT.partial`` was started by another run; ``detail`` says what differs (no hint)."""

    def __init__(self, partial: Path, detail: str, hint: str = HINT):
        super().__init__(f"{partial}: {detail}; {hint}")
        self.partial, self.detail = partial, detail


def _small_files(src: Path) -> list[Path]:
    """The files an input's identity hashes whole: config.json, the index, the auxiliary files (tokenizer...)."""
    return [src / n for n in ("config.json", INDEX_NAME) if (src / n).is_file()] + aux_files(src)


def input_identity(src: str | os.PathLike) -> dict:
    """The identity of the checkpoint directory ``src`` (see the module docstring)."""
    src = Path(src)
    shards = {p.name: file_stamp(p.stat()) for p in sorted(src.glob("*.safetensors"))}
    small = _small_files(src)
    return {"shards": shards, "sha256": {p.name: sha256_file(p) for p in small}}


def input_fingerprint(src: str | os.PathLike) -> str:
    """What every torchrun rank must see alike in the checkpoint directory ``src`` (a digest of: the sha256 of its
    config.json, index and auxiliary files, and each shard's size and header (tensor names, dtypes, shapes,
    offsets)). Unlike :func:`input_identity` it holds nothing of one machine's file system (inode, times), so
    ranks on two nodes reading their own copies agree; weights rewritten with every shape kept are not caught
    (that would hash every byte on every rank)."""
    src = Path(src)
    small = _small_files(src)
    shards = {}
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            shards[p.name] = [p.stat().st_size, hashlib.sha256(f.read(min(n, 100 << 20))).hexdigest()]
    key = {"shards": shards, "sha256": {p.name: sha256_file(p) for p in small}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def first_changed_shard(partial: Path, shards: list, digests: dict[str, dict]) -> int | None:
    """The index of the first of ``shards`` (the journal's [file, names, bytes]) missing from ``partial`` or whose
    size or sha256 is not what the journal recorded for it ({file: {sha256, size}}); None when all are as written."""
    def changed(shard) -> bool:
        f = partial / str(shard[0])
        want = (digests.get(shard[0]) if isinstance(digests, dict) else None) or {}
        want = want if isinstance(want, dict) else {}
        try:  # a shard that cannot be read is not one to keep
            if not f.is_file() or ("size" in want and f.stat().st_size != want["size"]):
                return True
            return "sha256" in want and sha256_file(f) != want["sha256"]
        except OSError:
            return True

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib lets go of the GIL
        flags = list(pool.map(changed, shards))
    return flags.index(True) if True in flags else None


def resume_key(stage: str, config: dict, src: str | os.PathLike) -> dict:
    """The key a resumable stage passes to :class:`CheckpointWriter` (``config``: ``asdict(cfg)``)."""
    return normalized({"stage": stage, "config": config, "input": input_identity(src), "moepress": code_id()})


def normalized(key: dict | None) -> dict | None:
    """``key`` as its JSON round trip (tuples become lists), the form the journal holds."""
    return None if key is None else json.loads(json.dumps(key, sort_keys=True, default=str))


def difference(old, new: dict | None) -> str:
    """What differs between the recorded key ``old`` and ``new``, as words for the error line."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ("has no record of the run that started it (an older moepress, or a stage that does not "
                "resume, wrote it)")
    parts = []
    if old.get("stage") != new.get("stage"):
        parts.append(f"was started by the {old.get('stage')} stage, this run is {new.get('stage')}")
    if old.get("moepress") != new.get("moepress"):  # other code keys other entries: naming them would mislead
        return "; ".join([*parts, f"was started by moepress {old.get('moepress')}, this is {new.get('moepress')}"])
    parts += _config_difference(old.get("config") or {}, new.get("config") or {})
    if old.get("input") != new.get("input"):
        parts.append(_input_difference(old.get("input") or {}, new.get("input") or {}))
    return "; ".join(parts) or "was started by another run"


def _word(v) -> str:
    return "none" if v is None else v if isinstance(v, str) else json.dumps(v)


def _config_difference(old: dict, new: dict) -> list[str]:
    """The options that differ; one that only one side records (quantize's ``device``, kept for calibrated
    formats only) is named only when nothing both record differs: it follows from the other."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    keys = [k for k in keys if k in old and k in new] or keys
    if not keys:
        return []
    if len(keys) == 1:
        k = keys[0]
        return [f"was started with {LABELS.get(k, k)} {_word(old.get(k))}, this run asks for {_word(new.get(k))}"]
    was = " and ".join(f"{LABELS.get(k, k)} {_word(old.get(k))}" for k in keys)
    now = " and ".join(f"{LABELS.get(k, k)} {_word(new.get(k))}" for k in keys)
    return [f"was started with {was}, this run asks for {now}"]


def _input_difference(old: dict, new: dict) -> str:
    if set(old) != set(new):
        return "was started from another input"
    names = set()
    for section in old:
        a, b = old.get(section) or {}, new.get(section) or {}
        names.update(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    shown = sorted(names)[:3]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"was started from another input ({', '.join(shown)}{more} differ)" if shown else \
        "was started from another input"


__all__ = ["HINT", "ResumeRefused", "difference", "first_changed_shard", "input_identity", "normalized",
           "resume_key"]


JOURNAL = "writer-journal.json"  # CheckpointWriter's record of whole shards, boundaries and the key
_NO_JOURNAL = object()  # a partial without a journal: started by an older moepress


def _unwritten(partial: Path) -> bool:
    """Whether ``partial`` holds nothing but the first journal's temporary file: killed after the writer made it,
    before it recorded a key, with nothing to lose."""
    return all(p.is_dir() or p.name == JOURNAL + ".tmp" for p in partial.rglob("*"))


def resumable_journal(partial: Path, key: dict | None) -> dict:
    """The journal of ``partial`` when it may be resumed with ``key`` ({} when there is no partial);
    else :class:`ResumeRefused` naming what differs. A partial killed while it was committed (its journal
    says so, or it has its manifest and no journal), or before it held anything (:func:`_unwritten`), gives
    ``{"committing": True}``: nothing in it is resumable, and the writer starts afresh."""
    if not partial.is_dir():
        return {}
    p = partial / JOURNAL
    try:
        journal = json.loads(p.read_text()) if p.is_file() else _NO_JOURNAL
    except (OSError, ValueError):
        raise MoepressError(f"{p}: unreadable journal; rerun without --resume") from None
    if (journal is _NO_JOURNAL and ((partial / MANIFEST_NAME).is_file() or _unwritten(partial))) or \
            (isinstance(journal, dict) and journal.get("committing")):
        return {"committing": True}
    if journal is _NO_JOURNAL:
        if key is None:  # a caller without a key resumes whatever is there
            return {}
        raise ResumeRefused(partial, difference(None, key))
    recorded = journal.get("key") if isinstance(journal, dict) else None
    if recorded != key:
        raise ResumeRefused(partial, difference(recorded, key))
    return journal
