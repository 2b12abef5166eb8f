"""One MoE layer's row of prune_report.json, and its one-line progress note."""

from __future__ import annotations

import math

from moepress.calib.observers import LayerRouting
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import Selection
from moepress.compress.prune.methods import PruneMethod


def layer_report(i: int, kind: str, sel: Selection, stats: LayerRouting, method: PruneMethod,
                 protected: frozenset[int]) -> dict:
    """Kept and dropped experts with their scores and token shares, plus the method's extra fields."""
    # each read once (on a GPU, a read per expert waited for the device each time)
    share = stats.share
    scores, counts, shares = sel.scores.tolist(), stats.counts.tolist(), share.tolist()
    new_of = {e: j for j, e in enumerate(sel.kept)}

    def row(e):
        s = float(scores[e])
        d = {"expert": e, "score": None if math.isnan(s) else s, "tokens": int(counts[e]),
             "share": round(float(shares[e]), 6)}
        if e in new_of:
            d["new_index"] = new_of[e]
        if e in protected:
            d["protected"] = True
        return d

    dropped = [e for e in range(stats.num_experts) if e not in new_of]
    return {"layer": i, "kind": kind, "tokens": stats.tokens, "score": method.score_name,
            "dropped_share": round(float(share[dropped].sum()), 6),
            "kept": [row(e) for e in sel.kept], "dropped": [row(e) for e in dropped], **sel.extra}


def layer_note(rep: dict, budget: Budget) -> str:
    return (f"layer {rep['layer']}: kept {len(rep['kept'])}/{budget.num_experts}, dropped "
            f"{100 * rep['dropped_share']:.1f}% of routing assignments")
