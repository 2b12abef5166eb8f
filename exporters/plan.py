"""Deployment planner: does MODEL in FORMAT fit TARGET, on how many GPUs, split how.

Bytes per GPU, from the model's structure (layer modules built on the meta device, so a
config-only directory is enough and a pruned checkpoint's smaller expert count is used as is):

- every ``nn.Linear`` of a decoder layer is stored in FORMAT (what ``moepress quantize`` writes:
  compress/quantize.py docstring): ``bf16`` 2 B/param; ``fp8`` 1 B + F32 weight and input scale;
  ``fp8-block`` 1 B + F32 [ceil(out/128), ceil(in/128)]; ``fp8-dynamic`` 1 B + F32 [out];
  ``int4-awq`` 0.5 B + F32 [out, in/128] + F32 pre_quant_scale [in]; ``int4-gptq`` without the
  pre_quant_scale; ``w4a8-awq`` int4-awq + two F32 scalars; ``nvfp4`` 0.5 B + FP8 scale per 16
  + F32 global scales (modelopt NVFP4: block 16, E4M3 block scales).
- embeddings, lm_head, norms, routers (and the correction bias) stay bf16.
- split: attention, dense MLPs and shared experts by TP; routed experts by EP (E/EP experts per
  rank, then by moe_tp = TP/EP: TensorRT-LLM's mapping has moe_tp_size * moe_ep_size = tp_size,
  tensorrt_llm/mapping.py); embeddings and lm_head vocab-parallel by TP; norms and routers
  replicated.
- KV cache for max_batch x max_seq_len tokens: MLA caches kv_lora_rank + qk_rope_head_dim values
  per token per layer (the compressed latent, shared by all heads, so every TP rank holds it);
  GQA caches 2 x kv_heads x head_dim, kv heads split by TP (at least one per rank).
- activations / workspace: max_num_tokens x hidden x (4 + 2 top_k) x 2 B (residual, norm, attention
  in/out, and the MoE dispatch holding top_k copies of each token in and out); and 10% of the
  GPU's memory is left to CUDA context, NCCL and cuBLAS workspaces (TensorRT-LLM's KV-cache
  manager takes 90% of the free memory by default: KvCacheConfig.free_gpu_memory_fraction).
- ``runtime="onnx"`` (a TensorRT engine built from the ONNX export, exporters/onnx_export.py): no
  KV cache (every call runs the whole sequence), one GPU, and the MoE computed densely over all
  experts, so activations are max_batch x max_seq_len tokens x (E x moe_intermediate x 3 + hidden
  x 6) float32 values (gate, up, their product per expert; residual stream and attention).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from moepress.errors import MoepressError
from moepress.exporters.targets import FORMATS, Target, check_format, get_target

GROUP = 128  # INT4 group size and FP8 block size (compress/quantize.py)
RESERVE_FRACTION = 0.10
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_BYTES = {"bf16": 2, "fp8": 1, "nvfp4": 0.5625}  # nvfp4: 4 bits + one E4M3 scale per 16


def linear_bytes(out_f: int, in_f: int, fmt: str) -> float:
    """Stored bytes of one [out, in] weight and its scales in ``fmt``."""
    n = out_f * in_f
    if fmt == "bf16":
        return 2 * n
    if fmt == "fp8":
        return n + 4 + 4
    if fmt == "fp8-block":
        return n + 4 * math.ceil(out_f / GROUP) * math.ceil(in_f / GROUP)
    if fmt == "fp8-dynamic":
        return n + 4 * out_f
    if fmt in ("int4-awq", "int4-gptq", "w4a8-awq") and in_f > GROUP and in_f % GROUP:
        return 2 * n  # left unquantized by `moepress quantize` (compress/quant/int4.py: effective_group)
    groups = math.ceil(in_f / GROUP)  # in_f < GROUP: one group per row (the group is clamped)
    if fmt == "int4-gptq":
        return n / 2 + 4 * out_f * groups
    if fmt == "int4-awq":
        return n / 2 + 4 * out_f * groups + 4 * in_f
    if fmt == "w4a8-awq":
        return n / 2 + 4 * out_f * groups + 4 * in_f + 4 + 4
    if fmt == "nvfp4":
        return n / 2 + n / 16 + 4 + 4
    raise MoepressError(f"--format {fmt}: unknown format; expected one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model; bytes in bf16 and per format come from ``linears``."""

    family: str
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    vocab_size: int
    num_heads: int
    kv_per_token_layer: int  # cached values per token per layer (MLA latent or 2 x kv_heads x head_dim)
    kv_heads: int  # 0 for MLA (latent not split by TP)
    # (kind, out, in, count): kind in attn, dense, shared, routed (routed: per expert, count = experts x layers)
    linears: tuple[tuple[str, int, int, int], ...]
    other_params: int  # norms, routers, biases (bf16, replicated)
    embed_params: int  # embeddings + lm_head (bf16, split by TP)

    @property
    def moe_intermediate(self) -> int:
        """Routed experts' intermediate size (the output size of their [I, hidden] projections)."""
        return max((o for k, o, i, _ in self.linears if k == "routed" and i == self.hidden_size), default=0)

    def bytes_by_kind(self, fmt: str) -> dict[str, float]:
        out = {"attn": 0.0, "dense": 0.0, "shared": 0.0, "routed": 0.0}
        for kind, o, i, c in self.linears:
            out[kind] += c * linear_bytes(o, i, fmt)
        out["embed"] = 2.0 * self.embed_params
        out["other"] = 2.0 * self.other_params
        return out


def _linears_of(module, kind_of) -> list[tuple[str, int, int]]:
    from torch import nn

    return [(kind_of(n), m.out_features, m.in_features) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def model_shape(model: str | Path | dict) -> ModelShape:
    """Structure of a checkpoint or config-only directory (or a config dict)."""
    import collections

    import torch
    from torch import nn

    from moepress.compress.arch import get_adapter

    if isinstance(model, str | Path) and Path(model).is_file() and str(model).endswith(".json"):
        import json

        model = json.loads(Path(model).read_text())
    if isinstance(model, dict):
        cfg, a = model, get_adapter(model)
    else:
        p = Path(model)
        if not (p / "config.json").is_file():
            raise MoepressError(f"{model}: not a checkpoint or config directory (no config.json)")
        from moepress.compress.checkpoint import CheckpointReader

        reader = CheckpointReader(p)
        cfg = reader.config
        a = get_adapter(cfg, reader.names(), where=str(p / "config.json"))
    linears: collections.Counter = collections.Counter()
    other = 0
    built = {}
    for i in range(a.num_layers):
        key = a.is_moe_layer(i)
        if key not in built:
            with torch.device("meta"):
                layer = a.build_layer(i)
            moe = layer.moe
            routed = {id(m) for m in moe.experts.modules()} if moe is not None else set()
            shared = {id(m) for m in moe.shared_experts.modules()} \
                if moe is not None and getattr(moe, "shared_experts", None) is not None else set()
            attn = {id(m) for m in layer.self_attn.modules()}
            lin, n_lin = collections.Counter(), 0
            for m in layer.modules():
                if not isinstance(m, nn.Linear):
                    continue
                kind = ("routed" if id(m) in routed else "shared" if id(m) in shared
                        else "attn" if id(m) in attn else "dense")
                lin[(kind, m.out_features, m.in_features)] += 1
                n_lin += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            total = sum(t.numel() for t in layer.parameters())
            built[key] = (lin, total - n_lin)
        lin, rest = built[key]
        linears.update(lin)
        other += rest
    H, V = a.hidden_size, a.vocab_size
    embed = V * H * (1 if a.tie_word_embeddings else 2)
    other += H  # final norm
    heads = int(cfg.get("num_attention_heads") or 1)
    if cfg.get("kv_lora_rank"):
        kv, kv_heads = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0), 0
    else:
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or H // heads)
        kv = 2 * kv_heads * hd
    return ModelShape(a.family, a.num_layers, H, a.num_experts, a.top_k, V, heads, kv, kv_heads,
                      tuple((k, o, i, c) for (k, o, i), c in sorted(linears.items())), other, embed)


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
    runtime: str = "trtllm"  # trtllm | onnx (a TensorRT engine from the ONNX export)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def per_gpu_bytes(shape: ModelShape, fmt: str, tp: int, ep: int, max_batch: int, max_seq_len: int,
                  max_num_tokens: int, kv_dtype: str, memory: int, runtime: str = "trtllm") -> dict:
    b = shape.bytes_by_kind(fmt)
    moe_tp = tp // ep
    routed_per_expert = b["routed"] / shape.num_experts if shape.num_experts else 0.0
    weights = ((b["attn"] + b["dense"] + b["shared"] + b["embed"]) / tp
               + routed_per_expert * (shape.num_experts // ep) / moe_tp + b["other"])
    tokens = max_batch * max_seq_len
    if shape.kv_heads:  # GQA: heads split by TP, at least one per rank
        per_tok = shape.kv_per_token_layer * math.ceil(shape.kv_heads / tp) / shape.kv_heads
    else:  # MLA latent: every rank holds it
        per_tok = shape.kv_per_token_layer
    kv = tokens * shape.num_layers * per_tok * KV_BYTES[kv_dtype]
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
    """Largest EP size that divides both the GPU count and the expert count."""
    if not num_experts:
        return 1
    return max(d for d in range(1, gpus + 1) if gpus % d == 0 and num_experts % d == 0)


def gpu_counts(target: Target) -> list[int]:
    """Powers of two up to a node, then whole nodes (powers of two of them; GB200 NVL72: 72, 144, ...)."""
    per = target.gpus_per_node
    inside = [n for n in GPU_COUNTS if n <= per]
    nodes = [per * k for k in (1, 2, 4, 8, 16, 32) if per * k <= GPU_COUNTS[-1]]
    return sorted(set(inside + nodes))


def plan(model_dir_or_config, target: str | Target, fmt: str | None = None, gpus: int | None = None,
         tp: int | None = None, ep: int | None = None, max_seq_len: int = 4096, max_batch: int = 8,
         max_num_tokens: int | None = None, kv_cache_dtype: str = "bf16", runtime: str = "trtllm") -> Plan:
    """Plan ``fmt`` of the model on ``target``; the smallest GPU count that fits when ``gpus`` is None.

    Raises a one-line :class:`MoepressError` with a suggestion when the target cannot run the
    format, the EP size does not divide the experts, or the model does not fit. ``runtime``:
    ``trtllm`` (TensorRT-LLM, engine or PyTorch backend) or ``onnx`` (a TensorRT engine from the
    ONNX export: one GPU, no KV cache, dense experts; see the module docstring).
    """
    if runtime not in ("trtllm", "onnx"):
        raise MoepressError(f"runtime {runtime!r}: expected trtllm or onnx")
    t = target if isinstance(target, Target) else get_target(target)
    name = str(model_dir_or_config) if isinstance(model_dir_or_config, str | Path) else "<config>"
    shape = model_dir_or_config if isinstance(model_dir_or_config, ModelShape) else model_shape(model_dir_or_config)
    fmt = fmt or ("bf16" if isinstance(model_dir_or_config, ModelShape) else default_format(model_dir_or_config))
    check_format(t, fmt)
    if kv_cache_dtype not in t.kv_cache_dtypes:
        raise MoepressError(f"--kv-cache-dtype {kv_cache_dtype}: {t.gpu} (sm{t.sm}) caches "
                            f"{', '.join(t.kv_cache_dtypes)}; use bf16")
    for opt, v in (("--max-seq-len", max_seq_len), ("--max-batch", max_batch), ("--gpus", gpus), ("--tp", tp),
                   ("--ep", ep)):
        if v is not None and v < 1:
            raise MoepressError(f"{opt}: expected a positive number, got {v}")
    max_num_tokens = max_num_tokens or min(max_batch * max_seq_len, 8192)
    E = shape.num_experts
    if ep is not None and E and E % ep:
        divs = [d for d in (1, 2, 4, 8, 16, 32, 64) if E % d == 0]
        raise MoepressError(f"--ep {ep}: the model has {E} routed experts, not divisible by {ep}; "
                            f"use --ep {max(d for d in divs if d <= ep) if any(d <= ep for d in divs) else 1} "
                            f"(divisors: {', '.join(map(str, divs))})")
    if tp is not None and gpus is None:
        gpus = tp
    if tp is not None and tp != gpus:
        raise MoepressError(f"--tp {tp}: expected --tp equal to --gpus ({gpus}); moepress plans "
                            f"tensor parallelism over all GPUs (attention) and EP x moe_tp = TP (experts)")
    if ep is not None and gpus is not None and gpus % ep:
        raise MoepressError(f"--ep {ep}: expected a divisor of the GPU count {gpus} "
                            f"(TensorRT-LLM: moe_tp_size x moe_ep_size = tp_size)")

    def make(n: int) -> Plan:
        e = ep if ep is not None else _default_ep(E, n)
        d = per_gpu_bytes(shape, fmt, n, e, max_batch, max_seq_len, max_num_tokens, kv_cache_dtype, t.memory_bytes,
                          runtime)
        total = shape.bytes_by_kind(fmt)
        notes = []
        if runtime == "onnx":
            notes.append("TensorRT engine from ONNX: no KV cache (each call runs the whole sequence), experts "
                         f"computed densely: activations for {max_batch} x {max_seq_len} tokens")
        if n > t.gpus_per_node:
            notes.append(f"{n // t.gpus_per_node} nodes of {t.gpus_per_node}: TP across nodes runs over "
                         f"the inter-node network, not {t.interconnect}")
        return Plan(str(name), t.name, fmt, n, n, e, n // e, max(1, math.ceil(n / t.gpus_per_node)), max_seq_len,
                    max_batch, max_num_tokens, kv_cache_dtype, d["total"] <= t.memory_bytes, d, t.memory_bytes,
                    int(sum(total.values())), E // e if E else 0, notes, t.to_dict(), runtime)

    if runtime == "onnx":
        if gpus not in (None, 1):
            raise MoepressError(f"--gpus {gpus}: a TensorRT engine from the ONNX export runs on one GPU; use "
                                f"--gpus 1, or the trtllm-ckpt / hf-modelopt exports for tensor/expert parallelism")
        p = make(1)
        if not p.fits:
            b = p.bytes_per_gpu
            raise MoepressError(
                f"--target {t.name}: the ONNX engine needs {_gb(b['total'])} on one {t.gpu} (weights "
                f"{_gb(b['weights'])}, dense-expert activations {_gb(b['activations'])} for {max_batch} x "
                f"{max_seq_len} tokens) of {_gb(t.memory_bytes)}: lower --max-batch / --max-seq-len, use a bigger "
                f"GPU or the trtllm-ckpt / hf-modelopt exports")
        return p
    if gpus is not None:
        p = make(gpus)
        if not p.fits:
            best = _smallest(make, t, ep)
            hint = f"use --gpus {best.gpus}" if best else f"use a smaller format than {fmt} or a bigger GPU"
            raise MoepressError(
                f"--gpus {gpus}: {fmt} needs {_gb(p.bytes_per_gpu['total'])} per {t.gpu} "
                f"(weights {_gb(p.bytes_per_gpu['weights'])}, KV cache {_gb(p.bytes_per_gpu['kv_cache'])}) "
                f"of {_gb(t.memory_bytes)}: {hint}")
        return p
    p = _smallest(make, t, ep)
    if p is None:
        big = make(gpu_counts(t)[-1])
        raise MoepressError(f"{name}: {fmt} does not fit on up to {big.gpus} x {t.gpu} "
                            f"({_gb(big.bytes_per_gpu['total'])} per GPU); use a smaller format, prune "
                            f"experts, or lower --max-batch/--max-seq-len")
    return p


def _smallest(make, t: Target, ep: int | None) -> Plan | None:
    for n in gpu_counts(t):
        if ep is not None and n % ep:
            continue
        p = make(n)
        if p.fits:
            return p
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def default_format(model) -> str:
    """The checkpoint's own format: moepress_quant.json's, block-FP8 configs, else bf16."""
    if isinstance(model, dict):
        cfg = model
    elif Path(model).is_file():
        import json

        cfg = json.loads(Path(model).read_text())
    else:
        p = Path(model)
        from moepress.compress.formats import read_layout as read_quant_layout

        layout = read_quant_layout(p)
        if layout and layout.get("format") in FORMATS:
            return layout["format"]
        import json

        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    from moepress.compress.inspect import storage_format

    s = storage_format(cfg)
    return s if s in FORMATS else "bf16"


def applicable(model, targets=None, max_seq_len: int = 4096, max_batch: int = 8) -> dict:
    """Per target and format: the smallest GPU count that holds the model (None: the target cannot
    run the format; 0: it can, but the model does not fit on up to a few hundred GPUs)."""
    from moepress.exporters.targets import PRODUCED, TARGETS

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
        + (f"KV cache {_gb(b['kv_cache'])} ({p.max_batch} x {p.max_seq_len} tokens)" if p.runtime == "trtllm"
           else "no KV cache") + f" + activations {_gb(b['activations'])} "
        f"+ reserve {_gb(b['reserve'])} = {_gb(b['total'])} of {_gb(p.memory_per_gpu)}",
        f"weights    {_gb(p.weights_total)} in total",
        f"fits       {'yes' if p.fits else 'no'}",
    ]
    lines += [f"note       {n}" for n in p.notes]
    return "\n".join(lines)

