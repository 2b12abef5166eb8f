"""Artifact manifests: ``moepress-manifest.json`` in every directory moepress writes.

It says what the artifact is and how it was made: the stage and its config (verbatim),
the inputs, every file's sha256 and size, tool versions, and (added by `check`) the
accuracy metrics. Publishing verifies the files against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from moepress.atomic import replace_file
from moepress.codeid import code_id
from moepress.errors import MoepressError

MANIFEST_NAME = "moepress-manifest.json"

_LIBRARIES = ("torch", "transformers", "safetensors", "nvidia-modelopt", "compressed-tensors", "onnx", "onnxruntime",
              "tensorrt", "tensorrt-llm")


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(st: os.stat_result) -> dict:
    """What identifies a file's version without reading it: size, mtime and, as git's index does, the inode
    change time, device and inode, which ``touch -r``, ``cp -p`` and ``rsync -a`` cannot carry over (they keep
    size and mtime while the bytes change)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "dev": st.st_dev,
            "ino": st.st_ino}


def installed_versions(names) -> dict[str, str]:
    """The installed versions of the distributions ``names`` (those not installed left out)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def library_versions() -> dict[str, str]:
    """Python's and the installed libraries' versions (those not installed left out)."""
    return {"python": platform.python_version(), **installed_versions(_LIBRARIES)}


def versions() -> dict[str, str]:
    """Python's, moepress's (the release and the digest of its code: moepress/codeid.py) and the libraries'
    versions, and torch's CPU thread count where torch is loaded: CPU sums, and so a calibrated output's last bits,
    depend on it (reproduce its bytes with the same OMP_NUM_THREADS)."""
    libs = library_versions()
    out = {"python": libs.pop("python"), "moepress": code_id(), **libs}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        out["torch_threads"] = str(torch.get_num_threads())
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of ``directory`` ({} when it has none); one that is not a JSON object (hand-edited,
    truncated) is refused in one line naming it."""
    p = Path(directory) / MANIFEST_NAME
    if not p.exists():
        return {}
    if not p.is_file():  # a FIFO would wait for a writer, a device be read whole
        raise MoepressError(f"{p}: not a regular file; expected a moepress manifest")
    try:
        m = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoepressError(f"{p}: not a moepress manifest (invalid JSON: {e})") from None
    except RecursionError:
        raise MoepressError(f"{p}: not a moepress manifest (nested too deeply to read)") from None
    if not isinstance(m, dict):
        raise MoepressError(f"{p}: not a moepress manifest (expected a JSON object, got {type(m).__name__})")
    return m


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    p = Path(directory) / MANIFEST_NAME
    replace_file(p, json.dumps(manifest, indent=2, default=str) + "\n")


def update_manifest(directory: str | os.PathLike, **sections) -> dict:
    """Merge top-level sections into an artifact's manifest (e.g. ``accuracy=...``)."""
    m = read_manifest(directory)
    m.update(sections)
    write_manifest(directory, m)
    return m


def resized(directory: str | os.PathLike) -> list[tuple[str, int | None, object]]:
    """The files the directory's manifest lists whose size on disk differs, as (name, size on disk or None where
    gone, listed size): a truncated copy or a rewritten file, told without reading their bytes."""
    d, out = Path(directory), []
    for f, v in (read_manifest(d).get("files") or {}).items():
        listed = v.get("size") if isinstance(v, dict) else None
        now = (d / f).stat().st_size if (d / f).is_file() else None
        if now != listed:
            out.append((f, now, listed))
    return out


def file_digests(directory: str | os.PathLike, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """sha256 and size of every file under directory (the manifest itself excluded)."""
    root = Path(directory)
    known = known or {}
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST_NAME:
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = known.get(rel) or {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out
