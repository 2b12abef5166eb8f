"""Look-ahead: per layer, the candidate selection whose hidden state after the NEXT decoder layer is
closest to the original model's.

A look-ahead layer's candidates (``candidate_states``) each run through the layer without touching
it (``CandidateView``); the choice (``decide``) is made when the next layer is loaded, on the
already pruned model. ``state_error`` is the measure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from moepress.calib.observers import LayerRouting
from moepress.compress.moe import DecoderLayer, SparseMoE
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import LayerEvidence, Selection
from moepress.compress.prune.methods import METHODS, PruneMethod
from moepress.compress.prune.report import layer_report
from moepress.compress.prune.search import reroute_select, rms_normalize
from moepress.compress.prune.stability import select_stable
from moepress.compress.prune.surgery import prune_moe_module
from moepress.compress.stream import StreamedModel


def lookahead_select(ev: LayerEvidence, budget: Budget) -> Selection:
    """Where there is no next layer to look through (MTP layers): the first candidate, reroute."""
    return reroute_select(ev, budget)


def state_error(ref: list[torch.Tensor], hs: list[torch.Tensor]) -> float:
    """sum ||n(ref) - n(hs)||^2 / sum ||n(ref)||^2 over all tokens, n = RMS normalisation (what the next
    norm reads), the measure the look-ahead compares candidate selections by."""
    num = den = 0.0
    for r, h in zip(ref, hs, strict=True):
        nr = rms_normalize(r.float())
        num += float(((nr - rms_normalize(h.float())) ** 2).sum())
        den += float((nr ** 2).sum())
    return num / max(den, 1e-30)


class CandidateView:
    """A layer with one candidate selection applied without touching the loaded layer: its MoE
    block is swapped for a view whose router rows and expert list are sliced (experts shared)."""

    def __init__(self, layer: DecoderLayer, kept: list[int]):
        self.layer, self.kept = layer, kept

    def __enter__(self):
        orig = self.layer.moe
        # its own router (prune_moe_module slices the router it is given), the same expert modules
        view = SparseMoE(copy.deepcopy(orig.gate), list(orig.experts), orig.route, orig.shared_experts,
                         orig.layer_idx, orig.top_k)
        prune_moe_module(view, self.kept)
        self.orig = orig
        setattr(self.layer, self.layer.ffn_attr, view)
        return self.layer

    def __exit__(self, *exc):
        setattr(self.layer, self.layer.ffn_attr, self.orig)


@dataclass
class Pending:
    """A look-ahead layer waiting for the next layer: its candidate selections and the hidden states
    each leaves (all calibration batches), and its routing statistics for the report."""

    layer: int
    kind: str
    cands: dict[str, Selection]
    outs: dict[str, list[torch.Tensor]]
    stats: LayerRouting
    chosen: str | None = None


def candidate_states(sm: StreamedModel, budget: Budget, meth: PruneMethod, ev: LayerEvidence,
                     layer: DecoderLayer, hs: list[torch.Tensor]) -> Pending:
    """A look-ahead method's distinct candidate selections and the states each leaves; the choice comes later."""
    cands: dict[str, Selection] = {}
    for name in meth.candidates:
        c = select_stable(METHODS[name], ev, budget)
        if not any(c.kept == o.kept for o in cands.values()):
            cands[name] = c
    outs = {}
    for name, c in cands.items():
        with CandidateView(layer, c.kept) as lay:
            outs[name] = sm.run_layer(lay, hs)
    return Pending(ev.layer, "trunk", cands, outs, ev.stats)


def decide(sm: StreamedModel, budget: Budget, p: Pending, ref: list[torch.Tensor],
           nxt: DecoderLayer | None) -> tuple[Selection, dict]:
    """The candidate whose state after ``nxt`` (or after its own layer when there is no next layer)
    is closest to the original's ``ref``: (selection, report row); ``p.chosen`` names it."""
    look_n = min(len(ref), len(next(iter(p.outs.values()))))
    ref = ref[:look_n]
    if nxt is not None:
        errs = {name: state_error(ref, [sm.run_layer(nxt, [h])[0] for h in o[:look_n]])
                for name, o in p.outs.items()}
    else:
        errs = {name: state_error(ref, o[:look_n]) for name, o in p.outs.items()}
    p.chosen = min(errs, key=errs.get)  # ties: the first candidate
    sel = p.cands[p.chosen]
    sel.extra = {**sel.extra, "lookahead": {"chosen": p.chosen, "next_state_rel_error": errs}}
    return sel, layer_report(p.layer, p.kind, sel, p.stats, METHODS[p.chosen], budget.protected_in(p.layer))
