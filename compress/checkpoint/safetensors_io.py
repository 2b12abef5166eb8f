"""The safetensors file format: dtype codes, and writing a file straight from tensor memory.

Format (huggingface/safetensors README): u64 little-endian header length, JSON header
{name: {dtype, shape, data_offsets}}, ``__metadata__``, padded with spaces to 8 bytes, then
the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_bytes

from moepress.errors import MoepressError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {v[0]: k for k, v in _DTYPES.items()}

_DIRECT_ALIGN = 4096
DIRECT_MIN_FILE_BYTES = 16 << 20  # smaller shards (tiny models, tests) go through the page cache


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write a safetensors file straight from the tensors' memory (no serialised copy of the
    shard in RAM, unlike ``safetensors.torch.save``), hashing while writing. Returns {"sha256", "size"}. The file
    is made new: a link at ``path`` (a resumed partial that came from elsewhere) is removed, not written through.
    """
    path.unlink(missing_ok=True)
    if any(t.dtype not in DTYPE_NAMES for t in tensors.values()):
        data = save_bytes(tensors, metadata=metadata)  # dtypes we have no code for: the library's way
        path.write_bytes(data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    order, hb, off = _layout(tensors, metadata)
    h = hashlib.sha256()
    size = 0
    direct = _DirectWriter.open(path, h) if 8 + len(hb) + off >= DIRECT_MIN_FILE_BYTES else None
    with direct if direct is not None else _HashingFile(path, h) as f:
        for chunk in (struct.pack("<Q", len(hb)), hb):
            f.write(chunk)
            size += len(chunk)
        for n in order:
            t = tensors[n].contiguous()
            if t.numel() == 0:
                continue
            mv = memoryview(t.view(-1).view(torch.uint8).numpy())
            f.write(mv)
            size += len(mv)
    return {"sha256": h.hexdigest(), "size": size}


HASH_BESIDE_MIN = 1 << 20  # bytes from which a write's SHA-256 runs in the hashing thread
_hasher: ThreadPoolExecutor | None = None
_hasher_lock = threading.Lock()


def _forget_hasher() -> None:
    """In a forked child: the parent's hashing thread does not exist there, so start a new one; and
    the locks, which a thread of the parent may have held at the fork, start unlocked."""
    global _hasher, _hasher_lock
    _hasher, _hasher_lock = None, threading.Lock()
    _DirectWriter._idle, _DirectWriter._lock = [], threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher)


def _hash_beside(h, data: memoryview, write) -> None:
    """``write(data)`` here while one more thread feeds ``data`` to ``h``: SHA-256 costs about as much
    CPU as the rest of writing a quantized shard, and both release the GIL, so with two cores the
    writer takes the longer of the two instead of their sum. Updates stay in write order (each one
    is waited for before the next write)."""
    global _hasher
    fut = None
    if len(data) >= HASH_BESIDE_MIN:
        with _hasher_lock:
            if _hasher is None:
                _hasher = ThreadPoolExecutor(1, thread_name_prefix="moepress-hash")
        try:
            fut = _hasher.submit(h.update, data)
        except RuntimeError:  # the interpreter is shutting down: no new threads; hash here
            pass
    if fut is None:
        write(data)
        h.update(data)
        return
    try:
        write(data)
    finally:
        fut.result()


class _HashingFile:
    """A buffered file that hashes what is written to it."""

    def __init__(self, path: Path, h):
        self.f, self.h = open(path, "wb"), h

    def write(self, data) -> None:
        _hash_beside(self.h, memoryview(data).cast("B"), self.f.write)

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A small file's bytes, its header in a fixed order: ``safetensors.torch.save`` writes ``__metadata__`` in
    its hash map's order, another in each process, so equal tensors would give files of different sha256s."""
    order, hb, _ = _layout(tensors, metadata)
    data = [t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in (tensors[n] for n in order)]
    return b"".join([struct.pack("<Q", len(hb)), hb, *data])


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[list[str], bytes, int]:
    """(tensor order, padded header bytes, data section size)."""
    # largest element size first, then by name, so every tensor is aligned (safetensors.torch orders
    # equal sizes by dtype first: the bytes need not equal its own)
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for n in order:
        t = tensors[n]
        nb = t.numel() * t.element_size()
        header[n] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return order, hb, off


class _DirectWriter:
    """A write-only file written with O_DIRECT through an aligned bounce buffer, hashing as it goes.

    Buffered writes of a big checkpoint go through the page cache and its write-back, which is
    slower than O_DIRECT for a file written once (compare ``dd conv=fdatasync`` with ``dd
    oflag=direct``) and costs a kernel copy of every byte. The bytes are copied into the bounce
    buffer by numpy (without the GIL, which the quantizing threads need) while the hashing thread
    reads them from the tensor (:func:`_hash_beside`). Bounce buffers are reused from file to file
    (a fresh one costs a page fault per 4 KiB). The last block is padded to the alignment and the
    file truncated to its true size on close. ``open`` returns None where O_DIRECT is refused.
    """

    CHUNK = 8 << 20
    _idle: list[mmap.mmap] = []  # bounce buffers of closed writers (at most one kept)
    _lock = threading.Lock()

    def __init__(self, fd: int, h):
        self.fd, self.h, self.size = fd, h, 0
        with self._lock:
            self.buf = self._idle.pop() if self._idle else None
        if self.buf is not None and len(self.buf) != self.CHUNK:  # kept under another CHUNK
            self.buf.close()
            self.buf = None
        if self.buf is None:
            # page-aligned, as O_DIRECT needs; private, so a forked child's copy is its own
            self.buf = mmap.mmap(-1, self.CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.buf)
        self.array = np.frombuffer(self.buf, dtype=np.uint8)
        self.fill = 0

    @classmethod
    def open(cls, path: Path, h) -> _DirectWriter | None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except (OSError, AttributeError):
            return None
        return cls(fd, h)

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            done += os.write(self.fd, self.view[done:nbytes])

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        _hash_beside(self.h, mv, self._copy_out)
        self.size += len(mv)

    def _copy_out(self, mv: memoryview) -> None:
        src = np.frombuffer(mv, dtype=np.uint8)
        i = 0
        while i < len(src):
            k = min(len(src) - i, self.CHUNK - self.fill)
            np.copyto(self.array[self.fill:self.fill + k], src[i:i + k])
            self.fill += k
            i += k
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)
                self.fill = 0

    def __enter__(self) -> _DirectWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.fill:
                padded = (self.fill + _DIRECT_ALIGN - 1) & ~(_DIRECT_ALIGN - 1)
                self.view[self.fill:padded] = bytes(padded - self.fill)
                self._flush(padded)
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.view.release()
            self.array = None  # numpy's export of the buffer, which would keep it from closing
            with self._lock:
                if not self._idle:
                    self._idle.append(self.buf)
                    self.buf = None
            if self.buf is not None:
                self.buf.close()


# ---- reading a header -------------------------------------------------------------------------
MAX_HEADER_BYTES = 100 * 1024 * 1024  # about the safetensors bound (safetensors/src/tensor.rs MAX_HEADER_SIZE)


def refuse_special(path: Path, expected: str) -> None:
    """One line for a FIFO, socket or character device where a file is read (a FIFO's read waits for a writer that
    never comes, a device's never ends); a missing or unreadable path is left to the read that reports it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        raise MoepressError(f"{path}: not a regular file; expected {expected}")


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header and check the file holds all the data it announces.

    Returns (header, offset of the data section). Errors describe what is wrong and never echo
    the file's bytes: the path may name any file (an index entry, a symlink), not a shard."""
    try:
        refuse_special(path, "a safetensors file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MoepressError(f"{path}: truncated safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise MoepressError(f"{path}: not a safetensors file (the header length field is not plausible; "
                                    f"file has {size} bytes)")
            if n > size - 8:
                raise MoepressError(f"{path}: truncated or corrupt safetensors file (the header runs past the "
                                    f"end of the file, {size} bytes)")
            header = json.loads(f.read(n))
    except PermissionError as e:
        raise MoepressError(f"{path}: cannot read shard ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MoepressError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict) or not all(_entry_ok(v) for k, v in header.items() if k != "__metadata__") \
            or not isinstance(header.get("__metadata__", {}), dict):
        raise MoepressError(f"{path}: not a safetensors file (header is not a JSON object of tensor entries "
                            "with dtype, shape and data_offsets)")
    end = _check_offsets(path, header)
    if 8 + n + end > size:
        raise MoepressError(f"{path}: truncated shard: header says {8 + n + end} bytes, file has {size}")
    if 8 + n + end < size:  # the safetensors library refuses it ("file not fully covered"): so do its consumers
        raise MoepressError(f"{path}: {size - 8 - n - end} bytes past the data its header lists ({8 + n + end} "
                            f"bytes); expected a safetensors file its library reads (no trailing bytes)")
    return header, 8 + n


def _check_offsets(path: Path, header: dict) -> int:
    """The data section's length; refused unless the tensors tile it from 0 without gaps or overlaps
    (safetensors/src/tensor.rs validate: "invalid offset"), so no tensor reads another's bytes."""
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise MoepressError(f"{path}: not a valid safetensors file (tensor '{name}' data_offsets start at "
                                f"{begin}; expected {at}: tensors overlap or leave a gap)")
        at = end
    return at


def _entry_ok(meta) -> bool:
    """A header entry as the safetensors format defines it: {dtype: str, shape: [int >= 0],
    data_offsets: [begin, end] with 0 <= begin <= end}; every number one torch holds (int64: a dimension of 2^64
    beside a 0 is an empty tensor no torch call takes)."""
    def ints(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63
                                           for x in v)

    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
        return False
    offsets = meta.get("data_offsets")
    return ints(meta.get("shape")) and ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]
