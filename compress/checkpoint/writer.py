"""Writing a sharded safetensors checkpoint atomically, through a ``.partial`` directory renamed into
place only when complete, so an interrupted run never leaves something that looks finished."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from moepress.compress.checkpoint.safetensors_io import INDEX_NAME, write_safetensors
from moepress.errors import MoepressError
from moepress.manifest import file_digests, versions, write_manifest

# Files that travel with a checkpoint whatever moepress does to its weights
# (tokenizer, chat template, generation defaults, remote code such as Kimi K2's).
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
    "generation_config.json", "vocab*", "merges.txt", "*.tiktoken", "tokenization_*.py",
    "configuration_*.py", "modeling_*.py", "preprocessor_config.json",
)


def aux_files(src: Path) -> list[Path]:
    """Tokenizer, chat template, generation config and remote-code files of a checkpoint."""
    out: set[Path] = set()
    for pat in AUX_FILE_PATTERNS:
        out.update(p for p in src.glob(pat) if p.is_file())
    return sorted(out)


class CheckpointWriter:
    """Writes a sharded safetensors checkpoint atomically.

    Tensors are buffered and written in shards of at most ``max_shard_bytes`` (a shard
    also ends where the caller calls :meth:`end_shard`, e.g. at a layer boundary).
    Everything goes to ``<out>.partial/``; :meth:`commit` names the shards
    ``model-0000i-of-0000N.safetensors``, writes the index and renames the directory to
    ``<out>``. Until then nothing named ``<out>`` exists (or the old one stays, with --force).
    """

    def __init__(self, out_dir: str | os.PathLike, *, force: bool = False,
                 max_shard_bytes: int = 2 * 1024**3, resume: bool = False, background: bool = False):
        self.out = Path(out_dir)
        self.partial = self.out.parent / (self.out.name + ".partial")
        self._prepare_dirs(force, resume)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (file, names, bytes)
        self._names: set[str] = set()
        self._digests: dict[str, dict] = {}  # shard file -> {sha256, size}, hashed while written
        # Stages fill this (stage, config, inputs ...); commit adds files and versions and
        # writes it as moepress-manifest.json.
        self.manifest: dict = {}
        if resume:
            j = self._read_journal()
            self._shards = [tuple(s) for s in j.get("shards", [])]  # type: ignore[misc]
            self._digests = j.get("digests", {})
            self._names = {n for _, names, _ in self._shards for n in names}
        self._next = len(self._shards)
        # background=True: a shard is written (and hashed) by a thread while the caller computes
        # the next one; at most one shard is in flight, so memory is two shards at most.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-write") if background else None
        self._pending: Future | None = None

    def _prepare_dirs(self, force: bool, resume: bool) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise MoepressError(f"{self.out}: output path exists and is not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not force:
            raise MoepressError(f"{self.out}: output directory is not empty (pass --force to replace it)")
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoepressError(f"{self.partial}: cannot create output directory ({e.strerror})") from None

    # ---- journal (which shards are complete) for resumable stages -----------------------
    def _journal_path(self) -> Path:
        return self.partial / "writer-journal.json"

    def _read_journal(self) -> dict:
        p = self._journal_path()
        return json.loads(p.read_text()) if p.exists() else {}

    def _write_journal(self) -> None:
        tmp = self._journal_path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"shards": self._shards, "digests": self._digests}))
        os.replace(tmp, self._journal_path())

    # ---- tensors -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names or name in self._buf:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        self._buf[name] = t
        self._buf_bytes += t.numel() * t.element_size()
        if self._buf_bytes >= self.max_shard_bytes:
            self.end_shard()

    def end_shard(self) -> None:
        """Write the buffered tensors as one shard (no-op if nothing is buffered)."""
        if not self._buf:
            return
        fname = f"shard-{self._next:05d}.safetensors"
        self._next += 1
        buf, nbytes = self._buf, self._buf_bytes
        self._names.update(buf)
        self._buf, self._buf_bytes = {}, 0
        if self._pool is None:
            self._write_shard(fname, buf, nbytes)
        else:
            self.wait()
            self._pending = self._pool.submit(self._write_shard, fname, buf, nbytes)

    def _write_shard(self, fname: str, buf: dict[str, torch.Tensor], nbytes: int) -> None:
        tmp = self.partial / (fname + ".tmp")
        self._digests[fname] = write_safetensors(tmp, buf, {"format": "pt"})
        os.replace(tmp, self.partial / fname)
        self._shards.append((fname, sorted(buf), nbytes))
        self._write_journal()  # the shard counts as done (for --resume) only from here

    def wait(self) -> None:
        """Block until the shard being written in the background (if any) is on disk."""
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    @property
    def written_names(self) -> set[str]:
        return self._names | set(self._buf)

    # ---- other files ---------------------------------------------------------------------
    def write_json(self, relname: str, obj) -> None:
        path = self.partial / relname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, relname: str, text: str) -> None:
        path = self.partial / relname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def copy_aux_files(self, src: str | os.PathLike) -> list[str]:
        copied = []
        for p in aux_files(Path(src)):
            shutil.copy2(p, self.partial / p.name)
            copied.append(p.name)
        return copied

    # ---- finish --------------------------------------------------------------------------
    def commit(self) -> Path:
        self.end_shard()
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
        known = self._name_shards()
        self._journal_path().unlink(missing_ok=True)
        write_manifest(self.partial, {**self.manifest, "versions": versions(),
                                      "files": file_digests(self.partial, known)})
        old = None
        if self.out.exists():
            old = self.out.parent / (self.out.name + f".old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def _name_shards(self) -> dict[str, dict]:
        """Rename the shards to their final names and write the index; the digests known by final name."""
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        total = 0
        known = {}
        for i, (fname, names, nbytes) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.partial / fname, self.partial / final)
            weight_map.update({name: final for name in names})
            total += nbytes
            if fname in self._digests:
                known[final] = self._digests[fname]
        if n:
            self.write_json(INDEX_NAME, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))})
        return known

    def abort(self) -> None:
        if self._pool is not None:
            try:
                self.wait()
            except Exception:  # already failing: the first error is the one reported
                pass
            self._pool.shutdown()
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
