"""Tokenized calibration sets on disk: the token file format and the cache that reuses it.

A token file is ``NAME.safetensors`` (tensors ``input_ids`` int32 [N, S] and ``source``
int32 [N], the index of the ``--calib`` source each sample came from) or ``NAME.pt``
(``torch.save`` of the same dict), next to ``NAME.safetensors.json`` describing it:
tokenizer fingerprint, sources with their content hashes, parameters, per-source
counts, and the token file's own sha256. ``moepress calib prepare`` writes one; the
cache (``$MOEPRESS_CACHE/calib/<key>.safetensors``, default ``~/.cache/moepress``) holds
the same files named by the key of what made them, so every stage that asks for the
same calibration set with the same tokenizer reuses the tokens.
``MOEPRESS_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from pathlib import Path

import torch

from moepress.calib.sources import sidecar_path
from moepress.codeid import package_digest
from moepress.errors import MoepressError
from moepress.manifest import installed_versions
from moepress.outputs import pid_alive

FORMAT = "moepress-calib"
VERSION = 1  # the token file's and cache entry's layout
# in the cache key, raised whenever the samples one key yields change (calib/data.py: allocate, _pack, _truncate,
# _render, a text file's pieces): an older moepress's samples were served for the same key (2: empty documents add
# no EOS; 3: text files over calib/sources/documents.py's PIECE_BYTES sampled by pieces; 4: pack takes at most
# calib/sampling.py's 1/PACK_DOCS of the tokens from one document)
SAMPLING = 4


def cache_root() -> Path | None:
    v = os.environ.get("MOEPRESS_CACHE")
    if v is not None and v.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if v:
        return Path(v).expanduser()
    try:
        return Path.home() / ".cache" / "moepress"
    except RuntimeError:  # no HOME and no passwd entry: no cache, as with MOEPRESS_CACHE=off
        return None


def calib_cache_dir() -> Path | None:
    root = cache_root()
    return None if root is None else root / "calib"


# the code that reads the sources and draws the samples: the calibration package, and compress.arch, whose config
# loading the tokenizer's (calib/tokenizer.py: Kimi's tiktoken tokenizer) goes through
SAMPLING_CODE = ("moepress.calib", "moepress.compress.arch")
# the libraries that read a Parquet file or a Hub dataset into records (the tokenizer's libraries are in its
# fingerprint: calib/tokenizer.py)
READERS = ("datasets", "pyarrow")


@functools.cache
def reader_versions() -> dict[str, str]:
    """The installed versions of ``READERS`` (those not installed left out)."""
    return installed_versions(READERS)


def cache_key(fields: dict) -> str:
    """sha256 of what decides the token ids (tokenizer, sources' contents, parameters, format, and the code that
    draws them: the source digest of ``SAMPLING_CODE``, so an edit that changes the samples without raising
    SAMPLING still misses, and the versions of the libraries that read the records)."""
    blob = json.dumps({"format": FORMAT, "version": VERSION, "sampling": SAMPLING,
                       "code": package_digest(*SAMPLING_CODE), "readers": reader_versions(), **fields}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` written whole or not at all (a temporary file renamed); the temporary files of killed
    writers of ``path`` (named by their pid) are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not pid_alive(old.name[len(path.name) + 2:-len(".tmp")]):
            old.unlink(missing_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def orphan_sidecar(path: Path) -> bool:
    """``path``'s sidecar is one this module wrote and ``path`` is missing: what a run killed between the two
    writes leaves (the sidecar is written first), replaced by the next run without --force."""
    side = sidecar_path(path)
    if path.exists() or not side.is_file():
        return False
    try:
        return json.loads(side.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_token_file(path: str | os.PathLike, input_ids: torch.Tensor, source: torch.Tensor, meta: dict) -> dict:
    """Write ``path`` (.safetensors or .pt) and its JSON sidecar; returns the sidecar dict."""
    path = Path(path)
    tensors = {"input_ids": input_ids.to(torch.int32).contiguous(), "source": source.to(torch.int32).contiguous()}
    if path.name.endswith(".safetensors"):
        from moepress.compress.checkpoint.safetensors_io import safetensors_bytes

        data = safetensors_bytes(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
    elif path.name.endswith(".pt"):
        import io

        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
    else:
        raise MoepressError(f"{path}: expected a file name ending in .safetensors or .pt")
    side = {"format": FORMAT, "version": VERSION, **meta,
            "file": {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                     "tensors": {"input_ids": ["int32", list(input_ids.shape)], "source": ["int32", [source.numel()]]}}}
    # the sidecar first: a run killed between the two leaves no token file without one (which looked finished
    # to a rerun: "exists (pass --force)"); a replaced pair's new sidecar beside the old file fails its sha256
    _atomic_write(sidecar_path(path), (json.dumps(side, indent=2) + "\n").encode())
    try:
        _atomic_write(path, data)
    except BaseException:  # a full disk: no sidecar left alone, describing a file that is not there
        sidecar_path(path).unlink(missing_ok=True)
        raise
    return side


def load_token_file(path: str | os.PathLike, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids int64 [N, S], source int64 [N], sidecar) of a token file; bad files raise MoepressError."""
    path = Path(path)
    side_p = sidecar_path(path)
    if not path.is_file():
        raise MoepressError(f"{path}: token file not found")
    if not side_p.is_file():
        raise MoepressError(f"{path}: no sidecar {side_p.name}; token files are made by `moepress calib prepare`")
    try:
        side = json.loads(side_p.read_text())
    except json.JSONDecodeError as e:
        raise MoepressError(f"{side_p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise MoepressError(f"{side_p}: not valid JSON (not UTF-8 text: invalid byte at offset {e.start})") from None
    if not isinstance(side, dict):
        raise MoepressError(f"{side_p}: expected a JSON object")
    if side.get("format") != FORMAT or side.get("version") != VERSION:
        raise MoepressError(f"{side_p}: expected format {FORMAT!r} version {VERSION}, "
                            f"got {side.get('format')!r} version {side.get('version')}")
    data = path.read_bytes()
    recorded = side.get("file") if isinstance(side.get("file"), dict) else {}
    if verify and hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
        raise MoepressError(f"{path}: contents do not match the sha256 in {side_p.name} (file changed or damaged)")
    kind = "safetensors" if path.name.endswith(".safetensors") else "torch.save"
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load

            t = load(data)
        else:
            import io

            t = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # the readers' messages may quote the file's bytes (pickle's "invalid load key")
        raise MoepressError(f"{path}: cannot read token file (not a {kind} file of tensors: "
                            f"{type(e).__name__})") from None
    if not isinstance(t, dict):
        raise MoepressError(f"{path}: cannot read token file (expected a dict of tensors)")
    ids, src = t.get("input_ids"), t.get("source")
    n, s = side.get("num_samples"), side.get("seq_len")
    if ids is None or src is None or ids.ndim != 2 or list(ids.shape) != [n, s] or src.shape != (n,):
        raise MoepressError(f"{path}: expected tensors input_ids [{n}, {s}] and source [{n}] as {side_p.name} says")
    for name, v in (("input_ids", ids), ("source", src)):  # float ids were truncated to other tokens
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise MoepressError(f"{path}: tensor '{name}' is {str(v.dtype).removeprefix('torch.')}; expected "
                                "integer token ids (int64 or int32, as `moepress calib prepare` writes)")
    return ids.long(), src.long(), side


def cache_paths(key: str) -> Path | None:
    d = calib_cache_dir()
    return None if d is None else d / f"{key}.safetensors"


# MOEPRESS_CACHE=off: nothing is written, but what this process built or hashed is reused within it (a `run`'s
# up-front key and its stages share one set, and a source is hashed once), under the same keys and stamps as on disk
_PROCESS_SETS: dict[str, tuple] = {}
_PROCESS_HASHES: dict = {}


def cache_get(key: str):
    """(input_ids, source, sidecar) for key, or None (absent, damaged, or the cache off and not built here)."""
    p = cache_paths(key)
    if p is None:
        hit = _PROCESS_SETS.get(key)
        return None if hit is None else (hit[0].clone(), hit[1].clone(), json.loads(hit[2]))
    if not p.exists() or not sidecar_path(p).exists():
        return None
    try:
        ids, src, side = load_token_file(p)
    except (MoepressError, OSError, ValueError, AttributeError, TypeError):  # damaged or unreadable: a miss
        return None
    return (ids, src, side) if side.get("key") == key else None


def cache_put(key: str, input_ids: torch.Tensor, source: torch.Tensor, meta: dict) -> Path | None:
    """Store a calibration set under key; a cache that cannot be written is skipped (returns None)."""
    p = cache_paths(key)
    if p is None:
        _PROCESS_SETS[key] = (input_ids.clone(), source.clone(), json.dumps({**meta, "key": key}))
        return None
    try:
        save_token_file(p, input_ids, source, {**meta, "key": key})
    except OSError:
        return None
    return p


def load_hash_memo() -> dict:
    """Content-hash memo (path -> size, mtime, sha256) kept in the cache so big sources are hashed once (the
    cache off: this process's)."""
    d = calib_cache_dir()
    if d is None:
        return _PROCESS_HASHES
    try:
        memo = json.loads((d / "file-hashes.json").read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: hash again
        return {}
    return memo if isinstance(memo, dict) else {}


def save_hash_memo(memo: dict) -> None:
    d = calib_cache_dir()
    if d is None or not memo:
        return
    try:
        _atomic_write(d / "file-hashes.json", json.dumps(memo).encode())
    except OSError:
        pass
