"""``auto``: every plan method prunes the whole model side by side; the lowest calibration loss wins.

Each layer is read once while all plans advance (the original model's statistics feed the
non-sequential plans, a look-ahead plan decides each layer one layer later); the winning plan
is then written, its layers read a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from moepress.compress.arch.base import Adapter
from moepress.compress.moe import DecoderLayer
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.config import PruneConfig
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.lookahead import CandidateView, Pending, calibration_nll, candidate_states, decide
from moepress.compress.prune.methods import METHODS
from moepress.compress.prune.report import layer_report
from moepress.compress.stream import StreamedModel
from moepress.progress import Progress


class Stage(Protocol):
    """What a plan race uses of the prune stage (compress/prune/stage.py: ``PruneStage``), declared
    here so that the race does not import the stage that runs it."""

    cfg: PruneConfig
    sm: StreamedModel
    adapter: Adapter
    batches: list[torch.Tensor]
    budget: Budget
    report_layers: list[dict]

    def evidence(self, i: int, layer: DecoderLayer, hs: list[torch.Tensor],
                 recorder: bool) -> tuple[LayerEvidence, list[torch.Tensor]]: ...

    def write_read(self, i: int, kept: list[int] | None) -> None: ...


@dataclass
class _Plan:
    """One plan's pruned model so far: its hidden states, the layer waiting for a look-ahead decision,
    and per decided layer the kept experts and the report row."""

    hs: list[torch.Tensor]
    pending: Pending | None = None
    kept: dict[int, list[int]] = field(default_factory=dict)
    rows: dict[int, dict] = field(default_factory=dict)


class PlanRace:
    """The plans of one ``auto`` run, advanced layer by layer over the stage's streamed model."""

    def __init__(self, stage: Stage, names: list[str]):
        self.stage, self.names = stage, names
        # the original model's statistics need a recorder when a non-look-ahead plan searches
        self.rec = any(METHODS[n].needs_outputs and not METHODS[n].candidates for n in names)

    def run(self, task, progress: Progress) -> tuple[list[torch.Tensor], dict]:
        """(final hidden states of the chosen plan, the plan report); the chosen plan is written."""
        s = self.stage
        ref = s.sm.embed(s.batches)
        plans = {name: _Plan(ref) for name in self.names}
        for i, layer in s.sm.layers():
            ref = self._advance(plans, i, layer, ref)
            task.advance(note=f"layer {i}: {len(self.names)} plans advanced")
        for p in plans.values():  # the last layer: its own output state against the original's
            if p.pending is not None:
                self._settle(p, ref, None)
        norm_w = s.sm.head_weights()
        loss = {name: calibration_nll(norm_w, plans[name].hs, s.batches) for name in self.names}
        best = min(loss, key=loss.get)  # ties: the first plan
        info = {"chosen": best, "calibration_nll": loss, "unpruned_calibration_nll": calibration_nll(
            norm_w, ref, s.batches)}
        self._write(plans[best], progress)
        return plans[best].hs, info

    def _advance(self, plans: dict[str, _Plan], i: int, layer: DecoderLayer,
                 ref: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every plan through layer i; returns the original model's state after it."""
        s = self.stage
        ev_ref = None
        if layer.moe is not None:  # the original model's statistics, for the non-sequential plans
            ev_ref, ref_next = s.evidence(i, layer, ref, self.rec and not s.cfg.sequential)
        else:
            ref_next = s.sm.run_layer(layer, ref)
        for name, p in plans.items():
            if p.pending is not None:
                self._settle(p, ref_next, layer)
            if layer.moe is None:
                p.hs = s.sm.run_layer(layer, p.hs)
            else:
                self._prune(name, p, i, layer, ev_ref)
        return ref_next

    def _prune(self, name: str, p: _Plan, i: int, layer: DecoderLayer, ev_ref: LayerEvidence | None) -> None:
        s = self.stage
        m = METHODS[name]
        if m.candidates:  # sequential: statistics of its own pruned prefix
            ev, _ = s.evidence(i, layer, p.hs, m.needs_outputs)
            p.pending = candidate_states(s.sm, s.budget, m, ev, layer, p.hs)
            return
        # statistics of the original model, or (--sequential) of its own pruned prefix
        ev = s.evidence(i, layer, p.hs, m.needs_outputs)[0] if s.cfg.sequential else ev_ref
        sel = m.select(ev, s.budget)
        p.kept[i] = sel.kept
        p.rows[i] = layer_report(i, "trunk", sel, ev.stats, m, s.budget.protected_in(i))
        with CandidateView(layer, sel.kept) as lay:
            p.hs = s.sm.run_layer(lay, p.hs)

    def _settle(self, p: _Plan, state: list[torch.Tensor], nxt: DecoderLayer | None) -> None:
        sel, row = decide(self.stage.sm, self.stage.budget, p.pending, state, nxt)
        p.kept[row["layer"]], p.rows[row["layer"]] = sel.kept, row
        p.hs = p.pending.outs[p.pending.chosen]
        p.pending = None

    def _write(self, plan: _Plan, progress: Progress) -> None:
        s = self.stage
        with progress.task("write", s.adapter.num_layers) as wtask:
            for i in range(s.adapter.num_layers):
                s.write_read(i, plan.kept.get(i))
                if i in plan.rows:
                    s.report_layers.append(plan.rows[i])
                wtask.advance(note=f"layer {i}")
