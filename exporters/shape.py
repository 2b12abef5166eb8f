"""The structure of a model that a deployment plan needs: its linears by kind and size, the
parameters outside them, attention and KV-cache shapes; and the stored bytes of a linear per format.

Read from the layer modules built on the meta device, so a config-only directory is enough and a
pruned checkpoint's smaller expert count is used as is. Kinds: ``attn`` (attention), ``kv`` (GQA's k_proj and
v_proj: split by KV head, replicated when TP exceeds the KV heads), ``replicated`` (attention linears whole on every
tensor-parallel rank: MLA's down-projections), ``dense`` (dense MLPs), ``shared`` (shared experts), ``routed``
(routed experts, counted per expert).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moepress.compress import formats
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader, declared_dtype, read_config_file
from moepress.compress.inspect import storage_format
from moepress.errors import MoepressError
from moepress.exporters.ct_layout import ct_matcher, ct_stored
from moepress.exporters.kernel_widths import fused_block_ok, runs_in_blocks


def linear_bytes(out_f: int, in_f: int, fmt: str, group: int | None = None, scale_bytes: int | None = None) -> float:
    """Stored bytes of one [out, in] weight and its scales in ``fmt`` (Format.stored_bytes); ``group``:
    the INT4 group size when not the default 128 (Kimi K2 Thinking's experts: 32, 18% more scale bytes);
    ``scale_bytes``: an INT4 checkpoint's own scale width when not moepress's F32 (Kimi's BF16)."""
    f = formats.FORMATS.get(fmt)
    if f is None or f.stored_bytes is None:
        raise MoepressError(f"--format {fmt}: unknown format; expected one of {', '.join(formats.FORMATS)}")
    if f.element == "int4" and (group is not None or scale_bytes is not None):
        return f.stored_bytes(out_f, in_f, **({"group": group} if group else {}),
                              **({"scale_bytes": scale_bytes} if scale_bytes else {}))
    return f.stored_bytes(out_f, in_f)


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
    # (kind, out, in, count): kind in attn, kv (k_proj / v_proj), replicated (whole on every TP rank), dense, shared,
    # routed
    # (routed: per expert, count = experts x layers)
    linears: tuple[tuple[str, int, int, int], ...]
    other_params: int  # norms, routers, biases (bf16, replicated)
    embed_params: int  # embeddings + lm_head (bf16, split by TP)
    max_positions: int = 0  # the config's max_position_embeddings (0: not given)
    int4_group: int | None = None  # a quantized checkpoint's INT4 group size (moepress_quant.json, quantization_config)
    # a `moepress quantize` output or a compressed-tensors checkpoint (exporters/ct_layout.py): its format and
    # (kind, out, in, stored format, count), linears a --rule or ``ignore`` left unquantized or gave another format
    # counted as stored when that format is planned
    stored_format: str | None = None
    stored: tuple[tuple[str, int, int, str, int], ...] = ()
    # (kind, out, in, count) of the linears planned in block FP8 that hf-fp8-block writes bf16 (kernel_widths.
    # fused_block_ok: a shape, or a fused group's, not in whole blocks); none for a checkpoint in block FP8 already,
    # which it copies as stored
    block_kept: tuple[tuple[str, int, int, int], ...] = ()
    # DeepSeek's multi-token-prediction layers (num_nextn_predict_layers, stored past the trunk): (kind, out, in, count)
    # of their decoder linears, and their parameters outside them: (other: norms, router, eh_proj; embed: their own
    # embed_tokens and shared_head.head). Counted in the formats whose checkpoint holds them (:func:`_holds_mtp`)
    mtp: tuple[tuple[str, int, int, int], ...] = ()
    mtp_params: tuple[int, int] = (0, 0)
    # a compressed-tensors checkpoint's INT4 scales as stored: in the model's dtype (compressed-tensors writes them
    # so; Kimi K2 Thinking: BF16), not moepress's F32; counted when its own format is planned
    int4_scale_bytes: int | None = None

    def _scale_bytes(self, fmt: str) -> int | None:
        return self.int4_scale_bytes if fmt == self.stored_format else None

    @property
    def moe_intermediate(self) -> int:
        """Routed experts' intermediate size (the output size of their [I, hidden] projections)."""
        return max((o for k, o, i, _ in self.linears if k == "routed" and i == self.hidden_size), default=0)

    def _planned(self, fmt: str) -> list[tuple]:
        """(kind, out, in, format, count) asked for: every linear in ``fmt``; a quantized checkpoint's as stored."""
        mtp = [(k, o, i, fmt, c) for k, o, i, c in self.mtp] if _holds_mtp(fmt) else []
        if self.stored and fmt == self.stored_format:
            return list(self.stored) + mtp
        return [(k, o, i, fmt, c) for k, o, i, c in self.linears] + mtp

    def rows(self, fmt: str) -> list[tuple]:
        """(kind, out, in, format, count) of each linear planned in ``fmt``, as it runs (:func:`_runs_as`) and as
        hf-fp8-block writes a block-FP8 one (``block_kept`` bf16)."""
        kept = collections.Counter({(k, o, i): c for k, o, i, c in self.block_kept})
        out = []
        for k, o, i, f, c in self._planned(fmt):
            n = min(c, kept[k, o, i]) if _is_block(f) else 0
            kept[k, o, i] -= n
            out += [(k, o, i, _runs_as(k, o, i, f), c - n)] + ([(k, o, i, _UNQUANTIZED, n)] if n else [])
        return [r for r in out if r[4]]

    def unblocked(self, fmt: str) -> list[tuple[str, int, int]]:
        """(kind, out, in) of the linears planned in block FP8 that :meth:`rows` counts as bf16."""
        kept = {(k, o, i) for k, o, i, c in self.block_kept if c}
        return sorted({(k, o, i) for k, o, i, f, _ in self._planned(fmt)
                       if _is_block(f) and ((k, o, i) in kept or _runs_as(k, o, i, f) != f)})

    def bytes_by_kind(self, fmt: str) -> dict[str, float]:
        """Bytes per kind of parameter in ``fmt``; in the checkpoint's own format, as its linears are stored."""
        out = {"attn": 0.0, "kv": 0.0, "replicated": 0.0, "dense": 0.0, "shared": 0.0, "routed": 0.0}
        for kind, o, i, f, c in self.rows(fmt):
            out[kind] += c * linear_bytes(o, i, f, self.int4_group, self._scale_bytes(fmt))
        mtp_other, mtp_embed = self.mtp_params if _holds_mtp(fmt) else (0, 0)
        out["embed"] = 2.0 * (self.embed_params + mtp_embed)
        out["other"] = 2.0 * (self.other_params + mtp_other)
        return out

    def kv_bytes_per_rank(self, fmt: str, tp: int) -> float:
        """Bytes of k_proj / v_proj (kind ``kv``) and their scales one TP rank holds: the rows of
        ceil(kv_heads / tp) whole KV heads with their scales (per-tensor scalars whole on every rank), so with fewer
        KV heads than ranks each rank holds one head (replicas). vLLM 0.33.0 (read at 0036d38d)
        model_executor/layers/linear.py QKVParallelLinear: num_kv_heads 1 and num_kv_head_replicas tp / kv_heads,
        weight_loader takes head tp_rank // replicas, block scales by adjust_block_scale_shard, a
        PerTensorScaleParameter per q / k / v. NVIDIA/TensorRT-LLM 00547a25 _torch/modules/attention.py:
        num_key_value_heads (kv + tp - 1) // tp, qkv_proj 2 * tp * kv_size rows split by TP, after 088aa36b
        _torch/models/checkpoints/hf/weight_mapper.py _duplicate_kv_weights repeats each head tp / kv."""
        if not self.kv_heads:
            return 0.0
        heads = -(-self.kv_heads // tp)
        return sum(c * linear_bytes(o // self.kv_heads * heads, i, f, self.int4_group, self._scale_bytes(fmt))
                   for k, o, i, f, c in self.rows(fmt) if k == "kv")


# MLA's down-projections, whole on every tensor-parallel rank: TensorRT-LLM _torch/modules/attention.py (class
# MLA: kv_a_proj_with_mqa a Linear with no tensor_parallel_mode), vLLM models/deepseek_v2.py (ReplicatedLinear)
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa")
# GQA's key / value projections, split by whole KV heads (ModelShape.kv_heads; kind "kv")
KV_PROJ = ("k_proj", "v_proj")


def _layer_linears(layer) -> tuple[list[tuple[str, str, int, int, bool]], int]:
    """A decoder layer's nn.Linear modules as (name, kind, out, in, whether hf-fp8-block writes it in block FP8:
    kernel_widths.fused_block_ok, as its export decides), and its parameters outside them."""
    moe = layer.moe
    routed = {id(m) for m in moe.experts.modules()} if moe is not None else set()
    shared = {id(m) for m in moe.shared_experts.modules()} \
        if moe is not None and getattr(moe, "shared_experts", None) is not None else set()
    attn = {id(m) for m in layer.self_attn.modules()}
    lin, n_lin = [], 0
    for name, m in layer.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        kind = ("routed" if id(m) in routed else "shared" if id(m) in shared
                else "replicated" if name.endswith(REPLICATED) else "dense" if id(m) not in attn
                else "kv" if name.rpartition(".")[2] in KV_PROJ else "attn")
        lin.append((name, kind, m.out_features, m.in_features))
        n_lin += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    total = sum(t.numel() for t in layer.parameters())
    shapes = {n: (o, i) for n, _, o, i in lin}
    names = {n + ".weight" for n in shapes}
    return [(n, k, o, i, fused_block_ok(names, shapes.get, n, k == "routed")) for n, k, o, i in lin], total - n_lin


def block_linears(model: str | Path) -> list[tuple[str, str, bool]]:
    """(name in its layer, full name, whether hf-fp8-block writes it in block FP8 once quantized so:
    kernel_widths.fused_block_ok, as :func:`_layer_linears` decides) for every decoder linear of the trunk, as
    ``model``'s config builds it: what a quantize section's rules are asked of before anything is quantized."""
    _, a, _ = _config_and_adapter(model)
    built, out = {}, []
    for i in range(a.num_layers):
        key = a.layer_shape_key(i)
        if key not in built:
            with torch.device("meta"):
                built[key] = _layer_linears(a.build_layer(i))[0]
        out += [(name, a.layer_prefix(i) + name, ok) for name, _, _, _, ok in built[key]]
    return out


def _config_and_adapter(model: str | Path | dict):
    """(config, adapter, reader: None for a config file or dict)."""
    if isinstance(model, str | Path) and Path(model).is_file() and str(model).endswith(".json"):
        return (cfg := read_config_file(model)), get_adapter(cfg, where=str(model)), None
    if isinstance(model, dict):
        return model, get_adapter(model), None
    p = Path(model)
    if not (p / "config.json").is_file():
        raise MoepressError(f"{model}: not a checkpoint or config directory (no config.json)")
    reader = CheckpointReader(p)
    return reader.config, get_adapter(reader.config, reader.names(), where=str(p / "config.json")), reader


def _ct_scale_bytes(reader: CheckpointReader | None, cfg: dict) -> int:
    """Bytes of a compressed-tensors checkpoint's INT4 group scale as its headers store it (Kimi K2 Thinking's and
    llm-compressor's: the model's dtype, BF16; moepress's export: F32); a config alone: the model's dtype."""
    if reader is not None and reader.has_weights:
        for n in reader.names():
            if n.endswith(".weight_packed") and n[: -len("_packed")] + "_scale" in reader:
                return 4 if reader.info(n[: -len("_packed")] + "_scale").dtype == "F32" else 2
    return 2 if str(declared_dtype(cfg) or "bfloat16") in ("bfloat16", "float16") else 4


def model_shape(model: str | Path | dict) -> ModelShape:
    """Structure of a checkpoint or config-only directory (or a config dict)."""
    cfg, a, reader = _config_and_adapter(model)
    layout = _layout(model)
    where = str(model) if isinstance(model, str | Path) else "<config>"
    match = None if layout else ct_matcher(cfg, where, strict=False)
    linears: collections.Counter = collections.Counter()
    stored: collections.Counter = collections.Counter()
    ct_rows: list[tuple[str, str, int, int]] = []  # a compressed-tensors checkpoint's linears by full name
    kept: collections.Counter = collections.Counter()  # ModelShape.block_kept
    native = not layout and _is_block(storage_format(cfg))  # hf-fp8-block copies its linears (_copy_block_layer)
    other = 0
    built = {}
    for i in range(a.num_layers):
        key = a.layer_shape_key(i)
        if key not in built:  # layers of one kind have one structure: build one on the meta device
            with torch.device("meta"):
                layer = a.build_layer(i)
            built[key] = _layer_linears(layer)
        lin, rest = built[key]
        linears.update((k, o, n) for _, k, o, n, _ in lin)
        mods, prefix = (layout or {}).get("modules", {}), a.layer_prefix(i)
        if layout:
            stored.update((k, o, n, (mods.get(prefix + name) or {}).get("format") or _UNQUANTIZED)
                          for name, k, o, n, _ in lin)
        elif match:
            ct_rows += [(prefix + name, k, o, n) for name, k, o, n, _ in lin]
        # a native block-FP8 checkpoint is copied as it ships, but for linears no runtime computes in blocks at all
        kept.update((k, o, n) for name, k, o, n, ok in lin if (not runs_in_blocks((o, n), k == "routed") if native
                                                                 else not ok)
                    and (not layout or _is_block((mods.get(prefix + name) or {}).get("format"))))
        other += rest
    mtp, mtp_kept, mtp_params = _mtp_layers(a, native)
    fmt, group = (layout.get("format"), _int4_group(layout)) if layout else (None, None)
    scale_bytes = None
    if match:
        stored, fmt, group = ct_stored(ct_rows, match, _UNQUANTIZED)
        scale_bytes = _ct_scale_bytes(reader, cfg)
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
                      tuple((k, o, i, c) for (k, o, i), c in sorted(linears.items())), other, embed,
                      int(cfg.get("max_position_embeddings") or 0), group, fmt,
                      tuple((k, o, n, f, c) for (k, o, n, f), c in sorted(stored.items())),
                      tuple((k, o, n, c) for (k, o, n), c in sorted((kept + mtp_kept).items())),
                      tuple((k, o, n, c) for (k, o, n), c in sorted(mtp.items())), mtp_params, scale_bytes)


_UNQUANTIZED = next(n for n, f in formats.FORMATS.items() if f.scale is None)  # what a --rule "none" leaves


def _mtp_layers(a, native: bool) -> tuple[collections.Counter, collections.Counter, tuple[int, int]]:
    """DeepSeek's MTP layers (adapter.mtp_layers; config num_nextn_predict_layers): their decoder linears, those
    hf-fp8-block writes bf16 (all of them but in a block-FP8 checkpoint, which it copies under the trunk's rule:
    bf16 only where no runtime computes a linear in blocks; hf_fp8_block.export_hf_fp8_block), and their other and
    embedding parameters (adapter.mtp_extra_params; vLLM 0.33.0 models/deepseek_mtp.py: eh_proj an nn.Linear whole
    on every rank, embed_tokens and shared_head.head split by TP)."""
    lin, kept, other, embed = collections.Counter(), collections.Counter(), 0, 0
    extra_other, extra_embed = a.mtp_extra_params()
    for i in a.mtp_layers():
        with torch.device("meta"):
            rows, rest = _layer_linears(a.build_layer(i))
        lin.update((k, o, n) for _, k, o, n, _ in rows)
        kept.update((k, o, n) for _, k, o, n, _ in rows if not native or not runs_in_blocks((o, n), k == "routed"))
        other, embed = other + rest + extra_other, embed + extra_embed
    return lin, kept, (other, embed)


def _holds_mtp(fmt: str) -> bool:
    """Whether a checkpoint planned in ``fmt`` holds the MTP layers: unquantized (the original, a pruned one: prune
    keeps them) or block FP8 (hf-fp8-block copies them); ``moepress quantize`` writes no layer past the trunk
    (quantize/stage.py EXTRA_LAYERS), so no export of its output holds them."""
    return fmt == _UNQUANTIZED or _is_block(fmt)


def _is_block(fmt: str | None) -> bool:
    """Whether ``fmt`` is a block-scaled format (128x128 block FP8)."""
    return getattr(formats.FORMATS.get(fmt or ""), "scale", None) == "block"


def _runs_as(kind: str, out_f: int, in_f: int, fmt: str) -> str:
    """The format a linear planned in ``fmt`` runs in: bf16 for a block-FP8 linear no runtime computes in block
    FP8 (:func:`kernel_widths.runs_in_blocks`; hf-fp8-block, the only export taking such a model, keeps it bf16),
    else ``fmt``."""
    return _UNQUANTIZED if _is_block(fmt) and not runs_in_blocks((out_f, in_f), kind == "routed") else fmt


def _layout(model) -> dict | None:
    """A ``moepress quantize`` output's moepress_quant.json (None for anything else)."""
    if isinstance(model, dict) or not Path(model).is_dir():
        return None
    layout = formats.read_layout(Path(model))
    return layout if layout and isinstance(layout.get("modules"), dict) else None


def _int4_group(layout: dict | None) -> int | None:
    """The group size a ``moepress quantize`` output declares (None: the format's default)."""
    g = (layout or {}).get("group_size")
    return g if isinstance(g, int) and g > 0 else None


__all__ = ["ModelShape", "block_linears", "linear_bytes", "model_shape"]
