"""Writing a sharded safetensors checkpoint atomically, through a ``.partial`` directory renamed into
place only when complete, so an interrupted run never leaves something that looks finished.

The writer also guards its output: it may not equal, sit inside or contain one of ``sources`` (the
stage's inputs); one process at a time writes ``OUT.partial`` (an flock on ``OUT.partial.lock``); a
resumed partial must carry the same resume key (compress/checkpoint/resume.py); an OS error while
writing names the file it was writing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from moepress.atomic import replace_file
from moepress.compress.checkpoint.auxiliary import aux_files
from moepress.compress.checkpoint.resume import JOURNAL, first_changed_shard, normalized, resumable_journal
from moepress.compress.checkpoint.safetensors_io import DTYPE_NAMES, INDEX_NAME, write_safetensors
from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, file_digests, versions, write_manifest
from moepress.outputs import OutputLock, clear_retired, install, output_dir, refuse_existing, refuse_overlap


class Deferred:
    """A tensor the writer reads only when it writes its shard: ``load()`` returns it (``dtype`` and
    ``shape`` are known before, so the shard's header is). A stage copying stored tensors (a pruned
    layer's kept experts, the embeddings) hands these to :meth:`CheckpointWriter.add`, so that the
    shard holds one such tensor in memory at a time instead of all of them until it is written.

    It offers what :func:`write_safetensors` asks of a value: ``dtype``, ``shape``, ``numel()``,
    ``element_size()`` for the header, and ``contiguous()``, which reads it, for the data.
    """

    def __init__(self, dtype: torch.dtype, shape: Iterable[int], load):
        self.dtype, self.shape, self._load = dtype, torch.Size(shape), load

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def contiguous(self) -> torch.Tensor:
        t = self._load().detach().to("cpu").contiguous()
        if t.dtype != self.dtype or t.shape != self.shape:
            raise MoepressError(f"deferred tensor: read {t.dtype} {list(t.shape)}, expected {self.dtype} "
                                f"{list(self.shape)}")
        return t


def read_later(reader, name: str) -> Deferred:
    """The stored tensor ``name`` of ``reader`` (a CheckpointReader), read when the writer writes its
    shard (a background writer: in its thread, beside the caller's work). A read error names the
    input, not the shard being written."""
    def load() -> torch.Tensor:
        try:
            return reader.get(name)
        except OSError as e:
            raise MoepressError(f"{reader.path}: cannot read tensor '{name}' ({e.strerror or e})") from None
    return Deferred(reader.get_dtype(name), reader.info(name).shape, load)




@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError without a file name (``os.write``'s ENOSPC, a full disk on close) names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def check_output(out: str | os.PathLike, *, force: bool = False, resume: bool = False, resume_key: dict | None = None,
                 sources: Iterable[str | os.PathLike] = (), finished: str | None = None, say=None) -> None:
    """What :class:`CheckpointWriter` refuses before it touches anything, without taking the lock:
    a stage calls it before its calibration, so that a bad ``-o`` is refused in a second. ``finished``: the file a
    killed run of the stage leaves in its partial beside finished work, which the writer clears unless resumed:
    said through ``say``, since clearing it discards work."""
    sources = tuple(sources)
    out = output_dir(out, sources)
    if not out.name:
        raise MoepressError(f"{out}: expected an output directory, not the file system root")
    partial = out.with_name(out.name + ".partial")
    refuse_overlap(partial, sources)
    busy(out, partial).refuse_if_held()
    refuse_existing(out, force)  # every rank says so alike, before its calibration
    if resume:
        resumable_journal(partial, normalized(resume_key))
    elif say is not None and finished is not None and (partial / finished).is_file():
        say(f"note: {partial} holds the finished layers of an earlier run, discarded now; --resume keeps them "
            "(with the same options)")


def busy(out: Path, partial: Path) -> OutputLock:
    """The lock a writer of ``out`` holds on its partial, with the refusal another process gets."""
    return OutputLock(partial.with_name(partial.name + ".lock"),
                      f"{out}: another moepress process is writing it ({partial} is locked)")


class CheckpointWriter:
    """Writes a sharded safetensors checkpoint atomically.

    Tensors are buffered and a shard is cut once it holds ``max_shard_bytes`` (so it may exceed that by one tensor;
    a shard also ends where the caller calls :meth:`end_shard`, e.g. at a layer boundary). The journal records where
    the caller's boundaries fall: a resume drops the trailing shards written after the last one (part of a layer
    bigger than ``max_shard_bytes``), so the stage writes that layer again from its start, into the same shards an
    uninterrupted run writes.
    Everything goes to ``<out>.partial/``; :meth:`commit` names the shards
    ``model-0000i-of-0000N.safetensors``, writes the index and renames the directory to
    ``<out>``. Until then nothing named ``<out>`` exists (or the old one stays, with --force).

    ``sources``: the stage's inputs, which ``<out>`` may not equal, contain or sit inside.
    ``resume_key``: recorded in the journal when the partial is created; ``resume=True`` continues
    a partial only when its recorded key equals this one (else :class:`ResumeRefused`, the
    partial untouched). From before the partial is created or cleared until commit or abort, an
    exclusive lock on ``<out>.partial.lock`` keeps a second writer out. :meth:`abort` removes the
    partial, except a resumed one holding shards of an earlier run (that work is kept for the next
    ``--resume``).

    ``transient``: files the stage keeps in the partial for a resume (e.g. quantize's totals), removed
    with the journal at :meth:`commit`, so that a kill at any moment before leaves them beside the shards.
    """

    def __init__(self, out_dir: str | os.PathLike, *, force: bool = False,
                 max_shard_bytes: int = 2 * 1024**3, resume: bool = False, background: bool = False,
                 resume_key: dict | None = None, sources: Iterable[str | os.PathLike] = (),
                 transient: Iterable[str] = ()):
        check_output(out_dir, force=force, sources=sources)
        self.out = output_dir(out_dir)  # `-o .`: OUT.partial beside the directory, not inside it
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.resume_key = normalized(resume_key)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor | Deferred] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (file, names, bytes)
        self._names: set[str] = set()
        self._ends: list[int] = []  # shard counts at the caller's end_shard() calls (layer boundaries)
        self._unit_ends: list[int] = []  # the boundaries of units (layers) this run finished: end_shard(unit=True)
        self._units_journaled = False  # one of them in the journal, its shards written: a resume keeps it
        self.transient = tuple(transient)
        self._digests: dict[str, dict] = {}  # shard file -> {sha256, size}, hashed while written
        self.changed: str | None = None  # a resumed shard missing or changed since written (from it on: rewritten)
        # Stages fill this (stage, config, inputs ...); commit adds files and versions and
        # writes it as moepress-manifest.json.
        self.manifest: dict = {}
        self._lock = busy(self.out, self.partial)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._take_partial(resume)
        self._next = len(self._shards)
        self._inherited = len(self._shards)  # shards of an earlier run: abort() keeps the partial
        # background=True: a shard is written (and hashed) by a thread while the caller computes
        # the next one; at most one shard is in flight, so memory is two shards at most.
        if background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-write")

    def _take_partial(self, resume: bool) -> None:
        """Lock, then check the journal (resume) before touching anything, then clear or keep the
        partial and record the key; the lock is dropped again if any of it fails."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoepressError(f"{self.out.parent}: cannot create output directory ({e.strerror})") from None
        self._lock.acquire()
        try:
            clear_retired(self.out)  # an old OUT a killed install had moved aside
            j = resumable_journal(self.partial, self.resume_key) if resume else {}
            self._shards = [tuple(s) for s in j.get("shards", [])]  # type: ignore[misc]
            self._digests = j.get("digests", {})
            ends = j["ends"] if "ends" in j else [len(self._shards)]
            # a boundary past the journaled shards is one whose shard was still being written; one past a shard
            # missing or changed since (not the killed run's bytes) is written again
            bad = first_changed_shard(self.partial, self._shards[:max(map(int, ends), default=0)], self._digests)
            last = len(self._shards) if bad is None else bad
            self.changed = None if bad is None else self._shards[bad][0]  # said by the stage
            self._ends = [int(n) for n in ends if int(n) <= last]
            self._drop_unfinished()
            self._names = {n for _, names, _ in self._shards for n in names}
            if self.partial.exists() and (not resume or j.get("committing")):
                shutil.rmtree(self.partial)
            try:
                self.partial.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MoepressError(f"{self.partial}: cannot create output directory ({e.strerror})") from None
            self._write_journal()
        except BaseException:
            self._lock.release()
            raise

    # ---- journal (which shards are complete, where the caller's boundaries are, the resume key) --
    def _journal_path(self) -> Path:
        return self.partial / JOURNAL

    def _write_journal(self, committing: bool = False) -> None:
        """Replace the journal atomically (by the writing thread; ``_ends`` may name shards still queued).
        ``committing``: the shards are being renamed to their final names, none is resumable any more."""
        state = {"committing": True} if committing else \
            {"shards": self._shards, "ends": list(self._ends), "digests": self._digests}
        with naming(self._journal_path()):
            replace_file(self._journal_path(), json.dumps({"key": self.resume_key, **state}))
        if not committing:
            self._units_journaled = any(e <= len(state["shards"]) for e in self._unit_ends)

    def _drop_unfinished(self) -> None:
        """A resumed journal's shards after its last caller boundary (a layer cut off between two of its
        shards) are removed: the stage writes that layer again whole, as one uninterrupted run does. A
        journal without boundaries (an older moepress) counts every shard as one."""
        keep = max(self._ends, default=0)
        for fname, _, _ in self._shards[keep:]:
            (self.partial / fname).unlink(missing_ok=True)
            self._digests.pop(fname, None)
        self._shards = self._shards[:keep]

    # ---- tensors -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor | Deferred) -> None:
        """Buffer ``tensor`` for the current shard (a :class:`Deferred` one is read when the shard is written)."""
        if name in self._names or name in self._buf:
            raise ValueError(f"tensor {name} written twice")
        t = tensor if isinstance(tensor, Deferred) else tensor.detach().to("cpu").contiguous()
        self._buf[name] = t
        self._buf_bytes += t.numel() * t.element_size()
        if self._buf_bytes >= self.max_shard_bytes:
            self._cut()  # not a boundary of the caller's: a resume does not keep a layer cut here

    def end_shard(self, unit: bool = True) -> None:
        """Write the buffered tensors as one shard (no-op if nothing is buffered) and record a boundary:
        the shards up to here hold whole units of the caller's (layers), which a resume keeps. ``unit`` False: what
        comes before the units (quantize's embedding), which a resume keeps too, but which alone is no finished work
        an interrupt keeps the partial for."""
        n = self._next + bool(self._buf)  # the shards queued once this one is
        if unit:
            self._unit_ends.append(n)
        if self._ends and self._ends[-1] == n:
            return
        self._ends.append(n)  # before the shard's journal entry is written (maybe by the thread)
        if self._buf:
            self._cut()
        else:  # the last shard was cut by add(): it is journaled already, without this boundary
            self.wait()
            self._write_journal()

    def _cut(self) -> None:
        """Write the buffered tensors as one shard (in the background thread, if there is one)."""
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
        if any(t.dtype not in DTYPE_NAMES for t in buf.values()):  # the library writes it: all in memory
            buf = {n: t.contiguous() for n, t in buf.items()}
        with naming(tmp):
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
        self.write_text(relname, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, relname: str, text: str) -> None:
        path = self.partial / relname
        with naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, text)  # made anew: a resumed partial may hold a link at the name

    def copy_aux_files(self, src: str | os.PathLike) -> list[str]:
        copied = []
        for p in aux_files(Path(src)):
            with naming(self.partial / p.name):
                (self.partial / p.name).unlink(missing_ok=True)  # a link there is replaced, not written through
                shutil.copy2(p, self.partial / p.name)
            copied.append(p.name)
        return copied

    # ---- finish --------------------------------------------------------------------------
    def commit(self) -> Path:
        self.end_shard()
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
        # the journal says "committing" first: a kill while the shards are renamed leaves a partial that
        # no resume takes and the next run clears; from the manifest on, the manifest says it
        self._write_journal(committing=True)
        for rel in self.transient:
            (self.partial / rel).unlink(missing_ok=True)
        known = self._name_shards()
        files = {f: d for f, d in file_digests(self.partial, known).items() if f != JOURNAL}  # removed next
        with naming(self.partial / MANIFEST_NAME):
            write_manifest(self.partial, {**self.manifest, "versions": versions(), "files": files})
        self._journal_path().unlink(missing_ok=True)
        install(self.partial, self.out)
        self._lock.release()
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

    def abort(self, keep: bool = False) -> None:
        """Give up after an error: remove the partial, unless it was resumed with an earlier run's shards
        (finished work this process did not create; its journal still says which shards are whole) or
        ``keep`` (the error says the finished shards are worth a ``--resume``: errors.PeerLost)."""
        if self._pool is not None:
            try:
                self.wait()
            except Exception:  # already failing: the first error is the one reported
                pass
            self._pool.shutdown()
        if self._inherited or keep:
            for p in self.partial.glob("*.tmp"):  # a shard or journal cut off mid-write
                p.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:  # e.g. a full disk while writing the index or the manifest
                self.abort()
                raise
        elif isinstance(exc, KeyboardInterrupt) and self.resume_key is not None and self.partial.is_dir() \
                and (self._units_journaled or self._inherited):  # a layer a resume keeps, here or resumed
            self.abort(keep=True)  # Ctrl-C / SIGTERM: the finished layers stay, as a kill leaves them
            exc.kept = self.partial
        elif getattr(exc, "keep_partial", False) and self.partial.is_dir():
            self.abort(keep=True)
            exc.args = (f"{exc}; the finished layers are kept in {self.partial}: rerun with --resume",)
        else:
            self.abort()

