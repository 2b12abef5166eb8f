"""Which formats a runtime takes on a target, and what a refused plan does instead: formats whose routed
experts TensorRT-LLM loads (its PyTorch backend), what a trtllm-ckpt holds (an engine), what an
hf-modelopt export holds; the refusal names a step that the planned artifact's builder takes
(``moepress build`` has no --format: a re-quantize or another export)."""

from __future__ import annotations

from moepress.compress import formats
from moepress.compress.quantize.config import GROUP_SIZES
from moepress.errors import MoepressError
from moepress.exporters.kernel_widths import block_ok, fp4_widths_ok, mla_rule_flags
from moepress.exporters.shape import ModelShape
from moepress.exporters.targets import UNQUANTIZED, FormatRefused, Target, check_format

# what a trtllm-ckpt holds (trtllm_ckpt.py _quant_algo), all an engine built from one (trtllm-engine) can be
TRTLLM_CKPT_FORMATS = (UNQUANTIZED, "fp8")
# what an onnx export holds (exporters/onnx_graph.py WRITES), all a TensorRT engine built from one can be
ONNX_FORMATS = (UNQUANTIZED, "fp8", "int4-awq", "int4-gptq", "w4a8-awq")


def check_runtime_format(t: Target, fmt: str, shape: ModelShape, runtime: str, export: str | None = None) -> None:
    """targets.check_format, suggesting only what the runtime takes: formats whose routed experts TensorRT-LLM
    loads (trtllm), what a trtllm-ckpt holds (trtllm-engine). An engine's format is its export's (``moepress
    build`` has no --format), so a refusal for an export names the export, not --format: a trtllm-ckpt, an
    onnx export, an hf-modelopt export (:func:`_check_hf_modelopt`)."""
    if runtime == "trtllm" and export == "hf-modelopt":
        return _check_hf_modelopt(t, fmt, shape)
    if runtime == "trtllm" and export == "hf-fp8-block":  # holds block FP8 only: another format is another export
        return _check_hf_modelopt(t, fmt, shape, kind="hf-fp8-block")
    if runtime == "trtllm":
        return check_format(t, fmt, lambda a: trtllm_experts_problem(shape, t, a) is None)
    if runtime == "trtllm-engine":
        return _check_held(t, fmt, "trtllm-ckpt", TRTLLM_CKPT_FORMATS)
    if export == "onnx":
        return _check_held(t, fmt, "onnx", ONNX_FORMATS)
    return check_format(t, fmt)


def _check_held(t: Target, fmt: str, kind: str, held: tuple[str, ...]) -> None:
    """check_format for an export of ``kind`` holding one of ``held``: the refusal names the export to make. A
    format the export cannot hold is refused first (a direct plan of an engine no export could feed)."""
    if fmt not in held:
        raise MoepressError(f"{kind} holds {', '.join(held)}, not {fmt}: quantize to one of those and export "
                            f"{kind}, or export the original model as a bf16 {kind}")
    _refuse_export(t, fmt, kind, lambda a: a in held, f"export the original model as a bf16 {kind}",
                   f" ({kind} holds {', '.join(held)})")


def _check_hf_modelopt(t: Target, fmt: str, shape: ModelShape, kind: str = "hf-modelopt") -> None:
    """targets.check_format for an hf-modelopt export (TensorRT-LLM's PyTorch backend): the refusal names a
    re-quantize to a format the export holds (a Model-Optimizer quant_algo, never bf16), whose experts
    TensorRT-LLM loads for this family and ``t`` runs; where none is, exports of the bf16 model ``t`` runs.
    ``kind``: the export handed to build (an hf-fp8-block export is refused so too, naming hf-modelopt)."""
    from moepress.exporters.trtllm_ckpt import SUPPORTED  # the families with a trtllm-build engine path

    why = formats.FORMATS[fmt].modelopt_moe_why if fmt in formats.FORMATS and shape.num_experts else ""
    if why and kind == "hf-modelopt":  # written by a moepress before hf-modelopt refused such experts
        raise MoepressError(f"the hf-modelopt export is {fmt}: {why}: export the quantized checkpoint as "
                            "hf-fp8-block instead")
    kinds = ("trtllm-ckpt (builder trtllm-engine) or " if shape.family in SUPPORTED else "") + "onnx (builder tensorrt)"
    _refuse_export(t, fmt, kind, lambda a: formats.FORMATS[a].modelopt_entry is not None
                   and not (shape.num_experts and formats.FORMATS[a].modelopt_experts_why(shape.family)),
                   f"no format an {'' if kind == 'hf-modelopt' else kind + ' or '}hf-modelopt export holds runs there "
                   f"with {shape.family} experts TensorRT-LLM loads; export the original bf16 model as {kinds}",
                   to="hf-modelopt", shape=shape)


def _refuse_export(t: Target, fmt: str, kind: str, ok, bf16_step: str, suffix: str = "",
                   to: str | None = None, shape: ModelShape | None = None) -> None:
    """check_format(t, fmt, ok), its refusal reworded for an export of ``kind`` (whose format ``build`` cannot
    change): the format check_format suggests becomes a re-quantize then this export again (or export ``to``);
    bf16 ``bf16_step``."""
    to = to or kind
    try:
        check_format(t, fmt, ok)
    except FormatRefused as e:
        why, alt = e.why, e.alt
        rules = mla_rules(shape, alt) if to == "hf-modelopt" and shape is not None else ""
        step = bf16_step if alt == UNQUANTIZED else \
            f"re-quantize the original model with --format {alt}{rules}, then export {to}" + \
            (" again" if to == kind else "")
        raise MoepressError(f"the {kind} export is {fmt}: {why}: {step}{suffix}") from None


def mla_rules(shape: ModelShape, fmt: str) -> str:
    """The --rule flags that keep bf16 what TensorRT-LLM's DeepSeek-V3 / Kimi K2 loader misreads in an hf-modelopt
    export of ``fmt`` (modelopt_misloads.trtllm_misloads, which `moepress build` refuses: export.json misloaded_by):
    the MLA kv_b_proj in any format, q_a / kv_a in FP8 per tensor or channel. Empty for a model without MLA."""
    if shape.kv_heads:  # MLA: its latent cache is not split in KV heads (shape.py)
        return ""
    return mla_rule_flags(formats.FORMATS[fmt].scale in ("tensor", "channel"))


def trtllm_experts_problem(shape: ModelShape, t: Target, fmt: str) -> str | None:
    """Why TensorRT-LLM's fused MoE cannot load this family's routed experts in ``fmt`` (the format
    registry's ``trtllm_moe_families``), naming a format that it can and ``t`` runs; None if it can."""
    f = formats.FORMATS[fmt]
    if not shape.num_experts or f.trtllm_loads_experts(shape.family):
        return None
    alts = [a for a in f.alternatives if t.supports(a) and formats.FORMATS[a].trtllm_loads_experts(shape.family)]
    alt = alts[0] if alts else UNQUANTIZED
    rules = mla_rules(shape, alt) if alt != UNQUANTIZED else ""
    block = "fp8-block"
    per_tensor = formats.FORMATS[alt].scale in ("tensor", "channel")
    # hf-fp8-block writes the linears of 128x128 grids only, and refuses a model with none (kimi-shaped widths 96)
    grid = any(block_ok((o, i), k == "routed") for k, o, i, _ in shape.linears) and t.supports(block)
    if rules and per_tensor and grid and formats.FORMATS[block].trtllm_loads_experts(shape.family):
        # per-tensor FP8 of an MLA model (DeepSeek-V3 / Kimi K2), which leaves its MLA projections bf16: its own
        # block FP8 under DeepSeek's names loads as it ships, no --rule (a 4-bit alternative keeps its rules)
        return (f"{f.trtllm_moe_why}, so {fmt} {shape.family} routed experts do not load; use {block} (export "
                f"hf-fp8-block) on {t.gpu}")
    return (f"{f.trtllm_moe_why}, so {fmt} {shape.family} routed experts do not load; use "
            f"{alt}{f' with{rules}' if rules else ''} on {t.gpu}")


def refuse_stored_formats(t: Target, shape: ModelShape, fmt: str, name: str) -> None:
    """A checkpoint planned in its own format whose --rules stored some linears in another: each such format
    against the target too (the checkpoint's headline format alone does not say what its experts need)."""
    if fmt != shape.stored_format:
        return
    others: dict[str, str] = {}
    for kind, _, _, f, _ in shape.stored:
        if f not in (fmt, UNQUANTIZED):
            others.setdefault(f, kind)
    for f, kind in sorted(others.items()):
        try:
            check_format(t, f)
        except MoepressError as e:
            raise MoepressError(f"{name}: its {kind} linears are stored {f} (a --rule): "
                                f"{str(e).removeprefix(f'--format {f}: ')}") from None


def vllm_only_int4(t: Target, fmt: str) -> str | None:
    """Why TensorRT-LLM does not run a checkpoint's own weight-only INT4 on ``t`` when vLLM does (None otherwise):
    TensorRT-LLM's matrix has no W4A16 on Blackwell, vLLM's W4A16 kernels (Marlin, compressed-tensors WNA16,
    capability 80+) run it there, as they serve Kimi K2 Thinking as it ships. So such a checkpoint is sized with a
    note, as on Hopper where TensorRT-LLM's fused MoE cannot load INT4 experts; a --format asked is still refused."""
    f = formats.FORMATS.get(fmt)
    if f is None or t.supports(fmt) or f.element != "int4" or f.activation != "none" or t.sm < 80:
        return None
    return (f"TensorRT-LLM runs {fmt} on sm{'/sm'.join(str(s) for s in f.archs)} only (its hardware support "
            f"matrix), not on sm{t.sm}")


def width_notes(shape: ModelShape, fmt: str) -> list[str]:
    """Notes on linears whose widths the runtimes' kernels do not compute in ``fmt`` (exporters/kernel_widths.py):
    block-FP8 linears hf-fp8-block keeps bf16 (ModelShape.rows), FP4 routed experts that the FP4 exports refuse."""
    notes, unblocked = [], shape.unblocked(fmt)
    if unblocked:
        what = ", ".join(f"{k} [{o}, {i}]" for k, o, i in unblocked)
        notes.append(f"hf-fp8-block keeps these bf16 (an input not in whole 128-wide groups, an expert width or a "
                     f"part of a fused q/k/v, gate/up or q_a/kv_a not whole 128-row blocks), counted bf16: {what}")
    notes += _int4_kept_notes(shape, fmt)
    fp4 = getattr(formats.FORMATS.get(fmt), "element", None) == "fp4"
    if shape.num_experts and fp4 and not fp4_widths_ok(shape.hidden_size, shape.moe_intermediate):
        notes.append(f"the FP4 fused-MoE kernels need the hidden size and expert width multiples of 64, one of 128 "
                     f"(here {shape.hidden_size} / {shape.moe_intermediate}): compressed-tensors and hf-modelopt "
                     f"refuse {fmt} routed experts; plan fp8 for them")
    return notes


def _int4_kept_notes(shape: ModelShape, fmt: str) -> list[str]:
    """An INT4 format planned from an unquantized model: the linears whose in_features its group does not divide
    (quantize leaves them bf16; compress/quant/int4.py effective_group), counted bf16, and the largest group size
    (quantize --group-size) that would quantize them all."""
    f = formats.FORMATS.get(fmt)
    if f is None or f.element != "int4" or shape.stored_format == fmt:
        return []
    group = shape.int4_group or max(GROUP_SIZES)
    kept = sorted({(k, i) for k, _, i, _ in shape.linears if i > group and i % group})
    if not kept:
        return []
    fits = [g for g in sorted(GROUP_SIZES, reverse=True) if all(i % g == 0 for _, i in kept)]
    way = f"; --group-size {fits[0]} quantizes them" if fits else ""
    return [f"{fmt} in groups of {group} leaves bf16 the linears whose inputs it does not divide, counted bf16: "
            f"{', '.join(f'{k} ({i} inputs)' for k, i in kept)}{way}"]
