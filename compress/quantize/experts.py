"""A layer's routed experts quantized as batches: every expert has the same shapes, so their GPTQ
solves and AWQ searches run as a few batched tensor ops (compress/quant/batched.py) instead of one
small solve per expert and projection; under torchrun each rank quantizes its share of the experts.

calibrated.py decides, expert by expert, what each group of linears is quantized from (its own
routed tokens, every token, amax only for round to nearest: the statistics it hands over) and
calls :meth:`ExpertBatch.add` where it would call ``quantize_group``; the batch runs the format's
quantizer over many such groups at once and records the results in the order they were added, so
the layer's result is the one the one-by-one calls give, bit for bit on the CPU (batched.py says
why). Groups the batched INT4 path does not cover (another format, no Hessian: round to nearest
or the clip search, weights whose all-zero columns differ between gate and up) run one by one: in one
process when they are added (their float32 weights are not held until the flush: a whole budget of
them was 33 MB of tests/test_quant_memory.py's fp8 peak), under torchrun at the flush, split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from moepress.calib import distributed as dist
from moepress.compress import formats
from moepress.compress.formats import _int4
from moepress.compress.formats.base import Quantized
from moepress.compress.quant import batched, gptq, int4
from moepress.compress.quantize.config import QuantConfig
from moepress.compress.quantize.group import LayerResult, quant_context, quantize_group
from moepress.compress.quantize.stats import amax_of

# working memory a batch may take (stacked weights, Hessians and factors; the pending groups'
# float32 weights and statistics): a few hundred MB, well under one stored Kimi K2 MoE layer (~17 GB in FP8),
# yet a whole small-expert layer's projection (384 experts x 128 wide) in one or two batches
BATCH_BYTES = 512 << 20
# on an accelerator the point is few large kernels: batches up to this share of its memory
DEVICE_BATCH_SHARE = 0.25
BATCHED = True  # False: every group through its format's one-by-one quantizer (the reference: bench, tests)


@dataclass
class _Group:
    fmt: str
    names: list[str]
    ws: list[torch.Tensor]
    st: object | None
    out: Quantized | None = None  # quantized already (at add: a group nothing batches)


def _bytes(ws: list[torch.Tensor]) -> int:
    """Working memory of one group in a batch: its weights in float64 and copies, its Hessian and factors."""
    inp = ws[0].shape[1]
    return sum(w.numel() for w in ws) * 4 * 6 + inp * inp * 8 * 4


class ExpertBatch:
    """quantize_group calls for one layer's routed experts, deferred and run batched; results go
    into ``res`` in the order of :meth:`add`, when the pending work passes ``budget`` bytes and at
    :meth:`flush`. Under torchrun (``env``) the ranks split each batch and exchange the results."""

    def __init__(self, res: LayerResult, cfg: QuantConfig, env: dist.DistEnv | None = None,
                 budget: int | None = None, batched_int4: bool | None = None):
        self.res, self.cfg, self.env, self.budget = res, cfg, env or dist.DistEnv(), budget
        self.batched_int4 = BATCHED if batched_int4 is None else batched_int4
        self.pending: list[_Group] = []
        self.bytes = 0

    def add(self, fmt: str, names: list[str], ws: list[torch.Tensor], st) -> Quantized | None:
        """As ``quantize_group(res, cfg, fmt, names, ws, st)``, later (recorded in ``res`` at the flush).
        Returns the quantizer's output where the group was quantized now, else None (pending)."""
        if self.budget is None:
            self.budget = _budget(ws[0].device, self.env)
        g = _Group(fmt, list(names), ws, st)
        self.pending.append(g)
        if not self.env.enabled and not _batched(g, self.cfg, self.batched_int4):
            _quantize_now(g, self.cfg)  # nothing to batch it with: its float32 weights go now, not at the flush
            return g.out
        self.bytes += _bytes(ws)
        if self.bytes >= self.budget:
            self.flush()
        return None

    def flush(self) -> None:
        groups, self.pending, self.bytes = self.pending, [], 0
        todo = [g for g in groups if g.out is None]
        for g, out in zip(todo, self._quantize(todo) if todo else [], strict=True):
            g.out = out
        for g in groups:
            quantize_group(self.res, self.cfg, g.fmt, g.names, g.ws, g.st, out=g.out)

    def _quantize(self, groups: list[_Group]) -> list[Quantized]:
        """Every group's quantizer output; under torchrun each rank computes a contiguous share."""
        env = self.env
        if not env.enabled:
            return quantize_groups(groups, self.cfg, self.batched_int4)
        mine = dist.shard(range(len(groups)), env.rank, env.world_size)
        part = quantize_groups([groups[i] for i in mine], self.cfg, self.batched_int4)
        device = groups[0].ws[0].device
        every = dist.all_gather_shares([_moved(q, "cpu") for q in part], env)
        return [_moved(q, device) for q in every]


def _quantize_now(g: _Group, cfg: QuantConfig) -> None:
    """``g`` through its format's one-by-one quantizer, as :func:`quantize_groups` would at the flush; what
    ``quantize_group`` reads of it later is kept: the output, the weights' width and device, the input's amax
    (not the float32 weights, the Hessian or the row sample: 6 MB an expert of tests/test_quant_memory's
    1024 x 512 experts, 176 MB of weights and a 29 MB sample for one of Kimi K2's 7168 x 2048)."""
    g.out = formats.FORMATS[g.fmt].quantize(g.ws, quant_context(cfg, g.st))
    g.ws = [w.new_empty((0, w.shape[1])) for w in g.ws]
    g.st = amax_of(g.st)


def _budget(device: torch.device, env: dist.DistEnv) -> int:
    """BATCH_BYTES on the CPU; DEVICE_BATCH_SHARE of an accelerator's memory. Under torchrun the
    smallest rank's, so that every rank flushes at the same groups (the results are exchanged there)."""
    if device.type != "cuda":
        return BATCH_BYTES
    budget = int(torch.cuda.get_device_properties(device).total_memory * DEVICE_BATCH_SHARE)
    return min(dist.all_gather_shares([budget], env))


def _moved(q: Quantized, device) -> Quantized:
    return Quantized([{k: v.to(device) for k, v in t.items()} for t in q.tensors],
                     None if q.pre_quant_scale is None else q.pre_quant_scale.to(device), q.awq_alpha, q.group,
                     q.skipped)


def _int4_options(fmt: str) -> dict | None:
    """The keyword options of the shared INT4 quantizer (formats/_int4.py) a format declares, or None."""
    q = formats.FORMATS[fmt].quantize
    if isinstance(q, partial) and q.func is _int4.quantize and not q.args:
        return dict(q.keywords)
    return None


def quantize_groups(groups: list[_Group], cfg: QuantConfig, batched_int4: bool = True) -> list[Quantized]:
    """Each group's ``Format.quantize`` output: INT4 groups with a Hessian batched by shape, the rest one by one."""
    outs: list[Quantized | None] = [None] * len(groups)
    by_key: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        if _batched(g, cfg, batched_int4):
            by_key.setdefault((g.fmt, len(g.ws), tuple(g.ws[0].shape)), []).append(i)
        else:
            outs[i] = formats.FORMATS[g.fmt].quantize(g.ws, quant_context(cfg, g.st))
    for (fmt, _, _), idx in by_key.items():
        if len(idx) == 1:  # nothing to batch: the one-by-one quantizer (GPTQ in the Hessian's own memory)
            outs[idx[0]] = formats.FORMATS[fmt].quantize(groups[idx[0]].ws, quant_context(cfg, groups[idx[0]].st))
            continue
        for i, q in zip(idx, int4_batch([groups[i] for i in idx], cfg, **_int4_options(fmt)), strict=True):
            outs[i] = q
    return outs


def _batched(g: _Group, cfg: QuantConfig, batched_int4: bool) -> bool:
    """Does :func:`quantize_groups` batch this group (an INT4 group that GPTQ rounds)?"""
    opts = _int4_options(g.fmt) if batched_int4 else None
    return opts is not None and _gptq_rounded(g, cfg, opts)


def _gptq_rounded(g: _Group, cfg: QuantConfig, opts: dict) -> bool:
    """Does the INT4 quantizer round this group by GPTQ (the path int4_batch covers)?"""
    st = g.st
    needs_h = opts.get("use_gptq") or (opts.get("use_awq") and cfg.awq_gptq)
    return (bool(needs_h) and st is not None and getattr(st, "S", None) is not None and st.n > 0
            and not any(_int4.skip(*w.shape, cfg.group_size) for w in g.ws))  # what the quantizer skips


def int4_batch(groups: list[_Group], cfg: QuantConfig, *, use_awq: bool, use_gptq: bool,
               fp8_input: bool = False, with_scale_2: bool = False) -> list[Quantized]:
    """formats/_int4.py ``quantize`` over groups of identical shapes that GPTQ rounds: one batched
    AWQ search, one batched factorisation, one batched column loop."""
    ctx = _int4.act_order_of(quant_context(cfg, groups[0].st), use_awq)
    group = int4.effective_group(groups[0].ws[0].shape[1], cfg.group_size)
    search = use_awq and not ctx.awq_folded
    if search:
        W = torch.stack([torch.stack([w.float() for w in g.ws]) for g in groups])
        found = batched.awq_search(W, [g.st.sample() for g in groups], torch.stack([g.st.act_mean for g in groups]),
                                   group)
        del W
        pqs = [p for p, _, _ in found]
        alphas = [a for _, a, _ in found]
    else:
        pqs = [None] * len(groups)  # GPTQ alone, or AWQ folded by the caller (nothing to search, none stored)
        alphas = [None] * len(groups)
    wqs = [[w.float() / p[None, :] if p is not None else w.float() for w in g.ws]
           for g, p in zip(groups, pqs, strict=True)]
    rounded = _gptq_batch(groups, wqs, pqs, ctx, group)
    outs = []
    for g, p, a, qs in zip(groups, pqs, alphas, rounded, strict=True):
        outs.append(Quantized(_int4.stored(g.ws, qs, p, with_scale_2), p, a, group))
    return outs


def _gptq_batch(groups: list[_Group], wqs: list[list[torch.Tensor]], pqs: list, ctx,
                group: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """GPTQ of each group's (smoothed) weights on its (smoothed) input's Hessian: batched where the
    group's weights share their all-zero columns (one factorisation, as gptq_quantize_shared),
    else one by one."""
    out: list = [None] * len(groups)
    shared = []
    deads = [[(w == 0).all(dim=0) for w in wq] for wq in wqs]
    agree = torch.stack([torch.stack([(d == ds[0]).all() for d in ds]).all() for ds in deads]).tolist()  # one read
    for i, wq in enumerate(wqs):
        dead = deads[i]
        if agree[i]:
            shared.append((i, dead[0]))
        else:
            H = _int4._hessian(groups[i].st, pqs[i], True)
            out[i] = gptq.gptq_quantize_shared(wq, H, group, ctx.gptq_damp, ctx.gptq_act_order)
    if shared:
        idx = [i for i, _ in shared]
        H = torch.stack([_int4._hessian(groups[i].st, pqs[i], True) for i in idx])
        perm, U = batched.factor(H, torch.stack([d for _, d in shared]), ctx.gptq_damp, ctx.gptq_act_order)
        del H
        Q, S = batched.gptq(torch.stack([torch.stack(wqs[i]) for i in idx]), perm, U, group)
        for b, i in enumerate(idx):
            out[i] = [(Q[b, k], S[b, k].clone()) for k in range(Q.shape[1])]
    return out
