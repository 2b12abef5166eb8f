"""What a checkpoint an exporter refuses should do instead: each hint is one clause naming only steps
that take the same checkpoint (a re-quantize flag, then an export that accepts it), built from what the
exporters and runtimes take, so that no refusal sends the user to another refusal
(tests/test_export_hints.py follows every hint once)."""

from __future__ import annotations

import re
from pathlib import Path

from moepress.compress import formats
from moepress.compress.arch import get_adapter
from moepress.compress.quant.int4 import effective_group
from moepress.compress.quantize.config import GROUP_SIZES
from moepress.errors import MoepressError
from moepress.exporters.fused_moe import (
    common_groups,
    expert_widths,
    fp4_expert_widths_ok,
    partial_fused_blocks,
    refuse_partial_blocks,
    refuse_partial_input_groups,
    routed_linears,
    routed_names,
)
from moepress.exporters.hf_common import Source, decoder_linears, fp8_block_grids
from moepress.exporters.kernel_widths import TENSORRT_INT4_BLOCKS, TRTLLM_INT4_MOE_GROUP, mla_rule_flags


def alike_group(s, modules: dict) -> int | None:
    """The --group-size that quantizes every layer's routed experts alike (the largest that divides all their
    in_features, as fused_moe.refuse_unlike / refuse_mixed suggest), when some layer's experts got different
    groups or some were left bf16 because no group divided them; else None."""
    layers = routed_linears(s).values()
    groups = {modules[n].get("group") for ns in layers for n in ns if n in modules} - {None}
    unlike = any(len({modules[n].get("group") for n in ns if n in modules}) > 1 for ns in layers)
    left = any(n not in modules for ns in layers for n in ns) and any(n in modules for ns in layers for n in ns)
    if not groups or not (unlike or left):
        return None
    fits = common_groups(expert_widths(s))
    return max(fits) if fits and max(fits) < max(groups) else None


def quantizes_experts(s, fmt: str) -> bool:
    """Whether quantize --format ``fmt`` quantizes every routed-expert projection of ``s`` (its widths) as a
    fused-MoE export takes them: INT4 needs a --group-size dividing every in_features (or not above it), FP4
    and block FP8 their fixed block (a projection left bf16 makes every fused-MoE export refuse the layer:
    fused_moe.refuse_mixed), FP4 also widths its fused-MoE kernels run (fused_moe.fp4_expert_widths_ok)."""
    f = formats.FORMATS[fmt]
    widths = expert_widths(s)
    if f.element == "int4":  # one group for all (a linear narrower than the group gets its own: refuse_unlike)
        return bool(common_groups(widths)) or (len(widths) == 1 and widths[0] <= max(GROUP_SIZES))
    if f.element == "fp4" and not fp4_expert_widths_ok(s):
        return False
    unit = f.split_unit[1] if f.split_unit and f.scale in ("group", "block") else 1
    return all(w % unit == 0 for w in widths)


def plain_quantize(s, fmt: str, export: str) -> str | None:
    """The quantize flags (``--format F``, with the --group-size it needs) whose output of the bf16 source ``s`` the
    ``export`` (hf-modelopt, compressed-tensors) takes, or None: routed experts its runtimes load
    (Format.modelopt_experts_why), quantized whole and alike (:func:`quantizes_experts`; INT4 at a group every
    expert width takes: fused_moe.refuse_unlike), block FP8 in whole 128-row fused parts and 128-wide inputs
    (fused_moe.partial_fused_blocks, refuse_partial_input_groups). What a refusal of ``s`` may name."""
    f = formats.FORMATS[fmt]
    if (export == "hf-modelopt" and f.modelopt_experts_why(s.adapter.family)) or not quantizes_experts(s, fmt):
        return None
    if f.scale == "block":
        modules = {n: {"format": fmt} for n in decoder_linears(s.reader, s.adapter)}
        try:
            refuse_partial_input_groups(s, export, modules)
        except MoepressError:
            return None
        if partial_fused_blocks(s, modules):
            return None
    widths = expert_widths(s)
    groups = {effective_group(w, max(GROUP_SIZES)) for w in widths}
    if f.element == "int4" and (len(groups) > 1 or None in groups):  # None: the default group leaves it unquantized
        common = common_groups(widths)
        return f"{fmt} --group-size {max(common)}" if common else None
    return fmt


def quantize_first(s, export: str, candidates: tuple[str, ...]) -> str:
    """"F (or G, H --group-size N)": the ``candidates`` whose plain quantize ``export`` takes (:func:`plain_quantize`),
    for the refusal of a bf16 source (hf_common.require_layout); "fp8" should none."""
    ways = [w for w in (plain_quantize(s, f, export) for f in candidates) if w] or ["fp8"]
    return ways[0] + (f" (or {', '.join(ways[1:])})" if ways[1:] else "")


def alike_experts(s, modules: dict) -> bool:
    """Whether every layer's routed experts are all quantized, with one format and group (what
    fused_moe.refuse_mixed and refuse_unlike ask of a fused-MoE export)."""
    return all(all(n in modules for n in ns) and len({(modules[n]["format"], modules[n].get("group")) for n in ns}) <= 1
               for ns in routed_linears(s).values())


def int4_routes(s, refusing: str) -> str:
    """Where an INT4-quantized source can go instead of ``refusing``, as one clause ("quantize with --awq-fold,
    then export compressed-tensors (...), or export onnx (...)"), built from what each exporter takes (so that no hint
    names an export that refuses the same source): onnx every INT4 format; hf-modelopt routed experts whose
    format a runtime loads from a Model-Optimizer checkpoint (hf_modelopt.refuse_unloadable_experts); a
    compressed-tensors form for int4-gptq and folded int4-awq only (compressed_tensors.layout_schemes); both
    need a layer's experts quantized alike (fused_moe.refuse_unlike). Empty when the source is not INT4."""
    modules = (s.layout or {}).get("modules") or {}
    fs = [formats.FORMATS[f] for f in sorted({m["format"] for m in modules.values()}) if f in formats.FORMATS]
    if not fs or any(f.element != "int4" for f in fs):
        return ""
    routed = {modules[n]["format"] for ns in routed_linears(s).values() for n in ns if n in modules}
    group = alike_group(s, modules)
    onnx = onnx_route({m.get("group") for m in modules.values() if formats.FORMATS[m["format"]].element == "int4"})
    if group is None and not alike_experts(s, modules):  # no group quantizes them whole and alike: fused exports refuse
        return ", or ".join(w for w in (FP8_THEN_CT, onnx) if not w.startswith(f"export {refusing}"))
    regroup = f" --group-size {group}" if group else ""
    if any(f.ct_format is None for f in fs):  # w4a8-awq: no form, folded or not
        ct = f"re-quantize with --format int4-gptq (or int4-awq --awq-fold){regroup}, then "
    elif any(f.awq for f in fs) and not s.layout.get("awq_fold"):
        ct = f"quantize with --awq-fold{regroup}, then "
    else:
        ct = f"quantize with{regroup}, then " if group else ""
    ways = [f"{ct}export compressed-tensors (vLLM, SGLang, transformers)"]
    grouped = {group} if group else {modules[n].get("group") for ns in routed_linears(s).values() for n in ns
                                     if n in modules}
    if all(formats.FORMATS[f].trtllm_loads_experts(s.adapter.family) for f in routed) and \
            grouped == {TRTLLM_INT4_MOE_GROUP}:  # its INT4 fused MoE allocates groups of 128 only
        ways.append(f"{f'quantize with{regroup}, then ' if group else ''}export hf-modelopt "
                    "(TensorRT-LLM's PyTorch backend)")
    ways.append(onnx)
    ways = [w for w in ways if not w.startswith(f"export {refusing}")]
    return ", or ".join(ways)


# the exports a refused checkpoint is sent to, and who loads them
HF_MODELOPT = "use --format hf-modelopt (TensorRT-LLM's PyTorch backend)"
HF_FP8_BLOCK = "export hf-fp8-block (TensorRT-LLM's PyTorch backend, vLLM, SGLang{})"
CT = "export compressed-tensors (vLLM, SGLang, transformers)"
FP8_THEN_CT = f"quantize with --format fp8 (or fp8-dynamic), then {CT}"
FP8_THEN_HF_MODELOPT = "quantize with --format fp8, then export hf-modelopt (TensorRT-LLM's PyTorch backend)"


def modelopt_named_experts(s: Source, modules: dict) -> list[str]:
    """The routed experts' formats that no runtime loads under Model-Optimizer's names (Format.modelopt_moe_why:
    block FP8), which hf-modelopt refuses."""
    return sorted({m for m in (modules[n]["format"] for n in routed_names(s) if n in modules)
                   if formats.FORMATS[m].modelopt_moe_why})


def block_experts_route(s: Source, modules: dict) -> str:
    """Where block-FP8 routed experts go instead of hf-modelopt: hf-fp8-block (DeepSeek's names), which takes a
    quantize output whose linears are all block FP8 (a --rule giving some another format: after a plain
    re-quantize), or compressed-tensors."""
    return f"{_fp8_block_route(modules)}, or {ct_route(s, modules)}"


def _fp8_block_route(modules: dict) -> str:
    """hf-fp8-block, which takes a quantize output whose linears are all block FP8 (else after a re-quantize)."""
    fb = HF_FP8_BLOCK.format("")
    if any(formats.FORMATS[m["format"]].scale != "block" for m in modules.values()):
        return f"quantize with --format fp8-block, then {fb}"
    return fb


def fused_blocks_route(s: Source, modules: dict, bad: list[str], refusing: str) -> str:
    """Where block-FP8 linears go that vLLM fuses with partial blocks inside (fused_moe.partial_fused_blocks),
    which ``refusing`` (compressed-tensors, hf-modelopt) refuses: hf-fp8-block, whose config gives vLLM the block
    size that allows them, or another format for them and the linears fused with them (one --rule per parent
    module), then ``refusing`` again, or compressed-tensors where the routed experts stay in a format hf-modelopt
    refuses (block FP8: :func:`modelopt_named_experts`)."""
    fb = _fp8_block_route(modules)
    parents = sorted({re.sub(r"^.*?layers\.\d+\.", "", n).rpartition(".")[0] for n in bad})
    rules = " ".join(f"--rule '{p}.*=fp8-dynamic'" for p in parents)
    then = "compressed-tensors" if refusing == "hf-modelopt" and modelopt_named_experts(s, modules) else refusing
    return f"{fb}, or quantize them and the linears fused with them in another format ({rules}), then export {then}"


def ct_route(s: Source, modules: dict) -> str:
    """The compressed-tensors export of a quantized source where compressed-tensors takes it as it is, else of its
    per-tensor FP8 re-quantize (any width, no blocks): routed experts left unquantized or quantized unlike the rest
    of their layer, or block-FP8 parts that vLLM fuses not whole 128-row blocks (:func:`partial_fused_blocks`), are
    refused there (compressed_tensors.py ``_refuse_misread_experts``), as FP4 routed experts of widths its FP4
    fused-MoE kernels cannot run are (fused_moe.refuse_fp4_expert_widths), as formats of two compressed-tensors
    formats are (one per checkpoint: compressed_tensors.layout_schemes)."""
    cts = {getattr(formats.FORMATS.get(m["format"]), "ct_format", None) for m in modules.values()}
    takes = len(cts) == 1 and None not in cts and alike_experts(s, modules) and not partial_fused_blocks(s, modules)
    return CT if takes and not _fp4_experts_refused(s, modules) else FP8_THEN_CT


def _fp4_experts_refused(s: Source, modules: dict) -> bool:
    """Whether ``s``'s routed experts are stored in an FP4 format at widths the FP4 fused-MoE kernels cannot run,
    which both FP4 exports refuse (fused_moe.fp4_expert_widths_ok)."""
    fmts = {modules[n]["format"] for n in routed_names(s) if n in modules}
    fp4 = any(f in formats.FORMATS and formats.FORMATS[f].element == "fp4" for f in fmts)
    return fp4 and not fp4_expert_widths_ok(s)


def elsewhere(s: Source) -> str:
    """Where a checkpoint trtllm-ckpt refuses goes instead, as one clause naming only steps that take it (so
    that no hint is a dead end): INT4 from moepress quantize, :func:`int4_routes`; packed tensors with no
    moepress_quant.json (Kimi's own compressed-tensors INT4 / MXFP4), :func:`packed_routes`; block-FP8 routed
    experts that are not whole 128x128 blocks, which hf-modelopt refuses (fused_moe.refuse_partial_blocks), and
    bf16 or native block FP8 without moepress_quant.json, which it cannot read: hf-fp8-block, which keeps the
    former bf16 and takes the latter as they are; other scaled weights without it (FP8 per tensor, some linears
    bf16): re-quantized, as hf-modelopt exports only a quantize output; a format with no Model-Optimizer
    quant_algo (MXFP4): compressed-tensors; routed experts no runtime loads from a Model-Optimizer checkpoint
    (block FP8: Format.modelopt_moe_why): hf-fp8-block; else hf-modelopt."""
    if s.layout is None:
        bf16 = not any(n.endswith(".weight_scale") for n in s.reader.names())
        block = s.block_fp8 or (bf16 and fp8_block_grids(s))
        return packed_routes(s.reader) or (HF_FP8_BLOCK.format("") if block else FP8_THEN_HF_MODELOPT)
    ways = int4_routes(s, "trtllm-ckpt")
    if ways:
        return ways
    modules = s.layout.get("modules") or {}
    if any(formats.FORMATS[m["format"]].modelopt_entry is None for m in modules.values()):  # MXFP4: no quant_algo
        return ct_route(s, modules)
    try:
        refuse_partial_blocks(s, "trtllm-ckpt", modules)
        refuse_partial_input_groups(s, "trtllm-ckpt", modules)
    except MoepressError:
        return (HF_FP8_BLOCK.format("; it keeps the linears that are not whole 128x128 blocks bf16")
                if fp8_block_grids(s) else FP8_THEN_HF_MODELOPT)
    if modelopt_named_experts(s, modules):
        return block_experts_route(s, modules)
    return HF_MODELOPT


def onnx_route(blocks: set) -> str:
    """The onnx export as a route for INT4 linears stored in these blocks: a TensorRT engine where TensorRT takes
    every block (kernel_widths.TENSORRT_INT4_BLOCKS), otherwise onnxruntime (the export declares TensorRT's misload,
    and `moepress build` refuses it)."""
    if blocks and blocks <= set(TENSORRT_INT4_BLOCKS):
        return "export onnx (a TensorRT engine)"
    ok = " or ".join(map(str, TENSORRT_INT4_BLOCKS))
    return f"export onnx (onnxruntime; TensorRT takes INT4 blocks of {ok} only)"


def packed_names(reader) -> list[str]:
    """The tensors stored packed (compressed-tensors INT4 / FP4 ``weight_packed``, gpt-oss MXFP4 ``_blocks``)."""
    return sorted(n for n in reader.names() if n.endswith((".weight_packed", "_blocks")))


# the onnx export writes packed INT4 decoded (bf16 initializers without Q/DQ: onnx_export.py), so a TensorRT engine
# builds from it whatever its groups
PACKED_ONNX = "export onnx (decoded to bf16: onnxruntime or a TensorRT engine)"


def packed_routes(reader) -> str:
    """Where a checkpoint stored packed without moepress_quant.json goes (empty if none is packed): vLLM and SGLang
    load its compressed-tensors form as stored (hf-modelopt and compressed-tensors export only a moepress
    quantize output), onnx decodes packed INT4 (not FP4), and TensorRT-LLM's PyTorch backend takes it
    re-quantized to block FP8 under DeepSeek's names (hf-fp8-block; FP8 per tensor in hf-modelopt where the widths
    are not whole blocks) (it loads no DeepSeek-V3 / Kimi K2 INT4 experts moepress writes)."""
    packed = packed_names(reader)
    if not packed:
        return ""
    fp4 = any(reader.info(n).dtype == "U8" for n in packed)  # E2M1 pairs; INT4 packs into I32
    # block FP8 where the widths allow (fused_moe.refuse_partial_input_groups), then DeepSeek's names: hf-modelopt
    # refuses block-FP8 experts (Format.modelopt_moe_why)
    then = ("--format fp8-block, then export hf-fp8-block" if _whole_input_groups(reader)
            else f"--format fp8{_mla_rules(reader)}, then export hf-modelopt")
    return ("vLLM and SGLang load its packed compressed-tensors form as stored, or "
            + ("" if fp4 else f"{PACKED_ONNX}, or ")
            + f"quantize with {then} (TensorRT-LLM's PyTorch backend)")


def _mla_rules(reader) -> str:
    """The --rule flags that keep bf16 the MLA projections TensorRT-LLM's DeepSeek loader misreads in an hf-modelopt
    export of per-tensor FP8 (`moepress build` refuses it without them); empty for a model without MLA (no
    ``kv_lora_rank``: DeepSeek-V3 / Kimi K2's latent attention)."""
    return mla_rule_flags(per_tensor=True) if (reader.config or {}).get("kv_lora_rank") else ""


def _whole_input_groups(reader) -> bool:
    """Whether every decoder-layer linear's in_features is a multiple of 128 (what block FP8 needs), from the
    shard headers: a packed weight's columns hold 8 INT4 (I32) or 2 FP4 (U8) values."""
    per = {"I32": 8, "U8": 2}
    for n in reader.names():
        if ".layers." in n and n.endswith((".weight", ".weight_packed")) and not n.endswith(".mlp.gate.weight"):
            info = reader.info(n)
            cols = info.shape[-1] * (per.get(info.dtype, 1) if n.endswith("_packed") else 1)
            if len(info.shape) == 2 and cols % 128:
                return False
    return True


def fp4_routes(reader, fp4: str) -> str:
    """What follows the refusal of FP4 weights by an exporter that rewrites them tensor by tensor (trtllm-ckpt,
    onnx): a moepress quantize output goes to the exports that write its format (MXFP4: compressed-tensors
    only, compress/formats/mxfp4.py; NVFP4: hf-modelopt or compressed-tensors); FP4 stored packed without
    moepress_quant.json (a compressed-tensors MXFP4 release), which those two export only from a quantize
    output, to :func:`packed_routes`; FP4 under Model-Optimizer's names without it, to the runtimes that load it.
    """
    layout = formats.layout_of(reader)
    packed = packed_routes(reader) if layout is None else ""
    if packed:
        return f"; for this {fp4} checkpoint: {packed}"
    if layout is None:  # FP4 under Model-Optimizer's own names (a released NVFP4 checkpoint), not a quantize output
        return (f"; this {fp4} checkpoint has no moepress_quant.json, and hf-modelopt / compressed-tensors export "
                "only moepress quantize outputs: where it is a Model-Optimizer export (hf_quant_config.json), "
                "TensorRT-LLM's PyTorch backend, vLLM and SGLang load it as stored")
    if any(".experts." in d["module"] for d in layout.get("skipped", [])):  # both refuse it (refuse_mixed)
        return f"; {FP8_THEN_CT}"
    src = Source(Path(reader.path), reader, get_adapter(reader.config), layout)
    if _fp4_experts_refused(src, layout.get("modules") or {}):  # both refuse their widths
        return f"; {FP8_THEN_CT}"
    use = "compressed-tensors" if fp4 == "MXFP4" else "hf-modelopt or compressed-tensors"
    return f" (for {fp4} use --format {use})"
