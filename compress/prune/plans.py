"""``auto``: several methods prune the whole model side by side; the method whose plans stay closest
to the original model on calibration samples their statistics did not see is run on all samples
and written.

The calibration samples are dealt into two folds (``holdout``): every plan method prunes the model
once from each fold's statistics, and each pruned model is compared with the original on the
other fold (KL divergence of the next-token distributions; NLL reported beside it). Each layer is
read once while all plans advance, fold by fold (the original model's statistics on one fold feed
that fold's non-sequential plans and are freed before the next fold's; a look-ahead plan decides
each layer one layer later). Plans of one fold that select the same experts share one fold fit. Where the stage folds
the dropped experts into the kept ones (``merge``), each plan is scored folded, its fold fit on its
own statistics: the race compares what would be written. The race writes nothing: the stage then
runs the chosen method on every calibration sample, as the method alone would (folded likewise),
and writes it (a second read of each layer).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from moepress.compress.arch.base import Adapter
from moepress.compress.moe import DecoderLayer
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.config import PruneConfig
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.holdout import HeldOut, choice_margin, score_plans
from moepress.compress.prune.lookahead import CandidateView, Pending, candidate_states, decide
from moepress.compress.prune.merge import folded
from moepress.compress.prune.methods import METHODS
from moepress.compress.stream import StreamedModel
from moepress.device import default_device
from moepress.memwatch import trim_heap
from moepress.progress import Progress


class Stage(Protocol):
    """What a plan race uses of the prune stage (compress/prune/stage.py: ``PruneStage``), declared
    here so that the race does not import the stage that runs it."""

    cfg: PruneConfig
    sm: StreamedModel
    adapter: Adapter
    budget: Budget
    merge_rule: str

    def evidence(self, i: int, layer: DecoderLayer, hs: list[torch.Tensor], recorder: bool,
                 chunks: bool = True) -> tuple[LayerEvidence, list[torch.Tensor]]: ...

    def merges(self, i: int) -> bool: ...


@dataclass
class _Plan:
    """One plan's pruned model so far: its hidden states on every calibration batch, its own fold's
    first (``stage.batches`` rotated so that ``hs[:n]`` are the statistics batches; None where never read),
    and the layer waiting for a look-ahead decision."""

    fold: int
    n: int
    hs: list[torch.Tensor | None]
    pending: Pending | None = None
    path: tuple = ()  # the kept experts of every layer so far: plans on the same path share their states


class PlanRace:
    """The plans of one ``auto`` run, advanced layer by layer over the stage's streamed model: every
    plan method once per fold (statistics from that fold), scored on the other fold."""

    def __init__(self, stage: Stage, names: list[str], folds: list[list[torch.Tensor]]):
        self.stage, self.names, self.folds = stage, names, folds
        self.batches = [b for f in folds for b in f]
        self.start = [sum(len(f) for f in folds[:i]) for i in range(len(folds))]
        # the original model's statistics need a recorder when a non-look-ahead plan searches or folds
        self.rec = bool(stage.merge_rule) or any(METHODS[n].needs_outputs and not METHODS[n].candidates
                                                 for n in names)

    def rot(self, xs: list, f: int) -> list:
        """``xs`` (one entry per batch, folds in order) starting at fold f's first batch."""
        return xs[self.start[f]:] + xs[:self.start[f]]

    def run(self, progress: Progress) -> dict:
        """The plan report: each method's held-out KL and NLL over all samples, and the chosen one."""
        s = self.stage
        ref = s.sm.embed(self.batches)
        plans = {(f, name): _Plan(f, len(fold), self._states(name, self.rot(ref, f), len(fold)))
                 for f, fold in enumerate(self.folds) for name in self.names}
        with progress.task("plans", s.adapter.num_layers) as task:
            for i, layer in s.sm.layers():
                s.refuse_non_finite(i, layer)
                ref = self._advance(plans, i, layer, ref)
                task.advance(note=f"layer {i}: {len(plans)} plans advanced")
        for p in plans.values():  # the last layer: its own output state against the original's
            if p.pending is not None:
                self._settle(p, self.rot(ref, p.fold)[:p.n], None)
        held, head, single = HeldOut(), s.sm.head_weights(), len(self.folds) == 1
        for f in range(len(self.folds)):
            m = 0 if single else len(self.folds[f])  # one fold: scored on its own samples
            score_plans(head, self.rot(ref, f)[m:], {n: plans[(f, n)].hs[m:] for n in self.names},
                        self.rot(self.batches, f)[m:], held)
        scores = held.scores()
        best = min(self.names, key=lambda k: scores[k]["heldout_kl"])  # ties: the first plan
        how = ("one calibration sample: scored on it, nothing held out" if single else
               f"{len(self.folds)}-fold: each method's plan from one fold's statistics scored on the other fold")
        return {"chosen": best, "selection": "lowest held-out KL divergence to the original model's next-token "
                f"distribution ({how}); the chosen method is then run on all calibration samples and written",
                "folds": len(self.folds), "heldout_tokens": held.positions, "heldout_samples": held.samples,
                "unpruned_heldout_nll": held.ref_nll / max(held.predicted, 1), "candidates": scores,
                "choice": choice_margin(best, held.kl, held.positions)}

    def _states(self, name: str, hs: list[torch.Tensor], n: int) -> list[torch.Tensor | None]:
        """A plan's states to carry: all, or (a plan whose statistics are the original model's, scored on the
        other fold) only the held-out ones, its own fold's entries None: they would never be read."""
        own_unused = len(self.folds) > 1 and not self.stage.cfg.sequential and not METHODS[name].candidates
        return [None] * n + hs[n:] if own_unused else hs

    def _run(self, layer: DecoderLayer, hs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``layer`` on the states a plan carries (the leading None entries stay None)."""
        k = next((j for j, h in enumerate(hs) if h is not None), len(hs))
        return hs[:k] + self.stage.sm.run_layer(layer, hs[k:])

    def _advance(self, plans: dict[tuple[int, str], _Plan], i: int, layer: DecoderLayer,
                 ref: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every plan through layer i; returns the original model's state after it. An MoE layer goes fold by
        fold: the original model's statistics on one fold, that fold's plans advanced, the statistics freed
        (one fold's recorder and fold fits in memory at a time)."""
        s = self.stage
        self.done: dict[tuple, list[torch.Tensor]] = {}  # (fold, path) -> states after this layer
        if layer.moe is None:
            ref_next = s.sm.run_layer(layer, ref)
            for p in plans.values():
                if p.pending is not None:
                    self._settle(p, self.rot(ref_next, p.fold)[:p.n], layer)
                p.path += ("dense",)
                if (p.fold, p.path) not in self.done:
                    self.done[(p.fold, p.path)] = self._run(layer, p.hs)
                p.hs = self.done[(p.fold, p.path)]
            return ref_next
        ref_next = []
        for f, fold in enumerate(self.folds):
            ref_next += self._advance_fold(plans, f, i, layer, ref[self.start[f]:self.start[f] + len(fold)])
        return ref_next

    def _advance_fold(self, plans: dict[tuple[int, str], _Plan], f: int, i: int, layer: DecoderLayer,
                      ref: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fold f's plans through MoE layer i, from the original model's statistics on fold f's batches
        ``ref`` (freed on return); returns the original model's state after the layer on them."""
        s = self.stage
        trim_heap()  # what the previous fold or layer freed, back to the OS before this fold's work
        # the original model's statistics on this fold, for its non-sequential plans
        ev, out = s.evidence(i, layer, ref, self.rec and not s.cfg.sequential, chunks=False)  # no report row
        groups: dict[tuple, tuple[LayerEvidence, list[int], list[_Plan]]] = {}  # (evidence, kept) -> plans
        for name in self.names:
            p = plans[(f, name)]
            if p.pending is not None:
                self._settle(p, out, layer)  # this fold's own batches: rot(ref_next, f)[:p.n]
            self._prune(name, p, i, layer, ev, groups)
        for e, kept, group in groups.values():
            self._run_selection(i, layer, e, kept, group)
        return out

    def _prune(self, name: str, p: _Plan, i: int, layer: DecoderLayer, ev_ref: LayerEvidence,
               groups: dict[tuple, tuple[LayerEvidence, list[int], list[_Plan]]]) -> None:
        """Plan p's selection in layer i: a look-ahead plan's candidates run now; any other plan joins the
        plans of the same evidence and selection in ``groups`` (run by ``_run_selection``)."""
        s = self.stage
        m = METHODS[name]
        if m.candidates:  # sequential: statistics of its own pruned prefix; candidates run on every batch
            ev, _ = s.evidence(i, layer, p.hs[:p.n], m.needs_outputs, chunks=False)
            with default_device(s.sm.device):
                p.pending = candidate_states(s.sm, s.budget, m, ev, layer, p.hs)
            return
        # statistics of the original model, or (--sequential) of its own pruned prefix
        if s.cfg.sequential:
            ev = s.evidence(i, layer, p.hs[:p.n], m.needs_outputs or s.merges(i), chunks=False)[0]
        else:
            ev = ev_ref
        with default_device(s.sm.device):
            kept = m.select(ev, s.budget).kept
        p.path += (tuple(kept),)
        groups.setdefault((id(ev), tuple(kept)), (ev, kept, []))[2].append(p)

    def _run_selection(self, i: int, layer: DecoderLayer, ev: LayerEvidence, kept: list[int],
                       group: list[_Plan]) -> None:
        """Layer i pruned to ``kept`` on the states of every plan in ``group`` (plans selecting ``kept`` from
        the same evidence ``ev``), scored as it would be written: the dropped experts folded in, fit on ``ev``
        (the fold depends on nothing else, so one fit serves the whole group; on a quantized input the float fold,
        before its re-quantization). A path that another plan already took (frequency = ean, often) runs once."""
        s = self.stage
        todo = {(p.fold, p.path): p.hs for p in group if (p.fold, p.path) not in self.done}
        if todo:
            fold = folded(ev, kept, self._stored_down(i)) if s.merges(i) else nullcontext()
            with default_device(s.sm.device), fold, CandidateView(layer, kept) as lay:
                for key, hs in todo.items():
                    self.done[key] = self._run(lay, hs)
        for p in group:
            p.hs = self.done[(p.fold, p.path)]

    def _stored_down(self, i: int):
        """Layer i's expert c's down projection read from the checkpoint, where the loaded layer holds it as
        stored (the fold rule "float"); else None (``folded`` keeps a copy)."""
        s = self.stage
        if s.merge_rule != "float":
            return None
        a = s.adapter
        return lambda c: s.sm.ckpt.get(a.expert_prefix(i, c) + a.expert_names[2] + ".weight")

    def _settle(self, p: _Plan, state: list[torch.Tensor], nxt: DecoderLayer | None) -> None:
        """Decide a look-ahead layer on the plan's statistics batches (``state``: the original's)."""
        with default_device(self.stage.sm.device):
            decide(self.stage.sm, self.stage.budget, p.pending, state, nxt)
        p.hs = p.pending.outs[p.pending.chosen]
        p.path += (tuple(p.pending.cands[p.pending.chosen].kept), "lookahead")
        p.pending = None
