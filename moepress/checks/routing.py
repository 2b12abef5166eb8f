"""Routing agreement: does the candidate's router send the reference's tokens to the experts the
reference's router sends them to?

At each MoE layer the candidate's router (its weights, correction bias, top-k and groups: its tensors
and its config.json; not the weights' scaling, which chooses no expert) is given the reference's
router input as the candidate's own norm gives it: the reference's normed input with the norm's weight
swapped for the candidate's (RMSNorm: weight x the normalised state, so one per-channel ratio), since an AWQ
fold multiplies that weight by its scales and divides the router's and the experts' columns by them
(compress/quantize/fold.py): fed the reference's normed input, a folded candidate read routing overlaps down to
0.92 where it routes as the reference but for bf16 rounding of its router. So whatever else the candidate
quantizes in the layer changes nothing here: a correct quantized or exported checkpoint routes as the reference
(moepress never quantizes a router; an AWQ fold's rescaled router may flip a near tie), while a dropped or
permuted correction bias or another top-k show at once (router rows permuted without their experts show in the
experts' own error, below). Such breaks (a dropped DeepSeek-V3 correction bias) can move the whole-model metrics
less than quantization does, so perplexity, KL and top-1 gates cannot tell them from quantization noise.

Experts are matched by their router rows, not by index: a candidate whose experts are the reference's in
another order, with their router rows moved alike (an expert-placement tool that rewrites the
checkpoint), is compared through that order. The router's scores on a few of the layer's tokens say
which reference row each candidate row is (routers are never quantized, so they match exactly); the
experts are then held to that: experts swapped without their router rows are each compared with the
expert their row stands for, and fail. Measured for streamed candidates with the reference's expert
count (not for pruned ones, whose experts are others).

Each expert's own error: the candidate expert's output on those tokens against its reference expert's,
every expert whether or not the eval tokens reach it, relative to the smaller of the two outputs, so an
expert scaled by 2 or by 1/2 reads 1.0 alike; the shared experts likewise, against the reference's. A wrong
scale on an expert the router rarely picks moves the whole model's outputs by a fraction of a percent,
under every whole-model gate; on the expert itself it is an error of the expert's own size. Each expert's
error is also held to its peers' (``peers``): over the median error of the layer's routed experts stored
alike, on the same tokens; and each expert's weights to the error their own rounding makes (``weights``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moepress.checks.peers import peer_ratios, relative_error, stored_form, worst_of
from moepress.checks.weights import WeightSketch
from moepress.compress.moe import SparseMoE

PROBE_TOKENS = 16  # tokens each expert's output is kept on, to match candidate experts to the reference's


class Agreement(NamedTuple):
    """One MoE layer's candidate against the reference on the reference's inputs."""

    share: float  # of (token, expert) choices both routers make, over the larger top-k
    renumbered: bool  # the candidate's experts are the reference's in another order
    expert_error: float  # largest over experts: |out_cand - out_ref| / min(|out_cand|, |out_ref|), probe tokens
    worst_expert: int | str  # the candidate's expert with that error ("shared": the shared experts)
    error_ratio: float | None  # largest over experts: its error / the median of its peers' (None: too few alike)
    ratio_expert: int | str | None  # the expert with that ratio
    weight_ratio: float | None = None  # largest over experts' linears: weight error / its rounding's (weights.py)
    weight_module: str | None = None  # the linear with that ratio, named in the layer


class RouteCapture:
    """Observer on the reference's MoE block: each batch's router input and the experts chosen, and on a few
    tokens of the first sample every expert's router score and output."""

    def __init__(self, moe: SparseMoE, per_sample: int | None = None, weights: dict[str, str] | None = None,
                 prefix: str = "", norm: torch.Tensor | None = None):
        """``weights``: the candidate's format of each linear in the layer (checks/weights.py), where its experts are
        the reference's (same count) and their weights are compared (None: not compared); ``prefix``: the MoE
        block's name in the layer; ``norm``: the weight of the reference's norm before the block."""
        self.num_experts = moe.num_experts
        self.norm = None if norm is None else norm.detach().float().clone()
        self.per_sample = per_sample  # tokens of one eval sample: the probe is taken from the first sample
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.probe: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # [tokens, experts]: the router's logits on the probe
        self.outputs: torch.Tensor | None = None  # [experts, tokens, hidden]
        self.shared: torch.Tensor | None = None  # [tokens, hidden]: the shared experts' output on the probe
        self.formats, self.prefix = weights, prefix
        self.weights: WeightSketch | None = None  # built on the first batch, with the probe tokens
        moe.observers.append(self)

    @torch.no_grad()
    def on_route(self, moe, x, logits, weights, indices) -> None:
        self.seen.append((x, indices))
        if self.probe is None:
            # spread over the first sample's positions (not only its first ones), whatever --batch-size puts
            # beside it: the probe, and so the expert errors, must not depend on the batch's make-up
            n = min(self.per_sample or x.shape[0], x.shape[0])
            pick = torch.linspace(0, n - 1, min(PROBE_TOKENS, n)).round().long().to(x.device)
            self.probe, self.scores = x[pick], logits[pick].float()
            self.outputs = _expert_outputs(moe, self.probe)
            if moe.shared_experts is not None:
                self.shared = moe.shared_experts(self.probe).float()
            if self.formats is not None:
                self.weights = WeightSketch(moe, self.formats, self.prefix, self.probe, self.outputs, self.shared)

    def _as_candidate(self, norm: torch.Tensor | None):
        """The reference's normed input -> the candidate's (``norm``: the weight of its norm before the block):
        x x norm / the reference's, per channel; the identity where the weights are equal or either is not
        known, and on a channel whose reference weight is zero (its normalised state is not in x)."""
        if norm is None or self.norm is None or norm.shape != self.norm.shape:
            return lambda x: x
        cand = norm.detach().float().to(self.norm.device)
        if torch.equal(cand, self.norm):
            return lambda x: x
        ratio = torch.where(self.norm != 0, cand / self.norm, torch.ones_like(cand))
        return lambda x: (x.float() * ratio.to(x.device)).to(x.dtype)

    @torch.no_grad()
    def overlap(self, moe: SparseMoE, norm: torch.Tensor | None = None) -> Agreement | None:
        """The candidate layer ``moe`` (``norm``: the weight of its norm before the block) against the reference on
        the same inputs, or None when its experts are not the reference's (another count)."""
        if moe.num_experts != self.num_experts or not self.seen:
            return None
        ref, mine_in = self.outputs, self._as_candidate(norm)
        probe = mine_in(self.probe.to(moe.gate.weight.device))
        order = _order(moe.route(moe, probe)[0].float().to(self.scores.device), self.scores)
        mine = ref[order.to(ref.device)]  # the reference expert each candidate expert's router row stands for
        cand = _expert_outputs(moe, probe).to(ref.device)
        # an expert whose output is zero on one side and not the other: inf, which fails any finite gate; one
        # whose output is not finite (NaN weights) reads NaN, which no gate passes
        errors = relative_error(cand - mine, cand, mine).cpu().tolist()
        names: list[int | str] = list(range(len(errors)))
        forms = [stored_form(e) for e in moe.experts]
        judged = []
        if self.shared is not None and moe.shared_experts is not None:
            sc = moe.shared_experts(probe).float().to(ref.device)[None]
            judged = [(float(relative_error(sc - self.shared[None], sc, self.shared[None])[0]),
                       stored_form(moe.shared_experts))]
            names.append("shared")
        floors, shared_floor = self.weights.expected_errors(moe, order) if self.weights is not None else (None, None)
        routed, shared = peer_ratios(errors, forms, judged, floors, [shared_floor] * len(judged))
        worst, err = worst_of(names, errors + [e for e, _ in judged])
        ratio_at, ratio = worst_of(names, routed + shared)
        hits = total = 0
        for x, ref_idx in self.seen:
            _, _, idx = moe.route(moe, mine_in(x.to(moe.gate.weight.device)))
            dev = ref_idx.device
            idx = order.to(dev)[idx.to(dev)]  # the candidate's expert j is the reference's order[j]
            hits += int((ref_idx[:, :, None] == idx[:, None, :]).any(-1).sum())
            total += ref_idx.shape[0] * max(ref_idx.shape[1], idx.shape[1])
        weight_at = weight = None
        if self.weights is not None:
            pairs = self.weights.ratios(moe, order)
            weight_at, weight = worst_of([n for _, n in pairs], [v for v, _ in pairs])
        return Agreement(hits / total, bool((order != torch.arange(len(order))).any()), err, worst, ratio, ratio_at,
                         weight, weight_at)


def _order(cand: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """order[j]: the reference router row whose scores (``ref``: [tokens, experts]) the candidate's row j's
    are nearest to, where that is a one-to-one renumbering; else the identity."""
    ident = torch.arange(ref.shape[1])
    order = torch.cdist(cand.T.contiguous(), ref.T.contiguous()).argmin(1).cpu()
    return order if torch.equal(order.sort().values, ident) else ident


def _expert_outputs(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """[experts, tokens, hidden] float32: every routed expert's output on ``x``."""
    return torch.stack([moe.experts[e](x).float() for e in range(moe.num_experts)])
