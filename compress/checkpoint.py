"""The checkpoint layer: the only code in moepress that opens model files.

Reads Hugging Face safetensors checkpoints lazily (one shard file or several
through ``model.safetensors.index.json``) and writes sharded checkpoints through
a ``.partial`` directory that is renamed into place only when complete, so an
interrupted run never leaves something that looks finished.

Stored weights may be quantized (DeepSeek/Kimi block-FP8 with ``weight_scale_inv``,
or the formats moepress writes); :meth:`CheckpointReader.weight` returns them
dequantized by the format registry's decoders (:func:`moepress.compress.formats.decode`),
one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from moepress.compress import formats
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

# Files that travel with a checkpoint whatever moepress does to its weights
# (tokenizer, chat template, generation defaults, remote code such as Kimi K2's).
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
    "generation_config.json", "vocab*", "merges.txt", "*.tiktoken", "tokenization_*.py",
    "configuration_*.py", "modeling_*.py", "preprocessor_config.json",
)


_DIRECT_ALIGN = 4096
DIRECT_MIN_BYTES = 4 << 20  # smaller tensors (norms, scales, tiny models) go through the page cache


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header and check the file holds all the data it announces.

    Returns (header, offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MoepressError(f"{path}: truncated safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 1024 * 1024:
                raise MoepressError(f"{path}: truncated or corrupt safetensors file "
                                    f"(header of {n} bytes announced, file has {size} bytes)")
            header = json.loads(f.read(n))
    except PermissionError as e:
        raise MoepressError(f"{path}: cannot read shard ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoepressError(f"{path}: corrupt safetensors header (not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MoepressError(f"{path}: truncated shard: header says {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoepressError(f"{path}: file not found") from None
    except PermissionError as e:
        raise MoepressError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoepressError(f"{path}: not valid JSON ({e})") from None


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class CheckpointReader:
    """Lazy, read-only view of a Hugging Face checkpoint directory.

    Opening reads config.json and every shard header (a few KB each) and checks them
    against each other; tensor data is read only when asked for, one tensor at a time.
    A directory with only config.json is valid (``has_weights`` is False): inspect and
    planning work on configs alone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise MoepressError(f"{self.path}: no such checkpoint directory") from None
        except PermissionError:
            raise MoepressError(f"{self.path}: checkpoint directory is not readable") from None
        if not stat.S_ISDIR(st.st_mode):
            raise MoepressError(f"{self.path}: expected a checkpoint directory (with config.json), got a file")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise MoepressError(f"{self.path}: checkpoint directory is not readable")
        self.config: dict = _json(self.path / "config.json")
        if not isinstance(self.config, dict):
            raise MoepressError(f"{self.path / 'config.json'}: expected a JSON object")
        self._tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: this file system refuses O_DIRECT
        self._load_headers()
        self._by_layer: dict[int, list[str]] = defaultdict(list)
        for name in self._tensors:
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if m:
                self._by_layer[int(m.group(1))].append(name)

    # ---- structure -------------------------------------------------------------------
    def _load_headers(self) -> None:
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.exists():
            weight_map = _json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise MoepressError(f"{index}: expected a 'weight_map' object")
            by_file: dict[str, list[str]] = defaultdict(list)
            for name, fname in weight_map.items():
                by_file[fname].append(name)
            for fname, names in sorted(by_file.items()):
                shard = self.path / fname
                if not shard.exists():
                    raise MoepressError(f"{index}: shard '{fname}' (holding {len(names)} tensors, "
                                        f"e.g. {names[0]}) is missing")
                header, base = _read_header(shard)
                for name in names:
                    if name not in header:
                        raise MoepressError(f"{shard}: tensor '{name}' named in {INDEX_NAME} is not in this shard")
                    self._add(name, header[name], shard, base)
        elif single.exists():
            header, base = _read_header(single)
            for name, meta in header.items():
                if name != "__metadata__":
                    self._add(name, meta, single, base)
        else:
            others = sorted(self.path.glob("*.safetensors"))
            if others:
                raise MoepressError(f"{self.path}: found {others[0].name} but no {INDEX_NAME} or {SINGLE_NAME}")

    def _add(self, name: str, meta: dict, file: Path, base: int) -> None:
        code = meta.get("dtype")
        if code not in _DTYPES:
            raise MoepressError(f"{file}: tensor '{name}' has unsupported dtype {code}")
        shape = tuple(int(s) for s in meta["shape"])
        begin, end = meta["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _DTYPES[code][1]:
            raise MoepressError(f"{file}: tensor '{name}' holds {end - begin} bytes, "
                                f"expected {numel * _DTYPES[code][1]} for {code} {list(shape)}")
        self._tensors[name] = TensorInfo(name, code, shape, file, base + begin, end - begin)

    @property
    def has_weights(self) -> bool:
        return bool(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def layer_names(self, layer: int) -> list[str]:
        return list(self._by_layer.get(layer, ()))

    def layer_indices(self) -> list[int]:
        return sorted(self._by_layer)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise MoepressError(f"{self.path}: tensor '{name}' not found in checkpoint") from None

    def get_dtype(self, name: str) -> torch.dtype:
        """The torch dtype ``name`` is stored in."""
        return _DTYPES[self.info(name).dtype][0]

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self._tensors.values():
            out[t.dtype] += t.nbytes
        return dict(out)

    def files(self) -> list[Path]:
        return sorted({t.file for t in self._tensors.values()})

    # ---- data ------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise MoepressError(f"{file}: cannot open shard ({e.strerror})") from None
            self._fds[file] = fd
        return fd

    def _direct_fd(self, file: Path) -> int | None:
        if file not in self._direct_fds:
            try:
                self._direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):  # tmpfs and some network file systems; not Linux
                self._direct_fds[file] = None
        return self._direct_fds[file]

    def _get_direct(self, info: TensorInfo) -> torch.Tensor | None:
        """Read a large tensor with O_DIRECT: the disk DMAs into our buffer, no page-cache copy
        (bench/throughput.py: 29 GB in 18.7 s and 4.5 s of CPU, against 27.5 s and ~20 s of
        CPU through the page cache on the 2-core machine). The read covers the enclosing
        4 KiB-aligned range; the tensor is a view into it. None: not possible here."""
        fd = self._direct_fd(info.file)
        if fd is None:
            return None
        start = info.offset & ~(_DIRECT_ALIGN - 1)
        span = (info.offset + info.nbytes - start + _DIRECT_ALIGN - 1) & ~(_DIRECT_ALIGN - 1)
        raw = torch.empty(span + _DIRECT_ALIGN, dtype=torch.uint8)
        pad = -raw.data_ptr() % _DIRECT_ALIGN
        try:
            done = _pread(fd, memoryview(raw.numpy())[pad:pad + span], start)
        except OSError:  # EINVAL: the device wants another alignment; read through the cache
            self._direct_fds[info.file] = None
            os.close(fd)
            return None
        lo = pad + info.offset - start
        if done < info.offset - start + info.nbytes:
            raise MoepressError(f"{info.file}: truncated shard while reading tensor '{info.name}'")
        return raw[lo:lo + info.nbytes]

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor, as stored (no dequantization).

        Read with pread into a fresh buffer rather than through mmap: resident memory
        stays bounded by what the caller holds (mapped pages of a 1 TB checkpoint would
        count against RSS), and reads from several threads (prefetch) are safe. Tensors of
        4 MiB and more are read with O_DIRECT where the file system allows it.
        """
        info = self.info(name)
        dtype = self.get_dtype(name)
        if info.nbytes >= DIRECT_MIN_BYTES:
            t = self._get_direct(info)
            if t is not None and t.data_ptr() % dtype.itemsize == 0:
                return t.view(dtype).reshape(info.shape)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes and _pread(self._fd(info.file), memoryview(buf.numpy()), info.offset) < info.nbytes:
            raise MoepressError(f"{info.file}: truncated shard while reading tensor '{name}'")
        return buf.view(dtype).reshape(info.shape)

    def weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A weight in float ``dtype``, dequantized if it is stored quantized."""
        return decode_weight(self, name, dtype)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def decode_weight(reader, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``name`` in float ``dtype`` through the format registry's decoders (``reader``: a CheckpointReader
    or a :class:`LayerView` over tensors already read)."""
    if name.endswith(".weight"):
        out = formats.decode(reader, name[: -len(".weight")], dtype)
        if out is not None:
            return out
    return reader.get(name).to(dtype)


class LayerView:
    """A reader over one layer's stored tensors read ahead of time (the stream's prefetch reads
    a layer's raw bytes — bf16, FP8 + scales — in a background thread; decoding to the compute
    dtype happens when the layer is built, so the read-ahead costs the stored size, not fp32)."""

    def __init__(self, reader: CheckpointReader, raw: dict[str, torch.Tensor]):
        self._reader, self._raw = reader, raw
        self.config, self.path = reader.config, reader.path

    def __contains__(self, name: str) -> bool:
        return name in self._raw or name in self._reader

    def get(self, name: str) -> torch.Tensor:
        t = self._raw.get(name)
        return t if t is not None else self._reader.get(name)

    def info(self, name: str) -> TensorInfo:
        return self._reader.info(name)

    def weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode_weight(self, name, dtype)

    def __getattr__(self, attr):  # e.g. formats' per-reader caches
        return getattr(self._reader, attr)


def aux_files(src: Path) -> list[Path]:
    """Tokenizer, chat template, generation config and remote-code files of a checkpoint."""
    out: set[Path] = set()
    for pat in AUX_FILE_PATTERNS:
        out.update(p for p in src.glob(pat) if p.is_file())
    return sorted(out)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write a safetensors file straight from the tensors' memory (no serialised copy of the
    shard in RAM, unlike ``safetensors.torch.save``), hashing while writing.

    Format (huggingface/safetensors README): u64 little-endian header length, JSON header
    {name: {dtype, shape, data_offsets}}, ``__metadata__``, padded with spaces to 8 bytes, then
    the tensors' bytes back to back in header order. Returns {"sha256", "size"}.
    """
    if any(t.dtype not in DTYPE_NAMES for t in tensors.values()):
        data = save_bytes(tensors, metadata=metadata)  # dtypes we have no code for: the library's way
        path.write_bytes(data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # largest alignment first, then by name (what safetensors.torch does), so every tensor is aligned
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
    h = hashlib.sha256()
    size = 0
    direct = _DirectWriter.open(path) if 8 + len(hb) + off >= DIRECT_MIN_FILE_BYTES else None
    with direct if direct is not None else open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hb)), hb):
            f.write(chunk)
            h.update(chunk)
            size += len(chunk)
        for n in order:
            t = tensors[n].contiguous()
            if t.numel() == 0:
                continue
            mv = memoryview(t.view(-1).view(torch.uint8).numpy())
            f.write(mv)
            h.update(mv)
            size += len(mv)
    return {"sha256": h.hexdigest(), "size": size}


DIRECT_MIN_FILE_BYTES = 64 << 20  # smaller shards (tiny models, tests) go through the page cache


class _DirectWriter:
    """A write-only file written with O_DIRECT through an aligned bounce buffer.

    Buffered writes of a big checkpoint go through the page cache and its write-back, which on
    the 2-core machine wrote 15 GB in 39 s (dd conv=fdatasync) against 12 s with O_DIRECT, and
    costs a kernel copy of every byte. The last block is padded to the alignment and the file
    truncated to its true size on close. ``open`` returns None where O_DIRECT is refused.
    """

    CHUNK = 32 << 20

    def __init__(self, fd: int):
        import mmap

        self.fd, self.size = fd, 0
        self.buf = mmap.mmap(-1, self.CHUNK)  # page-aligned, as O_DIRECT needs
        self.view = memoryview(self.buf)
        self.fill = 0

    @classmethod
    def open(cls, path: Path) -> _DirectWriter | None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            done += os.write(self.fd, self.view[done:nbytes])

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        i = 0
        while i < len(mv):
            k = min(len(mv) - i, self.CHUNK - self.fill)
            self.view[self.fill:self.fill + k] = mv[i:i + k]
            self.fill += k
            i += k
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)
                self.fill = 0
        self.size += len(mv)

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
            self.buf.close()


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
        if self.out.exists() and not self.out.is_dir():
            raise MoepressError(f"{self.out}: output path exists and is not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not force:
            raise MoepressError(f"{self.out}: output directory is not empty (pass --force to replace it)")
        self.partial = self.out.parent / (self.out.name + ".partial")
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoepressError(f"{self.partial}: cannot create output directory ({e.strerror})") from None
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
        self._journal_path().unlink(missing_ok=True)
        from moepress.manifest import file_digests, versions, write_manifest

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

