"""Constraints: one kept count for every pruned layer, and the experts that must stay.

The count is a multiple of ``--ep-size`` (TensorRT-LLM's expert-parallel fused MoE needs num_experts %
ep_size == 0; vLLM spreads a remainder over its ranks) and of ``n_group`` (the same number per group), and
keeps top-k reachable. Rounding: ``--ratio`` is a size budget, so its count is rounded *down* to the nearest
valid one (the pruned checkpoint is never larger than asked for); ``--keep`` is taken literally and refused
when invalid, with the valid neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moepress.compress.prune.config import PruneConfig
from moepress.compress.prune.routing import group_of
from moepress.errors import MoepressError


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


@dataclass(frozen=True)
class _Grid:
    """A model's routing geometry and the expert-parallel size: which kept counts are valid."""

    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    grouped_scores: bool  # DeepSeek/Kimi: a group's score is its two best experts
    ep_size: int

    @classmethod
    def of(cls, routing: dict, num_experts: int, ep_size: int) -> _Grid:
        return cls(num_experts, int(routing["top_k"]), int(routing.get("n_group") or 1),
                   int(routing.get("topk_group") or 1), routing["scoring"] == "sigmoid", ep_size)

    @property
    def step(self) -> int:
        # llm-compressor REAPPruningModifier (src/llmcompressor/modifiers/pruning/reap/base.py) drops the
        # same number per group: the router views scores as [T, n_group, E // n_group].
        return math.lcm(self.n_group, self.ep_size)

    @property
    def why(self) -> str:
        n_group, ep = self.n_group, self.ep_size
        return " and ".join(w for w, on in ((f"n_group={n_group}: the same number per group", n_group > 1),
                                           (f"--ep-size {ep}: num_experts % ep_size == 0 for "
                                            "TensorRT-LLM's expert-parallel fused MoE", ep > 1)) if on)

    def problem(self, n: int) -> str | None:
        """Why keeping ``n`` experts breaks the routing, or None."""
        k, n_group, topk_group = self.top_k, self.n_group, self.topk_group
        if n < k:
            return f"fewer than top_k={k} experts"
        if n_group > 1 and (n // n_group) * topk_group < k:
            return (f"{n // n_group} per group x topk_group={topk_group} reachable experts, "
                    f"fewer than top_k={k}")
        if self.grouped_scores and n // n_group < 2:
            return f"{n // n_group} per group (the group score sums each group's two best experts)"
        return None

    def valid(self) -> list[int]:
        return [n for n in range(self.step, self.num_experts, self.step) if self.problem(n) is None]


def plan_budget(adapter, cfg: PruneConfig, layers: list[int] | None = None) -> Budget:
    """The kept count for every MoE layer, or a one-line MoepressError naming the option."""
    grid = _Grid.of(adapter.routing(), adapter.num_experts, cfg.ep_size)
    layers = adapter.moe_layers() if layers is None else layers
    _check_options(cfg, grid)
    decisions: list[str] = []
    K = _kept_count(grid, cfg, decisions)
    E, k, n_group, topk_group = grid.num_experts, grid.top_k, grid.n_group, grid.topk_group
    if n_group > 1:
        decisions.append(f"n_group={n_group}: keep {K // n_group} of {E // n_group} experts in every group "
                         f"(topk_group={topk_group}: {topk_group * (K // n_group)} reachable >= top_k={k})")
    if cfg.ep_size > 1:
        decisions.append(f"--ep-size {cfg.ep_size}: {K} experts = {K // cfg.ep_size} per rank")
    decisions += _kernel_notes(grid, K)
    protected = _protected(cfg, layers, grid, K)
    if protected:
        decisions.append("protected: " + ", ".join(f"{layer}:{e}" for layer, e in cfg.protect))
    return Budget(E, K, k, n_group, topk_group, {i: frozenset(s) for i, s in protected.items()}, tuple(decisions))


def _trtllm_gen_problems(grid: _Grid, n: int) -> list[str]:
    """Why TensorRT-LLM's trtllm-gen fused MoE refuses ``n`` experts ([]: it runs them). Its routing kernels check
    num_experts % 4 == 0, num_experts > top_k and, with groups, top_k < topk_group x experts per group
    (cpp/tensorrt_llm/thop/fp8BlockScaleMoe.cpp run_fp8_block_scale_moe, TensorRT-LLM c40f1157; flashinfer
    csrc/trtllm_fused_moe_kernel_launcher.cu, which vLLM's trtllm FP8 MoE calls); its Blackwell default for
    block-FP8 experts (_torch/model_config.py resolve_moe_backend)."""
    k, reach = grid.top_k, grid.topk_group * (n // grid.n_group)
    return [w for w, bad in ((f"{n} not a multiple of 4", n % 4), (f"{n} not above top_k={k}", n <= k),
                             (f"topk_group x {n // grid.n_group} per group = {reach} not above top_k={k}",
                              grid.n_group > 1 and reach <= k)) if bad]


def _kernel_notes(grid: _Grid, K: int) -> list[str]:
    """A note where the kept count loads in every runtime but TensorRT-LLM's Blackwell fused MoE refuses it at the
    first forward, with the nearest valid counts below and above it that run there too (none: said)."""
    why = _trtllm_gen_problems(grid, K)
    if not why:
        return []
    fits = [n for n in grid.valid() if not _trtllm_gen_problems(grid, n)]
    near = [n for n in (max((n for n in fits if n < K), default=None), min((n for n in fits if n > K), default=None))
            if n is not None]
    return [f"note: TensorRT-LLM's trtllm-gen fused MoE (its Blackwell default for block-FP8 experts) refuses "
            f"{K} experts ({'; '.join(why)}); " + (f"--keep {' or '.join(map(str, near))} runs there" if near else
                                                   "no count below the model's runs there")]


def _check_options(cfg: PruneConfig, grid: _Grid) -> None:
    if cfg.ep_size < 1:
        raise MoepressError(f"--ep-size {cfg.ep_size}: expected a positive integer")
    if (cfg.ratio is None) == (cfg.keep is None):
        raise MoepressError("--ratio / --keep: expected exactly one of them")
    E, n_group = grid.num_experts, grid.n_group
    if n_group > 1 and E % n_group:
        raise MoepressError(f"config.json: {E} routed experts do not split into n_group={n_group} equal groups")


def _kept_count(grid: _Grid, cfg: PruneConfig, decisions: list[str]) -> int:
    """``--keep`` checked as given, or ``--ratio`` rounded down to the grid (noted in ``decisions``)."""
    E, step, why = grid.num_experts, grid.step, grid.why
    valid = grid.valid()
    target = None
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
        if K >= E:  # a whole calibration run that would drop nothing
            raise MoepressError(f"{src}: drops none of the {E} routed experts; expected at least "
                                f"{math.ceil(1e4 / E) / 1e4:g} (one expert of {E})")
        if K != target:
            decisions.append(f"{src}: {target} of {E} experts rounded down to {K} ({why}); rounding down "
                             f"so the pruned model never exceeds the requested size")
        else:
            decisions.append(f"{src}: keep {K} of {E} experts")
    problem = (grid.problem(K) if K > 0 else f"no experts ({target} rounded down to a multiple of {step}: {why})"
               if step > 1 and cfg.keep is None and target > 0 else "no experts")
    if problem:
        # rounded down, so the printed ratio itself keeps min(valid) (a ratio keeps floor(E * (1 - ratio)))
        largest = math.floor((1 - min(valid) / E) * 1e4 + 1e-9) / 1e4 if valid else 0.0
        hint = (f"; the largest valid ratio is {largest:g} (--keep {min(valid)})" if valid
                else "; no kept count is valid for this model" + (
                    f" (a multiple of {step} below {E}: {why})" if why and "rounded down" not in problem else ""))
        raise MoepressError(f"{src}: keeping {K} of {E} routed experts leaves {problem}{hint}")
    return K


def _protected(cfg: PruneConfig, layers: list[int], grid: _Grid, K: int) -> dict[int, set[int]]:
    """``--protect`` per layer, refused when it names no MoE layer or expert, or more than the kept."""
    E, n_group = grid.num_experts, grid.n_group
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
    return protected


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ",".join(map(str, xs))


def kept_bytes(reader, adapter, keep: int, pruned: list[int], unwritten: list[int]) -> int:
    """A lower bound of the bytes of the pruned checkpoint's tensors (its output's free-space check): every stored
    tensor, less the layers not written and, in each pruned layer, all but its ``keep`` smallest routed experts
    (and a router's rows: a tensor of the layer with one row per expert counted at ``keep`` rows)."""
    pruned_set, skip = set(pruned), {n for i in unwritten for n in reader.layer_names(i)}
    in_pruned = {n for i in pruned_set for n in reader.layer_names(i)}
    experts: dict[int, dict[int, int]] = {}
    total = 0
    for name in reader.names():
        if name in skip:
            continue
        info = reader.info(name)
        at = adapter.expert_index(name)
        if at is not None and at[0] in pruned_set:
            per = experts.setdefault(at[0], {})
            per[at[1]] = per.get(at[1], 0) + info.nbytes
        elif name in in_pruned and info.shape and info.shape[0] == adapter.num_experts:
            total += info.nbytes // adapter.num_experts * keep
        else:
            total += info.nbytes
    return total + sum(sum(sorted(per.values())[:keep]) for per in experts.values())

