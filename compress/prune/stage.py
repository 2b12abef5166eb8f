"""The prune stage: stream the checkpoint once, decide each MoE layer's kept experts, write as it goes.

The calibration batches run through the checkpoint one decoder layer at a time; for each MoE
layer the statistics of that layer decide which experts stay, and the layer is written straight
away (``surgery``). Memory is one layer plus the calibration activations. A look-ahead method
decides a layer when the next one is loaded; ``auto`` first races whole-model plans (``plans``)
and then runs the chosen method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from moepress.calib.data import calibration_inputs
from moepress.calib.observers import RoutingStats
from moepress.calib.sources import local_paths, refuse_output_over
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, read_later
from moepress.compress.checkpoint.writer import check_output
from moepress.compress.moe import DecoderLayer, first_non_finite
from moepress.compress.prune.budget import kept_bytes, plan_budget
from moepress.compress.prune.config import REPORT_NAME, PruneConfig
from moepress.compress.prune.evidence import LayerEvidence, RouteRecorder, Selection
from moepress.compress.prune.holdout import split_folds
from moepress.compress.prune.lookahead import Pending, candidate_states, decide
from moepress.compress.prune.merge import check_mergeable, fold_dropped, stored_in_float
from moepress.compress.prune.methods import METHODS, PruneMethod
from moepress.compress.prune.mtp import MTP_SCORING, MTPInput, mtp_layers_present, read_decoder_state
from moepress.compress.prune.plans import PlanRace
from moepress.compress.prune.report import layer_note, layer_report
from moepress.compress.prune.sidecars import pruned_sidecars, refuse_index_patterns
from moepress.compress.prune.stability import ChunkedRouting, select_stable
from moepress.compress.prune.surgery import prune_moe_module, write_from_checkpoint, write_from_layer
from moepress.compress.stream import StreamedModel, read_ahead_budget
from moepress.device import default_device
from moepress.errors import MoepressError
from moepress.memwatch import trim_heap
from moepress.outputs import require_space
from moepress.progress import QUIET, Progress

# token ids [B, S] per batch, or a function returning them (called once the options are validated)
Batches = list[torch.Tensor] | Callable[[], list[torch.Tensor]]


@torch.no_grad()
def prune_checkpoint(model: str | Path, out: str | Path, cfg: PruneConfig, *, batches: Batches,
                     progress: Progress = QUIET, force: bool = False, device: torch.device | None = None) -> dict:
    """Prune ``model`` into ``out`` (same format as the input); returns the result summary.

    ``batches`` are the calibration token ids [B, S], built by the caller. Passed as a function,
    they are fetched only after the checkpoint, the method and the budget are validated, so that a
    bad option is refused before any calibration data is read.
    """
    t0 = time.monotonic()
    stage = PruneStage(model, cfg, device=device)
    a = stage.adapter
    require_space(out, kept_bytes(stage.reader, a, stage.budget.keep, a.moe_layers() + stage.mtp, stage.undeclared),
                  "the pruned tensors")
    # before the calibration: an -o over the model or a --calib file refused in a second (with --force, the
    # writer deleted a --calib file inside -o before it was read)
    refuse_output_over(out, stage.inputs[1:])
    check_output(out, force=force, sources=stage.inputs)
    stage.run(out, batches() if callable(batches) else batches, force=force, progress=progress)
    return stage.summary(out, t0)


UNDECLARED = ("stored past num_hidden_layers and not declared by num_nextn_predict_layers, so no runtime reads "
              "them: not written")


def race_of(method: PruneMethod, cfg: PruneConfig) -> tuple[str, ...]:
    """The methods ``auto`` races: ``--race`` (two or more of auto's own, in auto's order, so that a tie goes the
    same way however they were listed) or all of auto's own; () for any other method. One line where
    ``--race`` names anything else or is given to a method that races nothing."""
    if not cfg.race:
        return method.plans
    given = ",".join(cfg.race)
    if not method.plans:
        raise MoepressError(f"--race {given}: only --method auto races methods; --method {cfg.method} runs one")
    bad = [m for m in cfg.race if m not in method.plans]
    if bad or len(cfg.race) < 2:
        what = f"'{bad[0]}' is not one of them" if bad else f"for one method, use --method {cfg.race[0]}"
        raise MoepressError(f"--race {given}: expected two or more of {', '.join(method.plans)}; {what}")
    return tuple(m for m in method.plans if m in cfg.race)


class PruneStage:
    """One prune run: the opened checkpoint, its budget, and the steps that prune and write it."""

    def __init__(self, model: str | Path, cfg: PruneConfig, device: torch.device | None = None):
        """Open ``model`` and validate the method and the budget (one-line MoepressErrors)."""
        if cfg.method not in METHODS:
            raise MoepressError(f"--method {cfg.method}: expected one of {', '.join(METHODS)}")
        self.cfg, self.method = cfg, METHODS[cfg.method]
        self.race = race_of(self.method, cfg)
        # "always" / "float" (where the experts are stored in float) / "": the method's, unless --merge/--no-merge
        self.merge_rule = {True: "always", False: ""}.get(cfg.merge, self.method.merge)
        self._merges: dict[int, bool] = {}
        if cfg.merge is False and self.method.merge == "always":
            raise MoepressError(f"--no-merge: --method {cfg.method} always folds the dropped experts into the kept "
                                "ones; expected --method reap for its selection without folding")
        if self.merge_rule and self.method.candidates:
            raise MoepressError(f"--merge: {cfg.method} decides each layer one layer later from candidate "
                                "selections; merging folds after a per-layer selection (reroute, reap, frequency, "
                                "ean, auto)")
        self.reader = reader = CheckpointReader(model)
        self.inputs = (reader.path, *local_paths(cfg.calib))  # what the output may not overlap
        # Within 2 stored layers: bf16 weights stay as stored and quantized ones (block FP8, packed INT4)
        # too, decoded at each call (StoredLinear: the same float32 results at a half, a quarter, an
        # eighth of the memory); the reader runs a sixteenth of a layer ahead (never a whole second
        # layer; the rest of the second layer's room is the methods' working memory), and a layer is
        # dropped before the next one is read (release_layers).
        self.sm = StreamedModel(reader, keep_stored=True,
                                read_ahead_bytes=read_ahead_budget(reader, 16, floor=0),
                                release_layers=True, device=device)
        self.adapter = a = self.sm.adapter
        self.mtp = mtp_layers_present(a, reader)
        if cfg.sequential and self.method.candidates and len(self.mtp) < 2:  # a flag that would change nothing
            raise MoepressError(f"--sequential: --method {cfg.method} always gathers a layer's statistics on the "
                                "pruned layers before it (it changes only an MTP layer's input from another MTP "
                                "layer, and this model has fewer than 2); expected no --sequential")
        self.finite: set[int] = set()  # layers whose weights refuse_non_finite found finite (auto reads them twice)
        # stored past num_hidden_layers and not a declared MTP layer: no runtime reads them; not written
        self.undeclared = [i for i in reader.layer_indices() if i >= a.num_layers and i not in self.mtp]
        moe_layers = a.moe_layers()
        if not moe_layers:
            raise MoepressError(f"{reader.path}: no MoE layers to prune")
        self.budget = plan_budget(a, cfg, moe_layers + self.mtp)
        refuse_index_patterns(reader.path, reader.config, a)
        if self.merge_rule == "always":  # before the first layer's work, not after it
            check_mergeable(reader, a, moe_layers[0])
        self.routing = a.routing()
        self.notes = list(self.budget.decisions)
        if self.routing["scoring"] == "softmax" and not self.routing["renormalize"]:
            self.notes.append("norm_topk_prob=false: the softmax runs over fewer experts after pruning, so the "
                              "weights of every token grow by sum(exp(all logits)) / sum(exp(kept logits)); choices "
                              "among kept experts are unchanged")
        if (misread := a.transformers_misreads()) is not None:  # the output keeps the input's layer kinds
            self.notes.append(f"note: transformers {misread}, in this output as in its input; vLLM and SGLang read "
                              "the config as moepress does")
        self.report_layers: list[dict] = []
        self.batches: list[torch.Tensor] = []
        self.w: CheckpointWriter | None = None

    # ---- the run ------------------------------------------------------------------------------

    def run(self, out: str | Path, batches: list[torch.Tensor], *, force: bool, progress: Progress) -> None:
        """Write the pruned checkpoint, its config.json and prune_report.json into ``out``."""
        self.batches = batches
        if self.undeclared:
            progress.info(f"layers {self.undeclared} of {self.reader.path}: {UNDECLARED}")
        n_tokens = sum(b.numel() for b in batches)
        reader, cfg = self.reader, self.cfg
        top_names = reader.top_names()
        plan_info = None
        with CheckpointWriter(out, force=force, sources=self.inputs) as w:
            self.w = w
            w.manifest.update({"stage": "prune", "config": asdict(cfg),
                               "inputs": {"model": str(reader.path.resolve()),
                                          "calibration": list(cfg.calib) or ["default"],
                                          "calibration_tokens": n_tokens, **calibration_inputs(cfg.calib)}})
            for name in top_names:  # each read when its shard is written
                w.add(name, read_later(reader, name))
            w.end_shard()
            if self.method.plans:  # the method chosen out of fold (a task of its own), then run on every sample
                plan_info = PlanRace(self, list(self.race), split_folds(batches)).run(progress)
                self.method = METHODS[plan_info["chosen"]]
            with progress.task("prune", self.adapter.num_layers + len(self.mtp)) as task:  # its ETA: this run's
                hs = self._run_single(task)
                if self.mtp:
                    self._prune_mtp(task, hs, self.method)
            config = self.adapter.config_with_experts(self.budget.keep)
            for name, obj in pruned_sidecars(reader.path, self.adapter, self.report_layers, config).items():
                w.write_json(name, obj)
            w.copy_aux_files(reader.path)
            w.write_json(REPORT_NAME, self._report(n_tokens, plan_info))
        self.w = None

    def _report(self, n_tokens: int, plan_info: dict | None) -> dict:
        a, budget = self.adapter, self.budget
        return {"model": str(self.reader.path), "family": a.family, "config": asdict(self.cfg),
                "num_experts": budget.num_experts, "kept": budget.keep, "experts_key": a.experts_key(),
                "routing": self.routing, "constraints": self.notes, "calibration_tokens": n_tokens,
                "mtp_layers": self.mtp, "mtp_scoring": MTP_SCORING if self.mtp else None,
                **({"layers_not_written": {"layers": self.undeclared, "why": UNDECLARED}} if self.undeclared else {}),
                **({"plans": plan_info} if plan_info else {}), **self._merge_report(), "layers": self.report_layers}

    def _merge_report(self) -> dict:
        if not self.merge_rule:
            return {}
        done = [r["layer"] for r in self.report_layers if "merged" in r]
        why = {"always": "every pruned layer", "float": "layers whose routed experts are stored in float; experts "
               "stored quantized keep their stored bytes (--merge folds and re-quantizes them)"}[self.merge_rule]
        return {"merge": {"rule": self.merge_rule, "applies_to": why, "merged_layers": done}}

    def summary(self, out: str | Path, t0: float) -> dict:
        shares = [r["dropped_share"] for r in self.report_layers]
        return {"output": str(out), "method": self.cfg.method, "chosen": self.method.name,  # auto: what it ran
                "num_experts": self.budget.num_experts,
                "kept": self.budget.keep, "moe_layers": len(self.report_layers), "mtp_layers": len(self.mtp),
                "dropped_token_share_mean": round(sum(shares) / len(shares), 6), "constraints": self.notes,
                "fragile_layers": sum(bool(r.get("stability", {}).get("fragile")) for r in self.report_layers),
                "seconds": round(time.monotonic() - t0, 3)}

    # ---- one method over the trunk ---------------------------------------------------------------

    def _reference_batches(self) -> int:
        """Look-ahead: how many of the first calibration batches (about search_tokens tokens) the
        original model's hidden states are kept for, to compare candidates against."""
        n_ref, t = 0, 0
        while self.method.candidates and n_ref < len(self.batches) and t < self.cfg.search_tokens:
            t += self.batches[n_ref].numel()
            n_ref += 1
        return n_ref

    def _run_single(self, task) -> list[torch.Tensor]:
        """The trunk pruned by one method, layer by layer; a look-ahead layer is written one layer later."""
        sm, look = self.sm, bool(self.method.candidates)
        hs = sm.embed(self.batches)
        ref = hs[:self._reference_batches()]
        pending: Pending | None = None
        for i, layer in sm.layers():
            trim_heap()  # what the previous layer's work freed, back to the OS (within 2 stored layers)
            self.refuse_non_finite(i, layer)
            if look:
                ref_next = sm.run_layer(layer, ref)
                if pending is not None:
                    hs = self._settle(pending, ref_next, layer, task)
                    pending = None
                ref = ref_next
            if layer.moe is None:
                hs = sm.run_layer(layer, hs)
                self.write_read(i, None)
                task.advance(note=f"layer {i}: dense, copied")
                continue
            if look:
                pending = self.prune_layer(i, layer, hs, "trunk", self.method)
                continue
            hs, _ = self.prune_layer(i, layer, hs, "trunk", self.method)
            task.advance(note=layer_note(self.report_layers[-1], self.budget))
        if pending is not None:  # the last layer: its own output state against the original's
            hs = self._settle(pending, ref, None, task)
        return hs

    def refuse_non_finite(self, i: int, layer: DecoderLayer) -> None:
        """A NaN / Inf weight (a quantized input's corrupt scale decodes to one) would carry NaN hidden states
        into every later layer's statistics, and the plan would rest on them; quantize refuses it alike."""
        if i in self.finite:
            return  # checked in the plan race
        bad = first_non_finite(layer)  # one decoded weight at a time, one host sync per layer where all are finite
        if bad is None:
            self.finite.add(i)
            return
        raise MoepressError(f"{self.reader.path}: {self.adapter.layer_prefix(i)}{bad[0]}: {bad[1]} values are not "
                            "finite (NaN or Inf) as decoded (its scale, for a quantized input); expected finite "
                            "weights")

    def _settle(self, pending: Pending, state: list[torch.Tensor], nxt: DecoderLayer | None,
                task) -> list[torch.Tensor]:
        """Decide and write a look-ahead layer; returns the hidden states its chosen selection leaves."""
        with default_device(self.sm.device):
            sel, row = decide(self.sm, self.budget, pending, state, nxt)
        self.report_layers.append(row)
        self.write_read(pending.layer, sel.kept)
        task.advance(note=layer_note(row, self.budget))
        return pending.outs[pending.chosen]

    def _prune_mtp(self, task, hs: list[torch.Tensor], method: PruneMethod) -> None:
        """Each MTP layer pruned on its own forward: input from the trunk's final state and the next token."""
        sm = self.sm
        norm, _ = sm.head_weights()
        prev = [norm(h) for h in hs]
        for depth, i in enumerate(self.mtp):
            inp = MTPInput(sm, i)
            hs_in = [inp(ids, h, depth) for ids, h in zip(self.batches, prev, strict=True)]
            layer = sm.build_layer(i, read_decoder_state(sm, i))
            prev, sel = self.prune_layer(i, layer, hs_in, "mtp", method)
            del layer
            task.advance(note=f"MTP layer {i}: kept {len(sel.kept)}/{self.budget.num_experts}")

    # ---- steps on one layer ----------------------------------------------------------------------

    def evidence(self, i: int, layer: DecoderLayer, hs: list[torch.Tensor], recorder: bool,
                 chunks: bool = True) -> tuple[LayerEvidence, list[torch.Tensor]]:
        """Run the unpruned ``layer`` on ``hs`` with the observers a method reads: (evidence, outputs)."""
        stats = RoutingStats()
        lr = stats.attach(i, layer)
        chunked = ChunkedRouting(lr.num_experts, lr.top_k, hs[0].shape[1]) if chunks else None  # stability
        if chunked is not None:
            layer.moe.observers.append(chunked)
        rec = hook = None
        with default_device(self.sm.device):
            if recorder:
                rec = RouteRecorder(sum(h.shape[0] * h.shape[1] for h in hs), self.cfg.search_tokens, self.cfg.seed)
                hook = rec.attach(layer)
            out_hs = self.sm.run_layer(layer, hs)
        layer.moe.observers = []
        if hook is not None:
            hook()
        return LayerEvidence(i, layer.moe, lr, self.routing, rec, chunked and chunked.chunks), out_hs

    def prune_layer(self, i: int, layer: DecoderLayer, hs: list[torch.Tensor], kind: str,
                    meth: PruneMethod) -> Pending | tuple[list[torch.Tensor], Selection]:
        """Select and write layer i: (its output states, the selection); a trunk layer of a look-ahead
        method returns its ``Pending`` candidates instead (written once decided)."""
        merging = not (meth.candidates and kind == "trunk") and self.merges(i)
        ev, out_hs = self.evidence(i, layer, hs, meth.needs_outputs or merging)
        with default_device(self.sm.device):  # the search's own tensors beside the layer's
            if meth.candidates and kind == "trunk":
                del out_hs  # the unpruned layer's states: each candidate leaves its own
                return candidate_states(self.sm, self.budget, meth, ev, layer, hs)
            sel = select_stable(meth, ev, self.budget)
            if merging:
                sel.extra["merged"] = fold_dropped(ev, sel.kept, self.budget.num_experts)
                trim_heap()  # the fold's solver buffers (MKL keeps them), before the layer is written
        assert len(sel.kept) == self.budget.keep
        self.report_layers.append(layer_report(i, kind, sel, ev.stats, meth, self.budget.protected_in(i)))
        write_from_layer(self.w, self.reader, self.adapter, i, layer, sel.kept, sel.extra.get("merged"))
        if self.cfg.sequential:
            prune_moe_module(layer.moe, sel.kept)
            out_hs = self.sm.run_layer(layer, hs)
        return out_hs, sel

    def merges(self, i: int) -> bool:
        """Whether layer i's dropped experts are folded into its kept ones (``merge_rule``); decided once per
        layer (the race asks for every plan)."""
        if self.merge_rule != "float":
            return bool(self.merge_rule)
        if i not in self._merges:
            a, experts = self.adapter, range(self.budget.num_experts)
            self._merges[i] = stored_in_float(self.reader, self.reader.layer_names(i),
                                              [a.expert_prefix(i, e) + n for e in experts for n in a.expert_names])
        return self._merges[i]

    def write_read(self, i: int, kept: list[int] | None) -> None:
        """Layer i read again as stored: pruned to ``kept``, or copied (dense)."""
        write_from_checkpoint(self.w, self.reader, self.adapter, i, kept)
