"""Each routed expert's weights held to its peers': a fault in the stored bytes (a scale tensor rolled by one row
or transposed, one expert's weights exchanged) that its output on the 16 probe tokens reads within the spread
of correct experts.

Each linear of each routed expert (gate, up, down) is compared with the reference expert's through a sketch: its
weight as the candidate computes with it (decoded; AWQ's ``pre_quant_scale`` multiplied into its columns) times
fixed Gaussian columns (SKETCH, more where the weight has few rows: SAMPLES entries at least), against the
reference weight times the same columns. The relative error of the sketches estimates that of the weights
(Frobenius) to about 1%, without holding the reference's weights beside the candidate's (Kimi K2: 138 MB of
sketches per layer, against 17 GB of weights; more where weights are narrow, as the bundled models'); a weight
narrower than its sketch is compared whole. The weights
alone, without activation quantization: what the stored bytes say.

Each linear's error is held to the median of the same linear in the layer's experts stored alike, only where those
peers agree. Round-to-nearest formats err alike on every expert (FP8, block FP8, NVFP4, MXFP4 on the bundled
models: the largest within 3% of the median), so one faulty expert stands out: an NVFP4 or block-FP8 scale
rolled by one row reads 2.6-3.8. Calibrated rounding (AWQ, GPTQ) and smoothing folded into the weights spread
the errors with the calibration (1.2-1.5 on the bundled models), and a weight ratio cannot tell a fault from
calibration there: a ``moepress quantize`` output of such a format is not judged here, nor is any group whose
second-largest ratio is over TIGHT (the output-level expert gates still judge them; they read the same faults
on the bundled models).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import torch
from torch import nn

from moepress.checks.peers import MIN_PEERS, peer_ratios, relative_error, stored_form
from moepress.compress.formats import FORMATS
from moepress.compress.moe import SparseMoE, StoredLinear

SKETCH = 8  # Gaussian columns each weight is multiplied by, at least
SAMPLES = 8192  # sketch entries per linear, at least: its error's norm estimated to 0.8% (1 / sqrt(2 SAMPLES))
TIGHT = 1.1  # the second-largest ratio of a group whose errors agree (round-to-nearest: 1.04 at most measured)


@lru_cache(maxsize=8)
def _columns(width: int, rows: int, device: str) -> torch.Tensor:
    """[width, k] float32: k = max(SKETCH, SAMPLES / rows) standard normal columns, seeded by the shape (the same
    for the reference and the candidate); the identity where k would reach ``width`` (the weight itself, exact)."""
    k = max(SKETCH, -(-SAMPLES // rows))
    if k >= width:
        return torch.eye(width, device=device)
    return torch.randn(width, k, generator=torch.Generator().manual_seed(width * 65537 + rows)).to(device)


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


def sketch(lin: nn.Linear) -> torch.Tensor:
    """[out, k]: the linear's effective weight times k fixed Gaussian columns (``_columns``)."""
    w = effective_weight(lin)
    return w @ _columns(w.shape[1], w.shape[0], str(w.device))


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
            errors = []
            for lin, k in zip(lins, order.tolist(), strict=True):  # one expert's sketch at a time, not a stack
                cand = sketch(lin)[None]
                ref = self.ref[k][role].to(cand.device)[None]
                errors.append(float(relative_error(cand - ref, cand, ref)[0]))
            for j, r in enumerate(agreeing(errors, [stored_form(lin) for lin in lins])):
                if r is not None and not calibrated_rounding(lins[j]):
                    worst[j] = r if worst[j] is None else max(worst[j], r, key=_nan_last)
        return worst


def calibrated_rounding(lin: nn.Linear) -> bool:
    """Whether ``lin`` is a ``moepress quantize`` output of a format that rounds by calibration (AWQ, GPTQ:
    ``fake_quant.attach`` names its format on the module), whose weight error says nothing of a fault."""
    fmt = getattr(lin, "quant_format", None)
    return fmt in FORMATS and (FORMATS[fmt].awq or FORMATS[fmt].gptq)


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
