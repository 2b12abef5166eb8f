"""A block's error held to its peers': the errors of blocks stored alike, on the same inputs.

A correct quantization errs about alike in every block it quantizes alike: every routed expert of a layer on
the same tokens, every layer's attention. A fault in one block (a scale off by 2 or 1.5, gate and up swapped,
a pre_quant_scale doubled) can stay under an absolute gate that must also pass the coarsest correct format,
while it stands out against its peers at once. The ratio is taken against the median of the blocks stored
alike (the same tensor names and dtypes: one format), so that a model quantized by rules (attention in FP8,
experts in INT4; one layer kept in bf16) compares each block with its own format only. Where the error a block's
own rounding makes is known (an expert of a round-to-nearest moepress output: checks/weights.py), it floors the
median: peers that round exactly (reference weights already on the format's grid) do not make it a fault.

The README's accuracy-gate section gives the ratios measured on correct and faulty artifacts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable
from statistics import median

import torch
from torch import nn

FLOOR = 1e-3  # a median below it reads as FLOOR: blocks stored exactly (error 0) still rank a broken peer
MIN_PEERS = 3  # blocks stored alike, the block itself included, for a median to mean anything


def worst_of(names: list, values: list[float | None]) -> tuple:
    """(name, value) of the largest value, a NaN the largest of all (no gate passes it); (None, None) where every
    value is None."""
    pairs = [(n, v) for n, v in zip(names, values, strict=True) if v is not None]
    if not pairs:
        return None, None
    return max(pairs, key=lambda p: math.inf if math.isnan(p[1]) else p[1])


def relative_error(diff: torch.Tensor, cand: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|diff| / min(|cand|, |ref|) per leading index (norms over the rest), so a scale off by 2 either way reads
    1.0; 0 where both are zero, inf where one is, NaN where either is not finite (no gate passes NaN)."""
    return norm_ratio(diff.flatten(1).norm(dim=1), cand.flatten(1).norm(dim=1), ref.flatten(1).norm(dim=1))


def norm_ratio(d: torch.Tensor, cand: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``relative_error`` from the norms: the difference's ``d``, the two sides' ``cand`` and ``ref`` (a caller
    that estimates one of them, as checks/weights.py the difference's, keeps the same zero, inf and NaN rules)."""
    size = torch.minimum(cand, ref)
    silent = torch.where(d > 0, math.inf, 0.0).to(d.dtype)
    err = torch.where(size > 0, d / size.clamp_min(torch.finfo(size.dtype).tiny), silent)
    return torch.where(torch.isfinite(d) & torch.isfinite(size), err, math.nan)


def stored_form(module: nn.Module) -> tuple:
    """How ``module``'s tensors are stored: each submodule's tensor names (a linear kept as stored: its checkpoint
    tensors' last name part, weight / weight_scale / pre_quant_scale ...) and dtypes, without shapes, so a shared
    expert wider than the routed ones compares with them when it is stored in their format."""
    out = []
    for path, m in module.named_modules():
        kept = getattr(m, "kept", ())
        if kept:
            ts = [(k.rsplit(".", 1)[-1], str(getattr(m, f"kept_{j}").dtype)) for j, k in enumerate(kept)]
        else:
            ts = [(n, str(t.dtype)) for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))]
        if ts:
            out.append((path, tuple(sorted(ts))))
    return tuple(out)


def peer_ratios(errors: list[float], forms: list[Hashable], judged: list[tuple[float, Hashable]] = (),
                floors: list[float | None] | None = None, judged_floors: list[float | None] | None = None
                ) -> tuple[list[float | None], list[float | None]]:
    """Each error over the median of the errors stored alike among ``errors`` (None: fewer than MIN_PEERS
    alike); ``judged``: further (error, form) pairs held to the same peers without being counted among them (a
    shared expert against the routed ones); ``floors`` / ``judged_floors``: per error, the error its own rounding makes
    (None: unknown), below which its denominator does not go, so a block that errs as its format errs is no fault
    where its peers happen to round exactly (reference weights already on the format's grid). A NaN error's ratio
    is NaN; an inf one's inf."""
    groups: dict[Hashable, list[float]] = defaultdict(list)
    for e, f in zip(errors, forms, strict=True):
        groups[f].append(math.inf if math.isnan(e) else e)

    def ratio(e: float, f: Hashable, floor: float | None = None) -> float | None:
        peers = groups.get(f, [])
        if len(peers) < MIN_PEERS:
            return None
        return e / max(median(peers), FLOOR, floor or 0.0)

    floors, judged_floors = floors or [None] * len(errors), judged_floors or [None] * len(judged)
    return ([ratio(e, f, fl) for e, f, fl in zip(errors, forms, floors, strict=True)],
            [ratio(e, f, fl) for (e, f), fl in zip(judged, judged_floors, strict=True)])
