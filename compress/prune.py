"""Expert pruning: drop the routed experts that matter least, one expert count for every layer.

Streamed like everything else: the calibration batches run through the checkpoint one
decoder layer at a time; for each MoE layer the statistics of that layer decide which
experts stay, and the layer is written straight away (router rows, correction bias and
experts sliced and renumbered; every other tensor copied exactly as stored, so a
block-FP8 checkpoint stays block-FP8). Memory is one layer plus the calibration
activations.

Pieces, top to bottom:
- routing simulation: the family's routing with some experts removed, on a full logit
  matrix (``route_masked``); it equals the sliced router exactly and drives the search.
- constraints: one kept count per model, multiples of ``--ep-size`` and of ``n_group``,
  top-k reachability, protected experts (``plan_budget``).
- methods (registry ``METHODS``): ``frequency``, ``ean``, ``reap`` rank experts by a
  statistic of ``RoutingStats``; ``reroute`` searches the dropped set that keeps the
  hidden state after the MoE block (as the next layer's RMSNorm reads it) closest to the
  original with the pruned router re-routing tokens; ``lookahead`` takes, per layer, the
  reroute or the reap selection, whichever leaves the hidden state after the NEXT decoder
  layer closest to the original model's (a one-layer look-ahead on the already pruned model:
  the layer's choice is made, and the layer written, when the next layer is loaded);
  ``auto`` (the default) prunes the whole model with lookahead, reroute and reap side by side
  (one read of each layer, the calibration set through each pruned model) and writes the plan
  with the lowest calibration loss (a second read of each layer).
- surgery: ``prune_moe_module`` (in memory) and ``pruned_layer_tensors`` (checkpoint).
- ``prune_checkpoint``: the stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moepress.calib.metrics import nll_sum
from moepress.calib.observers import LayerRouting, RoutingStats
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, LayerView
from moepress.compress.moe import DecoderLayer, SparseMoE
from moepress.compress.stream import StreamedModel, read_ahead_budget
from moepress.errors import MoepressError
from moepress.progress import QUIET, Progress

REPORT_NAME = "prune_report.json"
DEFAULT_METHOD = "auto"  # decided by bench/prune_quality.py (README table)
MTP_SCORING = ("each MTP layer is scored by its own forward on the calibration text (input: the trunk's final "
               "hidden state and the next token, as vLLM's DeepSeek MTP runs it) and keeps the trunk's expert count")


# ---- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneConfig:
    """One prune run. Exactly one of ``ratio`` (fraction of routed experts to drop) and ``keep``."""

    method: str = DEFAULT_METHOD
    ratio: float | None = None
    keep: int | None = None
    ep_size: int = 1
    protect: tuple[tuple[int, int], ...] = ()  # (layer, expert) pairs that always stay
    sequential: bool = False  # statistics of layer i+1 gathered on the already pruned layers 0..i
    calib: tuple[str, ...] = ()
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    # reroute: calibration tokens the search uses (a seeded subsample when there are more);
    # its cache holds about search_tokens * (2 * top_k + 4) * hidden floats.
    search_tokens: int = 16384


def parse_protect(spec: str | None) -> tuple[tuple[int, int], ...]:
    """``"3:5,3:7,10:0"`` -> ((3, 5), (3, 7), (10, 0))."""
    out = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer, expert = (int(v) for v in part.split(":"))
        except ValueError:
            raise MoepressError(f"--protect {part!r}: expected LAYER:EXPERT pairs like 3:5,3:7") from None
        if layer < 0 or expert < 0:
            raise MoepressError(f"--protect {part!r}: expected non-negative LAYER:EXPERT")
        out.append((layer, expert))
    return tuple(sorted(set(out)))


# ---- routing simulation ---------------------------------------------------------------------------


def group_of(num_experts: int, n_group: int) -> torch.Tensor:
    """Group id of each expert: DeepSeek's router views the scores as [T, n_group, E // n_group]."""
    return torch.arange(num_experts) // (num_experts // n_group)


def _group_scores(choice: torch.Tensor, n_group: int) -> torch.Tensor:
    t, e = choice.shape
    return choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)


def route_masked(logits: torch.Tensor, keep: torch.Tensor, routing: dict,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing over the kept experts only: (weights [T, k], indices [T, k]).

    ``logits`` [T, E] are the unpruned router's; ``keep`` is [E] or per token [T, E] (bool).
    Equal to routing with the router rows of the dropped experts removed (tests check it
    against the sliced router): softmax over the kept logits, or DeepSeek's sigmoid +
    correction bias with group-limited choice where a dropped expert can neither be
    chosen nor count towards its group's score.
    """
    k = routing["top_k"]
    keep = keep.expand_as(logits)
    if routing["scoring"] == "softmax":
        probs = F.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
        weights, indices = torch.topk(probs, k, dim=-1)
        if routing["renormalize"]:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices
    scores = logits.float().sigmoid()
    choice = (scores + bias.float()).masked_fill(~keep, float("-inf"))
    n_group, topk_group = routing["n_group"], routing["topk_group"]
    t, e = choice.shape
    group_idx = torch.topk(_group_scores(choice, n_group), k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, group_idx, True)
    choice = choice.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    indices = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if routing["renormalize"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing["routed_scaling_factor"], indices


def group_ranks(logits: torch.Tensor, keep: torch.Tensor, routing: dict,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] bools: the expert is one of the two best kept experts of its group (they make the
    group's score), and: it is the third best (it would make the score if one of the two went)."""
    choice = (logits.float().sigmoid() + bias.float()).masked_fill(~keep.expand_as(logits), float("-inf"))
    t, e = choice.shape
    n = routing["n_group"]
    size = e // n
    top = choice.view(t, n, size).topk(min(3, size), dim=-1)[1] + (torch.arange(n) * size)[None, :, None]
    top2 = torch.zeros(t, e, dtype=torch.bool).scatter_(1, top[..., :2].reshape(t, -1), True)
    third = torch.zeros(t, e, dtype=torch.bool)
    if size > 2:
        third.scatter_(1, top[..., 2], True)
    return top2, third


# ---- constraints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many experts every pruned layer keeps, and which must stay."""

    num_experts: int
    keep: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    protected: dict[int, frozenset[int]] = field(default_factory=dict)
    decisions: tuple[str, ...] = ()

    @property
    def keep_per_group(self) -> int:
        return self.keep // self.n_group

    def protected_in(self, layer: int) -> frozenset[int]:
        return self.protected.get(layer, frozenset())


def plan_budget(adapter, cfg: PruneConfig, layers: list[int] | None = None) -> Budget:
    """The kept count for every MoE layer, or a one-line MoepressError naming the option.

    Rounding: ``--ratio`` is a size budget, so the kept count is rounded *down* to the
    nearest valid count (the pruned checkpoint is never larger than asked for);
    ``--keep`` is taken literally and refused when invalid, with the valid neighbours.
    """
    r = adapter.routing()
    E, k = adapter.num_experts, int(r["top_k"])
    n_group = int(r.get("n_group") or 1)
    topk_group = int(r.get("topk_group") or 1)
    grouped_scores = r["scoring"] == "sigmoid"  # DeepSeek/Kimi: a group's score is its two best experts
    layers = adapter.moe_layers() if layers is None else layers
    decisions: list[str] = []
    if cfg.ep_size < 1:
        raise MoepressError(f"--ep-size {cfg.ep_size}: expected a positive integer")
    if (cfg.ratio is None) == (cfg.keep is None):
        raise MoepressError("--ratio / --keep: expected exactly one of them")
    if n_group > 1 and E % n_group:
        raise MoepressError(f"config.json: {E} routed experts do not split into n_group={n_group} equal groups")
    # llm-compressor REAPPruningModifier (src/llmcompressor/modifiers/pruning/reap/base.py) drops the
    # same number per group: the router views scores as [T, n_group, E // n_group].
    step = math.lcm(n_group, cfg.ep_size)
    why = " and ".join(w for w, on in ((f"n_group={n_group}: the same number per group", n_group > 1),
                                       (f"--ep-size {cfg.ep_size}: num_experts % ep_size == 0 for "
                                        "expert-parallel fused MoE", cfg.ep_size > 1)) if on)

    def feasible(n: int) -> str | None:
        if n < k:
            return f"fewer than top_k={k} experts"
        if n_group > 1 and (n // n_group) * topk_group < k:
            return (f"{n // n_group} per group x topk_group={topk_group} reachable experts, "
                    f"fewer than top_k={k}")
        if grouped_scores and n // n_group < 2:
            return f"{n // n_group} per group (the group score sums each group's two best experts)"
        return None

    valid = [n for n in range(step, E, step) if feasible(n) is None]
    if cfg.keep is not None:
        K = int(cfg.keep)
        if not 1 <= K < E:
            raise MoepressError(f"--keep {K}: expected 1..{E - 1} (the model has {E} routed experts)")
        if K % step:
            lo, hi = K // step * step, (K // step + 1) * step
            near = " or ".join(str(n) for n in (lo, hi) if n in valid)
            raise MoepressError(f"--keep {K}: expected a multiple of {step} ({why})"
                                + (f"; nearest valid: {near}" if near else ""))
        src = f"--keep {K}"
    else:
        if not 0.0 < cfg.ratio < 1.0:
            raise MoepressError(f"--ratio {cfg.ratio}: expected a fraction of experts to drop in (0, 1)")
        target = math.floor(E * (1.0 - cfg.ratio) + 1e-9)
        K = target // step * step
        src = f"--ratio {cfg.ratio}"
        if K != target:
            decisions.append(f"{src}: {target} of {E} experts rounded down to {K} ({why}); rounding down "
                             f"so the pruned model never exceeds the requested size")
        else:
            decisions.append(f"{src}: keep {K} of {E} experts")
    problem = (feasible(K) if K > 0 else f"no experts ({target} rounded down to a multiple of {step}: {why})"
               if step > 1 and cfg.keep is None and target > 0 else "no experts")
    if problem:
        hint = (f"; the largest valid ratio is {1 - min(valid) / E:.4g} (--keep {min(valid)})" if valid
                else "; no kept count is valid for this model" + (
                    f" (a multiple of {step} below {E}: {why})" if why and "rounded down" not in problem else ""))
        raise MoepressError(f"{src}: keeping {K} of {E} routed experts leaves {problem}{hint}")
    if n_group > 1:
        decisions.append(f"n_group={n_group}: keep {K // n_group} of {E // n_group} experts in every group "
                         f"(topk_group={topk_group}: {topk_group * (K // n_group)} reachable >= top_k={k})")
    if cfg.ep_size > 1:
        decisions.append(f"--ep-size {cfg.ep_size}: {K} experts = {K // cfg.ep_size} per rank")

    protected: dict[int, set[int]] = {}
    for layer, e in cfg.protect:
        if layer not in layers:
            raise MoepressError(f"--protect {layer}:{e}: layer {layer} is not an MoE layer "
                                f"(MoE layers: {_ranges(layers)})")
        if e >= E:
            raise MoepressError(f"--protect {layer}:{e}: expert {e} does not exist (the model has {E})")
        protected.setdefault(layer, set()).add(e)
    for layer, es in protected.items():
        if len(es) > K:
            raise MoepressError(f"--protect: {len(es)} experts protected in layer {layer}, more than the {K} kept")
        if n_group > 1:
            g = group_of(E, n_group)
            for gi in range(n_group):
                n = sum(1 for e in es if int(g[e]) == gi)
                if n > K // n_group:
                    raise MoepressError(f"--protect: {n} experts protected in group {gi} of layer {layer}, "
                                        f"more than the {K // n_group} kept per group")
    if protected:
        decisions.append("protected: " + ", ".join(f"{layer}:{e}" for layer, e in cfg.protect))
    return Budget(E, K, k, n_group, topk_group, {i: frozenset(s) for i, s in protected.items()}, tuple(decisions))


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ",".join(map(str, xs))


# ---- evidence and methods -------------------------------------------------------------------------


class RouteRecorder:
    """Observer keeping what the reroute search needs for a fixed subsample of calibration tokens:
    the MoE input, the router logits, the chosen experts with their weights and (``attach``) the
    residual stream entering the MoE block and the block's whole output (shared experts included),
    whose sum is the hidden state the next layer normalises and reads."""

    def __init__(self, n_tokens: int, keep: int, seed: int):
        self.pick = torch.zeros(n_tokens, dtype=torch.bool)  # over all calibration tokens, in stream order
        self.pick[torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))[:keep]] = True
        self.offset = 0
        self.last = torch.zeros(0, dtype=torch.bool)
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.residual: list[torch.Tensor] = []
        self.block_out: list[torch.Tensor] = []

    def attach(self, layer: DecoderLayer) -> Callable[[], None]:
        """Observe ``layer``'s MoE block; returns a function that removes the hooks."""
        def pre(mod, args):  # the input of post_attention_layernorm: the residual stream
            h = args[0].reshape(-1, args[0].shape[-1])
            m = self.pick[self.offset: self.offset + h.shape[0]]
            if m.any():
                self.residual.append(h[m].detach().float())

        def post(mod, args, out):  # runs after on_route of the same tokens: self.last is their mask
            if self.last.any():
                self.block_out.append(out.reshape(-1, out.shape[-1])[self.last].detach().float())

        layer.moe.observers.append(self)
        hooks = [layer.post_attention_layernorm.register_forward_pre_hook(pre),
                 layer.moe.register_forward_hook(post)]
        return lambda: [h.remove() for h in hooks]

    def on_route(self, moe, x, logits, weights, indices) -> None:
        m = self.pick[self.offset: self.offset + x.shape[0]]
        self.offset += x.shape[0]
        self.last = m
        if m.any():
            self.parts.append((x[m].detach().float(), logits[m].detach().float(), indices[m], weights[m].float()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(p) for p in zip(*self.parts, strict=True))


@dataclass
class LayerEvidence:
    """What a method sees for one MoE layer."""

    layer: int
    moe: SparseMoE
    stats: LayerRouting
    routing: dict
    recorder: RouteRecorder | None = None


@dataclass
class Selection:
    kept: list[int]  # ascending: new expert j is old expert kept[j]
    scores: torch.Tensor  # [E] float64, higher = more important (NaN where not scored)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PruneMethod:
    name: str
    help: str
    select: Callable[[LayerEvidence, Budget], Selection]
    score_name: str
    needs_outputs: bool = False  # needs a RouteRecorder (cached router logits and MoE inputs)
    # look-ahead: the layer keeps whichever of these methods' selections leaves the hidden state after
    # the NEXT decoder layer closest to the original model's (decided one layer later; see prune_checkpoint)
    candidates: tuple[str, ...] = ()
    # plans: these methods each prune the whole model side by side; the lowest calibration loss is kept
    plans: tuple[str, ...] = ()


METHODS: dict[str, PruneMethod] = {}


def register_method(name: str, help: str, score_name: str, needs_outputs: bool = False,
                    candidates: tuple[str, ...] = (), plans: tuple[str, ...] = ()):
    def deco(fn: Callable[[LayerEvidence, Budget], Selection]):
        METHODS[name] = PruneMethod(name, help, fn, score_name, needs_outputs, candidates, plans)
        return fn
    return deco


def keep_top(scores: torch.Tensor, budget: Budget, layer: int) -> list[int]:
    """The best-scored experts, protected ones first, the same number in every group."""
    E = budget.num_experts
    prot = budget.protected_in(layer)
    key = {e: (e not in prot, -float(scores[e]) if not math.isnan(float(scores[e])) else math.inf, e)
           for e in range(E)}
    size = E // budget.n_group
    kept: list[int] = []
    for g in range(budget.n_group):
        members = sorted(range(g * size, (g + 1) * size), key=key.__getitem__)
        kept += members[: budget.keep_per_group]
    return sorted(kept)


def _score_method(name: str, help: str, score_name: str):
    def deco(fn: Callable[[LayerRouting], torch.Tensor]):
        def select(ev: LayerEvidence, budget: Budget) -> Selection:
            s = fn(ev.stats).double()
            return Selection(keep_top(s, budget, ev.layer), s)
        register_method(name, help, score_name)(select)
        return fn
    return deco


@_score_method("frequency", "tokens routed to each expert", "tokens")
def frequency_scores(stats: LayerRouting) -> torch.Tensor:
    return stats.counts


@_score_method("ean", "expert activation norm: sum over routed tokens of ||f_j(x)||_2 (REAP paper's EAN)",
               "ean_sum")
def ean_scores(stats: LayerRouting) -> torch.Tensor:
    # The REAP paper's EAN baseline is the summed norm (CerebrasResearch/reap src/reap/observer.py
    # "ean_sum"); it favours frequently routed experts, unlike a per-token mean.
    return stats.norm_sum


@_score_method("reap", "REAP: mean over routed tokens of g_j(x) * ||f_j(x)||_2 (arXiv 2510.13999)", "reap")
def reap_scores(stats: LayerRouting) -> torch.Tensor:
    # g_j is the weight the family's router really gives (renormalised softmax, or DeepSeek's
    # sigmoid + bias + groups x routed_scaling_factor), not REAP's softmax approximation.
    return stats.reap


# ---- reroute: greedy backward elimination on the MoE output with re-routing ------------------------


class ExpertOutputs:
    """f_e(x_t) for (token, expert) pairs, computed once, on demand (exact, from the layer's experts)."""

    def __init__(self, x: torch.Tensor, moe: SparseMoE):
        self.x, self.moe = x, moe
        t, h = x.shape
        self.slot = torch.full((t, moe.num_experts), -1, dtype=torch.long)
        self.buf = torch.empty(max(1024, t), h)
        self.n = 0

    @torch.no_grad()
    def fill(self, t: torch.Tensor, e: torch.Tensor) -> None:
        miss = self.slot[t, e] < 0
        if not bool(miss.any()):
            return
        T = self.x.shape[0]
        key = torch.unique(e[miss] * T + t[miss])  # sorted: grouped by expert
        need = self.n + key.numel()
        if need > self.buf.shape[0]:
            grown = torch.empty(max(need, 2 * self.buf.shape[0]), self.buf.shape[1])
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        experts, counts = torch.unique_consecutive(key // T, return_counts=True)
        for ex, toks in zip(experts.tolist(), torch.split(key % T, counts.tolist()), strict=True):
            y = self.moe.experts[ex](self.x[toks]).float()
            self.buf[self.n: self.n + toks.numel()] = y
            self.slot[toks, ex] = torch.arange(self.n, self.n + toks.numel())
            self.n += toks.numel()

    def combine(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j w_j f_{e_j}(x_t) for rows t [n], indices/weights [n, k]."""
        tt = t[:, None].expand_as(indices).reshape(-1)
        ee = indices.reshape(-1)
        self.fill(tt, ee)
        y = torch.index_select(self.buf, 0, self.slot[tt, ee]).view(*indices.shape, -1)
        return torch.bmm(weights.float().unsqueeze(1), y).squeeze(1)


def _rms_normalize(v: torch.Tensor) -> torch.Tensor:
    """v / rms(v) per row: an RMSNorm without its weight (the next layer's norm applies its own)."""
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-12)


class RerouteSearch:
    """Greedy backward elimination: drop, one at a time, the expert whose removal increases
    sum_t ||n(b_t + y_t) - n(b_t + y'_t)||^2 the least, where y is the layer's original
    routed-expert output, y' the output when the pruned router re-routes every token among the
    kept experts (``route_masked``: exact family routing), b_t the rest of the post-block hidden
    state (the residual stream plus the shared experts' output) and n(v) = v / rms(v): the error
    of what the next layer's RMSNorm reads. Against the plain squared error of y this weighs an
    error by the size of the residual it lands in and counts a change of direction, not of
    length (on the bundled models it picks sets with lower held-out perplexity, chiefly in the
    first MoE layers where the routed output dominates a small residual). Without a recorded
    residual (``RouteRecorder.attach`` not used) the objective is sum_t ||y_t - y'_t||^2.

    ``contrib[t, c]`` is how much token t's error grows if c is dropped next; it is non-zero only
    where dropping c can change t's routing (t is routed to c; c makes t's group score in
    DeepSeek's groups; any c for a softmax without renormalisation). After a drop only the rows
    whose entries can have changed are re-evaluated: tokens re-routed by the drop, tokens whose
    evaluations used the dropped expert as a replacement, and (groups) tokens for which it was
    the third best of its group. The result equals re-evaluating everything at every step (a test
    checks it against that brute force), at a fraction of the cost.
    """

    CHUNK_BYTES = 128 * 2**20  # expert outputs gathered at once (rows x top_k x hidden floats)

    def __init__(self, ev: LayerEvidence, budget: Budget):
        self.ev, self.budget = ev, budget
        x, self.logits, idx0, w0 = ev.recorder.tensors()
        self.r = ev.routing
        self.bias = ev.moe.gate.e_score_correction_bias
        self.E = budget.num_experts
        self.T = x.shape[0]
        self.chunk = max(64, self.CHUNK_BYTES // (4 * budget.top_k * x.shape[1]))
        self.out = ExpertOutputs(x, ev.moe)
        # Prefill each token's routed experts and its next candidates by router preference:
        # a renormalised top-k that loses up to m experts re-routes within these.
        m = min(budget.top_k, self.E - budget.keep)
        pref = self.logits if self.r["scoring"] == "softmax" else self.logits.sigmoid() + self.bias.float()
        cand = torch.cat([idx0, pref.topk(budget.top_k + m, dim=-1)[1]], 1)
        self.out.fill(torch.arange(self.T)[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))
        self.y0 = self.out.combine(torch.arange(self.T), idx0, w0)
        # b = residual + block output - routed output, so that b + y0 is the recorded post-block state
        if ev.recorder.residual:
            self.base = torch.cat(ev.recorder.residual) + torch.cat(ev.recorder.block_out) - self.y0
            self.ref = _rms_normalize(self.base + self.y0)
        else:
            self.base = self.ref = None
        ref = self.y0 if self.ref is None else self.ref
        self.ref_sq = float((ref.double() ** 2).sum())
        self.keep = torch.ones(self.E, dtype=torch.bool)
        self.droppable = torch.ones(self.E, dtype=torch.bool)
        self.droppable[list(budget.protected_in(ev.layer))] = False
        self.grouped = self.r["scoring"] == "sigmoid" and self.r["n_group"] > 1
        self.dense = self.r["scoring"] == "softmax" and not self.r["renormalize"]
        everyone = torch.arange(self.T)
        self.w, self.idx = route_masked(self.logits, self.keep, self.r, self.bias)
        self.err = self._err(everyone, self.idx, self.w)
        if self.grouped:
            self.top2, self.third = group_ranks(self.logits, self.keep, self.r, self.bias)
        self.contrib = torch.zeros(self.T, self.E, dtype=torch.float64)
        self.used = torch.zeros(self.T, self.E, dtype=torch.bool)
        self._evaluate(everyone)

    def _err(self, rows, idx, w) -> torch.Tensor:
        out = torch.empty(rows.numel(), dtype=torch.float64)
        for s in range(0, rows.numel(), self.chunk):
            sl = slice(s, s + self.chunk)
            y = self.out.combine(rows[sl], idx[sl], w[sl])
            if self.base is None:
                d = self.y0[rows[sl]] - y
            else:
                d = self.ref[rows[sl]] - _rms_normalize(self.base[rows[sl]] + y)
            out[sl] = (d * d).sum(-1).double()
        return out

    def _affected(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), E]: dropping e (kept, droppable) can change the routing of these tokens."""
        if self.dense:
            a = torch.ones(rows.numel(), self.E, dtype=torch.bool)
        else:
            a = torch.zeros(rows.numel(), self.E, dtype=torch.bool).scatter_(1, self.idx[rows], True)
            if self.grouped:
                a |= self.top2[rows]
        return a & self.keep & self.droppable

    def _evaluate(self, rows: torch.Tensor) -> None:
        """Recompute contrib and used for these tokens under the current kept set."""
        self.contrib[rows] = 0
        self.used[rows] = False
        ri, c = self._affected(rows).nonzero(as_tuple=True)
        for s in range(0, ri.numel(), self.chunk):
            t, cc = rows[ri[s: s + self.chunk]], c[s: s + self.chunk]
            keep = self.keep.expand(t.numel(), self.E).clone()
            keep[torch.arange(t.numel()), cc] = False
            w, idx = route_masked(self.logits[t], keep, self.r, self.bias)
            self.contrib[t, cc] = self._err(t, idx, w) - self.err[t]
            self.used[t[:, None].expand_as(idx), idx] = True

    def drop(self, e: int) -> None:
        moved = (self.idx == e).any(1)
        if self.dense:
            moved[:] = True
        if self.grouped:
            moved |= self.top2[:, e]
        stale = moved | self.used[:, e]
        if self.grouped:
            stale |= self.third[:, e]
        self.keep[e] = False
        rows = moved.nonzero(as_tuple=True)[0]
        if rows.numel():
            self.w[rows], self.idx[rows] = route_masked(self.logits[rows], self.keep, self.r, self.bias)
            self.err[rows] = self._err(rows, self.idx[rows], self.w[rows])
        rows = stale.nonzero(as_tuple=True)[0]
        if self.grouped and rows.numel():
            self.top2[rows], self.third[rows] = group_ranks(self.logits[rows], self.keep, self.r, self.bias)
        self._evaluate(rows)

    def eligible(self) -> torch.Tensor:
        b = self.budget
        g = group_of(self.E, b.n_group)
        left = torch.zeros(b.n_group, dtype=torch.long).index_add_(0, g, self.keep.long())
        return self.keep & self.droppable & (left[g] > b.keep_per_group)

    def run(self) -> Selection:
        scores = torch.full((self.E,), float("nan"), dtype=torch.float64)
        order = []
        while int(self.keep.sum()) > self.budget.keep:
            delta = self.contrib.sum(0).masked_fill(~self.eligible(), float("inf"))
            best = int(torch.argmin(delta))  # first minimum: lowest expert id on ties
            scores[best] = float(delta[best])
            order.append(best)
            self.drop(best)
        rest = self.keep & self.droppable  # kept experts: the error each would add if dropped now
        scores[rest] = self.contrib.sum(0)[rest]
        kept = self.keep.nonzero(as_tuple=True)[0].tolist()
        rel = float(self.err.sum()) / max(self.ref_sq, 1e-30)
        return Selection(kept, scores, {"drop_order": order, "post_moe_state_rel_error": rel,
                                        "search_tokens": self.T, "cached_pairs": self.out.n})


@register_method("reroute", "greedy backward elimination minimising the error of the normalised hidden "
                 "state after the MoE block on calibration tokens, with the pruned router re-routing them "
                 "(exact family routing)",
                 "added_relative_sq_error", needs_outputs=True)
def reroute_select(ev: LayerEvidence, budget: Budget) -> Selection:
    return RerouteSearch(ev, budget).run()


@register_method("lookahead", "per layer, the reroute or the reap selection: whichever leaves the hidden state after "
                 "the next decoder layer (run on the already pruned model) closest to the original model's",
                 "added_relative_sq_error", needs_outputs=True, candidates=("reroute", "reap"))
def lookahead_select(ev: LayerEvidence, budget: Budget) -> Selection:
    # used where there is no next layer to look through (MTP layers): the first candidate
    return reroute_select(ev, budget)


def state_error(ref: list[torch.Tensor], hs: list[torch.Tensor]) -> float:
    """sum ||n(ref) - n(hs)||^2 / sum ||n(ref)||^2 over all tokens, n = RMS normalisation (what the next
    norm reads), the measure the look-ahead compares candidate selections by."""
    num = den = 0.0
    for r, h in zip(ref, hs, strict=True):
        nr = _rms_normalize(r.float())
        num += float(((nr - _rms_normalize(h.float())) ** 2).sum())
        den += float((nr ** 2).sum())
    return num / max(den, 1e-30)


def calibration_nll(head: tuple[nn.Module, torch.Tensor], hs: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood of the calibration tokens given the final hidden states
    ``hs``; one sequence at a time (a [seq, vocab] float64 temporary, not [batch, seq, vocab])."""
    norm, w = head
    tot, n = 0.0, 0
    for h, ids in zip(hs, batches, strict=True):
        for r in range(h.shape[0]):
            s, k = nll_sum(F.linear(norm(h[r:r + 1]), w).float(), ids[r:r + 1])
            tot, n = tot + s, n + k
    return tot / max(n, 1)


# auto's own callable is never the one that selects (its plans' methods do, MTP layers included);
# registered with lookahead's so that the registry holds a callable for every method
register_method("auto", "every other method prunes the whole model side by side (each layer read once, the "
                "calibration set through each pruned model); the plan with the lowest calibration loss is "
                "written (its layers read a second time)", "plan", needs_outputs=True,
                plans=("lookahead", "reroute", "reap"))(lookahead_select)


class _Candidate:
    """A layer with one candidate selection applied without touching the loaded layer: its MoE
    block is swapped for a view whose router rows and expert list are sliced (experts shared)."""

    def __init__(self, layer: DecoderLayer, kept: list[int]):
        self.layer, self.kept = layer, kept

    def __enter__(self):
        import copy

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


# ---- surgery --------------------------------------------------------------------------------------


@torch.no_grad()
def prune_moe_module(moe: SparseMoE, kept: list[int]) -> SparseMoE:
    """Slice a loaded MoE block in place: router rows, correction bias, experts renumbered 0..K-1."""
    idx = torch.tensor(kept, dtype=torch.long)
    moe.gate.weight = nn.Parameter(moe.gate.weight.data[idx].clone(), requires_grad=False)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias[idx].clone()
    moe.experts = nn.ModuleList([moe.experts[e] for e in kept])
    return moe


def pruned_layer_tensors(reader: CheckpointReader, adapter, i: int, kept: list[int]):
    """Yield (name, stored tensor) of layer i with only the kept routed experts.

    Expert tensors (weights and whatever is stored beside them: FP8 ``weight_scale_inv``,
    scales) are renamed to the dense new index and copied as stored; tensors under the
    router prefix are sliced along their expert dimension (``gate.weight`` [E, H],
    ``e_score_correction_bias`` [E], any router bias); everything else is copied as is.
    """
    E = adapter.num_experts
    new_of = {e: j for j, e in enumerate(kept)}
    router = adapter.router_prefix(i)
    idx = torch.tensor(kept, dtype=torch.long)
    for name in sorted(reader.layer_names(i)):
        hit = adapter.expert_index(name)
        if hit is not None and hit[0] == i:
            e = hit[1]
            if e in new_of:
                old = adapter.expert_prefix(i, e)
                yield adapter.expert_prefix(i, new_of[e]) + name[len(old):], reader.get(name)
            continue
        t = reader.get(name)
        if name.startswith(router):
            if t.ndim >= 1 and t.shape[0] == E:
                t = t[idx].clone()
            elif t.numel() != 1:
                raise MoepressError(f"{reader.path}: router tensor '{name}' has shape {list(t.shape)}; expected "
                                    f"its first dimension to be the {E} routed experts (or a scalar)")
        yield name, t


# ---- the stage ------------------------------------------------------------------------------------


def _read_decoder_state(sm: StreamedModel, i: int) -> dict[str, torch.Tensor]:
    """The decoder-layer tensors of layer i (an MTP layer stores more beside them: left out here)."""
    a, ck = sm.adapter, sm.ckpt
    prefix = a.layer_prefix(i)
    state = {}
    for key, shape in sm.expected_layer_shapes(i).items():
        name = prefix + key
        if name not in ck:
            raise MoepressError(f"{ck.path}: tensor '{name}' is missing from the checkpoint")
        dtype = torch.float32 if a.keep_fp32(name) else sm.dtype
        t = ck.weight(name, dtype) if name.endswith(".weight") else ck.get(name).to(dtype)
        if tuple(t.shape) != shape:
            raise MoepressError(f"{ck.path}: tensor '{name}' has shape {list(t.shape)}, config.json implies "
                                f"{list(shape)}")
        state[key] = t
    return state


class _MTPInput:
    """DeepSeek-V3 multi-token prediction layer k's input (vLLM model_executor/models/deepseek_mtp.py):
    eh_proj(cat(enorm(embed(t_{i+k+1})), hnorm(h_i))), h being the main model's final hidden state
    (after its final norm, as vLLM passes it) for k = 0 and the previous MTP layer's output after."""

    def __init__(self, sm: StreamedModel, i: int):
        a, ck = sm.adapter, sm.ckpt
        p = a.layer_prefix(i)

        def w(name):
            return ck.weight(name, sm.dtype)

        self.embed = w(p + "embed_tokens.weight") if p + "embed_tokens.weight" in ck else w(a.embed_name)
        self.enorm, self.hnorm = a.build_norm(a.hidden_size), a.build_norm(a.hidden_size)
        self.enorm.weight.data = w(p + "enorm.weight")
        self.hnorm.weight.data = w(p + "hnorm.weight")
        self.eh_proj = w(p + "eh_proj.weight")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, prev: torch.Tensor, depth: int) -> torch.Tensor:
        e = F.embedding(ids[:, depth + 1:], self.embed)
        h = prev[:, : e.shape[1]]
        return F.linear(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1), self.eh_proj)


def mtp_layers_present(adapter, reader: CheckpointReader) -> list[int]:
    declared = getattr(adapter, "mtp_layers", lambda: [])()
    return [i for i in declared if reader.layer_names(i)]


def _layer_report(i: int, kind: str, sel: Selection, stats: LayerRouting, method: PruneMethod,
                  protected: frozenset[int]) -> dict:
    share = stats.share
    new_of = {e: j for j, e in enumerate(sel.kept)}

    def row(e):
        s = float(sel.scores[e])
        d = {"expert": e, "score": None if math.isnan(s) else s, "tokens": int(stats.counts[e]),
             "share": round(float(share[e]), 6)}
        if e in new_of:
            d["new_index"] = new_of[e]
        if e in protected:
            d["protected"] = True
        return d

    dropped = [e for e in range(stats.num_experts) if e not in new_of]
    return {"layer": i, "kind": kind, "tokens": stats.tokens, "score": method.score_name,
            "dropped_share": round(float(share[dropped].sum()), 6),
            "kept": [row(e) for e in sel.kept], "dropped": [row(e) for e in dropped], **sel.extra}


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


def _note(rep: dict, budget: Budget) -> str:
    return (f"layer {rep['layer']}: kept {len(rep['kept'])}/{budget.num_experts}, dropped "
            f"{100 * rep['dropped_share']:.1f}% of routed tokens")


@torch.no_grad()
def prune_checkpoint(model: str | Path, out: str | Path, cfg: PruneConfig, *,
                     batches: list[torch.Tensor] | None = None, force: bool = False,
                     progress: Progress = QUIET, trust_remote_code: bool = False) -> dict:
    """Prune ``model`` into ``out`` (same format as the input); returns the result summary.

    ``batches`` (token ids [B, S]) replace the calibration set built from ``cfg`` (tests,
    checkpoints without a tokenizer).
    """
    t0 = time.monotonic()
    if cfg.method not in METHODS:
        raise MoepressError(f"--method {cfg.method}: expected one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    reader = CheckpointReader(model)
    # bf16 weights stay as stored (StoredLinear: same float32 results, half the memory) and the
    # reader runs a bounded distance ahead (a quarter layer at most), never a whole third layer.
    sm = StreamedModel(reader, keep_stored=True, read_ahead_bytes=read_ahead_budget(reader))
    a = sm.adapter
    mtp = mtp_layers_present(a, reader)
    moe_layers = a.moe_layers()
    if not moe_layers:
        raise MoepressError(f"{reader.path}: no MoE layers to prune")
    budget = plan_budget(a, cfg, moe_layers + mtp)
    routing = a.routing()
    notes = list(budget.decisions)
    if routing["scoring"] == "softmax" and not routing["renormalize"]:
        notes.append("norm_topk_prob=false: the softmax runs over fewer experts after pruning, so the weights "
                     "of every token grow by sum(exp(all logits)) / sum(exp(kept logits)); choices among kept "
                     "experts are unchanged")
    if batches is None:
        from moepress.calib.data import calibration_batches

        batches = calibration_batches(model, cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed,
                                      trust_remote_code=trust_remote_code)
    n_tokens = sum(b.numel() for b in batches)

    layer_names = {n for i in reader.layer_indices() for n in reader.layer_names(i)}
    top_names = [n for n in reader.names() if n not in layer_names]
    report_layers: list[dict] = []

    def evidence(i: int, layer: DecoderLayer, hs: list[torch.Tensor], recorder: bool):
        """Run the unpruned ``layer`` on ``hs`` with the observers a method reads: (evidence, outputs)."""
        stats = RoutingStats()
        lr = stats.attach(i, layer)
        rec = hook = None
        if recorder:
            rec = RouteRecorder(sum(h.shape[0] * h.shape[1] for h in hs), cfg.search_tokens, cfg.seed)
            hook = rec.attach(layer)
        out_hs = sm.run_layer(layer, hs)
        layer.moe.observers = []
        if hook is not None:
            hook()
        return LayerEvidence(i, layer.moe, lr, routing, rec), out_hs

    def candidates(meth: PruneMethod, ev: LayerEvidence, layer: DecoderLayer, hs: list[torch.Tensor]) -> Pending:
        """A look-ahead method's candidate selections and the states each leaves; the choice comes later."""
        cands: dict[str, Selection] = {}
        for name in meth.candidates:
            c = METHODS[name].select(ev, budget)
            if not any(c.kept == o.kept for o in cands.values()):
                cands[name] = c
        outs = {}
        for name, c in cands.items():
            with _Candidate(layer, c.kept) as lay:
                outs[name] = sm.run_layer(lay, hs)
        return Pending(ev.layer, "trunk", cands, outs, ev.stats)

    def write_held(i: int, layer: DecoderLayer, kept: list[int]) -> None:
        # the kept experts' tensors are written from the layer itself where it holds them exactly
        # as stored (bf16 kept as stored): no second read of the layer, no second copy in memory
        prefix = a.layer_prefix(i)
        held = {prefix + k: v for k, v in layer.state_dict().items()
                if prefix + k in reader and v.dtype == reader.get_dtype(prefix + k)}
        for name, t in pruned_layer_tensors(LayerView(reader, held), a, i, kept):
            w.add(name, t)
        del held
        w.end_shard()

    def write_read(i: int, kept: list[int] | None) -> None:
        """Layer i read again as stored: pruned to ``kept``, or copied (dense)."""
        if kept is None:
            for name in sorted(reader.layer_names(i)):
                w.add(name, reader.get(name))
        else:
            for name, t in pruned_layer_tensors(reader, a, i, kept):
                w.add(name, t)
        w.end_shard()

    def prune_layer(i: int, layer: DecoderLayer, hs: list[torch.Tensor], kind: str, meth: PruneMethod):
        ev, out_hs = evidence(i, layer, hs, meth.needs_outputs)
        if meth.candidates and kind == "trunk":
            return candidates(meth, ev, layer, hs)
        sel = meth.select(ev, budget)
        assert len(sel.kept) == budget.keep
        report_layers.append(_layer_report(i, kind, sel, ev.stats, meth, budget.protected_in(i)))
        write_held(i, layer, sel.kept)
        if cfg.sequential:
            prune_moe_module(layer.moe, sel.kept)
            out_hs = sm.run_layer(layer, hs)
        return out_hs, sel

    plans = list(method.plans)
    look = bool(method.candidates) or any(METHODS[n].candidates for n in plans)
    # look-ahead: the original model's hidden states on the first calibration batches (about
    # search_tokens tokens), advanced with every unpruned layer, to compare candidates against
    n_ref, t = 0, 0
    while look and n_ref < len(batches) and t < cfg.search_tokens:
        t += batches[n_ref].numel()
        n_ref += 1
    if plans:  # the non-sequential plans select from the original model's statistics: every batch
        n_ref = len(batches)

    def decide(p: Pending, ref: list[torch.Tensor], nxt: DecoderLayer | None) -> tuple[Selection, dict]:
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
        return sel, _layer_report(p.layer, p.kind, sel, p.stats, METHODS[p.chosen], budget.protected_in(p.layer))

    def run_single(task) -> list[torch.Tensor]:
        hs = sm.embed(batches)
        ref = hs[:n_ref]
        pending: Pending | None = None

        def settle(state, nxt):
            sel, row = decide(pending, state, nxt)
            report_layers.append(row)
            write_read(pending.layer, sel.kept)
            task.advance(note=_note(row, budget))
            return pending.outs[pending.chosen]

        for i, layer in sm.layers():
            if look:
                ref_next = sm.run_layer(layer, ref)
                if pending is not None:
                    hs = settle(ref_next, layer)
                    pending = None
                ref = ref_next
            if layer.moe is None:
                hs = sm.run_layer(layer, hs)
                write_read(i, None)
                task.advance(note=f"layer {i}: dense, copied")
                continue
            if look:
                pending = prune_layer(i, layer, hs, "trunk", method)
                continue
            hs, _ = prune_layer(i, layer, hs, "trunk", method)
            task.advance(note=_note(report_layers[-1], budget))
        if pending is not None:  # the last layer: its own output state against the original's
            hs = settle(ref, None)
        return hs

    def run_plans(task) -> tuple[list[torch.Tensor], dict]:
        """Every plan's pruned model advanced side by side, each layer read once; the plan with the
        lowest calibration loss is written, its layers read a second time."""
        ref = sm.embed(batches)
        st = {name: {"hs": ref, "pending": None, "kept": {}, "rows": {}} for name in plans}

        def settle(p: dict, state: list[torch.Tensor], nxt: DecoderLayer | None) -> None:
            sel, row = decide(p["pending"], state, nxt)
            p["kept"][row["layer"]], p["rows"][row["layer"]] = sel.kept, row
            p["hs"] = p["pending"].outs[p["pending"].chosen]
            p["pending"] = None

        rec = any(METHODS[n].needs_outputs and not METHODS[n].candidates for n in plans)
        for i, layer in sm.layers():
            ev_ref = None
            if layer.moe is not None:  # the original model's statistics, for the non-sequential plans
                ev_ref, ref_next = evidence(i, layer, ref, rec and not cfg.sequential)
            else:
                ref_next = sm.run_layer(layer, ref)
            for name in plans:
                m, p = METHODS[name], st[name]
                if p["pending"] is not None:
                    settle(p, ref_next, layer)
                if layer.moe is None:
                    p["hs"] = sm.run_layer(layer, p["hs"])
                elif m.candidates:  # sequential: statistics of its own pruned prefix
                    ev, _ = evidence(i, layer, p["hs"], m.needs_outputs)
                    p["pending"] = candidates(m, ev, layer, p["hs"])
                else:  # statistics of the original model, or (--sequential) of its own pruned prefix
                    ev = evidence(i, layer, p["hs"], m.needs_outputs)[0] if cfg.sequential else ev_ref
                    sel = m.select(ev, budget)
                    p["kept"][i] = sel.kept
                    p["rows"][i] = _layer_report(i, "trunk", sel, ev.stats, m, budget.protected_in(i))
                    with _Candidate(layer, sel.kept) as lay:
                        p["hs"] = sm.run_layer(lay, p["hs"])
            ref = ref_next
            task.advance(note=f"layer {i}: {len(plans)} plans advanced")
        for name in plans:  # the last layer: its own output state against the original's
            if st[name]["pending"] is not None:
                settle(st[name], ref, None)
        norm_w = sm.head_weights()
        loss = {name: calibration_nll(norm_w, st[name]["hs"], batches) for name in plans}
        best = min(loss, key=loss.get)  # ties: the first plan
        info = {"chosen": best, "calibration_nll": loss, "unpruned_calibration_nll": calibration_nll(
            norm_w, ref, batches)}
        with progress.task("write", a.num_layers) as wtask:
            for i in range(a.num_layers):
                write_read(i, st[best]["kept"].get(i))
                if i in st[best]["rows"]:
                    report_layers.append(st[best]["rows"][i])
                wtask.advance(note=f"layer {i}")
        return st[best]["hs"], info

    n_steps = a.num_layers + len(mtp)
    plan_info = None
    with CheckpointWriter(out, force=force) as w:
        w.manifest.update({"stage": "prune", "config": asdict(cfg),
                           "inputs": {"model": str(reader.path), "calibration": list(cfg.calib) or ["default"],
                                      "calibration_tokens": n_tokens}})
        for name in top_names:
            w.add(name, reader.get(name))
        w.end_shard()
        with progress.task("prune", n_steps) as task:
            if plans:
                hs, plan_info = run_plans(task)
            else:
                hs = run_single(task)
            if mtp:
                mtp_method = METHODS[plan_info["chosen"]] if plan_info else method
                norm, _ = sm.head_weights()
                prev = [norm(h) for h in hs]
                for depth, i in enumerate(mtp):
                    inp = _MTPInput(sm, i)
                    hs_in = [inp(ids, h, depth) for ids, h in zip(batches, prev, strict=True)]
                    layer = sm.build_layer(i, _read_decoder_state(sm, i))
                    prev, sel = prune_layer(i, layer, hs_in, "mtp", mtp_method)
                    del layer
                    task.advance(note=f"MTP layer {i}: kept {len(sel.kept)}/{budget.num_experts}")
        config = a.config_with_experts(budget.keep)
        w.write_json("config.json", config)
        w.copy_aux_files(reader.path)
        report = {"model": str(reader.path), "family": a.family, "config": asdict(cfg),
                  "num_experts": budget.num_experts, "kept": budget.keep, "experts_key": a.experts_key(),
                  "routing": routing, "constraints": notes, "calibration_tokens": n_tokens,
                  "mtp_layers": mtp, "mtp_scoring": MTP_SCORING if mtp else None,
                  **({"plans": plan_info} if plan_info else {}), "layers": report_layers}
        w.write_json(REPORT_NAME, report)
    shares = [r["dropped_share"] for r in report_layers]
    return {"output": str(out), "method": cfg.method, "num_experts": budget.num_experts, "kept": budget.keep,
            "moe_layers": len(report_layers), "mtp_layers": len(mtp),
            "dropped_token_share_mean": round(sum(shares) / len(shares), 6), "constraints": notes,
            "seconds": round(time.monotonic() - t0, 3)}
