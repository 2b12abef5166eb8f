"""Deployment planner: does MODEL in FORMAT fit TARGET, on how many GPUs, split how.

Bytes per GPU, from the model's structure (exporters/shape.py: layer modules built on the meta device, so a
config-only directory is enough and a pruned checkpoint's smaller expert count is used as is):

- every ``nn.Linear`` of a decoder layer is stored in FORMAT, as ``moepress quantize`` writes it: the bytes of one
  [out, in] weight and its scales are the format's ``stored_bytes`` (one module per format in compress/formats/, which
  says what each stores; e.g. NVFP4: 0.5 B + an E4M3 scale per 16 values + F32 global scales, modelopt's layout).
- embeddings, lm_head, norms, routers (and the correction bias) stay bf16.
- split: attention, dense MLPs and shared experts by TP, k_proj / v_proj by whole KV heads (replicated when TP
  exceeds them: ModelShape.kv_bytes_per_rank); routed experts by EP (E/EP experts per rank, then by moe_tp = TP/EP:
  TensorRT-LLM's mapping has moe_tp_size * moe_ep_size = tp_size, tensorrt_llm/mapping.py); embeddings and lm_head
  vocab-parallel by TP; norms, routers and MLA's down-projections (q_a_proj, kv_a_proj_with_mqa) replicated. A
  split whose rank share cuts a block or group of the format (Format.split_unit) is refused for routed experts and
  noted for dense / shared MLPs.
- KV cache for max_batch x max_seq_len tokens: MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer
  (the compressed latent, shared by all heads, so every TP rank holds it); GQA caches 2 x kv_heads x head_dim, kv
  heads split by TP (at least one per rank).
- activations / workspace: max_num_tokens x hidden x (4 + 2 top_k) x 2 B (residual, norm, attention in/out, and
  the MoE dispatch holding top_k copies of each token in and out); and 10% of the GPU's memory is left to CUDA
  context, NCCL and cuBLAS workspaces (TensorRT-LLM's KV-cache manager takes 90% of the free memory by default:
  KvCacheConfig.free_gpu_memory_fraction).
- ``runtime="onnx"`` (a TensorRT engine built from the ONNX export, exporters/onnx_export.py): no KV cache (every
  call runs the whole sequence), one GPU, and the MoE computed densely over all experts, so activations are
  max_batch x max_seq_len tokens x (E x moe_intermediate x 3 + hidden x 6) float32 values (gate, up, their product
  per expert; residual stream and attention).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import moepress.exporters.kv_cache as kv_cache
from moepress.compress import formats
from moepress.compress.formats.base import GROUP
from moepress.errors import MoepressError
from moepress.exporters.kv_cache import KV_CACHE
from moepress.exporters.own_format import default_format
from moepress.exporters.runtime_formats import (
    check_runtime_format,
    mla_rules,
    refuse_stored_formats,
    trtllm_experts_problem,
    vllm_only_int4,
    width_notes,
)
from moepress.exporters.shape import ModelShape, model_shape
from moepress.exporters.targets import PRODUCED, TARGETS, UNQUANTIZED, Target, get_target, pick_format

RESERVE_FRACTION = 0.10
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RUNTIMES = ("trtllm", "trtllm-engine", "onnx")


@dataclass
class Plan:
    model: str
    target: str
    format: str
    gpus: int
    tp: int
    ep: int
    moe_tp: int
    nodes: int
    max_seq_len: int
    max_batch: int
    max_num_tokens: int
    kv_cache_dtype: str
    fits: bool
    bytes_per_gpu: dict = field(default_factory=dict)  # weights, kv_cache, activations, reserve, total
    memory_per_gpu: int = 0
    weights_total: int = 0
    experts_per_rank: int = 0
    notes: list = field(default_factory=list)
    target_info: dict = field(default_factory=dict)
    runtime: str = "trtllm"  # trtllm | trtllm-engine (from a trtllm-ckpt) | onnx (a TensorRT engine from ONNX)
    unloadable: str | None = None  # why the runtime cannot load the planned experts (the sizes still hold)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def per_gpu_bytes(shape: ModelShape, fmt: str, tp: int, ep: int, max_batch: int, max_seq_len: int,
                  max_num_tokens: int, kv_dtype: str, memory: int, runtime: str = "trtllm") -> dict:
    b = shape.bytes_by_kind(fmt)
    moe_tp = tp // ep
    routed_per_expert = b["routed"] / shape.num_experts if shape.num_experts else 0.0
    weights = ((b["attn"] + b["dense"] + b["shared"] + b["embed"]) / tp + shape.kv_bytes_per_rank(fmt, tp)
               + routed_per_expert * (shape.num_experts // ep) / moe_tp + b["other"] + b["replicated"])
    if runtime == "trtllm-engine":  # trtllm_ckpt writes the vocab embedding whole on every rank
        weights += 2.0 * shape.vocab_size * shape.hidden_size * (1 - 1 / tp)  # (use_parallel_embedding false)
    tokens = max_batch * max_seq_len
    if shape.kv_heads:  # GQA: heads by TP, at least one per rank (vLLM 0.33.0 config/model.py get_num_kv_heads
        # max(1, kv // tp); TensorRT-LLM d2a5560a _torch/pyexecutor/resource_manager.py (kv + tp - 1) // tp)
        per_tok = shape.kv_per_token_layer * math.ceil(shape.kv_heads / tp) / shape.kv_heads
    else:  # MLA latent: every rank holds it
        per_tok = shape.kv_per_token_layer
    kv = tokens * shape.num_layers * per_tok * KV_CACHE[kv_dtype].bytes
    act = max_num_tokens * shape.hidden_size * (4 + 2 * shape.top_k) * 2
    if runtime == "onnx":  # full-sequence engine: no cache, dense experts in float32
        kv = 0
        act = tokens * (shape.num_experts * shape.moe_intermediate * 3 + shape.hidden_size * 6) * 4
    reserve = RESERVE_FRACTION * memory
    d = {"weights": weights, "kv_cache": kv, "activations": act, "reserve": reserve}
    d = {k: int(math.ceil(v)) for k, v in d.items()}
    d["total"] = sum(d.values())
    return d


def _default_ep(num_experts: int, gpus: int) -> int:
    """Largest EP size that divides both the GPU count and the expert count (1 without experts)."""
    return max(d for d in range(1, num_experts + 1) if gpus % d == 0 and num_experts % d == 0) if num_experts else 1


def gpu_counts(target: Target) -> list[int]:
    """Powers of two up to a node, then whole nodes (powers of two of them; GB200 NVL72: 72, 144, ...)."""
    per = target.gpus_per_node
    inside = [n for n in GPU_COUNTS if n <= per]
    nodes = [per * k for k in (1, 2, 4, 8, 16, 32) if per * k <= GPU_COUNTS[-1]]
    return sorted(set(inside + nodes))


@dataclass
class _Planner:
    """The plan of one model, format and target for a given GPU count, and the searches over counts."""

    name: str
    shape: ModelShape
    t: Target
    fmt: str
    ep: int | None
    max_seq_len: int
    max_batch: int
    max_num_tokens: int
    kv_cache_dtype: str
    runtime: str
    flag: str = "--gpus"  # the option that gave the GPU count (--tp stands for it)

    def make(self, n: int) -> Plan:
        shape, t, E = self.shape, self.t, self.shape.num_experts
        e = self.ep if self.ep is not None else _default_ep(E, n)
        d = per_gpu_bytes(shape, self.fmt, n, e, self.max_batch, self.max_seq_len, self.max_num_tokens,
                          self.kv_cache_dtype, t.memory_bytes, self.runtime)
        total = shape.bytes_by_kind(self.fmt)
        notes = []
        if self.runtime == "onnx":
            notes.append("TensorRT engine from ONNX: no KV cache (each call runs the whole sequence), experts "
                         f"computed densely: activations for {self.max_batch} x {self.max_seq_len} tokens")
        if n > t.gpus_per_node:
            notes.append(f"{n // t.gpus_per_node} nodes of {t.gpus_per_node}: TP across nodes runs over "
                         f"the inter-node network, not {t.interconnect}")
        cut = self._cut(n, n // e, ("dense", "shared"))
        if cut:
            notes.append(f"{cut}: TensorRT-LLM runs that MLP at a smaller TP; vLLM and SGLang refuse this split")
        return Plan(str(self.name), t.name, self.fmt, n, n, e, n // e, max(1, math.ceil(n / t.gpus_per_node)),
                    self.max_seq_len, self.max_batch, self.max_num_tokens, self.kv_cache_dtype,
                    d["total"] <= t.memory_bytes, d, t.memory_bytes, int(sum(total.values())), E // e if E else 0,
                    notes, t.to_dict(), self.runtime)

    def smallest(self) -> Plan | None:
        """The plan on the fewest GPUs that holds the model (None: none up to the largest count; ``skipped``:
        why the first count that would hold it cannot split it)."""
        self.skipped = None
        for n in gpu_counts(self.t):
            if self.ep is not None and n % self.ep:
                continue
            why = self.unsplittable(n)
            p = self.make(n)
            if why is None and p.fits:
                return p
            if why is not None and p.fits and self.skipped is None:
                self.skipped = f"{n} x {self.t.gpu} would hold it, but {why}"
        return None

    def onnx(self, gpus: int | None) -> Plan:
        t = self.t
        for opt, v in ((self.flag, gpus), ("--ep", self.ep)):
            if v not in (None, 1):
                raise MoepressError(f"{opt} {v}: a TensorRT engine from the ONNX export runs on one GPU; use "
                                    f"{opt} 1, or the trtllm-ckpt / hf-modelopt exports for tensor/expert parallelism")
        p = self.make(1)
        if not p.fits:
            b = p.bytes_per_gpu
            raise MoepressError(
                f"--target {t.name}: the ONNX engine needs {_gb(b['total'])} on one {t.gpu} (weights "
                f"{_gb(b['weights'])}, dense-expert activations {_gb(b['activations'])} for {self.max_batch} x "
                f"{self.max_seq_len} tokens) of {_gb(t.memory_bytes)}: lower --max-batch / --max-seq-len, use a "
                f"bigger GPU or the trtllm-ckpt / hf-modelopt exports")
        return p

    def unsplittable(self, n: int) -> str | None:
        """Why TP = ``n`` cannot split this model (None: it can). TensorRT-LLM gives each rank num_attention_heads / tp
        heads (layers/attention.py), KV heads as kv_cache.kv_split_problem says, and each moe_tp rank
        intermediate / moe_tp of every expert (layers/moe.py); exporters/trtllm_ckpt.check_mapping refuses the same."""
        heads, inter = self.shape.num_heads, self.shape.moe_intermediate
        moe_tp = n // (self.ep if self.ep is not None else _default_ep(self.shape.num_experts, n))
        kv = kv_cache.kv_split_problem(self.shape.kv_heads, n)
        if heads % n or kv:
            return f"tp {n} does not divide the {heads} attention heads" if heads % n else kv
        if inter and inter % moe_tp:
            return f"moe_tp {moe_tp} (tp / ep) does not divide the experts' intermediate size {inter}"
        # only the routed experts' cut refuses: no runtime shrinks moe_tp (vLLM #17569: a block-FP8 gate/up of
        # 192 rows per rank). A dense or shared MLP cut this way is a note (:meth:`make`): TensorRT-LLM runs it at
        # a smaller TP (modeling_deepseekv3.py _compute_mlp_tp_size: gcd(intermediate / block, tp)), vLLM and
        # SGLang refuse it (sgl-project/sglang#3345: DeepSeek's 18432-wide MLP at TP 32).
        return self._cut(n, moe_tp, ("routed",))

    def _cut(self, tp: int, moe_tp: int, kinds: tuple[str, ...]) -> str | None:
        """Why a rank's share of a ``kinds`` MLP weight would not hold whole blocks or groups of its format
        (Format.split_unit; a quantized checkpoint's linears as stored): gate / up split by rows, down by inputs."""
        for kind, o, i, fmt, _ in self.shape.rows(self.fmt):
            f = formats.FORMATS.get(fmt)
            split = moe_tp if kind == "routed" else tp
            if kind not in kinds or split == 1 or f is None or f.split_unit == (1, 1):
                continue
            r, c = f.split_unit or (1, self.shape.int4_group or GROUP)
            dim, unit, what = (i, c, "input channels") if o == self.shape.hidden_size else (o, r, "rows")
            if dim % split or (dim // split) % unit:
                return (f"{'moe_tp' if kind == 'routed' else 'tp'} {split} gives each rank {dim / split:g} {what} of "
                        f"the {kind} MLP's [{o}, {i}] weights, not a multiple of {fmt}'s {unit}")
        return None

    def fixed(self, gpus: int) -> Plan:
        why = self.unsplittable(gpus)
        if why is not None:
            fits = [n for n in gpu_counts(self.t) if n % (self.ep or 1) == 0 and self.unsplittable(n) is None
                    and self.make(n).fits]  # counts the --ep given splits
            raise MoepressError(f"{self.flag} {gpus}: {why}; expected a GPU count that splits both"
                                + (f" (e.g. {', '.join(map(str, fits[:4]))})" if fits else ""))
        t, p = self.t, self.make(gpus)
        if not p.fits:
            best = self.smallest()
            hint = f"use --gpus {best.gpus}" if best else f"use a smaller format than {self.fmt} or a bigger GPU"
            raise MoepressError(
                f"{self.flag} {gpus}: {self.fmt} needs {_gb(p.bytes_per_gpu['total'])} per {t.gpu} "
                f"(weights {_gb(p.bytes_per_gpu['weights'])}, KV cache {_gb(p.bytes_per_gpu['kv_cache'])}) "
                f"of {_gb(t.memory_bytes)}: {hint}")
        return p

    def fewest(self) -> Plan:
        p = self.smallest()
        if p is None and self.skipped:
            raise MoepressError(f"{self.name}: {self.fmt}: {self.skipped}; use another format, --ep, or lower "
                                "--max-batch/--max-seq-len")
        if p is None:
            big = self.make(gpu_counts(self.t)[-1])
            raise MoepressError(f"{self.name}: {self.fmt} does not fit on up to {big.gpus} x {self.t.gpu} "
                                f"({_gb(big.bytes_per_gpu['total'])} per GPU); use a smaller format, prune "
                                f"experts, or lower --max-batch/--max-seq-len")
        return p


DEFAULT_SEQ_LEN = 4096


def _seq_len(name: str, shape: ModelShape, asked: int | None) -> int:
    """--max-seq-len: at most the model's max_position_embeddings (positions past it were never trained,
    and rope scaling is already folded into that number); default 4096, or the model's maximum if smaller."""
    m = shape.max_positions
    if asked is None:
        return min(DEFAULT_SEQ_LEN, m) if m else DEFAULT_SEQ_LEN
    if m and asked > m:
        raise MoepressError(f"--max-seq-len {asked}: {name} has max_position_embeddings {m}; expected at most {m}")
    if asked == 1:  # (below 1: check_sizes) prompt and output share it: one token leaves none to generate
        raise MoepressError("--max-seq-len 1: expected at least 2 (it counts the prompt and the generated tokens)")
    return asked


class KVCacheRefused(MoepressError):
    """A KV-cache dtype the target does not run for this model, as --kv-cache-dtype asked it; ``why`` for the
    callers that name where the dtype came from instead (an export that declares it, a recipe's quantize.kv_cache)."""

    def __init__(self, kv: str, why: str, instead: str):
        super().__init__(f"--kv-cache-dtype {kv}: {why}; use {instead}")
        self.kv, self.why = kv, why


def _check_request(t: Target, name: str, shape: ModelShape, kv_cache_dtype: str, sizes: dict[str, int | None]) -> None:
    if kv_cache_dtype not in t.kv_cache_dtypes:
        raise KVCacheRefused(kv_cache_dtype, f"{t.gpu} (sm{t.sm}) caches {', '.join(t.kv_cache_dtypes)}",
                             kv_cache.DEFAULT)
    mla = kv_cache.for_sm(t.sm, mla=True)
    if not shape.kv_heads and kv_cache_dtype not in mla:  # MLA: one latent cached per token (shape.py)
        on = ", ".join(f"sm{a}" for a in kv_cache.KV_CACHE[kv_cache_dtype].mla_archs or ())
        raise KVCacheRefused(kv_cache_dtype, f"{name} caches an MLA latent, which TensorRT-LLM's {kv_cache_dtype} "
                             f"MLA kernels run on {on} only, not on {t.gpu} (sm{t.sm})", ", ".join(mla))
    check_sizes(sizes)


def check_sizes(sizes: dict[str, int | None]) -> None:
    """Each given size (an option's name -> value) at least 1."""
    for opt, v in sizes.items():
        if v is not None and v < 1:
            raise MoepressError(f"{opt}: expected a positive number, got {v}")


def _parallelism(E: int, gpus: int | None, tp: int | None, ep: int | None) -> int | None:
    """The GPU count asked for (--tp stands for it), after checking --tp / --ep against it and the experts."""
    if ep is not None and E and E % ep:
        divs = [d for d in (1, 2, 4, 8, 16, 32, 64) if E % d == 0]
        raise MoepressError(f"--ep {ep}: the model has {E} routed experts, not divisible by {ep}; "
                            f"use --ep {max(d for d in divs if d <= ep) if any(d <= ep for d in divs) else 1} "
                            f"(divisors: {', '.join(map(str, divs))})")
    gpus = tp if tp is not None and gpus is None else gpus
    if tp is not None and tp != gpus:
        raise MoepressError(f"--tp {tp}: expected --tp equal to --gpus ({gpus}); moepress plans "
                            f"tensor parallelism over all GPUs (attention) and EP x moe_tp = TP (experts)")
    if ep is not None and gpus is not None and gpus % ep:
        raise MoepressError(f"--ep {ep}: expected a divisor of the GPU count {gpus} "
                            f"(TensorRT-LLM: moe_tp_size x moe_ep_size = tp_size)")
    return gpus


def plan(model_dir_or_config, target: str | Target, fmt: str | None = None, gpus: int | None = None,
         tp: int | None = None, ep: int | None = None, max_seq_len: int | None = None, max_batch: int = 8,
         max_num_tokens: int | None = None, kv_cache_dtype: str = kv_cache.DEFAULT, runtime: str = "trtllm",
         bits: int | None = None, export: str | None = None) -> Plan:
    """Plan ``fmt`` of the model on ``target``; the smallest GPU count that fits when ``gpus`` is None.

    Raises a one-line :class:`MoepressError` with a suggestion when the target cannot run the
    format, the EP size does not divide the experts, or the model does not fit. ``runtime``:
    ``trtllm`` (TensorRT-LLM, engine or PyTorch backend) or ``onnx`` (a TensorRT engine from the
    ONNX export: one GPU, no KV cache, dense experts; see the module docstring). ``bits`` (with no
    ``fmt``): the planner picks the target's format of that weight width (targets.pick_format: NVFP4
    for 4 bits on Blackwell) and says why in the plan's notes. ``export``: the kind of export `moepress build`
    plans (exporters/artifacts.py), whose format the export fixes: refusals name a re-export, not --format.
    """
    if runtime not in RUNTIMES:
        raise MoepressError(f"runtime {runtime!r}: expected {', '.join(RUNTIMES)}")
    t = target if isinstance(target, Target) else get_target(target)
    name = str(model_dir_or_config) if isinstance(model_dir_or_config, str | Path) else "<config>"
    given = isinstance(model_dir_or_config, ModelShape)
    shape = model_dir_or_config if given else model_shape(model_dir_or_config)
    why = None
    if fmt is None and bits is not None:
        fmt, why = pick_format(t, bits)
    own = fmt is None and not given  # the checkpoint's own format: a plan of what exists, not a choice
    fmt = fmt or (UNQUANTIZED if given else default_format(model_dir_or_config))
    vllm_only = vllm_only_int4(t, fmt) if own and runtime == "trtllm" and export is None else None
    if vllm_only is None:
        try:
            check_runtime_format(t, fmt, shape, runtime, export)
        except MoepressError as e:  # the checkpoint's own format was never given as --format
            msg = str(e)
            raise MoepressError(f"{name}: quantized as {fmt}{msg.removeprefix(f'--format {fmt}')}" if own and
                                msg.startswith(f"--format {fmt}:") else msg) from None
    refuse_stored_formats(t, shape, fmt, name)
    max_seq_len = _seq_len(name, shape, max_seq_len)
    _check_request(t, name, shape, kv_cache_dtype, {"--max-seq-len": max_seq_len, "--max-batch": max_batch,
                                                    "--gpus": gpus, "--tp": tp, "--ep": ep})
    max_num_tokens = max_num_tokens or min(max_batch * max_seq_len, 8192)
    flag = "--tp" if gpus is None and tp is not None else "--gpus"
    gpus = _parallelism(shape.num_experts, gpus, tp, ep)
    planner = _Planner(name, shape, t, fmt, ep, max_seq_len, max_batch, max_num_tokens, kv_cache_dtype, runtime, flag)
    p = planner.onnx(gpus) if runtime == "onnx" else planner.fixed(gpus) if gpus is not None else planner.fewest()
    if why:
        p.notes.insert(0, f"format chosen for {bits}-bit weights: {why}")
    p.notes += width_notes(shape, fmt)
    # a quantize to come (not a checkpoint or export of that format already, whose export.json says whether
    # TensorRT-LLM misreads it, and `moepress build` refuses it then)
    planned = not own and fmt != UNQUANTIZED and export is None and shape.stored_format != fmt
    rules = mla_rules(shape, fmt) if runtime == "trtllm" and planned else ""
    if rules and formats.FORMATS[fmt].scale != "block":  # block FP8 goes hf-fp8-block, which TensorRT-LLM reads
        p.notes.append(f"an hf-modelopt export of {fmt} quantizes MLA projections TensorRT-LLM's DeepSeek loader "
                       f"misreads (`moepress build` refuses it); for TensorRT-LLM quantize with{rules}")
    if runtime == "trtllm":
        p.unloadable = vllm_only or trtllm_experts_problem(shape, t, fmt)
        if p.unloadable:
            p.notes.append(f"TensorRT-LLM cannot load it: {p.unloadable} (the sizes hold for vLLM with a "
                           "compressed-tensors export)")
    return p


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def applicable(model, targets=None, max_seq_len: int | None = None, max_batch: int = 8) -> dict:
    """Per target and format: the smallest GPU count that holds the model (None: the target cannot
    run the format; 0: it can, but the model does not fit on up to a few hundred GPUs)."""
    shape = model_shape(model)
    out = {}
    for t in targets or TARGETS.values():
        row = {}
        for fmt in PRODUCED:
            if not t.supports(fmt):
                row[fmt] = None
                continue
            try:
                row[fmt] = plan(shape, t, fmt, max_seq_len=max_seq_len, max_batch=max_batch).gpus
            except MoepressError:
                row[fmt] = 0
        out[t.name] = row
    return out


def render(p: Plan) -> str:
    b = p.bytes_per_gpu
    lines = [
        f"model      {p.model}",
        f"target     {p.target_info['gpu']} (sm{p.target_info['sm']}, {p.target_info['memory_gb']:g} GB, "
        f"{p.target_info['interconnect']})",
        f"format     {p.format}, KV cache {p.kv_cache_dtype}",
        f"gpus       {p.gpus} ({p.nodes} node{'s' if p.nodes > 1 else ''}): tp {p.tp}, ep {p.ep}, moe_tp {p.moe_tp}"
        + (f", {p.experts_per_rank} experts per EP rank" if p.experts_per_rank else ""),
        f"per GPU    weights {_gb(b['weights'])} + "
        + (f"KV cache {_gb(b['kv_cache'])} ({p.max_batch} x {p.max_seq_len} tokens)" if p.runtime != "onnx"
           else "no KV cache") + f" + activations {_gb(b['activations'])} "
        f"+ reserve {_gb(b['reserve'])} = {_gb(b['total'])} of {_gb(p.memory_per_gpu)}",
        f"weights    {_gb(p.weights_total)} in total",
        f"fits       {'yes' if p.fits else 'no'}",
    ]
    lines += [f"note       {n}" for n in p.notes]
    return "\n".join(lines)

