"""`moepress inspect`: what a checkpoint (or a config-only directory) holds.

Parameter counts come from the layer modules built on the meta device (no weights
needed), so the numbers are the ones the stream will really load.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from moepress.compress import formats
from moepress.compress.arch import get_adapter
from moepress.compress.arch.base import Adapter, count_params
from moepress.compress.checkpoint import CheckpointReader, declared_dtype
from moepress.compress.formats import ct_inputs, fp8_block
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError


def _layer_counts(adapter: Adapter, i: int) -> tuple[int, int]:
    """(total, active-per-token) parameters of decoder layer i."""
    with torch.device("meta"):
        layer = adapter.build_layer(i)
    total = count_params(layer)
    moe = layer.moe
    if moe is None:
        return total, total
    per_expert = count_params(moe.experts[0])
    return total, total - (moe.num_experts - moe.top_k) * per_expert


def param_counts(adapter: Adapter) -> dict:
    """Total and active parameters, embeddings and head included (head counted once if tied). DeepSeek's MTP
    layers (stored past the trunk, run only to draft tokens) count in ``total`` and ``mtp``, not in ``active``,
    as DeepSeek-V3 counts them (671B main model + 14B MTP module)."""
    cache = lru_cache(maxsize=None)(lambda moe: _layer_counts(adapter, first[moe]))
    first = {}
    mtp_layers = adapter.mtp_layers()
    for i in [*range(adapter.num_layers), *mtp_layers]:
        first.setdefault(adapter.is_moe_layer(i), i)
    total = active = 0
    for i in range(adapter.num_layers):
        t, a = cache(adapter.is_moe_layer(i))
        total += t
        active += a
    mtp = sum(cache(adapter.is_moe_layer(i))[0] + sum(adapter.mtp_extra_params()) for i in mtp_layers)
    per_expert = 3 * adapter.hidden_size * adapter.moe_intermediate_size()
    moe_layers = len(adapter.moe_layers()) + sum(adapter.is_moe_layer(i) for i in mtp_layers)
    emb = adapter.vocab_size * adapter.hidden_size
    head = 0 if adapter.tie_word_embeddings else emb
    norm = adapter.hidden_size
    return {
        "total": total + emb + head + norm + mtp,
        "active": active + emb + head + norm,
        "routed_experts": moe_layers * adapter.num_experts * per_expert,
        "embeddings": emb,
        "lm_head": head,
        **({"mtp": mtp} if mtp_layers else {}),
    }


def storage_format(config: dict, layout: dict | None = None) -> str:
    """How the checkpoint's weights are stored: a moepress format name where one applies (a ``moepress quantize``
    output's moepress_quant.json names its formats), else what its ``quantization_config`` says, else its dtype."""
    named = sorted({m.get("format") for m in ((layout or {}).get("modules") or {}).values()} - {None})
    if named:
        return ", ".join(named)
    qc = config.get("quantization_config") or {}
    if fp8_block.block_config(qc):
        return fp8_block.FORMAT.name
    if qc:
        # e.g. "compressed-tensors pack-quantized" (Kimi K2 Thinking's routed experts)
        label = " ".join(dict.fromkeys(str(x) for x in (qc.get("quant_method"), qc.get("format")) if x))
        return label or "quantized"
    return str(declared_dtype(config) or "unknown")


def module_formats(reader: CheckpointReader, adapter: Adapter) -> dict[str, dict[str, int]]:
    """How the decoder layers' 2-D weights are stored, per storage label: {label: {"routed experts": n,
    "other": m}}. A compressed-tensors packed module is labelled by its scheme (``int4 symmetric group
    32 (compressed-tensors pack-quantized)``), a module moepress_quant.json lists by its format and group
    (``int4-awq group 128``; INT4, NVFP4 and MXFP4 are all uint8 on disk); any other weight by its stored dtype."""
    named = (formats.layout_of(reader) or {}).get("modules") or {}
    out: dict[str, dict[str, int]] = {}
    for i in reader.layer_indices():
        names = set(reader.layer_names(i))
        bases = {n[: -len(ct_inputs.PACKED)] for n in names if n.endswith(ct_inputs.PACKED)}
        bases |= {n[: -len(".weight")] for n in names if n.endswith(".weight") and len(reader.info(n).shape) == 2}
        for b in bases:
            m = named.get(b) or {}
            # with its group, as a compressed-tensors module's label has it: one layout may hold two (a linear
            # narrower than --group-size gets a smaller one)
            own = m.get("format") and m["format"] + (f" group {m['group']}" if m.get("group") else "")
            label = ct_inputs.describe(reader, b) or own or reader.info(b + ".weight").dtype.lower()
            kind = "routed experts" if adapter.expert_index(b + ".weight") is not None else "other"
            counts = out.setdefault(label, {})
            counts[kind] = counts.get(kind, 0) + 1
    return out


def non_hf_export(path: str | Path) -> dict | None:
    """The export.json record ({} where unreadable) of a `moepress export` output that is not a Hugging Face
    checkpoint (onnx: no config.json; trtllm-ckpt: rank*.safetensors beside TensorRT-LLM's config.json); None for
    anything else."""
    d = Path(path)
    if not (d / "export.json").is_file() or ((d / "config.json").is_file() and not (d / "rank0.safetensors").is_file()):
        return None
    try:
        info = json.loads((d / "export.json").read_text())
    except (OSError, ValueError):
        info = None
    return info if isinstance(info, dict) else {}


def _refuse_non_hf_export(path: str) -> None:
    """A `moepress export` output that is not a Hugging Face checkpoint: one line naming it and its source, not the
    missing file the reader would name."""
    info = non_hf_export(path)
    if info is not None:
        fmt, source = info.get("format"), info.get("source")
        raise MoepressError(f"{path}: a `moepress export{f' --format {fmt}' if fmt else ''}` output (export.json); "
                            "inspect reads Hugging Face checkpoints (config.json with model.safetensors or its index)"
                            + (f": expected its source, {source}" if source else ""))


def summarize(path: str) -> dict:
    _refuse_non_hf_export(path)
    reader = CheckpointReader(path)
    a = get_adapter(reader.config, reader.names(), where=str(reader.path / "config.json"))
    if reader.has_weights:
        StreamedModel(reader)  # checks config against the shard headers (reads no tensor data)
    moe_layers = a.moe_layers()
    dense = [i for i in range(a.num_layers) if i not in moe_layers]
    out = {
        "path": str(reader.path),
        "family": a.family,
        "model_type": reader.config.get("model_type"),
        "architectures": reader.config.get("architectures"),
        "layers": {"total": a.num_layers, "moe": moe_layers, "dense": dense},
        "hidden_size": a.hidden_size,
        "vocab_size": a.vocab_size,
        "experts": {
            "routed": a.num_experts,
            "config_key": a.experts_key(),
            "shared": a.n_shared_experts(),
            "top_k": a.top_k,
            "moe_intermediate_size": a.moe_intermediate_size(),
        },
        "routing": a.routing(),
        "params": param_counts(a),
        "storage": storage_format(reader.config, formats.layout_of(reader)),
        "has_weights": reader.has_weights,
        "bytes_on_disk": reader.bytes_by_dtype(),
        "remote_code": bool(reader.config.get("auto_map")),
    }
    if reader.has_weights:
        out["module_formats"] = module_formats(reader, a)
    mtp = a.mtp_layers()
    if mtp:
        out["layers"]["mtp"] = mtp
    return out


def _fmt_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def render(s: dict) -> str:
    e, r, p, lay = s["experts"], s["routing"], s["params"], s["layers"]
    route = f"{r['scoring']} top-{r['top_k']}"
    if r.get("renormalize"):
        route += ", renormalised"
    if r.get("correction_bias"):
        route += f", correction bias ({r.get('topk_method', 'noaux_tc')})"
    if r.get("n_group", 1) > 1:
        route += f", {r['n_group']} groups (top {r['topk_group']})"
    if r.get("routed_scaling_factor", 1.0) != 1.0:
        route += f", scaled x{r['routed_scaling_factor']}"
    lines = [
        f"model      {s['path']}",
        f"family     {s['family']} (model_type {s['model_type']}"
        + (", remote code not needed" if s["remote_code"] else "") + ")",
        f"layers     {lay['total']}: MoE {_ranges(lay['moe'])}; dense {_ranges(lay['dense'])}"
        + (f"; MTP {_ranges(lay['mtp'])}" if lay.get("mtp") else ""),
        f"experts    {e['routed']} routed ({e['config_key']}) + {e['shared']} shared, "
        f"intermediate {e['moe_intermediate_size']}",
        f"routing    {route}",
        f"params     {_fmt_count(p['total'])} total, {_fmt_count(p['active'])} active per token "
        f"(routed experts {_fmt_count(p['routed_experts'])}"
        + (f"; MTP {_fmt_count(p['mtp'])}, not active" if p.get("mtp") else "") + ")",
        f"storage    {s['storage']}",
    ]
    if s["has_weights"]:
        disk = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(s["bytes_on_disk"].items()))
        lines.append(f"on disk    {_fmt_bytes(sum(s['bytes_on_disk'].values()))} ({disk})")
    else:
        lines.append("on disk    no weights (config only)")
    for k, (label, counts) in enumerate(sorted(s.get("module_formats", {}).items())):
        parts = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
        lines.append(f"{'modules' if k == 0 else '':<10} {label}: {parts}")
    if "formats" in s:
        lines.append(f"formats    {', '.join(s['formats'])}")
    if "targets" in s:
        lines.append(f"targets    {s['targets']}")
    return "\n".join(lines)
