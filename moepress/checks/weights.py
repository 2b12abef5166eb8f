"""Each routed expert's weights held to its peers': a fault in the stored bytes (a scale tensor rolled by one row
or transposed, one expert's weights exchanged) that its output on the 16 probe tokens reads within the spread
of correct experts.

Each linear of each routed expert (gate, up, down) is compared with the reference expert's as the candidate
computes with it (decoded; AWQ's ``pre_quant_scale`` multiplied into its columns; no activation quantization:
what the stored bytes say). The norm of the difference is estimated through a sketch, the weight times fixed
Gaussian columns (SKETCH, more where the weight has few rows: SAMPLES entries at least; a weight narrower than
that whole), to about 1% for quantization noise, without holding the reference's weights beside the
candidate's (Kimi K2: 138 MB of sketches per layer, against 17 GB of weights); the weights' own norms are exact.

Each linear's error is held to the median of the same linear in the layer's experts stored alike, where its
rounding is known to be to nearest and those peers agree. Round-to-nearest formats err alike on every expert
(FP8, block FP8, NVFP4, MXFP4 on the bundled models: the largest within 3% of the median), so one faulty expert
stands out: an NVFP4 or block-FP8 scale rolled by one row reads 2.5-3.7. Calibrated rounding (AWQ, GPTQ) and
smoothing folded into the weights spread the errors with the calibration, beside experts rounded to nearest
for want of tokens (an ``--awq-fold`` export read 2.4 over its median), and a weight ratio cannot tell a fault
from calibration there: only a ``moepress quantize`` output of a round-to-nearest format and weights stored in
float are judged, and only in groups whose second-largest ratio is at most TIGHT (the output-level expert gates
judge the rest).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import torch
from torch import nn

from moepress.checks.peers import MIN_PEERS, norm_ratio, peer_ratios, stored_form
from moepress.compress.formats import FORMATS
from moepress.compress.moe import SparseMoE, StoredLinear

SKETCH = 8  # Gaussian columns each weight is multiplied by, at least
SAMPLES = 8192  # sketch entries per linear, at least: its error's norm estimated to 0.8% (1 / sqrt(2 SAMPLES))
TIGHT = 1.1  # the second-largest ratio of a group whose errors agree (round-to-nearest: 1.04 at most measured)


@lru_cache(maxsize=8)
def _columns(width: int, rows: int, device: str) -> torch.Tensor | None:
    """[width, k] float32: k = max(SKETCH, SAMPLES / rows) standard normal columns scaled by 1 / sqrt(k), so that
    |D P| estimates |D| (Frobenius), seeded by the shape (the same for the reference and the candidate); None
    where k would reach ``width``: the weight is compared whole."""
    k = max(SKETCH, -(-SAMPLES // rows))
    if k >= width:
        return None
    g = torch.Generator().manual_seed(width * 65537 + rows)
    return (torch.randn(width, k, generator=g) / math.sqrt(k)).to(device)


def effective_weight(lin: nn.Linear) -> torch.Tensor:
    """The float32 weight ``lin`` computes with: decoded where kept quantized, times the ``pre_quant_scale`` its
    input is multiplied by (``fake_quant.attach`` keeps it on the module), so an AWQ weight compares with the
    unscaled reference weight."""
    if isinstance(lin, StoredLinear) and lin.qweight is not None:
        w = lin.qweight().float()
    elif isinstance(lin, StoredLinear):
        w = lin.stored_weight(torch.float32)
    else:
        w = lin.weight.detach().float()
    pqs = getattr(lin, "pre_quant_scale", None)
    return w if pqs is None else w * pqs.to(w.device, torch.float32)[None]


def sketch(lin: nn.Linear) -> tuple[torch.Tensor, float]:
    """The linear's effective weight times the fixed columns of its shape (``_columns``; the weight itself where
    narrow), and the weight's own norm, exact: a sketched norm errs with the weight's spectrum, its error's not
    (quantization noise is flat)."""
    w = effective_weight(lin)
    p = _columns(w.shape[1], w.shape[0], str(w.device))
    return (w if p is None else w @ p), float(w.norm())


def sketch_error(cand: tuple[torch.Tensor, float], ref: tuple[torch.Tensor, float]) -> float:
    """|W_c - W_r| / min(|W_c|, |W_r|) from their sketches (``peers.norm_ratio``): the difference's norm estimated,
    the norms exact."""
    (a, na), (b, nb) = cand, ref
    d = (a - b.to(a.device)).norm().cpu()
    return float(norm_ratio(d[None], torch.tensor([na], dtype=d.dtype), torch.tensor([nb], dtype=d.dtype))[0])


class WeightSketch:
    """The reference MoE layer's routed experts, sketched before the layer is freed."""

    def __init__(self, moe: SparseMoE):
        self.ref = [[sketch(lin) for lin in e.linears()] for e in moe.experts]

    @torch.no_grad()
    def ratios(self, moe: SparseMoE, order: torch.Tensor) -> list[float | None]:
        """Per candidate expert (expert j against the reference's ``order[j]``): the largest over its linears of
        its weight error over the median of the same linear's in the experts stored alike, where they agree
        (None: no linear judged)."""
        worst: list[float | None] = [None] * len(moe.experts)
        for role in range(len(self.ref[0])):
            lins = [e.linears()[role] for e in moe.experts]
            if not any(rounded_to_nearest(lin) for lin in lins):
                continue  # nothing to judge: no weight decoded for it
            # one expert's sketch at a time, not a stack
            errors = [sketch_error(sketch(lin), self.ref[k][role]) for lin, k in zip(lins, order.tolist(), strict=True)]
            for j, r in enumerate(agreeing(errors, [stored_form(lin) for lin in lins])):
                if r is not None and rounded_to_nearest(lins[j]):
                    worst[j] = r if worst[j] is None else max(worst[j], r, key=_nan_last)
        return worst


def rounded_to_nearest(lin: nn.Linear) -> bool:
    """Whether ``lin``'s stored weight is known to be rounded to nearest: a ``moepress quantize`` output of a format
    that rounds so (not AWQ, not GPTQ: ``fake_quant.attach`` names the format on the module), or a weight stored in
    float (a copy or a cast). Quantized otherwise (a compressed-tensors or third-party checkpoint, which may be AWQ
    or GPTQ with a few experts rounded to nearest for want of tokens, beside which a calibrated one stands out):
    not judged."""
    fmt = getattr(lin, "quant_format", None)
    if fmt is not None:
        return fmt in FORMATS and not (FORMATS[fmt].awq or FORMATS[fmt].gptq)
    if isinstance(lin, StoredLinear) and (lin.kept or lin.qweight is not None):
        return False
    return lin.weight.is_floating_point() and lin.weight.element_size() >= 2


def _nan_last(v: float) -> float:
    return math.inf if math.isnan(v) else v


def agreeing(errors: list[float], forms: list) -> list[float | None]:
    """``peer_ratios`` of ``errors``, kept only in groups (stored alike) of MIN_PEERS or more whose second-largest
    ratio is at most TIGHT: where the peers agree, one error far from them is a fault."""
    ratios, _ = peer_ratios(errors, forms)
    groups: dict = defaultdict(list)
    for r, f in zip(ratios, forms, strict=True):
        if r is not None:
            groups[f].append(_nan_last(r))
    tight = {f for f, rs in groups.items() if len(rs) >= MIN_PEERS and sorted(rs)[-2] <= TIGHT}
    return [r if f in tight else None for r, f in zip(ratios, forms, strict=True)]
