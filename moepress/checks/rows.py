"""A check's per-layer rows and the headline metrics drawn from them: hidden-state agreement, each block's own
error and its ratio to its peers', routing agreement and the experts' errors at MoE layers."""

from __future__ import annotations

import math

from moepress.calib.metrics import LayerStats, error_jump
from moepress.checks.local import BlockErrors
from moepress.checks.peers import peer_ratios, worst_of
from moepress.checks.routing import Agreement

# Relative hidden-state error below which two runs count as equal (float32 rounding between runtimes).
JUMP_FLOOR = 1e-5
# why a ratio gate has no value: no block had peers
UNPEERED = {"max_expert_error_ratio": "no MoE layer has 3 routed experts stored alike (the same tensor names and "
            "dtypes) for an expert's error to be held to",
            "max_attention_error_ratio": "fewer than 3 layers' attention blocks are stored alike (the same tensor "
            "names and dtypes) for one's error to be held to",
            "max_weight_error_ratio": "no linear's weights are known rounded to nearest (a `moepress quantize` "
            "output of fp8, fp8-block, fp8-dynamic, nvfp4, nvfp4-a16 or mxfp4, made from the reference with one "
            "quantize) for their error to be held to that rounding's"}


def unpeered_notes(per_layer: list[dict]) -> list[str]:
    """Notes naming the layers whose attention, or whose worst expert, had too few blocks stored alike for a ratio:
    the ratio gates do not cover them."""
    notes = []
    att = [p["layer"] for p in per_layer if "attention_error" in p and p["attention_error_ratio"] is None]
    exp = [p["layer"] for p in per_layer if "expert_error" in p and p.get("expert_error_ratio") is None]
    if att:
        notes.append(f"attention of layer(s) {', '.join(map(str, att))}: fewer than 3 layers' attention stored alike, "
                     "not held to its peers (--max-attention-error-ratio)")
    if exp:
        notes.append(f"experts of layer(s) {', '.join(map(str, exp))}: fewer than 3 routed experts stored alike, not "
                     "held to their peers (--max-expert-error-ratio)")
    weights = [p["layer"] for p in per_layer if "weight_error_ratio" in p and p["weight_error_ratio"] is None]
    if weights:
        notes.append(f"weights of layer(s) {', '.join(map(str, weights))}: none known rounded to nearest "
                     "(AWQ / GPTQ, or a format moepress did not write): not held to their own rounding's error "
                     "(--max-weight-error-ratio)")
    return notes


def _worst(pick, values: list[float]) -> float:
    """``pick`` (min / max) of ``values``, NaN if any is: min() and max() skip a NaN after a finite value."""
    return math.nan if any(v != v for v in values) else pick(values)


def _moe_rows(routing: dict[int, Agreement], metrics: dict) -> dict[int, dict]:
    """Per MoE layer: routing agreement, the worst expert's own error and the largest ratio of an expert's error
    to its peers'; their extremes into ``metrics``."""
    rows = {i: {"routing_overlap": a.share, "expert_error": a.expert_error, "worst_expert": a.worst_expert,
                "expert_error_ratio": a.error_ratio, "ratio_expert": a.ratio_expert}
            for i, a in routing.items()}
    if routing:
        metrics["min_routing_overlap"] = min(a.share for a in routing.values())
        metrics["max_expert_error"] = _worst(max, [a.expert_error for a in routing.values()])
        ratios = [a.error_ratio for a in routing.values() if a.error_ratio is not None]
        if ratios:
            metrics["max_expert_error_ratio"] = _worst(max, ratios)
    return rows


def _weight_rows(routing: dict[int, Agreement], blocks: dict[int, BlockErrors], metrics: dict) -> dict[int, dict]:
    """Per layer whose weights were compared: the largest ratio of a linear's weight error to its rounding's
    (routed experts from ``routing``, the rest from ``blocks``) and that linear's name; the largest into
    ``metrics``."""
    judged = {i: [(x.weight_ratio, x.weight_module) for x in (routing.get(i), blocks.get(i))
                  if x is not None and x.weight_ratio is not None] for i in set(routing) | set(blocks)}
    rows = {}
    for i in sorted(i for i, b in blocks.items() if b.weighed):
        n, v = worst_of([n for _, n in judged[i]], [v for v, _ in judged[i]])
        rows[i] = {"weight_error_ratio": v, "weight_module": n}
    weights = [v for pairs in judged.values() for v, _ in pairs]
    if weights:
        metrics["max_weight_error_ratio"] = _worst(max, weights)
    return rows


def _block_rows(blocks: dict[int, BlockErrors], metrics: dict) -> dict[int, dict]:
    """Per layer: its attention and feed-forward blocks' own errors, the attention's ratio to its peers'; the
    largest ratio into ``metrics``."""
    keys = sorted(blocks)
    ratios, _ = peer_ratios([blocks[i].attention for i in keys], [blocks[i].attention_form for i in keys])
    if any(r is not None for r in ratios):
        metrics["max_attention_error_ratio"] = _worst(max, [r for r in ratios if r is not None])
    return {i: {"attention_error": blocks[i].attention, "attention_error_ratio": r, "ffn_error": blocks[i].ffn}
            for i, r in zip(keys, ratios, strict=True)}


def layer_metrics(layers: list[LayerStats] | None, embed, routing: dict[int, Agreement],
                  blocks: dict[int, BlockErrors], metrics: dict) -> tuple[list[dict], dict | None]:
    """Per-layer rows (hidden-state agreement; the blocks' own errors; routing agreement and expert error at MoE
    layers), the layer where the error jumps, and the per-layer headline metrics, added to ``metrics``."""
    moe = _moe_rows(routing, metrics)
    own = _block_rows(blocks, metrics)
    weights = _weight_rows(routing, blocks, metrics)
    if layers is None:
        return [], None
    per_layer = [{"layer": i, **s.summary(), **own.get(i, {}), **moe.get(i, {}), **weights.get(i, {})}
                 for i, s in enumerate(layers)]
    start = embed.summary()["rel_error"] if embed is not None else 0.0
    k = error_jump([p["rel_error"] for p in per_layer], start)
    before = (per_layer[k - 1]["rel_error"] if k else start) if k is not None else None
    jump = None
    # grows there (or turns NaN), above float32 rounding noise between two runtimes
    if k is not None and not per_layer[k]["rel_error"] <= max(before, JUMP_FLOOR):
        jump = {"layer": k, "before": before, "after": per_layer[k]["rel_error"]}
    metrics["min_layer_cosine"] = _worst(min, [p["cosine"] for p in per_layer])
    metrics["final_layer_rel_error"] = per_layer[-1]["rel_error"]
    metrics["max_layer_rel_error"] = _worst(max, [p["rel_error"] for p in per_layer])
    return per_layer, jump
