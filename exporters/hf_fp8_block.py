"""`hf-fp8-block`: the native block-FP8 layout DeepSeek-V3 and Kimi K2 ship in (also Qwen3's
official *-FP8 releases), loaded by TensorRT-LLM's PyTorch backend, vLLM, SGLang and
transformers (FineGrainedFP8; on CPU it dequantizes at load time).

Layout (deepseek-ai/DeepSeek-V3 README_WEIGHTS.md and its config.json;
transformers/quantizers/quantizer_finegrained_fp8.py: serialized names ``weight``,
``weight_scale_inv``):

- a quantized linear ``P``: ``P.weight`` float8_e4m3fn [out, in] and ``P.weight_scale_inv``
  float32 [ceil(out/128), ceil(in/128)], dequantized weight = block * its scale_inv (edge blocks
  partial);
- ``config.json: quantization_config = {quant_method: "fp8", fmt: "e4m3", activation_scheme:
  "dynamic", weight_block_size: [128, 128], modules_to_not_convert: [...]}``; activations are
  quantized dynamically per token and 128 channels by the runtime;
- high precision (bf16; DeepSeek's ``e_score_correction_bias`` float32 as stored): embeddings,
  lm_head, norms, routers (``mlp.gate``), listed in ``modules_to_not_convert`` (transformers
  matches those from the start of a module name up to a module boundary, or as a suffix:
  transformers/quantizers/quantizers_utils.py: should_convert_module; ``mlp.gate`` never
  matches ``mlp.gate_proj``).

Partial blocks: a linear the runtimes would not compute as stored stays high precision and is listed
in ``modules_to_not_convert`` (kernel_widths.block_ok): an input width that is not a multiple of 128
(activations are quantized in 1x128 groups; the tiny DeepSeek's 64-wide expert down projections), a
routed expert's width that is not (the fused MoE kernels need whole blocks, 64 and 96 included), or a
dense output over 128 that is not (transformers reads such a scale grid with the wrong block size: the
tiny DeepSeek's 192-row ``q_b_proj``), and every part of a group the runtimes fuse into one linear (q/k/v,
gate/up, q_a / kv_a) unless all of them are whole 128-row blocks (hf_common.block_linear_ok: vLLM and SGLang read
a fused scale grid of ceil(rows / 128) rows and refuse a group quantized partly); the export's summary names them
(``kept_high_precision``). A layer
whose routed experts all stay high precision is also listed as its fused experts module
(``model.layers.N.block_sparse_moe.experts``): transformers' FP8 path and vLLM decide per fused
module, and per-expert entries alone do not keep it dense (fused_moe.py).

Inputs: a bf16 (or pruned) checkpoint — quantized here, calibration-free (``quant/fp8.py:
quantize_block``, modelopt-identical numerics, see tests/test_quant_modelopt.py); a
``moepress quantize --format fp8-block`` output — ``weight_scale`` renamed ``weight_scale_inv``,
no requantization; or a checkpoint already in this layout — copied, but for linears no runtime computes in
blocks at all (dequantized). The export keeps a
``moepress_quant.json`` so moepress's own forward of it (``StreamedModel``, ``moepress check``)
applies the runtime's dynamic 1x128 activation quantization.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moepress.compress import formats
from moepress.compress.formats import fp8_block
from moepress.compress.quant import fp8
from moepress.errors import MoepressError
from moepress.exporters.base import Exporter
from moepress.exporters.ct_misloads import TRANSFORMERS_CHECKED
from moepress.exporters.fused_moe import high_precision_layers, refuse_mixed
from moepress.exporters.hf_common import (
    FLOAT_DTYPES,
    any_block_grid,
    block_linear_ok,
    open_source,
    output_config,
    tensor_groups,
    unquantized_modules,
)
from moepress.exporters.hints import FP8_THEN_CT, packed_names, packed_routes
from moepress.exporters.kernel_widths import BLOCK, fused_block_ok, grid_ok, runs_in_blocks

# the format this layout stores: FP8 weights with a scale per 128x128 block (TensorRT-LLM FP8_BLOCK_SCALES)
BLOCK_FP8 = formats.by_quant_algo("FP8_BLOCK_SCALES").name


def layer_linears(adapter, i: int) -> list[str]:
    """Names (relative to the layer) of decoder layer i's nn.Linear modules: the ones DeepSeek-V3
    stores in FP8 (attention, dense MLP, experts, shared experts; routers are not nn.Linear)."""
    with torch.device("meta"):
        layer = adapter.build_layer(i)
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _rename_layer(r, a, names, writer, dtype, quantized: set[str], kept: list[str]) -> None:
    """A ``moepress quantize --format fp8-block`` layer: ``weight_scale`` written as ``weight_scale_inv``."""
    for n in names:
        base = n[: -len(".weight_scale")] if n.endswith(".weight_scale") else None
        q8 = base is not None and base + ".weight" in r and r.info(base + ".weight").dtype == "F8_E4M3"
        if n.endswith(".weight") and n[: -len(".weight")] + ".weight_scale" in r:
            if block_linear_ok(r, a, n[: -len(".weight")]):
                writer.add(n, r.get(n))
            else:  # not computed as stored: high precision (the dequantized block-FP8 weight)
                writer.add(n, r.weight(n, dtype))
                kept.append(n[: -len(".weight")])
        elif q8:
            if block_linear_ok(r, a, base):
                # DeepSeek's 2-D grid, from ours or an hf-modelopt export's 4-D one
                writer.add(base + ".weight_scale_inv", fp8.block_grid(r.get(n).float()))
                quantized.add(base)
        else:
            writer.add(n, r.get(n))


def _copy_layer(r, names, writer) -> None:
    """Tensors past the trunk (embeddings, norm, head, DeepSeek's MTP layers) of a bf16 checkpoint or a `moepress
    quantize` output (which writes no MTP layer): copied, an MTP layer in bf16 (listed in modules_to_not_convert)."""
    for n in names:
        writer.add(n, r.get(n))


def _copy_block_layer(r, a, names, writer, dtype, quantized: set[str], kept: list[str], misread: list[str]) -> None:
    """A decoder layer already in this layout: copied as it ships (DeepSeek-V3's 576-row kv_a_proj_with_mqa included),
    but a block-FP8 linear the runtimes do not compute in blocks (:func:`_copies`: an input width, or a routed expert's
    width, that is not whole blocks, and every part of a fused q/k/v, gate/up or q_a/kv_a when a part but the last of
    DeepSeek's pair is not whole 128-row blocks: vLLM and SGLang refuse such a fused group at load) written
    dequantized, high precision, without its scale, as from a bf16 input. ``misread``: the copied linears whose
    scale grid transformers reads otherwise (grid_ok)."""
    for n in names:
        base = n.removesuffix(".weight_scale_inv").removesuffix(".weight")
        if base + ".weight_scale_inv" in r and not _copies(r, a, base):
            if n == base + ".weight":
                writer.add(n, r.weight(n, dtype))
                kept.append(base)
            continue
        writer.add(n, r.get(n))
        if n.endswith(".weight_scale_inv"):
            quantized.add(base)
            if not grid_ok(r.info(base + ".weight").shape):  # copied as shipped; transformers reads its grid otherwise
                misread.append(base)


def _copies(r, a, base: str) -> bool:
    """Whether a stored block-FP8 linear is copied as it ships: the export's rule (kernel_widths.fused_block_ok) with
    runs_in_blocks for each shape, so that a dense output over 128 rows transformers reads with another grid is
    copied (and said: grid_ok), not dequantized as a bf16 input's would stay (block_linear_ok)."""
    return fused_block_ok(r, lambda b: tuple(r.info(b + ".weight").shape), base, a.expert_index(base) is not None,
                          shape_ok=runs_in_blocks)


def _quantize_layer(r, a, i: int, names, writer, dtype, quantized: set[str], kept: list[str]) -> None:
    """A bf16 layer: every nn.Linear quantized to 128x128 blocks (calibration-free), those the runtimes
    would not compute so kept as stored (read as weights: an integer tensor is refused, not copied)."""
    prefix = a.layer_prefix(i)
    targets = {prefix + m + ".weight" for m in layer_linears(a, i)}
    for n in names:
        if n in targets and not block_linear_ok(r, a, n[: -len(".weight")]):
            kept.append(n[: -len(".weight")])
            writer.add(n, r.weight(n, FLOAT_DTYPES.get(r.info(n).dtype, dtype)))
        elif n in targets:
            q, sc = fp8.quantize_block(r.weight(n, torch.float32))
            writer.add(n, q)
            writer.add(n + "_scale_inv", sc)
            quantized.add(n[: -len(".weight")])
        else:
            writer.add(n, r.get(n))


def _block_candidates(s, mode: str) -> list[str]:
    """The linears this export would write in block FP8 were their grids whole (a quantize output's block-FP8
    modules; every decoder linear of a bf16 model), in order."""
    if mode == "rename":
        return [n for n, m in (s.layout.get("modules") or {}).items() if formats.FORMATS[m["format"]].scale == "block"]
    return [s.adapter.layer_prefix(i) + m for i in range(s.adapter.num_layers) for m in layer_linears(s.adapter, i)]


def _written_fp8(s) -> set[str]:
    """The linears of a ``moepress quantize --format fp8-block`` output this export writes in block FP8."""
    return {n for n in _block_candidates(s, "rename") if block_linear_ok(s.reader, s.adapter, n)}


def refuse_input(src: Path):
    """A bf16, block-FP8 (DeepSeek's, or a moepress fp8-block output) checkpoint it writes, as (Source, mode:
    copy / rename / quantize); else one line."""
    s = open_source(src)
    r, a = s.reader, s.adapter
    if s.layout is not None and s.formats != {BLOCK_FP8}:
        way = ("quantize with --format fp8-block, then export hf-fp8-block, or export the original" if
               any_block_grid(src) else FP8_THEN_CT)  # no linear with a 128x128 grid: this export refuses both
        raise MoepressError(f"--format hf-fp8-block: {src} is quantized as "
                            f"{', '.join(sorted(s.formats)) or 'nothing (moepress_quant.json lists no module)'}; "
                            f"expected fp8-block or a bf16 checkpoint: {way}")
    # copy: DeepSeek's block FP8, or this export's own output (its moepress_quant.json lists DeepSeek-named modules)
    own = s.layout is not None and all(f"{m}.weight_scale_inv" in r for m in s.layout["modules"])  # (not empty: above)
    mode = "copy" if own or (s.layout is None and s.block_fp8) else "rename" if s.layout is not None else "quantize"
    if mode == "rename":  # a --rule that left some of a layer's experts bf16: transformers then fails at load
        refuse_mixed(s, "hf-fp8-block", _written_fp8(s), "transformers' FP8 path, vLLM, SGLang and TensorRT-LLM "
                     "fuse a layer's experts under one quantization", other_formats=False)  # it writes block FP8 only
    packed = packed_names(r)
    if packed:  # compressed-tensors INT / FP4 or gpt-oss MXFP4 modules: copied packed, consumers saw no weight
        way, routes = "quantize with --format fp8-block, then export hf-fp8-block", packed_routes(r)
        way = way if any_block_grid(src) else FP8_THEN_CT  # no linear with a 128x128 grid: this export refuses it
        raise MoepressError(f"--format hf-fp8-block: {src} stores {len(packed)} packed tensors (e.g. {packed[0]}); "
                            "expected a bf16 or block-FP8 checkpoint" + ("" if way in routes else f" ({way})")
                            + f"; {routes}")
    block = list(fp8.block_size_of(r.config)) if mode == "copy" else BLOCK
    if block != BLOCK:  # copied bytes keep their block grid
        raise MoepressError(f"--format hf-fp8-block: {src}/config.json has weight_block_size "
                            f"{block}; this layout declares {BLOCK} (vLLM, SGLang and "
                            "TensorRT-LLM read the block from it); expected a checkpoint of 128 x 128 blocks")
    given = _block_candidates(s, mode) if mode != "copy" else []
    if given and not any(block_linear_ok(r, a, n) for n in given):  # refused before the pass over the model
        raise MoepressError(f"--format hf-fp8-block: no linear of {src} has a 128x128 block grid every runtime "
                            f"computes as stored (e.g. {given[0]}); expected input widths (and routed experts' "
                            f"widths) that are multiples of 128: {FP8_THEN_CT}")
    return s, mode


def export_hf_fp8_block(src: Path, writer, cfg, progress) -> dict:
    s, mode = refuse_input(src)
    r, a = s.reader, s.adapter
    quantized: set[str] = set()
    kept: list[str] = []  # linears left in high precision (scale grid not read alike by consumers)
    misread: list[str] = []  # linears copied in block FP8 whose grid transformers reads otherwise
    dtype = getattr(torch, cfg.float_dtype(r, a))
    with progress.task("export hf-fp8-block", a.num_layers + 2) as task:
        for kind, i, names in tensor_groups(s):
            if mode == "copy":  # DeepSeek's MTP layers (past the trunk, "embed") under the trunk's rule too
                _copy_block_layer(r, a, names, writer, dtype, quantized, kept, misread)
            elif kind != "layer":  # embeddings, norm, head, and layers past the trunk (DeepSeek's MTP)
                _copy_layer(r, names, writer)
            elif mode == "rename":
                _rename_layer(r, a, names, writer, dtype, quantized, kept)
            else:
                _quantize_layer(r, a, i, names, writer, dtype, quantized, kept)
            writer.end_shard()
            task.advance(note=f"layer {i}" if kind == "layer" else kind)
    if not quantized:  # every linear's grid failed: a bf16 model under quant_method fp8
        raise MoepressError(f"--format hf-fp8-block: no linear of {src} has a 128x128 block grid every runtime "
                            f"computes as stored (e.g. {kept[0] if kept else 'none'}); expected input widths (and "
                            f"routed experts' widths) that are multiples of 128: {FP8_THEN_CT}")
    not_converted = unquantized_modules(s, quantized)
    # a layer whose routed experts all stay high precision: named as the fused module too (fused_moe.py)
    not_converted = sorted(not_converted + high_precision_layers(s, set(not_converted)))
    writer.write_json("config.json", output_config(s, fp8_block.quantization_config(not_converted)))
    writer.write_json("moepress_quant.json", {"format": BLOCK_FP8, "rules": [], "group_size": None,
                                              "kv_cache": None, "shared": [], "borrowed": [], "skipped": [],
                                              "modules": {m: {"format": BLOCK_FP8} for m in sorted(quantized)}})
    writer.copy_aux_files(src)
    mtp = [a.layer_prefix(i).rstrip(".") for i in a.mtp_layers()] if mode == "quantize" else []
    return {"mode": mode, "quantized_linears": len(quantized), "modules_to_not_convert": len(not_converted),
            "kept_high_precision": kept, **({"mtp_layers_high_precision": mtp} if mtp else {}),
            **_misread_notes(misread)}


def _misread_notes(misread: list[str]) -> dict:
    """export.json's consumer fields (artifacts.consumer_misload reads them) for linears copied in block FP8 with a
    dimension over 128 that is not whole blocks (DeepSeek-V3 ships its 576-row kv_a_proj_with_mqa so; the runtimes
    read the block from weight_block_size): transformers derives the block from the scale grid
    (integrations/finegrained_fp8.py ``_dequantize_one``: block = rows // scale_rows), refusing the grid or, where
    it divides the rows, dequantizing with the wrong block."""
    if not misread:
        return {}
    why = (f"derives the block from the scale grid, and {len(misread)} linears copied in block FP8 have a dimension "
           f"over 128 that is not whole blocks (e.g. {misread[0]}): it refuses their grid or dequantizes them with the "
           "wrong block")
    return {"consumer_notes": [f"transformers <= {TRANSFORMERS_CHECKED} {why}; vLLM, SGLang and TensorRT-LLM read "
                               "the block from weight_block_size"],
            "misloaded_by": {"transformers": TRANSFORMERS_CHECKED}, "misloaded_why": {"transformers": why}}


EXPORTER = Exporter(
    "hf-fp8-block", export_hf_fp8_block, description="DeepSeek-V3 / Kimi K2 native block-FP8 Hugging Face checkpoint "
    "(weight_scale_inv per 128x128 block); from bf16 (calibration-free) or fp8-block",
    consumers="TensorRT-LLM (PyTorch backend), vLLM, SGLang, transformers (FineGrainedFP8)",
    writes_format=lambda f: f.name == BLOCK_FP8, refuse_input=refuse_input,
)
