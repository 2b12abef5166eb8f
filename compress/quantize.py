"""`moepress quantize`: FP8 / INT4 quantization, streamed one decoder layer at a time.

Output: Model-Optimizer's unified Hugging Face layout (what
``modelopt.torch.export.export_hf_checkpoint`` writes; NVIDIA/Model-Optimizer
``modelopt/torch/export/unified_export_hf.py`` and ``quant_utils.py``). For a quantized linear
with prefix ``P`` (e.g. ``model.layers.1.mlp.experts.3.gate_proj``):

=============  ==================================================================================
format         tensors
=============  ==================================================================================
fp8            ``P.weight`` F8_E4M3 [out, in]; ``P.weight_scale`` F32 [] (dequant = q * s);
               ``P.input_scale`` F32 [] (static activation scale, amax / 448)
fp8-block      ``P.weight`` F8_E4M3; ``P.weight_scale`` F32 [ceil(out/128), ceil(in/128)]
               (DeepSeek's ``weight_scale_inv`` values); activations dynamic, 1 x 128 per token
fp8-dynamic    ``P.weight`` F8_E4M3; ``P.weight_scale`` F32 [out, 1]; activations per token
int4-awq       ``P.weight`` U8 [out/2, in] (two rows per byte, low nibble = even row:
               quant_utils.pack_int4_in_uint8); ``P.weight_scale`` F32 [out, in/group] (amax / 7);
               ``P.pre_quant_scale`` F32 [in] (the input is multiplied by it); the smoothed weight
               is rounded by GPTQ on the smoothed input (``awq_gptq``, default) or to nearest
int4-gptq      as int4-awq without ``pre_quant_scale``
w4a8-awq       as int4-awq plus ``P.input_scale`` F32 [] (FP8 activations, of x * pre_quant_scale)
               and ``P.weight_scale_2`` F32 [] (= amax(W / pre_quant_scale) / 448, modelopt's
               second weight quantizer)
kv cache fp8   ``model.layers.N.self_attn.k_scale`` / ``v_scale`` F32 [] = amax / 448 of the k / v
               projections' outputs (the values the cache holds before RoPE; see quant_report)
=============  ==================================================================================

INT4 group: ``--group-size`` input channels (128 default, 64, 32); a linear with fewer inputs
uses one group per row (the group is clamped to in_features, e.g. DeepSeek-V3-tiny's expert
down_proj with 64 inputs: weight_scale [out, 1], recorded per module as ``group`` in the sidecar);
a linear whose in_features is not a multiple of the group is left unquantized and listed under
``left_unquantized`` in quant_report.json (compress/quant/int4.py: effective_group). The pure
per-format functions are in compress/quant/{fp8,int4,awq,gptq,w4a8,kv}.py.

quant_report.json (and the ``report`` section of moepress-manifest.json): quant_algo, number of
quantized linears, ``experts_with_borrowed_scales`` ([{layer, expert, tokens, gate_up, down}]:
experts calibration routed fewer than MIN_EXPERT_TOKENS tokens to), ``expert_calibration_tokens``
({layer: [routed tokens per expert]}), ``left_unquantized``; the report file also ``awq_alpha`` (alpha per group).

Everything else keeps its name and stored dtype (routers, norms, embeddings, lm_head are
never quantized). ``config.json`` gets ``quantization_config`` ({quant_method: modelopt,
quant_algo, ...}), ``hf_quant_config.json`` holds modelopt's {producer, quantization{quant_algo,
kv_cache_quant_algo, group_size, exclude_modules}} (``MIXED_PRECISION`` + ``quantized_layers``
for recipes with several formats), and the sidecar ``moepress_quant.json`` lists every
quantized module: {"format", "group_size", "modules": {P: {"format", "group"}}, "shared":
[[P, ...]], "borrowed": [...]} — what :func:`read_quant_layout` returns.

Scale conventions for TensorRT-LLM's fused kernels (tensorrt_llm/_torch/modules/fused_moe;
modelopt's ``preprocess_linear_fusion``): linears that read the same input (q/k/v; gate/up,
fused into one GEMM) share ``input_scale``, the FP8 ``weight_scale``, ``weight_scale_2`` and the
AWQ ``pre_quant_scale``; all routed experts of a layer share one input scale per projection
(the maximum), which is also how an expert that calibration sent no tokens gets a valid one.
Its weight scales come from its weights; its AWQ search uses the layer's MoE input instead of
its own tokens (reported as borrowed).

Streaming: layer i is calibrated on the outputs of the already quantized layers 0..i-1
(``sequential``, the default) and written as one shard; the writer's journal makes a killed
run resume at the first unfinished layer with byte-identical output.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moepress.compress import formats
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, LayerView
from moepress.compress.formats.fake_quant import attach as attach_fake_quant
from moepress.compress.quant import fp8, int4
from moepress.compress.quant import kv as kvq
from moepress.compress.stream import StoredLinear, StreamedModel, read_ahead, read_ahead_budget
from moepress.errors import MoepressError
from moepress.progress import QUIET, Progress

SIDECAR = formats.SIDECAR
read_quant_layout = formats.read_layout
REPORT = "quant_report.json"


FORMATS = formats.produced()  # what --format / --rule may name

# Linears that read the same input tensor (siblings under one parent): fused by TensorRT-LLM.
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"}, {"gate_proj", "up_proj", "w1", "w3"})
MIN_EXPERT_TOKENS = 8  # fewer routed calibration tokens: the expert's AWQ/GPTQ statistics are borrowed
AWQ_SAMPLE_ROWS = 1024  # rows of calibration input the AWQ search evaluates per linear group


@dataclass(frozen=True)
class QuantConfig:
    """One quantize run. ``format`` applies to every linear of every decoder layer unless
    ``rules`` ((pattern, format|"none"), ...) say otherwise for modules whose name (relative to
    the layer, e.g. ``mlp.experts.3.gate_proj``, or full) matches the fnmatch pattern; the first
    matching rule wins."""

    format: str | None = "fp8"
    rules: tuple[tuple[str, str], ...] = ()
    group_size: int = 128
    kv_cache: str | None = None
    sequential: bool = True
    calib: tuple[str, ...] = ()
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    gptq_damp: float = 0.01
    # GPTQ columns by decreasing Hessian diagonal (llm-compressor's default "static" act order);
    # lower held-out perplexity than in-order on every bundled model (bench/quant_quality.py)
    gptq_act_order: bool = True
    # AWQ (int4-awq, w4a8-awq): after the scale search, the smoothed weight W / pre_quant_scale is
    # rounded by GPTQ on the smoothed input's Hessian (scales amax / 7), llm-compressor's AWQ + GPTQ
    # stacking; lower held-out perplexity than round-to-nearest with the clip search on 5 of the 6
    # bundled model x AWQ format cells (bench/quant_quality.py). The stored format is unchanged.
    awq_gptq: bool = True
    # with awq_gptq off: the clip search after the scale search (llm-awq auto_clip, modelopt awq_clip,
    # its awq_full); both off = modelopt's awq_lite
    awq_clip: bool = True

    def __post_init__(self):
        for fmt in [self.format, *(f for _, f in self.rules)]:
            if fmt is not None and fmt != "none" and fmt not in FORMATS:
                raise MoepressError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
        if self.format is None and not self.rules:
            raise MoepressError("--format: required (or --rule PATTERN=FORMAT)")
        if self.group_size not in (32, 64, 128):
            raise MoepressError(f"--group-size {self.group_size}: expected 128, 64 or 32")
        if self.kv_cache not in (None, "fp8"):
            raise MoepressError(f"--kv-cache {self.kv_cache}: expected fp8")

    def format_of(self, rel: str, full: str) -> str | None:
        for pat, fmt in self.rules:
            if fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(full, pat):
                return None if fmt == "none" else fmt
        return self.format

    def formats(self) -> set[str]:
        return {f for f in [self.format, *(f for _, f in self.rules)] if f and f != "none"}

    @property
    def needs_calibration(self) -> bool:
        return any(FORMATS[f].calibrated for f in self.formats()) or self.kv_cache is not None


def config_from_recipe(q: dict, c: dict) -> QuantConfig:
    rules = tuple((str(k), str(v)) for k, v in (q.get("rules") or {}).items())
    return QuantConfig(format=q.get("format"), rules=rules, group_size=q.get("group_size", 128),
                       kv_cache=q.get("kv_cache"), sequential=q.get("sequential", True),
                       calib=tuple(c.get("sources") or ()), num_samples=c.get("num_samples", 64),
                       seq_len=c.get("seq_len", 256), seed=c.get("seed", 0),
                       gptq_act_order=q.get("gptq_act_order", True), awq_clip=q.get("awq_clip", True),
                       awq_gptq=q.get("awq_gptq", True))


# ---- calibration statistics of one layer --------------------------------------------------------

class LinearStats:
    """Inputs seen by one linear (or one group sharing an input): amax and mean |x| per channel,
    a sample of rows (AWQ), the Hessian (GPTQ).

    Each forward call contributes (sum |x| in float64, rows, x^T x); contributions are folded in
    call order. Under torchrun every rank keeps its own calls' contributions until
    :meth:`gather`, which folds all ranks' calls in global batch order — so the statistics, and
    the quantized checkpoint, are bit-identical to one process's.
    """

    def __init__(self, hessian: bool, defer: bool = False):
        self.amax = None
        self.hessian = hessian
        self.defer = defer  # keep per-call contributions for gather() (distributed)
        self.calls: list[tuple] = []
        self.abs_sum = None
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.S = None  # sum of x^T x (float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        a = x.abs()
        self.amax = a.amax(0) if self.amax is None else torch.maximum(self.amax, a.amax(0))
        take = x[: max(0, AWQ_SAMPLE_ROWS - self.n_rows)].clone()
        self.n_rows += take.shape[0]
        xd = x.double() if self.hessian else None
        call = (a.sum(0, dtype=torch.float64), x.shape[0], take, xd.T @ xd if self.hessian else None)
        if self.defer:
            self.calls.append(call)
        else:
            self._fold(call)

    def _fold(self, call) -> None:
        s, n, rows, xtx = call
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += n
        if rows.shape[0] and sum(r.shape[0] for r in self.rows) < AWQ_SAMPLE_ROWS:
            self.rows.append(rows[: AWQ_SAMPLE_ROWS - sum(r.shape[0] for r in self.rows)])
        if xtx is not None:
            self.S = xtx if self.S is None else self.S + xtx

    def gather(self, env) -> None:
        """Fold every rank's calls, in global order (ranks hold contiguous shards of the batches)."""
        import torch.distributed as dist

        everyone: list = [None] * env.world_size
        dist.all_gather_object(everyone, (self.calls, self.amax))
        self.calls = []
        amaxes = [am for _, am in everyone if am is not None]
        self.amax = torch.stack(amaxes).amax(0) if amaxes else None
        for calls, _ in everyone:
            for call in calls:
                self._fold(call)
        self.defer = False

    @property
    def H(self):
        return None if self.S is None else 2.0 * self.S / max(self.n, 1)

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)


def _gather_list(items: list, env) -> list:
    """Every rank's list, concatenated in rank order (= global batch order)."""
    if not env.enabled:
        return items
    import torch.distributed as dist

    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, items)
    return [x for part in everyone for x in part]


def _groups(names: list[str]) -> list[list[str]]:
    """Linears (module names in a layer) grouped by shared input; order preserved."""
    out, seen = [], set()
    for n in names:
        if n in seen:
            continue
        parent, _, leaf = n.rpartition(".")
        grp = [n]
        for fam in SHARED_INPUT:
            if leaf in fam:
                grp = [m for m in names if m.rpartition(".")[0] == parent and m.rpartition(".")[2] in fam]
                break
        seen.update(grp)
        out.append(grp)
    return out


# ---- the stage ------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # names relative to the layer
    modules: dict[str, dict] = field(default_factory=dict)
    specs: dict[str, tuple] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)
    borrowed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    awq_alpha: dict[str, float] = field(default_factory=dict)
    expert_tokens: list[int] = field(default_factory=list)  # routed calibration tokens per expert


def _needs_h(cfg: QuantConfig, fmt: str | None) -> bool:
    """Does a linear of format ``fmt`` need its input's Hessian (GPTQ rounding)?"""
    return fmt is not None and formats.FORMATS[fmt].needs_hessian(cfg.awq_gptq)


def _quantize_group(res: LayerResult, cfg: QuantConfig, fmt: str, names: list[str], ws: list[torch.Tensor],
                    st: LinearStats | None, input_amax_override: torch.Tensor | None = None) -> None:
    """Quantize linears ``names`` (they read one input, statistics ``st``) with the format's own
    quantizer, add the static input scale where the format has one, and record them in ``res``."""
    f = formats.FORMATS[fmt]
    out = f.quantize(ws, formats.QuantContext(cfg.group_size, st, cfg.gptq_damp, cfg.gptq_act_order,
                                              cfg.awq_gptq, cfg.awq_clip))
    if out.skipped is not None:
        res.skipped.extend({"module": n, "reason": out.skipped} for n in names)
        return
    if out.awq_alpha is not None:
        res.awq_alpha[names[0]] = out.awq_alpha
    tensors = dict(zip(names, out.tensors, strict=True))
    pqs = out.pre_quant_scale
    isc = None
    if f.static_input:
        amax = input_amax_override
        if amax is None:
            a = st.amax if st is not None and st.amax is not None else torch.zeros(ws[0].shape[1])
            amax = (a * pqs).amax() if pqs is not None else a.amax()
        isc = fp8.scale_from_amax(amax).reshape(())
        for n in names:
            tensors[n]["input_scale"] = isc
    for n in names:
        for k, v in tensors[n].items():
            res.tensors[f"{n}.{k}"] = v
        res.modules[n] = {"format": fmt, **({"group": int(ws[0].shape[1] // tensors[n]["weight_scale"].shape[1])}
                                            if out.group is not None else {})}
        res.specs[n] = (fmt, pqs, isc)
    if len(names) > 1:
        res.shared.append(list(names))


def _input_amax_for_awq(st: LinearStats | None, pqs: torch.Tensor | None) -> torch.Tensor | None:
    if st is None or st.amax is None:
        return None
    return (st.amax * pqs).amax() if pqs is not None else st.amax.amax()


@torch.no_grad()
def quantize_layer(sm: StreamedModel, i: int, layer, hs: list[torch.Tensor], cfg: QuantConfig, env=None):
    """Calibrate and quantize decoder layer i (running on ``hs``, this rank's batches); returns
    (LayerResult, original outputs). Under torchrun the statistics are gathered from every rank."""
    from moepress.calib.distributed import DistEnv

    env = env or DistEnv()
    a = sm.adapter
    prefix = a.layer_prefix(i)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    moe = layer.moe
    expert_names = set()
    if moe is not None:
        for e, ex in enumerate(moe.experts):
            for ln in ex.names:
                expert_names.add(f"{layer.ffn_attr}.experts.{e}.{ln}")
    fmt_of = {n: cfg.format_of(n, prefix + n) for n in linears}
    targets = [n for n in linears if fmt_of[n] is not None]
    needs = {n for n in targets if FORMATS[fmt_of[n]].calibrated}
    hooks, stats = [], {}
    for grp in _groups([n for n in targets if n not in expert_names]):
        if not any(n in needs for n in grp):
            continue
        st = LinearStats(hessian=any(_needs_h(cfg, fmt_of[n]) for n in grp), defer=env.enabled)
        for n in grp:
            stats[n] = st
        hooks.append(linears[grp[0]].register_forward_pre_hook(lambda m, args, st=st: st.add(args[0])))
    moe_inputs, routes = [], []
    kv = {}
    if cfg.kv_cache:
        for n in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.kv_a_proj_with_mqa"):
            if n in linears:
                kv[n] = torch.zeros(())
                hooks.append(linears[n].register_forward_hook(
                    lambda m, args, out, n=n: kv.__setitem__(n, kvq.observe(kv[n], out))))
    if moe is not None and any(n in needs for n in expert_names):
        hooks.append(moe.register_forward_pre_hook(
            lambda m, args: moe_inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())))

        class _Routes:
            def on_route(self, m, x, logits, weights, indices):
                routes.append(indices.detach().clone())

        obs = _Routes()
        moe.observers.append(obs)
    need_run = bool(needs) or bool(kv) or not cfg.sequential
    outs = sm.run_layer(layer, hs) if need_run else None
    for h in hooks:
        h.remove()
    if moe is not None and any(n in needs for n in expert_names):
        moe.observers.remove(obs)
    if env.enabled:
        import torch.distributed as dist

        for st in {id(v): v for v in stats.values()}.values():
            st.gather(env)
        moe_inputs, routes = _gather_list(moe_inputs, env), _gather_list(routes, env)
        for n in kv:
            dist.all_reduce(kv[n], op=dist.ReduceOp.MAX)

    res = LayerResult()
    weights = _FloatWeights(linears)  # float32 on demand: never the whole layer in float32 at once
    # attention, dense MLP, shared experts
    for grp in _groups([n for n in targets if n not in expert_names]):
        by_fmt: dict[str, list[str]] = {}
        for n in grp:
            by_fmt.setdefault(fmt_of[n], []).append(n)
        for fmt, names in by_fmt.items():
            _quantize_group(res, cfg, fmt, names, [weights[n] for n in names], stats.get(names[0]))
    # routed experts, one at a time from the layer's MoE input and its routing
    if moe is not None:
        X = torch.cat(moe_inputs) if moe_inputs else None
        idx = torch.cat(routes) if routes else None
        per_proj_amax: dict[str, torch.Tensor] = {}
        expert_groups: list[tuple[int, str, list[str]]] = []
        layer_stats = None
        if X is not None:
            layer_stats = LinearStats(hessian=False)
            layer_stats.add(X)
        for e, ex in enumerate(moe.experts):
            g, u, d = (f"{layer.ffn_attr}.experts.{e}.{ln}" for ln in ex.names)
            toks = (idx == e).any(-1).nonzero().squeeze(-1) if idx is not None else torch.zeros(0, dtype=torch.long)
            x_e = X[toks] if X is not None else None
            few = x_e is None or x_e.shape[0] < MIN_EXPERT_TOKENS
            # this expert's weights in float32, each made once (quantized, or gate/up for down's input)
            wx = {n: weights[n] for n in (g, u, d) if fmt_of[n] is not None or (n != d and not few)}
            res.expert_tokens.append(0 if x_e is None else int(x_e.shape[0]))
            if few and any(n in needs for n in (g, u, d)):
                res.borrowed.append({"layer": i, "expert": e, "tokens": 0 if x_e is None else int(x_e.shape[0]),
                                     "gate_up": "AWQ/GPTQ statistics and input scale from the layer's MoE input",
                                     "down": "input scale from the other experts; AWQ/GPTQ off (round to nearest)"})
            st_gu = st_d = None
            if any(n in needs for n in (g, u, d)):
                src = layer_stats if few else None
                if src is None:
                    st_gu = LinearStats(hessian=_needs_h(cfg, fmt_of[g]))
                    st_gu.add(x_e)
                else:
                    st_gu = src
                    if _needs_h(cfg, fmt_of[g]) and layer_stats.S is None:
                        layer_stats = LinearStats(hessian=True)
                        layer_stats.add(X)
                        st_gu = layer_stats
                if not few:
                    h = ex.act_fn(nn.functional.linear(x_e, wx[g])) * nn.functional.linear(x_e, wx[u])
                    st_d = LinearStats(hessian=_needs_h(cfg, fmt_of.get(d)))
                    st_d.add(h)
            gu = [n for n in (g, u) if fmt_of[n] is not None]
            by_fmt = {}
            for n in gu:
                by_fmt.setdefault(fmt_of[n], []).append(n)
            for fmt, names in by_fmt.items():
                _quantize_group(res, cfg, fmt, names, [wx[n] for n in names], st_gu)
                expert_groups.append((e, "gate_up", names))
            if fmt_of[d] is not None:
                _quantize_group(res, cfg, fmt_of[d], [d], [wx[d]], st_d)
                expert_groups.append((e, "down", [d]))
        # one input scale per projection for all routed experts (TensorRT-LLM's fused MoE):
        # the max over the experts that saw tokens; experts without tokens take it too.
        for _, proj, names in expert_groups:
            key = f"{proj}:{fmt_of[names[0]]}"
            if f"{names[0]}.input_scale" in res.tensors and not any(
                    b["expert"] == int(names[0].split(".")[-2]) for b in res.borrowed):
                v = res.tensors[f"{names[0]}.input_scale"]
                per_proj_amax[key] = v if key not in per_proj_amax else torch.maximum(per_proj_amax[key], v)
        for _, proj, names in expert_groups:
            key = f"{proj}:{fmt_of[names[0]]}"
            if key in per_proj_amax:
                for n in names:
                    res.tensors[f"{n}.input_scale"] = per_proj_amax[key].clone()
                    fmt, pqs, _ = res.specs[n]
                    res.specs[n] = (fmt, pqs, per_proj_amax[key].clone())
    if kv:
        for n, amax in kv.items():
            attn = n.rpartition(".")[0]
            kind = "v_scale" if n.endswith("v_proj") else "k_scale"
            res.tensors[f"{attn}.{kind}"] = kvq.kv_scale(amax)
            if n.endswith("kv_a_proj_with_mqa"):
                res.tensors[f"{attn}.v_scale"] = kvq.kv_scale(amax)
    return res, outs


def _free_plan(sm: StreamedModel, i: int, cfg: QuantConfig) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Calibration-free layer i: the groups to quantize [(format, linear names)] and every stored
    tensor of the layer in the order :func:`quantize_tensors` consumes them (the groups' weights,
    with their block-FP8 scales, then the rest)."""
    a = sm.adapter
    prefix = a.layer_prefix(i)
    with torch.device("meta"):
        meta = a.build_layer(i)
    names = [n for n, m in meta.named_modules() if isinstance(m, nn.Linear)]
    fmt_of = {n: cfg.format_of(n, prefix + n) for n in names}
    groups: list[tuple[str, list[str]]] = []
    for grp in _groups([n for n in names if fmt_of[n] is not None]):
        by_fmt: dict[str, list[str]] = {}
        for n in grp:
            by_fmt.setdefault(fmt_of[n], []).append(n)
        groups += list(by_fmt.items())
    order = []
    for _, ns in groups:
        for n in ns:
            order += [prefix + n + sfx for sfx in (".weight", ".weight_scale_inv") if prefix + n + sfx in sm.ckpt]
    taken = set(order)
    return groups, order + [n for n in sorted(sm.ckpt.layer_names(i)) if n not in taken]


@torch.no_grad()
def quantize_tensors(sm: StreamedModel, i: int, cfg: QuantConfig, groups: list[tuple[str, list[str]]],
                     tensors: Iterator[tuple[str, torch.Tensor]], n_stored: int,
                     pool: ThreadPoolExecutor | None = None, depth: int = 0) -> tuple[LayerResult, LayerView]:
    """Calibration-free formats: quantize layer i group by group as its stored tensors arrive from
    ``tensors`` (a :func:`read_ahead` stream in :func:`_free_plan` order), dropping each weight
    once quantized; no layer module, no activations. Returns the result and a view over the
    layer's other stored tensors (``n_stored`` in all are taken from the stream).

    ``pool``: groups are quantized by its threads (one single-threaded torch op stream each,
    which on 2 cores beats one stream of 2-thread ops), at most ``depth`` groups ahead; results
    are merged in group order, so the output does not depend on the pool."""
    prefix = sm.adapter.layer_prefix(i)
    res = LayerResult()
    raw: dict[str, torch.Tensor] = {}
    taken = 0
    pending: deque[tuple[LayerResult, Future | None]] = deque()

    def merge() -> None:
        sub, fut = pending.popleft()
        if fut is not None:
            fut.result()
        res.tensors.update(sub.tensors)
        res.modules.update(sub.modules)
        res.specs.update(sub.specs)
        res.shared.extend(sub.shared)
        res.skipped.extend(sub.skipped)

    def take(name: str) -> None:
        nonlocal taken
        got, t = next(tensors)
        assert got == name, (got, name)  # the plan and the stream agree by construction
        raw[got] = t
        taken += 1

    for fmt, ns in groups:
        for n in ns:
            for sfx in (".weight", ".weight_scale_inv"):
                if prefix + n + sfx in sm.ckpt:
                    take(prefix + n + sfx)
        view = LayerView(sm.ckpt, raw)
        # block-FP8 from bf16: quantize the stored tensor as is (fp8.quantize_block divides in
        # float32 either way: same bytes, no float32 copy); everything else from float32
        ws = [view.weight(prefix + n + ".weight", torch.bfloat16 if _reads_stored_bf16(fmt) and
                          sm.ckpt.info(prefix + n + ".weight").dtype == "BF16" else torch.float32) for n in ns]
        for n in ns:
            raw.pop(prefix + n + ".weight", None)
            raw.pop(prefix + n + ".weight_scale_inv", None)
        sub = LayerResult()
        if pool is None:
            _quantize_group(sub, cfg, fmt, ns, ws, None)
            pending.append((sub, None))
        else:
            pending.append((sub, pool.submit(_quantize_group, sub, cfg, fmt, ns, ws, None)))
        del ws, view
        while len(pending) > depth:
            merge()
    while pending:
        merge()
    while taken < n_stored:
        name, t = next(tensors)
        raw[name] = t
        taken += 1
    return res, LayerView(sm.ckpt, raw)


def _reads_stored_bf16(fmt: str) -> bool:
    """Block FP8 from bf16: quantize the stored tensor as is (fp8.quantize_block divides in float32
    either way: same bytes, no float32 copy); everything else from float32."""
    f = FORMATS[fmt]
    return f.element == "fp8" and f.scale == "block"


class _FloatWeights(dict):
    """``weights[name]``: that linear's weight in float32, made when asked and not kept (a
    float32 layer's weight itself; a bf16 :class:`StoredLinear`'s, a transient copy)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        super().__init__()
        self._linears = linears

    def __missing__(self, name: str) -> torch.Tensor:
        return self._linears[name].weight.detach().float()

    def get(self, name, default=None):  # noqa: D102  (dict.get skips __missing__)
        return self[name] if name in self._linears else default


def _dequantizer(w: torch.Tensor, s: torch.Tensor):
    if w.dtype == torch.uint8:
        return lambda: int4.dequantize(int4.unpack_int4(w), s)
    return lambda: fp8.dequantize(w, s)


def _apply(layer, res: LayerResult) -> None:
    """Turn the layer into its fake-quant self: dequantized weights + activation hooks.

    A float32 linear gets the dequantized weight in place (no second copy of the layer); a
    :class:`StoredLinear` keeps the quantized tensors and dequantizes at each call, and its
    bf16 weight is released (memory goes down, not up, as the layer is quantized)."""
    mods = dict(layer.named_modules())
    for n in res.modules:
        w = res.tensors[f"{n}.weight"]
        s = res.tensors[f"{n}.weight_scale"]
        m = mods[n]
        if isinstance(m, StoredLinear):
            m.qweight = _dequantizer(w, s)
            m.weight = nn.Parameter(torch.empty(0, dtype=m.weight.dtype), requires_grad=False)
            continue
        deq = _dequantizer(w, s)()
        m.weight.data.copy_(deq)  # in place: no second copy of the layer's weights
        del deq
    attach_fake_quant(layer, res.specs)


def quantize_checkpoint(model: str | Path, out: str | Path, cfg: QuantConfig, *,
                        batches: list[torch.Tensor] | None = None, force: bool = False, resume: bool = False,
                        progress: Progress = QUIET, trust_remote_code: bool = False) -> dict:
    """Quantize ``model`` into ``out``; returns the summary (also in quant_report.json)."""
    from moepress import __version__
    from moepress.calib.data import calibration_batches

    t0 = time.monotonic()
    reader = CheckpointReader(model)
    if read_quant_layout(reader.path) is not None:
        raise MoepressError(f"{reader.path}: already quantized by moepress ({SIDECAR}); quantize the original")
    from moepress.calib import distributed as dist

    # bf16 weights stay bf16 in the layer (StoredLinear: same float32 results, half the memory)
    # and the reader runs a bounded distance ahead: peak memory ~ one stored layer + its output
    budget = read_ahead_budget(reader)
    sm = StreamedModel(reader, keep_stored=True, read_ahead_bytes=budget)
    a = sm.adapter
    sm.check_weights()
    # torchrun: calibration batches are split across ranks (contiguous shares), statistics are
    # gathered and folded in global order, rank 0 writes; identical to one process.
    env = dist.init()
    if not env.is_main:
        progress = QUIET
    if batches is None and cfg.needs_calibration:
        batches = dist.run_main_first(env, lambda: calibration_batches(
            reader.path, cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed, cfg.batch_size, trust_remote_code))
    n_tokens = sum(b.numel() for b in batches) if batches is not None else 0
    if batches is not None and env.enabled:
        batches = dist.shard(batches, env.rank, env.world_size)
    calibrated = batches is not None and cfg.needs_calibration
    modules, shared, borrowed, skipped, alphas, expert_tokens = {}, [], [], [], {}, {}
    # calibration-free: the shard of layer i is written while layer i+1 is quantized
    writer = (CheckpointWriter(out, force=force, resume=resume, background=not calibrated) if env.is_main
              else _NullWriter())
    with writer as w:
        done = w.written_names
        start = 0
        while start < a.num_layers and all(a.layer_prefix(start) + k in done or
                                           _quantized_name(a.layer_prefix(start) + k, done)
                                           for k in sm.expected_layer_shapes(start)):
            start += 1
        if env.enabled:
            import torch.distributed as tdist

            box = [start]
            tdist.broadcast_object_list(box, src=0)
            start = box[0]
        if start:
            progress.info(f"quantize: resuming at layer {start} ({start} finished layers kept from the killed run)")
        if a.embed_name not in done:
            w.add(a.embed_name, reader.get(a.embed_name))
            w.end_shard()
        hs = sm.embed(batches) if calibrated else None
        prev = _load_prev_report(w.partial) if start else {}
        modules.update(prev.get("modules", {}))
        shared += prev.get("shared", [])
        borrowed += prev.get("borrowed", [])
        skipped += prev.get("skipped", [])
        alphas.update(prev.get("awq_alpha", {}))
        expert_tokens.update(prev.get("expert_tokens", {}))
        with progress.task("quantize", a.num_layers) as task:
            if start:
                task.advance(start, note=f"layers 0-{start - 1} already written")
            stream = sm.layers(0) if calibrated else ((i, None) for i in range(start, a.num_layers))
            src = reader  # where the layer's unquantized tensors are read from
            plans: dict[int, tuple] = {}

            def plan(j: int) -> tuple:
                if j not in plans:
                    plans[j] = _free_plan(sm, j, cfg)
                return plans[j]

            # calibration-free: one read-ahead over every layer's stored tensors, in plan order, and
            # the groups quantized by torch's thread count of single-threaded workers
            stored = None if calibrated else read_ahead(
                reader, (n for j in range(start, a.num_layers) for n in plan(j)[1]), budget)
            threads = torch.get_num_threads()
            workers = ThreadPoolExecutor(threads, thread_name_prefix="moepress-quant",
                                         initializer=torch.set_num_threads, initargs=(1,)) \
                if not calibrated and threads > 1 else None
            if workers is not None:
                torch.set_num_threads(1)
            for i, layer in stream:
                prefix = a.layer_prefix(i)
                if i < start:
                    # finished before the kill: only its (quantized) outputs are needed, as inputs of layer i+1
                    if calibrated:
                        res, outs = quantize_layer(sm, i, layer, hs, cfg, env)
                        if cfg.sequential:
                            _apply(layer, res)
                            outs = sm.run_layer(layer, hs)
                        hs = outs
                    continue
                if calibrated:
                    res, outs = quantize_layer(sm, i, layer, hs, cfg, env)
                else:  # calibration-free: tensor by tensor, no layer module, no activations
                    groups, order = plan(i)
                    res, src = quantize_tensors(sm, i, cfg, groups, stored, len(order), workers,
                                                2 * threads if workers is not None else 0)
                    plans.pop(i)
                if calibrated and cfg.sequential:
                    _apply(layer, res)
                    outs = sm.run_layer(layer, hs)
                if calibrated:
                    hs = outs
                # write: quantized tensors replace their linear's weight; the rest as stored
                qnames = {f"{n}.weight" for n in res.modules}
                for name in sorted(reader.layer_names(i)):
                    rel = name[len(prefix):]
                    if rel in qnames or name.endswith(".weight_scale_inv"):
                        continue
                    t = src.get(name)
                    if t.dtype == fp8.FP8_DTYPE:  # block-FP8 input, module left unquantized: bf16
                        t = src.weight(name, torch.bfloat16)
                    w.add(name, t)
                src = reader
                for rel, t in sorted(res.tensors.items()):
                    w.add(prefix + rel, t.contiguous())
                w.end_shard()
                modules.update({prefix + n: m for n, m in res.modules.items()})
                shared += [[prefix + n for n in g] for g in res.shared]
                borrowed += res.borrowed
                skipped += [{**s, "module": prefix + s["module"]} for s in res.skipped]
                alphas.update({prefix + k: v for k, v in res.awq_alpha.items()})
                if res.expert_tokens:
                    expert_tokens[str(i)] = res.expert_tokens
                _save_prev_report(w.partial, {"modules": modules, "shared": shared, "borrowed": borrowed,
                                              "skipped": skipped, "awq_alpha": alphas,
                                              "expert_tokens": expert_tokens})
                note = f"layer {i}: {len(res.modules)} linears quantized" + (
                    f", {len(res.borrowed)} experts borrowed scales" if res.borrowed else "")
                layer = res = None  # nothing of layer i outlives its iteration (the writer has it)
                task.advance(note=note)
            if stored is not None:
                stored.close()
            if workers is not None:
                workers.shutdown()
                torch.set_num_threads(threads)
        for name in (a.norm_name, a.head_name):
            if name in reader and name not in done:
                w.add(name, reader.get(name))
        if w.partial is not None:
            (w.partial / "moepress-quant-progress.json").unlink(missing_ok=True)
        fmts = sorted({m["format"] for m in modules.values()})
        algo = FORMATS[fmts[0]].quant_algo if len(fmts) == 1 else "MIXED_PRECISION"
        group = cfg.group_size if any(FORMATS[f].element == "int4" for f in fmts) else None
        exclude = sorted({_module_pattern(n) for n in _unquantized_linears(reader, a, modules)})
        hf_quant = {"producer": {"name": "moepress", "version": __version__},
                    "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if cfg.kv_cache else None,
                                     **({"group_size": group} if group else {}), "exclude_modules": exclude}}
        if algo == "MIXED_PRECISION":
            hf_quant["quantization"]["quantized_layers"] = {
                n: {"quant_algo": FORMATS[m["format"]].quant_algo,
                    **({"group_size": m["group"]} if "group" in m else {})}
                for n, m in sorted(modules.items())}
        conf = dict(reader.config)
        conf.pop("quantization_config", None)
        conf["quantization_config"] = {"quant_method": "modelopt", **hf_quant["quantization"]}
        conf["torch_dtype"] = conf.get("torch_dtype") or "bfloat16"
        w.write_json("config.json", conf)
        w.write_json("hf_quant_config.json", hf_quant)
        sidecar = {"format": cfg.format, "rules": [list(r) for r in cfg.rules], "group_size": cfg.group_size,
                   "kv_cache": cfg.kv_cache, "modules": dict(sorted(modules.items())), "shared": shared,
                   "borrowed": borrowed, "skipped": skipped}
        w.write_json(SIDECAR, sidecar)
        report = {"model": str(reader.path), "family": a.family, "config": dataclasses.asdict(cfg),
                  "quant_algo": algo, "quantized_linears": len(modules), "experts_with_borrowed_scales": borrowed,
                  "left_unquantized": skipped, "awq_alpha": alphas,
                  "expert_calibration_tokens": expert_tokens,  # layer -> routed tokens per expert
                  "calibration_tokens": n_tokens if calibrated else 0}
        w.write_json(REPORT, report)
        w.copy_aux_files(reader.path)
        w.manifest.update({"stage": "quantize", "config": dataclasses.asdict(cfg),
                           "inputs": {"model": str(reader.path)},
                           "report": {"quant_algo": algo, "quantized_linears": len(modules),
                                      "experts_with_borrowed_scales": borrowed,
                                      "expert_calibration_tokens": expert_tokens,
                                      "left_unquantized": skipped}})
    dist.barrier(env)
    return {"output": str(out), "format": cfg.format, "quant_algo": algo, "layers": a.num_layers,
            "quantized_linears": len(modules), "borrowed": len(borrowed), "skipped": len(skipped),
            "seconds": round(time.monotonic() - t0, 3)}


def quantize(model_dir: str | Path, out_dir: str | Path, cfg: QuantConfig,
             calib_batches: list[torch.Tensor] | None = None, progress: Progress = QUIET, **kw) -> dict:
    """The stage's Python entry point (same as :func:`quantize_checkpoint`): ``calib_batches``
    (token id batches) default to ``calib.data.calibration_batches`` over ``cfg.calib``."""
    return quantize_checkpoint(model_dir, out_dir, cfg, batches=calib_batches, progress=progress, **kw)


def _quantized_name(name: str, done: set[str]) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")] + ".weight_scale" in done


class _NullWriter:
    """What ranks other than 0 write: nothing (rank 0 holds the checkpoint writer)."""

    partial = None
    manifest: dict = {}
    written_names: set = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def add(self, name, tensor):
        pass

    def end_shard(self):
        pass

    def write_json(self, rel, obj):
        pass

    def copy_aux_files(self, src):
        return []


def _load_prev_report(partial: Path | None) -> dict:
    if partial is None:
        return {}
    p = partial / "moepress-quant-progress.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_prev_report(partial: Path | None, d: dict) -> None:
    if partial is None:
        return
    p = partial / "moepress-quant-progress.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, default=float))
    tmp.replace(p)


def _unquantized_linears(reader: CheckpointReader, a, modules: dict) -> list[str]:
    out = []
    for n in reader.names():
        if n.endswith(".weight") and reader.info(n).shape and len(reader.info(n).shape) == 2:
            base = n[: -len(".weight")]
            if base not in modules and not base.endswith(("embed_tokens",)) and "norm" not in base.rsplit(".", 1)[-1]:
                out.append(base)
    return out


def _module_pattern(name: str) -> str:
    """model.layers.3.mlp.gate -> model.layers.*.mlp.gate (modelopt's exclude_modules wildcards)."""
    parts = name.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts)
