"""Content hashes of calibration sources (the calibration cache's key), and the files a source reads."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from moepress.calib.sources.spec import TEXT_SUFFIXES, SourceSpec
from moepress.manifest import file_stamp, sha256_file


def _file_sha(p: Path, memo: dict | None) -> str:
    st = p.stat()
    key, stamp = str(p.resolve()), file_stamp(st)
    if memo is not None:
        hit = memo.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("sha256"), str) and \
                all(hit.get(k) == v for k, v in stamp.items()):
            return hit["sha256"]
    d = sha256_file(p)
    if memo is not None:
        memo[key] = {**stamp, "sha256": d}
    return d


def text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def content_hash(src: SourceSpec, memo: dict | None = None) -> str | None:
    """sha256 over the bytes a source reads (None for a Hub dataset at a moving revision)."""
    if src.type == "hub":
        if src.revision and re.fullmatch(r"[0-9a-f]{40}", src.revision):
            return hashlib.sha256(f"hub:{src.location}:{src.config}:{src.revision}".encode()).hexdigest()
        return None
    p = src.path
    if p.is_file():
        files = [p] + ([sidecar_path(p)] if src.type == "tokens" and sidecar_path(p).exists() else [])
    elif src.type == "text":
        files = text_files(p)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("cache-"))
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p if p.is_dir() else p.parent).as_posix()
        h.update(f"{rel}\0{_file_sha(f, memo)}\0".encode())
    return h.hexdigest()


def sidecar_path(p: Path) -> Path:
    """The JSON that describes a prepared token file: ``calib.safetensors`` -> ``calib.safetensors.json``."""
    return p.with_name(p.name + ".json")
