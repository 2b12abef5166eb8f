"""Calibration-free formats: each layer quantized tensor by tensor as its stored tensors arrive, with
no layer module and no activations.

One read-ahead runs over every remaining layer's stored tensors in plan order (the groups' weights
first, then the rest), so the read of layer i+1 overlaps the quantization and the write of layer i;
the groups are decoded and quantized by a pool of single-threaded workers, one per core (one
torch op stream each, which beats one stream of multi-threaded ops), or on the stream's GPU,
merged in group order so the output does not depend on the pool or the device.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from moepress.compress.checkpoint import CheckpointReader, LayerView
from moepress.compress.formats import Format
from moepress.compress.quantize.config import FORMATS, QuantConfig
from moepress.compress.quantize.group import LayerResult, quantize_group
from moepress.compress.quantize.stats import by_format, shared_input_groups
from moepress.compress.stream import StreamedModel, check_shape, read_ahead
from moepress.device import Uploader

WEIGHT_TENSORS = (".weight", ".weight_scale_inv")  # a linear's stored weight and its block-FP8 input scale

Plan = tuple[list[tuple[str, list[str]]], list[str]]


def linear_names(sm: StreamedModel, i: int, cache: dict[tuple, list[str]] | None = None) -> list[str]:
    """Layer i's linears in module order, from a layer built on the meta device (once per
    :meth:`Adapter.layer_shape_key` with ``cache``: building one costs more than quantizing a
    small layer's tensors)."""
    key = sm.adapter.layer_shape_key(i)
    if cache is None or key not in cache:
        with torch.device("meta"):
            meta = sm.adapter.build_layer(i)
        names = [n for n, m in meta.named_modules() if isinstance(m, nn.Linear)]
        if cache is None:
            return names
        cache[key] = names
    return cache[key]


def model_linear_names(sm: StreamedModel) -> list[tuple[str, str]]:
    """Every linear of the model as (name in its layer, full name), layer by layer (what --rule patterns match)."""
    a, cache = sm.adapter, {}
    return [(rel, a.layer_prefix(i) + rel) for i in range(a.num_layers) for rel in linear_names(sm, i, cache)]


def formatted_linears(sm: StreamedModel, format_of: Callable[[str, str], str | None],
                      group_size: int) -> Iterator[tuple[int, str, Format, int, int, str | None]]:
    """(layer, linear's name in it, its format, out and in features, why the format skips that shape or None) for
    every linear ``format_of(name in its layer, full name)`` gives a format, layer by layer."""
    a, cache = sm.adapter, {}
    for i in range(a.num_layers):
        prefix, shapes = a.layer_prefix(i), None
        for rel in linear_names(sm, i, cache):
            if (name := format_of(rel, prefix + rel)) is None:
                continue
            f = FORMATS[name]
            shapes = shapes or sm.expected_layer_shapes(i)
            out_f, in_f = shapes[rel + ".weight"][:2]
            yield i, rel, f, out_f, in_f, None if f.skip is None else f.skip(out_f, in_f, group_size)


def _int4_layout(f: Format, cfg: QuantConfig) -> dict:
    """An INT4 format's stored size arguments: the group asked, and no AWQ scale where --awq-fold folds it."""
    if f.element != "int4":
        return {}
    return {"group": cfg.group_size, **({"awq_scale": False} if cfg.awq_fold else {})}


def quantized_bytes(sm: StreamedModel, cfg: QuantConfig) -> int:
    """A lower bound of the bytes of the quantized checkpoint's tensors (its output's free-space check): every
    linear given a format that holds its shape at that format's stored size, every other stored tensor of the
    model's layers and of none at its stored size (a linear left unquantized is written as stored, or
    dequantized: larger)."""
    a, r = sm.adapter, sm.ckpt
    total = sum(r.info(n).nbytes for n in r.top_names())
    quantized: dict[int, set[str]] = {}
    for i, rel, f, out_f, in_f, skipped in formatted_linears(sm, cfg.format_of, cfg.group_size):
        if skipped is None and f.stored_bytes is not None:
            total += int(f.stored_bytes(out_f, in_f, **_int4_layout(f, cfg)))
            quantized.setdefault(i, set()).add(rel)
    for i in range(a.num_layers):
        prefix, held = a.layer_prefix(i), quantized.get(i, set())
        total += sum(r.info(n).nbytes for n in r.layer_names(i) if n[len(prefix):].rpartition(".")[0] not in held)
    return total


def free_plan(sm: StreamedModel, i: int, cfg: QuantConfig, cache: dict[tuple, list[str]] | None = None) -> Plan:
    """Calibration-free layer i: the groups to quantize [(format, linear names)] and every stored
    tensor of the layer in the order :func:`quantize_tensors` consumes them (the groups' weights,
    with their block-FP8 scales, then the rest). ``cache``: see :func:`linear_names`."""
    prefix = sm.adapter.layer_prefix(i)
    sm.check_layer_shapes(i)  # header shapes: this path quantizes stored tensors without building the layer
    names = linear_names(sm, i, cache)
    fmt_of = {n: cfg.format_of(n, prefix + n) for n in names}
    groups: list[tuple[str, list[str]]] = []
    for grp in shared_input_groups([n for n in names if fmt_of[n] is not None]):
        groups += list(by_format(grp, fmt_of).items())
    order = []
    for _, ns in groups:
        for n in ns:
            order += [prefix + n + sfx for sfx in WEIGHT_TENSORS if prefix + n + sfx in sm.ckpt]
    taken = set(order)
    return groups, order + [n for n in sorted(sm.ckpt.layer_names(i)) if n not in taken]


def reads_stored_bf16(fmt: str) -> bool:
    """Block-scaled weights (128 x 128 FP8 blocks) from bf16: quantize the stored tensor as is
    (compress/quant/fp8.py quantize_block divides in float32 either way: same bytes, no float32
    copy); everything else from float32."""
    return FORMATS[fmt].scale == "block"


@torch.no_grad()
def quantize_tensors(sm: StreamedModel, i: int, cfg: QuantConfig, groups: list[tuple[str, list[str]]],
                     tensors: Iterator[tuple[str, torch.Tensor]], n_stored: int,
                     pool: ThreadPoolExecutor | None = None, depth: int = 0) -> tuple[LayerResult, LayerView]:
    """Quantize layer i group by group as its stored tensors arrive from ``tensors`` (a
    :func:`read_ahead` stream in :func:`free_plan` order), dropping each weight once quantized.
    Returns the result and a view over the layer's other stored tensors (``n_stored`` in all are
    taken from the stream).

    ``pool``: groups are quantized by its threads, at most ``depth`` groups ahead; results are
    merged in group order, so the output does not depend on the pool."""
    return _FreeLayer(sm, i, cfg, tensors, pool, depth).run(groups, n_stored)


def quantize_stored(stored: dict[str, torch.Tensor], ckpt: CheckpointReader, cfg: QuantConfig, fmt: str,
                    prefix: str, ns: list[str], dtypes: list[torch.dtype], uploader: Uploader | None,
                    shapes: list[tuple[int, ...]]) -> LayerResult:
    """One group of linears ``ns`` from their stored tensors: decoded (on the uploader's device, when
    given) and quantized there; the result on the host. Each decoded weight must have its shape in
    ``shapes`` (config.json's): a packed weight's shape is known only once decoded (``free_plan``
    checks the others from the shard headers)."""
    if uploader is not None:
        stored = uploader.upload(stored)
    view = LayerView(ckpt, stored)
    ws = [view.weight(prefix + n + ".weight", dt) for n, dt in zip(ns, dtypes, strict=True)]
    del stored, view
    for n, w, shape in zip(ns, ws, shapes, strict=True):
        check_shape(str(ckpt.path), f"{prefix}{n}.weight", w.shape, shape)
    sub = LayerResult()
    quantize_group(sub, cfg, fmt, ns, ws, None)
    return sub if uploader is None else to_host(sub)


def to_host(res: LayerResult) -> LayerResult:
    """``res`` with its tensors moved to the host (what the writer takes)."""
    def host(v):
        return v.cpu() if isinstance(v, torch.Tensor) else v
    res.tensors = {k: host(v) for k, v in res.tensors.items()}
    res.specs = {k: tuple(host(v) for v in spec) for k, spec in res.specs.items()}
    return res


class _FreeLayer:
    """One calibration-free layer being quantized: the stored tensors taken so far, the groups in flight."""

    def __init__(self, sm: StreamedModel, i: int, cfg: QuantConfig, tensors: Iterator[tuple[str, torch.Tensor]],
                 pool: ThreadPoolExecutor | None, depth: int):
        self.sm, self.cfg, self.tensors, self.pool, self.depth = sm, cfg, tensors, pool, depth
        self.prefix = sm.adapter.layer_prefix(i)
        self.shapes = sm.expected_layer_shapes(i)
        self.res = LayerResult()
        self.raw: dict[str, torch.Tensor] = {}
        self.taken = 0
        self.pending: deque[tuple[LayerResult | None, Future | None]] = deque()
        self.uploader = sm.uploader if not sm.uploader.on_cpu else None

    def run(self, groups: list[tuple[str, list[str]]], n_stored: int) -> tuple[LayerResult, LayerView]:
        for fmt, ns in groups:
            self.submit(fmt, ns)
            while len(self.pending) > self.depth:
                self.merge()
        while self.pending:
            self.merge()
        while self.taken < n_stored:
            name, t = next(self.tensors)
            self.raw[name] = t
            self.taken += 1
        return self.res, LayerView(self.sm.ckpt, self.raw)

    def take(self, name: str) -> None:
        got, t = next(self.tensors)
        assert got == name, (got, name)  # the plan and the stream agree by construction
        self.raw[got] = t
        self.taken += 1

    def submit(self, fmt: str, ns: list[str]) -> None:
        """Take the group's stored weights from the stream and quantize them (in the pool, if any)."""
        prefix, ckpt = self.prefix, self.sm.ckpt
        for n in ns:
            for sfx in WEIGHT_TENSORS:
                if prefix + n + sfx in ckpt:
                    self.take(prefix + n + sfx)
        stored = {prefix + n + sfx: self.raw.pop(prefix + n + sfx) for n in ns for sfx in WEIGHT_TENSORS
                  if prefix + n + sfx in self.raw}
        dtypes = [torch.bfloat16 if reads_stored_bf16(fmt) and ckpt.info(prefix + n + ".weight").dtype == "BF16"
                  else torch.float32 for n in ns]
        job = (ckpt, self.cfg, fmt, prefix, ns, dtypes, self.uploader, [self.shapes[n + ".weight"] for n in ns])
        if self.pool is None:
            self.pending.append((quantize_stored(stored, *job), None))
        else:
            self.pending.append((None, self.pool.submit(quantize_stored, stored, *job)))
        del stored

    def merge(self) -> None:
        sub, fut = self.pending.popleft()
        self.res.merge(sub if fut is None else fut.result())


class FreePipeline:
    """Layers ``start``.. of a calibration-free run: their plans, one read-ahead over all their
    stored tensors, and the worker pool.

    On the CPU the pool has one worker per core this process may run on (``sched_getaffinity``:
    ``taskset`` and cgroup CPU sets are honoured) and torch runs single-threaded meanwhile, so
    workers and torch's own threads never oversubscribe the cores. On a GPU (the stream's device)
    two workers upload, quantize and download groups, so one group's host work overlaps another's
    kernels (one upload stream, the default compute stream and blocking downloads are shared: copies
    do not overlap kernels); torch's CPU threads are left as they are.
    """

    GPU_WORKERS = 2

    def __init__(self, reader: CheckpointReader, sm: StreamedModel, cfg: QuantConfig, start: int, budget: int):
        self.sm, self.cfg = sm, cfg
        self.plans: dict[int, Plan] = {}
        self.linears: dict[tuple, list[str]] = {}
        self.stored = read_ahead(
            reader, (n for j in range(start, sm.adapter.num_layers) for n in self.plan(j)[1]), budget)
        self.threads = torch.get_num_threads()
        on_cpu = sm.uploader.on_cpu
        self.n_workers = cpu_workers() if on_cpu else self.GPU_WORKERS
        self.workers = ThreadPoolExecutor(self.n_workers, thread_name_prefix="moepress-quant",
                                          initializer=torch.set_num_threads if on_cpu else None,
                                          initargs=(1,) if on_cpu else ()) if self.n_workers > 1 else None
        if self.workers is not None and on_cpu:
            torch.set_num_threads(1)

    def plan(self, j: int) -> Plan:
        """Layer j's plan, made once (by the read-ahead's thread or the caller, whichever asks first)."""
        if j not in self.plans:
            self.plans[j] = free_plan(self.sm, j, self.cfg, self.linears)
        return self.plans[j]

    def layer(self, i: int) -> tuple[LayerResult, LayerView]:
        """Quantize layer i: its result and a view over its other stored tensors."""
        groups, order = self.plan(i)
        out = quantize_tensors(self.sm, i, self.cfg, groups, self.stored, len(order), self.workers,
                               2 * self.n_workers if self.workers is not None else 0)
        self.plans.pop(i)
        return out

    def close(self) -> None:
        self.stored.close()
        if self.workers is not None:
            self.workers.shutdown()
            torch.set_num_threads(self.threads)


def cpu_workers() -> int:
    """The cores this process may run on (its affinity mask), else torch's thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return torch.get_num_threads()
