"""Calibration-free formats: each layer quantized tensor by tensor as its stored tensors arrive, with
no layer module and no activations.

One read-ahead runs over every remaining layer's stored tensors in plan order (the groups' weights
first, then the rest), so the read of layer i+1 overlaps the quantization and the write of layer i;
the groups are quantized by torch's thread count of single-threaded workers (one torch op stream
each, which on few cores beats one stream of multi-threaded ops), merged in group order so the
output does not depend on the pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from moepress.compress.checkpoint import CheckpointReader, LayerView
from moepress.compress.quantize.config import FORMATS, QuantConfig
from moepress.compress.quantize.group import LayerResult, quantize_group
from moepress.compress.quantize.stats import by_format, shared_input_groups
from moepress.compress.stream import StreamedModel, read_ahead

WEIGHT_TENSORS = (".weight", ".weight_scale_inv")  # a linear's stored weight and its block-FP8 input scale

Plan = tuple[list[tuple[str, list[str]]], list[str]]


def free_plan(sm: StreamedModel, i: int, cfg: QuantConfig) -> Plan:
    """Calibration-free layer i: the groups to quantize [(format, linear names)] and every stored
    tensor of the layer in the order :func:`quantize_tensors` consumes them (the groups' weights,
    with their block-FP8 scales, then the rest)."""
    prefix = sm.adapter.layer_prefix(i)
    sm.check_layer_shapes(i)  # header shapes: this path quantizes stored tensors without building the layer
    with torch.device("meta"):
        meta = sm.adapter.build_layer(i)
    names = [n for n, m in meta.named_modules() if isinstance(m, nn.Linear)]
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


class _FreeLayer:
    """One calibration-free layer being quantized: the stored tensors taken so far, the groups in flight."""

    def __init__(self, sm: StreamedModel, i: int, cfg: QuantConfig, tensors: Iterator[tuple[str, torch.Tensor]],
                 pool: ThreadPoolExecutor | None, depth: int):
        self.sm, self.cfg, self.tensors, self.pool, self.depth = sm, cfg, tensors, pool, depth
        self.prefix = sm.adapter.layer_prefix(i)
        self.res = LayerResult()
        self.raw: dict[str, torch.Tensor] = {}
        self.taken = 0
        self.pending: deque[tuple[LayerResult, Future | None]] = deque()

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
        view = LayerView(ckpt, self.raw)
        ws = [view.weight(prefix + n + ".weight", torch.bfloat16 if reads_stored_bf16(fmt) and
                          ckpt.info(prefix + n + ".weight").dtype == "BF16" else torch.float32) for n in ns]
        for n in ns:
            for sfx in WEIGHT_TENSORS:
                self.raw.pop(prefix + n + sfx, None)
        sub = LayerResult()
        if self.pool is None:
            quantize_group(sub, self.cfg, fmt, ns, ws, None)
            self.pending.append((sub, None))
        else:
            self.pending.append((sub, self.pool.submit(quantize_group, sub, self.cfg, fmt, ns, ws, None)))
        del ws, view

    def merge(self) -> None:
        sub, fut = self.pending.popleft()
        if fut is not None:
            fut.result()
        self.res.merge(sub)


class FreePipeline:
    """Layers ``start``.. of a calibration-free run: their plans, one read-ahead over all their
    stored tensors, and the worker pool (torch runs single-threaded in each worker meanwhile)."""

    def __init__(self, reader: CheckpointReader, sm: StreamedModel, cfg: QuantConfig, start: int, budget: int):
        self.sm, self.cfg = sm, cfg
        self.plans: dict[int, Plan] = {}
        self.stored = read_ahead(
            reader, (n for j in range(start, sm.adapter.num_layers) for n in self.plan(j)[1]), budget)
        self.threads = torch.get_num_threads()
        self.workers = ThreadPoolExecutor(self.threads, thread_name_prefix="moepress-quant",
                                          initializer=torch.set_num_threads, initargs=(1,)) \
            if self.threads > 1 else None
        if self.workers is not None:
            torch.set_num_threads(1)

    def plan(self, j: int) -> Plan:
        """Layer j's plan, made once (by the read-ahead's thread or the caller, whichever asks first)."""
        if j not in self.plans:
            self.plans[j] = free_plan(self.sm, j, self.cfg)
        return self.plans[j]

    def layer(self, i: int) -> tuple[LayerResult, LayerView]:
        """Quantize layer i: its result and a view over its other stored tensors."""
        groups, order = self.plan(i)
        out = quantize_tensors(self.sm, i, self.cfg, groups, self.stored, len(order), self.workers,
                               2 * self.threads if self.workers is not None else 0)
        self.plans.pop(i)
        return out

    def close(self) -> None:
        self.stored.close()
        if self.workers is not None:
            self.workers.shutdown()
            torch.set_num_threads(self.threads)
