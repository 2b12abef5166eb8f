"""Routing statistics over a calibration set: collect on the layer stream, summarize, write.

``collect`` streams the model once (one decoder layer in memory), attaching the routing
observer to every MoE layer (and, when asked, per-linear input absmax). The routing is
the adapters' ``route``, which replicates transformers' routers exactly (softmax top-k;
DeepSeek-V3 / Kimi K2 sigmoid scores + correction bias + group limit).

``summarize`` gives, per MoE layer: never-routed experts, rarely-routed experts (token
share below ``rare`` x the uniform share 1/E), load imbalance as max/mean share and the
coefficient of variation of the per-expert counts, and the effective number of experts
exp(entropy of the shares).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moepress.calib.observers import InputAbsMax, RoutingStats
from moepress.compress.moe import first_non_finite
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.progress import QUIET, Progress


@torch.no_grad()
def collect(model: str | Path, batches: list[torch.Tensor], *, absmax: bool = False, progress: Progress = QUIET,
            dtype: torch.dtype = torch.float32, device: torch.device | None = None, share: str = "",
            ) -> tuple[RoutingStats, dict[str, torch.Tensor] | None, dict]:
    """(routing statistics, ``{model.layers.i.<linear>: input absmax}`` or None, model facts);
    the layers run on ``device`` (None: the CPU). ``share`` labels the per-layer progress notes (under
    torchrun they count this rank's batches, before the ranks' statistics are added)."""
    # weights kept as stored (bf16, FP8, packed INT4), decoded at each call: the same statistics at a half to
    # an eighth of a float32 layer's memory
    # a layer's weights let go before the next is built (its observers still name its modules)
    sm = StreamedModel(str(model), dtype=dtype, device=device, keep_stored=True, release_layers=True)
    a = sm.adapter
    stats = RoutingStats()
    for i in a.moe_layers():  # every layer present even with no batches (ranks hold the same layers)
        stats.ensure(i, a.num_experts, a.top_k)
    amax: dict[str, torch.Tensor] | None = {} if absmax else None
    hs = sm.embed(batches)
    with progress.task("calib stats", sm.num_layers) as task:
        for i, layer in sm.layers():
            if (bad := first_non_finite(layer)) is not None:  # NaN statistics would be written as if measured
                raise MoepressError(f"{sm.ckpt.path}: {a.layer_prefix(i)}{bad[0]}: {bad[1]} values are not finite "
                                    "(NaN or Inf) as decoded; expected finite weights")
            lr = stats.attach(i, layer)
            obs = None
            if absmax:
                obs = InputAbsMax()
                obs.attach(layer)
            hs = sm.run_layer(layer, hs)
            RoutingStats.detach(layer)
            if obs is not None:
                obs.detach()
                amax.update(obs.state_dict(prefix=a.layer_prefix(i)))
            if lr is None:
                task.advance(note=f"layer {i}: dense")
            else:
                s = layer_summary(lr)
                task.advance(note=f"layer {i}: {share}{lr.tokens} tokens, max/mean {s['max_over_mean']:.2f}, "
                                  f"never routed {len(s['never_routed'])}")
    facts = {"family": a.family, "num_layers": a.num_layers, "moe_layers": a.moe_layers(),
             "num_experts": a.num_experts, "top_k": a.top_k, "routing": a.routing()}
    return stats, amax, facts


def layer_summary(lr, rare: float = 0.1) -> dict:
    counts = lr.counts.cpu().double()
    e = lr.num_experts
    total = float(counts.sum())
    share = counts / total if total else torch.zeros(e, dtype=torch.float64)
    mean = total / e
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum()) if total else 0.0
    return {
        "tokens": lr.tokens,
        "routed_slots": int(total),
        "never_routed": [int(x) for x in torch.nonzero(counts == 0).flatten()],
        "rare": [int(x) for x in torch.nonzero((counts > 0) & (share < rare / e)).flatten()],
        "max_over_mean": float(counts.max() / mean) if total else 0.0,
        "min_over_mean": float(counts.min() / mean) if total else 0.0,
        "cv": float(counts.std(unbiased=False) / mean) if total else 0.0,
        "effective_experts": math.exp(entropy) if total else 0.0,
        "busiest": int(counts.argmax()),
    }


def summarize(stats: RoutingStats, rare: float = 0.1) -> dict:
    layers = {str(i): layer_summary(lr, rare) for i, lr in sorted(stats.layers.items())}
    worst = max(layers.items(), key=lambda kv: kv[1]["max_over_mean"], default=(None, None))
    return {
        "rare_threshold": rare,
        "layers": layers,
        "never_routed_total": sum(len(s["never_routed"]) for s in layers.values()),
        "rare_total": sum(len(s["rare"]) for s in layers.values()),
        "worst_layer": None if worst[0] is None else int(worst[0]),
        "worst_max_over_mean": None if worst[1] is None else worst[1]["max_over_mean"],
        "mean_cv": sum(s["cv"] for s in layers.values()) / max(len(layers), 1),
    }


def per_expert(stats: RoutingStats) -> dict:
    """Per layer and expert: counts, share, mean gate, mean output norm, REAP (JSON-ready lists)."""
    out = {}
    for i, lr in sorted(stats.layers.items()):
        out[str(i)] = {"num_experts": lr.num_experts, "top_k": lr.top_k, "tokens": lr.tokens,
                       "counts": lr.counts.tolist(), "share": lr.share.tolist(), "gate_sum": lr.gate_sum.tolist(),
                       "mean_gate": lr.mean_gate.tolist(), "norm_sum": lr.norm_sum.tolist(),
                       "mean_norm": lr.mean_norm.tolist(), "reap_sum": lr.reap_sum.tolist(), "reap": lr.reap.tolist(),
                       # REAP counts a token where the expert is in the raw logits' top-k, not where it was routed
                       "reap_count": lr.reap_count.tolist()}
    return out


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "-"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def render(summary: dict, facts: dict, tokens: int) -> str:
    """The terminal summary: one line per MoE layer."""
    r = summary["rare_threshold"]
    lines = [f"{facts['family']}: {len(facts['moe_layers'])} MoE layers x {facts['num_experts']} experts, "
             f"top-{facts['top_k']}, {tokens} calibration tokens",
             f"{'layer':>5}  {'max/mean':>8}  {'CV':>5}  {'eff.':>5}  {'never':>5}  {'rare':>4}  "
             f"never routed / rare (<{r:g} x uniform share)"]
    for i, s in summary["layers"].items():
        lines.append(f"{i:>5}  {s['max_over_mean']:8.2f}  {s['cv']:5.2f}  {s['effective_experts']:5.1f}  "
                     f"{len(s['never_routed']):5d}  {len(s['rare']):4d}  "
                     f"{_ranges(s['never_routed'])} / {_ranges(s['rare'])}")
    lines.append(f"never routed: {summary['never_routed_total']} experts; rarely routed: {summary['rare_total']}; "
                 f"worst imbalance: layer {summary['worst_layer']} "
                 f"(max/mean {summary['worst_max_over_mean'] or 0:.2f}); mean CV {summary['mean_cv']:.2f}")
    return "\n".join(lines)
