"""How firmly each layer's decision rests on the calibration tokens (``prune_report.json``: ``stability``).

A layer's decision is the boundary between the weakest kept expert and the strongest dropped one
(within each group for grouped routers). Its margin is compared with the margin's sampling noise:

* score methods (statistics of ``RoutingStats`` only): a delete-a-group jackknife. The
  calibration samples are dealt into ``CHUNKS`` groups (sample r to group r % CHUNKS) whose
  statistics ``ChunkedRouting`` keeps apart; the method selects again with each group left out;
  the noise is the jackknife standard error of the margin, and ``jackknife_flips`` counts the
  leave-one-group-out selections that differ from the written one;
* searches that report their own boundary (``reroute``: the last drop against the runner-up at
  that step, with the per-token paired noise of the two contributions) keep it.

``z`` = margin / noise; a decision with ``z`` < 2 (or a jackknife flip) is ``fragile``: a resample
of the calibration set, or a handful of tokens, could change which experts stay.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from moepress.calib.metrics import margin_z
from moepress.calib.observers import LayerRouting
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import LayerEvidence, Selection
from moepress.compress.prune.methods import PruneMethod

CHUNKS = 8  # jackknife groups of calibration samples
FRAGILE_Z = 2.0


class ChunkedRouting:
    """Observer: ``LayerRouting`` per group of calibration samples (sample r -> group r % CHUNKS).

    The layer sees flattened tokens [B * S, H]; ``seq_len`` S maps a token to its sample."""

    def __init__(self, num_experts: int, top_k: int, seq_len: int, chunks: int = CHUNKS):
        self.seq_len, self.n = seq_len, chunks
        self.chunks = [LayerRouting(num_experts, top_k) for _ in range(chunks)]
        self.row = 0  # index of the next forward's first sample
        self.tok_chunk = self.local = None

    def on_route(self, moe, x, logits, weights, indices) -> None:
        """Each group's tokens to its ``LayerRouting``; the tokens per (expert, group) counted for
        ``on_expert`` in the same host sync (one per forward, not one per expert: a GPU waits each time)."""
        t, n = x.shape[0], self.n
        sample = self.row + torch.arange(t, device=x.device) // self.seq_len
        self.row += -(-t // self.seq_len)
        self.tok_chunk = sample % n
        counts = torch.cat([torch.bincount(self.tok_chunk, minlength=n), torch.bincount(
            (indices * n + self.tok_chunk[:, None]).reshape(-1), minlength=moe.num_experts * n)]).tolist()
        per_chunk, self.per_expert = counts[:n], [counts[n + e * n: n + (e + 1) * n] for e in range(moe.num_experts)]
        self.local = torch.empty(t, dtype=torch.long, device=x.device)
        for c, rows in enumerate(torch.split(torch.argsort(self.tok_chunk, stable=True), per_chunk)):
            if per_chunk[c]:
                self.local[rows] = torch.arange(per_chunk[c], device=x.device)
                self.chunks[c].on_route(moe, x[rows], None if logits is None else logits[rows], weights[rows],
                                        indices[rows])

    def on_expert(self, moe, e, tokens, slots, gate, x_e, y_e) -> None:
        split = self.per_expert[e]
        rows = torch.split(torch.argsort(self.tok_chunk[tokens], stable=True), split)
        for c, r in enumerate(rows):
            if split[c]:
                self.chunks[c].on_expert(moe, e, self.local[tokens[r]], slots[r], gate[r], x_e[r], y_e[r])


def _without(total: LayerRouting, part: LayerRouting) -> LayerRouting:
    """``total`` minus one group's statistics (every accumulated field is a sum)."""
    out = LayerRouting(total.num_experts, total.top_k, total.tokens - part.tokens)
    for k in LayerRouting._FIELDS:
        setattr(out, k, getattr(total, k) - getattr(part, k).to(getattr(total, k).device))
    return out


def _boundaries(scores: torch.Tensor, kept: list[int], budget: Budget, layer: int) -> list[tuple[int, int]]:
    """(weakest kept, strongest dropped) per group, protected experts and unscored ones left out."""
    E, prot = budget.num_experts, budget.protected_in(layer)
    size = E // budget.n_group
    keep, vals = set(kept), scores.tolist()  # read once (on a GPU, each float(scores[e]) waited for the device)
    out = []
    for g in range(budget.n_group):
        members = [e for e in range(g * size, (g + 1) * size) if e not in prot and not math.isnan(vals[e])]
        k = [e for e in members if e in keep]
        d = [e for e in members if e not in keep]
        if k and d:
            out.append((min(k, key=lambda e: vals[e]), max(d, key=lambda e: vals[e])))
    return out


def jackknife(meth: PruneMethod, ev: LayerEvidence, budget: Budget, sel: Selection,
              chunks: list[LayerRouting]) -> dict | None:
    """The selection's tightest group boundary, its margin and jackknife noise, and the flips."""
    used = [c for c in chunks if c.tokens > 0]
    pairs = _boundaries(sel.scores, sel.kept, budget, ev.layer)
    if len(used) < 2 or not pairs:
        return None
    loo = [meth.select(replace(ev, stats=_without(ev.stats, c), recorder=None), budget) for c in used]
    g = len(used)
    # a summed score left without one group is a sum over g - 1 groups: scaled by g / (g - 1), the jackknife
    # gives the standard error of a sum of g groups, sqrt(g / (g - 1) * sum_i (m_i - mean m)^2) over the groups'
    # own margins m_i (unscaled, it read (g - 1) / g of it)
    scale = g / (g - 1) if meth.score_is_sum else 1.0
    best = None
    for k, d in pairs:
        margins = torch.tensor([scale * float(s.scores[k] - s.scores[d]) for s in loo], dtype=torch.float64)
        noise = math.sqrt((g - 1) / g * float(((margins - margins.mean()) ** 2).sum()))
        row = _row(k, d, float(sel.scores[k] - sel.scores[d]), noise, getattr(ev.stats, meth.tokens))
        if best is None or _key(row) < _key(best):
            best = row
    flips = sum(s.kept != sel.kept for s in loo)
    best.update({"noise_from": f"jackknife over {g} groups of calibration samples",
                 "jackknife_flips": f"{flips}/{g}"})
    best["fragile"] = best["fragile"] or flips > 0
    return best


def _key(row: dict) -> float:
    return math.inf if row["z"] is None else row["z"]


def _row(k: int, d: int, margin: float, noise: float, tokens: torch.Tensor) -> dict:
    """``tokens``: per expert, the calibration tokens its score rests on (the method's ``tokens`` field)."""
    z = margin_z(margin, noise)  # a tie (both unscored, kept by index): 0, fragile
    return {"weakest_kept": k, "strongest_dropped": d, "kept_tokens": int(tokens[k]),
            "dropped_tokens": int(tokens[d]), "margin": margin, "noise": noise,
            "z": None if not math.isfinite(z) else z, "fragile": z < FRAGILE_Z}


def stability(meth: PruneMethod, ev: LayerEvidence, budget: Budget, sel: Selection,
              chunks: list[LayerRouting] | None) -> dict:
    """The ``stability`` field of a layer's report row."""
    out: dict = {"statistics_tokens": ev.stats.tokens}
    b = sel.extra.get("boundary")  # JSON-safe: z is None when the noise is 0
    if b is not None:  # a search's own boundary
        z = margin_z(b["margin"], b["noise"])  # a tie (neither touches a search token): 0, fragile
        out.update({**b, "kept_tokens": int(ev.stats.counts[b["weakest_kept"]]),
                    "dropped_tokens": int(ev.stats.counts[b["strongest_dropped"]]),
                    "z": None if not math.isfinite(z) else z, "fragile": z < FRAGILE_Z})
    elif chunks is not None and not meth.needs_outputs:
        out.update(jackknife(meth, ev, budget, sel, chunks) or {"fragile": False})
    return out


def select_stable(meth: PruneMethod, ev: LayerEvidence, budget: Budget) -> Selection:
    """``meth.select`` with the decision's ``stability`` in its extra fields (the report row shows them)."""
    sel = meth.select(ev, budget)
    st = stability(meth, ev, budget, sel, ev.chunks)
    sel.extra = {**{k: v for k, v in sel.extra.items() if k != "boundary"}, "stability": st}
    return sel
