"""Reading a Hugging Face safetensors checkpoint lazily: headers up front, one tensor at a time.

One shard file (``model.safetensors``) or several through ``model.safetensors.index.json``.
Stored weights may be quantized (DeepSeek/Kimi block-FP8 with ``weight_scale_inv``, or the
formats moepress writes); :meth:`CheckpointReader.weight` returns them dequantized by the
format registry's decoders (:func:`moepress.compress.formats.decode`).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.compress import formats
from moepress.compress.checkpoint.auxiliary import aux_files, check_inside
from moepress.compress.checkpoint.buffers import POOL_MIN_BYTES, BufferPool
from moepress.compress.checkpoint.json_files import read_config_file, read_json_file
from moepress.compress.checkpoint.safetensors_io import _DIRECT_ALIGN, _DTYPES, INDEX_NAME, SINGLE_NAME, read_header
from moepress.compress.formats import ct_inputs, gptoss_mxfp4
from moepress.errors import MoepressError

DIRECT_MIN_BYTES = 4 << 20  # smaller tensors (norms, scales, tiny models) go through the page cache


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def declared_dtype(config: dict) -> str | None:
    """The dtype config.json declares for the model's weights: ``dtype`` (transformers 5 writes and reads it),
    else ``torch_dtype`` (older ones); None where it declares neither."""
    return config.get("dtype") or config.get("torch_dtype")


def _check_relative(index: Path, name, fname) -> None:
    """An index entry names a shard by a path relative to the model directory: not absolute,
    no '..' (transformers joins it to the directory; an absolute path would replace it)."""
    if not isinstance(fname, str) or not fname or "\0" in fname:
        raise MoepressError(f"{index}: weight_map entry '{name}': expected a shard file name, got {fname!r}")
    p = Path(fname)
    if p.is_absolute() or ".." in p.parts:
        raise MoepressError(f"{index}: weight_map entry '{name}' -> '{fname}': expected a file inside the model "
                            "directory (a relative path without '..')")


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _check_directory(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MoepressError(f"{path}: no such checkpoint directory") from None
    except PermissionError:
        raise MoepressError(f"{path}: checkpoint directory is not readable") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MoepressError(f"{path}: expected a checkpoint directory (with config.json), got a file")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MoepressError(f"{path}: checkpoint directory is not readable")


class CheckpointReader:
    """Lazy, read-only view of a Hugging Face checkpoint directory.

    Opening reads config.json and every shard header (a few KB each) and checks them
    against each other; tensor data is read only when asked for, one tensor at a time.
    A directory with only config.json is valid (``has_weights`` is False): inspect and
    planning work on configs alone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_directory(self.path)
        for p in self.path.glob("*.json"):  # what stages read and copy: its own files (aux_files refuses the rest)
            if p.is_symlink():
                check_inside(self.path, p, f"{p}: resolves to")
        aux_files(self.path)
        self.config: dict = read_config_file(self.path / "config.json")
        self._tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: this file system refuses O_DIRECT
        self._retired: list[int] = []  # O_DIRECT fds given up on: closed with the reader (a read may still use one)
        self._fd_lock = threading.Lock()  # reads come from several threads (read-ahead, a background writer)
        self._load_headers()
        # module names served by a decoder from packed tensors (P.weight from P.weight_packed, gpt-oss P
        # from P_blocks): `name in reader` and `info` answer for them, `get` reads only stored tensors
        self._aliases = {**ct_inputs.packed_aliases(self._tensors), **gptoss_mxfp4.packed_aliases(self._tensors)}
        self._check_packed_declared()
        self._by_layer: dict[int, list[str]] = defaultdict(list)
        self._top: list[str] = []  # of no decoder layer
        for name in self._tensors:
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if m:
                self._by_layer[int(m.group(1))].append(name)
            else:
                self._top.append(name)

    # ---- structure -------------------------------------------------------------------
    def _load_headers(self) -> None:
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.exists() and single.exists():
            # transformers 5.24 loads model.safetensors (modeling_utils.py: SAFE_WEIGHTS_NAME is looked for
            # before SAFE_WEIGHTS_INDEX_NAME), vLLM the index's shards: the consumers disagree on the weights
            raise MoepressError(f"{self.path}: holds both {SINGLE_NAME} and {INDEX_NAME} (transformers loads the "
                                f"first, vLLM the index's shards); expected one of them: remove the other")
        if index.exists():
            self._load_index(index)
        elif single.exists():
            check_inside(self.path, single, f"{single}: resolves to")
            header, base = read_header(single)
            for name, meta in header.items():
                if name != "__metadata__":
                    self._add(name, meta, single, base)
        else:
            others = sorted(self.path.glob("*.safetensors"))
            if others:
                raise MoepressError(f"{self.path}: found {others[0].name} but no {INDEX_NAME} or {SINGLE_NAME}")

    def _load_index(self, index: Path) -> None:
        data = read_json_file(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise MoepressError(f"{index}: expected a 'weight_map' object")
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                _check_relative(index, name, fname)  # raises
            by_file[fname].append(name)
        listed: dict[str, set[str]] = defaultdict(set)  # one shard however the index spells it ("./a", "a")
        for fname, names in by_file.items():
            listed[os.path.normpath(fname)].update(names)
        for fname, names in sorted(by_file.items()):
            _check_relative(index, names[0], fname)  # once per shard: an index names ~1M tensors in ~60 files
            shard = self.path / fname
            check_inside(self.path, shard, f"{index}: weight_map entry '{names[0]}' -> '{fname}' resolves to")
            if not shard.exists():
                raise MoepressError(f"{index}: shard '{fname}' (holding {len(names)} tensors, "
                                    f"e.g. {names[0]}) is missing")
            header, base = read_header(shard)
            for name in names:
                if name not in header:
                    raise MoepressError(f"{shard}: tensor '{name}' named in {INDEX_NAME} is not in this shard")
                self._add(name, header[name], shard, base)
            mine = listed[os.path.normpath(fname)]
            if len(header) - ("__metadata__" in header) != len(mine):
                # transformers 5.24 (modeling_utils.py: `for k in file_pointer.keys()`) and vLLM load every tensor
                # of a listed shard, a later shard's copy replacing an earlier one's: they would run weights
                # moepress never read
                extra = next(k for k in header if k != "__metadata__" and k not in mine)
                where = f"lists it in '{weight_map[extra]}'" if extra in weight_map else "does not list it"
                raise MoepressError(f"{shard}: holds tensor '{extra}' but {INDEX_NAME} {where} (transformers and "
                                    f"vLLM load every tensor of a shard); expected the index to list each shard's "
                                    f"tensors")

    def _check_packed_declared(self) -> None:
        """Refuse packed tensors config.json does not declare: the runtimes decode them by its
        quantization_config (compressed-tensors' pack-quantized formats, gpt-oss' mxfp4 blocks) and, without
        it, load each such module's weight as missing, randomly initialised, while moepress decodes them by
        their names: a check would pass what no runtime runs."""
        method = (self.config.get("quantization_config") or {}).get("quant_method")
        for packed, want in ((ct_inputs.packed_aliases(self._tensors), "compressed-tensors"),
                             (gptoss_mxfp4.packed_aliases(self._tensors), "mxfp4")):
            if packed and method != want:
                name = min(packed.values())
                raise MoepressError(f"{self.path / 'config.json'}: tensor '{name}' is stored packed, but "
                                    f"quantization_config declares quant_method {method!r}; expected {want!r}, as "
                                    "the runtimes decode it by (without it they load the weight as missing)")

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

    def top_names(self) -> list[str]:
        """The stored tensors of no decoder layer (embedding, final norm, head, anything else), in stored order."""
        return list(self._top)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._aliases

    def info(self, name: str) -> TensorInfo:
        """Where a stored tensor lies; for a module weight stored packed, its packed tensor's."""
        try:
            return self._tensors[name]
        except KeyError:
            if name in self._aliases:
                return self._tensors[self._aliases[name]]
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
            with self._fd_lock:
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
            with self._fd_lock:
                if file not in self._direct_fds:
                    try:
                        self._direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
                    except (OSError, AttributeError):  # tmpfs and some network file systems; not Linux
                        self._direct_fds[file] = None
        return self._direct_fds[file]

    def _get_direct(self, info: TensorInfo, pool: BufferPool | None = None) -> torch.Tensor | None:
        """Read a large tensor with O_DIRECT: the disk DMAs into our buffer (a ``pool`` lease, else
        a fresh one), no page-cache copy and far less CPU time than a read through the page cache
        (bench/throughput.py measures both). The read covers the enclosing 4 KiB-aligned range;
        the tensor is a view into it. None: not possible here."""
        fd = self._direct_fd(info.file)
        if fd is None:
            return None
        start = info.offset & ~(_DIRECT_ALIGN - 1)
        span = (info.offset + info.nbytes - start + _DIRECT_ALIGN - 1) & ~(_DIRECT_ALIGN - 1)
        if pool is not None:
            raw, pad = pool.lease(span), 0  # page-aligned
        else:
            raw = torch.empty(span + _DIRECT_ALIGN, dtype=torch.uint8, device="cpu")
            pad = -raw.data_ptr() % _DIRECT_ALIGN
        try:
            done = _pread(fd, memoryview(raw.numpy())[pad:pad + span], start)
        except OSError:  # EINVAL: the device wants another alignment; read through the cache
            with self._fd_lock:
                if self._direct_fds.get(info.file) == fd:
                    self._direct_fds[info.file] = None
                    self._retired.append(fd)  # another thread may be reading with it
            return None
        lo = pad + info.offset - start
        if done < info.offset - start + info.nbytes:
            raise MoepressError(f"{info.file}: truncated shard while reading tensor '{info.name}'")
        return raw[lo:lo + info.nbytes]

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """The stored tensor, as stored (no dequantization). A module weight that exists only packed
        (``P.weight`` of a compressed-tensors ``P.weight_packed``, gpt-oss ``P`` of ``P_blocks``) has no
        stored form of its own: it comes decoded (:meth:`_decoded`), so that stages reading "the stored
        weight" of a module see its values.

        Read with pread into a fresh buffer, or one of ``pool``'s (a stream's reads: no fresh
        pages per tensor), rather than through mmap: resident memory stays bounded by what the
        caller holds (mapped pages of a 1 TB checkpoint would count against RSS), and reads from
        several threads (read-ahead) are safe. Tensors of 4 MiB and more, and every pooled one, are
        read with O_DIRECT where the file system allows it.
        """
        if name in self._aliases and name not in self._tensors:
            return self._decoded(name)
        info = self.info(name)
        dtype = self.get_dtype(name)
        pool = pool if pool is not None and info.nbytes >= POOL_MIN_BYTES else None
        if info.nbytes >= DIRECT_MIN_BYTES or pool is not None:
            t = self._get_direct(info, pool)
            if t is not None and t.data_ptr() % dtype.itemsize == 0:
                return t.view(dtype).reshape(info.shape)
        # host memory whatever the default device (a stage may read inside torch.device(cuda))
        buf = torch.empty(info.nbytes, dtype=torch.uint8, device="cpu") if pool is None \
            else pool.lease(info.nbytes)[:info.nbytes]
        if info.nbytes and _pread(self._fd(info.file), memoryview(buf.numpy()), info.offset) < info.nbytes:
            raise MoepressError(f"{info.file}: truncated shard while reading tensor '{name}'")
        return buf.view(dtype).reshape(info.shape)

    def _decoded(self, name: str) -> torch.Tensor:
        """A module weight stored packed, decoded in the dtype its format decodes to (compressed-tensors
        INT4: the scales' dtype, bf16 in Kimi's checkpoints; FP4 and gpt-oss MXFP4: bf16)."""
        if self._aliases[name].endswith(ct_inputs.PACKED):
            return ct_inputs.decode_native(self, name[: -len(".weight")])
        return gptoss_mxfp4.decode(self, name, torch.bfloat16)

    def weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A weight in float ``dtype``, dequantized if it is stored quantized."""
        return decode_weight(self, name, dtype)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values(), *self._retired]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()
        self._retired.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# what a weight with no decoder may be stored as (anything else is bytes, not values)
FLOAT_WEIGHTS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def decode_weight(reader, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``name`` in float ``dtype`` through the format registry's decoders (``reader``: a CheckpointReader
    or a :class:`LayerView` over tensors already read)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name  # gpt-oss experts: no ".weight"
    out = formats.decode(reader, base, dtype)
    if out is not None:
        return out
    t = reader.get(name)
    if t.dtype not in FLOAT_WEIGHTS:  # e.g. int8 or FP8 bytes with no scale beside them: not values
        raise MoepressError(f"{name}: stored as {str(t.dtype).removeprefix('torch.')} with no quantization scales "
                            "beside it; expected bf16, fp16 or fp32, or a quantized format's tensors")
    return t.to(dtype)


class LayerView:
    """A reader over one layer's stored tensors read ahead of time (the stream's prefetch reads
    a layer's raw bytes — bf16, FP8 + scales — in a background thread; decoding to the compute
    dtype happens when the layer is built, so the read-ahead costs the stored size, not fp32)."""

    def __init__(self, reader: CheckpointReader, raw: dict[str, torch.Tensor]):
        self._reader, self._raw = reader, raw
        self.config, self.path = reader.config, reader.path

    def __contains__(self, name: str) -> bool:
        return name in self._raw or name in self._reader

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        t = self._raw.get(name)
        return t if t is not None else self._reader.get(name)

    def info(self, name: str) -> TensorInfo:
        return self._reader.info(name)

    def weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode_weight(self, name, dtype)

    def __getattr__(self, attr):  # e.g. formats' per-reader caches
        return getattr(self._reader, attr)
