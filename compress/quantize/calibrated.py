"""One decoder layer calibrated and quantized: hooks gather its linears' input statistics while it
runs on the calibration activations, then its linears are quantized group by group.

Routed experts are quantized one at a time from the layer's MoE input and its routing (each
expert's own tokens). All routed experts of a layer share one input scale per projection (the
maximum over the experts that saw tokens), as the runtimes' FP8 MoE loaders make it anyway
(vLLM fp8.py Fp8MoEMethod and TensorRT-LLM _torch/modules/fused_moe/quantization.py take the max
over experts; bench/quant_quality.py cites both); that is also how an expert without tokens gets a
valid one.

Experts with too little evidence. With top-k routing many experts see few calibration tokens, and
an expert that saw fewer tokens than its input width has a rank-deficient Hessian: GPTQ then
compensates rounding error only inside the span of those tokens (elsewhere only the 1% damping
holds it), and AWQ's scale search fits a handful of rows, so the rounding fits the calibration
tokens rather than the expert's input distribution. The rule (config.py): an expert that
calibration routed fewer than ``max(MIN_EXPERT_TOKENS, SPARSE_EXPERT_RATIO x input width)`` tokens
(ratio 1: fewer tokens than channels) is rounded to nearest, all three projections (its static
input scale still from its own tokens, or the peers' without any). Round to nearest needs
nothing the expert did not see (no statistics of tokens routed elsewhere, no second pass of every
expert over every token) and cannot overfit. The alternatives kept for comparison
(bench/quant_suite.py; README, "sparse experts"): gate/up statistics from every MoE-input token
with down rounded to nearest (``borrow``), and statistics from every MoE-input token through the
sparse expert (``all-tokens``, llm-compressor's ``moe_calibrate_all_experts`` for the sparse ones)
or through every expert (``ALL_TOKENS_STATISTICS``).
quant_report.json lists per expert its tokens, its gate/up input Hessian's rank and damped
condition number (stats.hessian_evidence), where its statistics came from and each projection's
rounding; ``experts_with_borrowed_scales`` lists the sparse ones.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as tdist
from torch import nn

import moepress.compress.quantize.config as qconfig
from moepress.calib.distributed import DistEnv
from moepress.calib.observers import in_side_computation
from moepress.compress.formats import _int4
from moepress.compress.moe import AttentionObserver, expert_tokens
from moepress.compress.quant import kv as kvq
from moepress.compress.quantize.config import FORMATS, QuantConfig
from moepress.compress.quantize.experts import ExpertBatch
from moepress.compress.quantize.fold import fold_layer
from moepress.compress.quantize.group import FloatWeights, LayerResult, quantize_group
from moepress.compress.quantize.stats import (
    LinearStats,
    amax_only,
    by_format,
    gather_list,
    hessian_pending,
    hessian_read,
    shared_input_groups,
    with_amax,
)
from moepress.compress.stream import StoredLinear, StreamedModel
from moepress.errors import MoepressError

# k_scale / v_scale = amax / 448 of the keys / values the attention caches (compress/quant/kv.py)
KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale")
RULE_STATISTICS = {"routed": "its routed tokens", "rtn": "none (round to nearest)",
                   "all-tokens": "every MoE-input token", "borrow": "gate/up: every MoE-input token; down: none"}
RULE_GATE_UP = {"rtn": "round to nearest; input scale from its tokens or the peers'",
                "all-tokens": "AWQ/GPTQ statistics from every MoE-input token; input scale from its tokens",
                "borrow": "AWQ/GPTQ statistics and input scale from the layer's MoE input"}
RULE_DOWN = {"rtn": "round to nearest; input scale from its tokens or the peers'",
             "all-tokens": "AWQ/GPTQ statistics from the expert run on every MoE-input token",
             "borrow": "input scale from the other experts; AWQ/GPTQ off (round to nearest)"}


@torch.no_grad()
def quantize_layer(sm: StreamedModel, i: int, layer, hs: list[torch.Tensor], cfg: QuantConfig, env=None):
    """Calibrate and quantize decoder layer i (running on ``hs``, this rank's batches); returns
    (LayerResult, original outputs). Under torchrun the statistics are gathered from every rank."""
    return CalibratedLayer(sm, i, layer, cfg, env or DistEnv()).run(hs)


class _RouteLog:
    """MoE observer: the experts each calibration token was routed to, in call order."""

    def __init__(self):
        self.routes: list[torch.Tensor] = []

    def on_route(self, m, x, logits, weights, indices):
        self.routes.append(indices.detach().clone())


def expert_hidden(ex, wg: torch.Tensor, wu: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An expert's down-projection input for ``x``: act(x Wg^T) * (x Wu^T) (``ex``: its activation)."""
    return ex.act_fn(nn.functional.linear(x, wg)) * nn.functional.linear(x, wu)


def _observe_input(st: LinearStats, module, args) -> None:
    if not in_side_computation():  # an observer's own forward calls are not the layer's inputs
        st.add(args[0])


class CalibratedLayer:
    """Decoder layer i's calibration and quantization, step by step (:meth:`run`)."""

    def __init__(self, sm: StreamedModel, i: int, layer, cfg: QuantConfig, env: DistEnv):
        self.sm, self.i, self.layer, self.cfg, self.env = sm, i, layer, cfg, env
        prefix = sm.adapter.layer_prefix(i)
        self.linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        self.moe = layer.moe
        self.expert_names = set()
        if self.moe is not None:
            for e, ex in enumerate(self.moe.experts):
                for ln in ex.names:
                    self.expert_names.add(f"{layer.ffn_attr}.experts.{e}.{ln}")
        self.fmt_of = {n: cfg.format_of(n, prefix + n) for n in self.linears}
        self.targets = [n for n in self.linears if self.fmt_of[n] is not None]
        self.needs = {n for n in self.targets if FORMATS[self.fmt_of[n]].calibrated}
        self.stats: dict[str, LinearStats] = {}  # non-expert linear -> its group's statistics
        self.kv: dict[str, torch.Tensor] = {}  # k_scale / v_scale tensor name -> amax of the cached keys / values
        self.moe_inputs: list[torch.Tensor] = []
        self.routes: list[torch.Tensor] = []
        self.layer_stats: LinearStats | None = None  # the whole MoE input's, for experts that borrow
        self.res = LayerResult()
        self.weights = FloatWeights(self.linears)  # float32 on demand: never the whole layer at once

    def run(self, hs: list[torch.Tensor]) -> tuple[LayerResult, list[torch.Tensor] | None]:
        outs = self.observe(hs)
        if outs is not None:
            self._refuse_non_finite_outputs(outs)
        if self.cfg.awq_fold:  # AWQ smoothing folded into norms / v_proj / up_proj (fold.py)
            fold_layer(self)
        self.quantize_non_experts()
        if self.moe is not None:
            self.quantize_experts()
        if self.kv:
            self.kv_scales()
        ev = self.res.expert_evidence  # the experts' Hessian figures, read from the device at once
        for entry, h in zip(ev, hessian_read([e["hessian"] for e in ev]), strict=True):
            entry["hessian"] = h
        return self.res, outs

    def _refuse_non_finite_outputs(self, outs: list[torch.Tensor]) -> None:
        """NaN / Inf activations make a Hessian unfactorable (GPTQ's, and the sparse-expert evidence's: a traceback,
        or a silent round-to-nearest), and no input scale refuses them in a weight-only format: the layer's output
        is checked before anything is computed from its statistics, and a weight holding NaN / Inf (a linear's,
        decoded, or a norm's or router's) is named as the cause."""
        bad = torch.tensor([int(any(bool((~torch.isfinite(o)).any()) for o in outs))], dtype=torch.int32)
        if self.env.enabled:  # every rank refuses, or none: one alone would leave the others in a collective
            bad = bad.to(self.env.device)
            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
        if not int(bad.item()):
            return
        prefix = self.sm.adapter.layer_prefix(self.i)
        params = [(n + ".weight", self.weights[n]) for n in self.linears]  # linears decoded; then norms, routers
        params += [(n, p) for n, p in self.layer.named_parameters() if p.dtype in (torch.float32, torch.bfloat16,
                                                                                    torch.float16)]
        for n, w in params:
            k = int((~torch.isfinite(w)).sum())
            if k:
                raise MoepressError(f"{prefix}{n}: {k} values are not finite (NaN or Inf); expected finite weights")
        raise MoepressError(f"{prefix.rstrip('.')}: its output on the calibration samples holds NaN or Inf with finite "
                            f"weights (activations overflow); nothing can be calibrated from them")

    @property
    def _experts_calibrated(self) -> bool:
        return self.moe is not None and any(n in self.needs for n in self.expert_names)

    def _non_expert_groups(self) -> list[list[str]]:
        return shared_input_groups([n for n in self.targets if n not in self.expert_names])

    # ---- statistics ------------------------------------------------------------------------------

    def observe(self, hs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Run the layer on ``hs`` with the hooks that gather what its quantization needs; returns
        its outputs (None when nothing is to be gathered and the run is sequential)."""
        hooks, log = self._hook()
        need_run = bool(self.needs) or bool(self.kv) or not self.cfg.is_sequential()
        outs = self.sm.run_layer(self.layer, hs) if need_run else None
        for h in hooks:
            h.remove()
        if log is not None:
            self.moe.observers.remove(log)
            self.routes = log.routes
        if self.env.enabled:
            self._gather()
        return outs

    def _hook(self) -> tuple[list, _RouteLog | None]:
        """Input statistics of each non-expert group, the cached keys and values, the MoE input and routing."""
        hooks = []
        for grp in self._non_expert_groups():
            if not any(n in self.needs for n in grp):
                continue
            st = LinearStats(hessian=any(self.cfg.needs_hessian(self.fmt_of[n]) for n in grp), defer=self.env.enabled)
            for n in grp:
                self.stats[n] = st
            hooks.append(self.linears[grp[0]].register_forward_pre_hook(partial(_observe_input, st)))
        if self.cfg.kv_cache:
            self.kv = {n: torch.zeros(()) for n in KV_SCALES}
            hooks.append(AttentionObserver(self.layer.self_attn, self._observe_kv))
        log = None
        if self._experts_calibrated:
            hooks.append(self.moe.register_forward_pre_hook(self._observe_moe_input))
            log = _RouteLog()
            self.moe.observers.append(log)
        return hooks, log

    def _observe_kv(self, key: torch.Tensor, value: torch.Tensor) -> None:
        k, v = KV_SCALES
        self.kv[k], self.kv[v] = kvq.observe(self.kv[k], key), kvq.observe(self.kv[v], value)

    def _observe_moe_input(self, module, args) -> None:
        self.moe_inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    def _gather(self) -> None:
        """torchrun: every rank's statistics, folded in global batch order."""
        dev = self.sm.device
        for st in {id(v): v for v in self.stats.values()}.values():
            st.gather(self.env, dev)
        self.moe_inputs, self.routes = (gather_list(self.moe_inputs, self.env, dev),
                                        gather_list(self.routes, self.env, dev))
        for n in self.kv:  # on the group's device (NCCL takes no CPU tensor, gloo no CUDA one)
            t = self.kv[n].to(self.env.device)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            self.kv[n] = t.to(self.kv[n].device)

    # ---- quantization --------------------------------------------------------------------------

    def quantize_non_experts(self) -> None:
        """Attention, dense MLP, shared experts: each group of linears reading one input."""
        for grp in self._non_expert_groups():
            parts = by_format(grp, self.fmt_of)
            for fmt, names in parts.items():
                st = self.stats.get(names[0])
                if st is not None:  # read by one quantizer call: it may take the Hessian in place (stats.py)
                    st.single_use = len(parts) == 1
                quantize_group(self.res, self.cfg, fmt, names, self._weights_for(fmt, names), st,
                               identity_dequantized=names[0].endswith(self.sm.adapter.identity_dequantized))

    def _weights_for(self, fmt: str, names: list[str]) -> list[torch.Tensor]:
        """The weights handed to ``fmt``'s quantizer: as stored where it reads them exactly (the INT4
        quantizer, formats/_int4.py: no float32 copy of a wide weight next to its Hessian), else float32.
        Folded weights (fold.py FoldedWeights) are always made by ``self.weights``."""
        if type(self.weights) is FloatWeights and _int4.reads_stored(FORMATS[fmt]) \
                and not any(getattr(self.linears[n], "kept", ()) for n in names):  # FP8 as stored: not values
            return [self.linears[n].weight.detach() for n in names]
        return [self.weights[n] for n in names]

    def quantize_experts(self) -> None:
        """Routed experts one at a time, from the layer's MoE input and its routing; then their
        input scales shared per projection."""
        X, idx = self.moe_input(), torch.cat(self.routes) if self.routes else None
        if X is not None:
            self.layer_stats = LinearStats(hessian=False)
            self.layer_stats.add(X)
        expert_groups: list[tuple[int, str, list[str]]] = []
        self.batch = ExpertBatch(self.res, self.cfg, self.env)  # their quantize_group calls, batched (experts.py)
        sm, prefix = self.sm, self.sm.adapter.layer_prefix(self.i)
        # for experts whose weights _let_go dropped: read again from the checkpoint, float32 (bf16 -> float32 is
        # exact: the values the layer's StoredLinear weight gave). Not a method of self: the weights would hold
        # self in a reference cycle, and with it the layer's result until the garbage collector ran
        self.weights.reread = lambda n: sm.read_tensor(f"{prefix}{n}.weight")
        n = len(self.moe.experts)
        tokens = expert_tokens(idx, n) if idx is not None else [torch.zeros(0, dtype=torch.long)] * n
        for e, ex in enumerate(self.moe.experts):
            toks = tokens[e]
            x_e = X[toks] if X is not None else None
            expert_groups += self._quantize_expert(e, ex, X, x_e)
        self.batch.flush()
        self._share_expert_input_scales(expert_groups)

    def _evidence_rule(self, tokens: int, width: int, pooled: bool | None = None) -> str:
        """Where expert statistics come from: ``routed`` (its own tokens) or the sparse-expert rule.
        ``pooled``: whether the layer's MoE input was observed (default: its statistics exist)."""
        pooled = self.layer_stats is not None if pooled is None else pooled
        if qconfig.ALL_TOKENS_STATISTICS and pooled:
            return "all-tokens"
        if tokens >= max(qconfig.MIN_EXPERT_TOKENS, qconfig.SPARSE_EXPERT_RATIO * width):
            return "routed"
        rule = qconfig.SPARSE_EXPERT_RULE
        return rule if pooled else "rtn"

    def _quantize_expert(self, e: int, ex, X: torch.Tensor | None,
                         x_e: torch.Tensor | None) -> list[tuple[int, str, list[str]]]:
        """Expert e on its tokens ``x_e``; returns its quantized groups (expert, projection, names)."""
        g, u, d = (f"{self.layer.ffn_attr}.experts.{e}.{ln}" for ln in ex.names)
        fmt_of, res = self.fmt_of, self.res
        tokens = 0 if x_e is None else int(x_e.shape[0])
        wx = {n: self.weights[n] for n in (g, u, d) if fmt_of[n] is not None or (n != d and x_e is not None)}
        res.expert_tokens.append(tokens)
        calibrated = any(n in self.needs for n in (g, u, d))
        rule = self._evidence_rule(tokens, self.linears[g].in_features) if calibrated else "routed"
        st_gu, st_d = self._expert_stats(ex, (g, u, d), X, x_e, rule, wx) if calibrated else (None, None)
        if calibrated:
            self._record_evidence(e, tokens, rule, (g, d), x_e)
        groups = []
        for fmt, names in by_format([n for n in (g, u) if fmt_of[n] is not None], fmt_of).items():
            self._let_go(names, self.batch.add(fmt, names, [wx[n] for n in names], st_gu))
            groups.append((e, "gate_up", names))
        if fmt_of[d] is not None:
            self._let_go([d], self.batch.add(fmt_of[d], [d], [wx[d]], st_d))
            groups.append((e, "down", [d]))
        return groups

    def _let_go(self, names: list[str], out) -> None:
        """The stored weights of linears quantized already (``out``: ExpertBatch.add's, None while pending),
        let go now rather than at the layer's end, so the layer's stored experts shrink as their outputs
        grow (else the peak holds a layer's stored and quantized experts at once). Nothing reads them again: a
        sequential run's next forward dequantizes the output (apply_fake_quant drops them anyway), and the
        input scale of experts no peer's tokens reached reads them from the checkpoint (``weights.reread``)."""
        if out is None or out.skipped is not None:
            return
        for n in names:
            m = self.linears[n]
            if isinstance(m, StoredLinear):
                m.drop_stored()

    def _expert_stats(self, ex, gud: tuple[str, str, str], X: torch.Tensor | None, x_e: torch.Tensor | None,
                      rule: str, wx: dict[str, torch.Tensor]) -> tuple[LinearStats, LinearStats | None]:
        """(gate/up input statistics, down input statistics) of one expert under ``rule``. The static
        input scale (its amax) always comes from the expert's own tokens (none: the peers', see
        :meth:`_share_expert_input_scales`), whatever the AWQ/GPTQ statistics come from."""
        g, u, d = gud
        needs_h = self.cfg.needs_hessian

        def inner(x):
            return expert_hidden(ex, wx[g], wx[u], x)

        h_e = inner(x_e) if x_e is not None and x_e.shape[0] and g in wx and u in wx else None
        if rule == "rtn":
            return amax_only(x_e), amax_only(h_e)
        if rule == "routed":
            st_gu = LinearStats(hessian=needs_h(self.fmt_of[g]))
            st_gu.add(x_e)
            st_d = LinearStats(hessian=needs_h(self.fmt_of.get(d)))
            if h_e is not None:
                st_d.add(h_e)
            return st_gu, st_d
        if needs_h(self.fmt_of[g]) and self.layer_stats.S is None:
            self.layer_stats = LinearStats(hessian=True)
            self.layer_stats.add(X)
        if rule == "borrow":  # gate/up amax from every token too: excluded from the shared scale's max
            return self.layer_stats, None
        st_d = LinearStats(hessian=needs_h(self.fmt_of.get(d)))
        for chunk in X.split(4096):
            st_d.add(inner(chunk))
        return with_amax(self.layer_stats, x_e), with_amax(st_d, h_e)

    def _record_evidence(self, e: int, tokens: int, rule: str, gd: tuple[str, str], x_e) -> None:
        """The expert's entry in quant_report.json: tokens, its gate/up input Hessian's rank and
        condition (stats.hessian_evidence), where its statistics came from, each projection's rounding."""
        g, d = gd
        entry = {"expert": e, "tokens": tokens, "statistics": RULE_STATISTICS[rule],
                 "rounding": {"gate_up": self._rounding(g, rule), "down": self._rounding(d, rule, down=True)},
                 "hessian": hessian_pending(x_e, self.cfg.gptq_damp)}  # read with the layer's others (run)
        self.res.expert_evidence.append(entry)
        if rule != "routed":
            self.res.borrowed.append({"layer": self.i, "expert": e, "tokens": tokens, "rule": rule,
                                      "gate_up": RULE_GATE_UP[rule], "down": RULE_DOWN[rule]})

    def _rounding(self, n: str, rule: str, down: bool = False) -> str | None:
        """How linear ``n`` of a routed expert is rounded (from its format's attributes and the rule)."""
        fmt = self.fmt_of.get(n)
        if fmt is None:
            return None
        f = FORMATS[fmt]
        if rule == "rtn" or (rule == "borrow" and down) or not (f.awq or f.gptq):
            return "round to nearest"
        if f.gptq:
            return "gptq"
        return "awq + gptq" if self.cfg.awq_gptq else ("awq + clip" if self.cfg.awq_clip else "awq")

    def _share_expert_input_scales(self, expert_groups: list[tuple[int, str, list[str]]]) -> None:
        """One input scale per projection (and format) for all routed experts: the max over the
        experts that saw tokens; experts without tokens take it too."""
        res, per_proj_amax = self.res, {}
        # not in the max: experts without tokens, and "borrow"'s gate/up amax (every token's)
        borrowed = {b["expert"] for b in res.borrowed if b["tokens"] == 0 or b["rule"] == "borrow"}
        for _, proj, names in expert_groups:
            key = f"{proj}:{self.fmt_of[names[0]]}"
            if f"{names[0]}.input_scale" in res.tensors and int(names[0].split(".")[-2]) not in borrowed:
                v = res.tensors[f"{names[0]}.input_scale"]
                per_proj_amax[key] = v if key not in per_proj_amax else torch.maximum(per_proj_amax[key], v)
        for e, proj, names in expert_groups:
            key = f"{proj}:{self.fmt_of[names[0]]}"
            if key not in per_proj_amax and f"{names[0]}.input_scale" in res.tensors and self.moe_inputs:
                per_proj_amax[key] = self._all_tokens_input_scale(e, proj, names[0])  # no peer saw tokens
                for b in res.borrowed:
                    if b["expert"] == e:
                        b[f"{proj}_input_scale"] = "every MoE-input token's (no expert of its format saw one)"
            if key in per_proj_amax:
                for n in names:
                    res.tensors[f"{n}.input_scale"] = per_proj_amax[key].clone()
                    fmt, pqs, _ = res.specs[n]
                    res.specs[n] = (fmt, pqs, per_proj_amax[key].clone())

    def moe_input(self) -> torch.Tensor | None:
        """The layer's MoE inputs as one tensor (None: none), held once: the pieces go once concatenated (Kimi K2 at its
        calibration tokens: about 10 GB each); a later call copies nothing."""
        if len(self.moe_inputs) > 1:
            self.moe_inputs = [torch.cat(self.moe_inputs)]
        return self.moe_inputs[0] if self.moe_inputs else None

    def _all_tokens_input_scale(self, e: int, proj: str, n: str) -> torch.Tensor:
        """Linear ``n``'s static input scale from every MoE-input token run through expert e: for a
        projection whose experts of its format saw no token at all (a --rule giving one rarely-routed
        expert its own format), whose own amax would be 0 and clamp every activation to nothing."""
        X = self.moe_input()
        fmt, pqs, _ = self.res.specs[n]
        if proj == "gate_up":
            amax = X.abs().amax(dim=0)
        else:
            ex = self.moe.experts[e]
            g, u = (self.weights[f"{self.layer.ffn_attr}.experts.{e}.{ln}"] for ln in ex.names[:2])
            amax = torch.stack([expert_hidden(ex, g, u, c).abs().amax(0) for c in X.split(4096)]).amax(0)
        amax = (amax * pqs).amax() if pqs is not None else amax.amax()
        return FORMATS[fmt].input_scale(amax).reshape(())

    def kv_scales(self) -> None:
        """The attention's k_scale / v_scale from the amax of the keys / values it cached."""
        for n, amax in self.kv.items():
            self.res.tensors[n] = kvq.kv_scale(amax)
