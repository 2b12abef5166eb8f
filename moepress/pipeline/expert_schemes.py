"""What the exports that fuse a layer's routed experts (hf-modelopt, compressed-tensors) refuse of the routed experts'
quantization scheme, asked of a format, a group size and the expert shapes before any stage runs (the preflight's
``refuse_expert_schemes``; exporters/fused_moe.py refuses the same of the written checkpoint)."""

from __future__ import annotations

FP4_WIDTHS = ("the FP4 fused-MoE kernels of vLLM and TensorRT-LLM need both widths multiples of 64 and one of 128: "
              "exporters/kernel_widths.py")
TRTLLM_INT4_EXPERTS = ("TensorRT-LLM's INT4 fused MoE allocates groups of 128 only, and vLLM / SGLang load no "
                       "INT4 experts from a Model-Optimizer checkpoint: exporters/fused_moe.py "
                       "refuse_unloaded_expert_groups")
UNPACKED = "transformers reads the expert weights of a pack-quantized (INT4 / FP4) checkpoint only as packed weights"


def expert_scheme_problem(f, g: int, shapes: dict[str, tuple[int, int]], fused: list[str],
                          formats_run: set, family: str = "") -> tuple | None:
    """(export, what the quantize does to the routed experts, why the export refuses it) for format ``f`` at
    --group-size ``g`` on expert projections of ``shapes`` (name: (out, in)) of the model ``family``; None when the
    exports take it.
    ``formats_run``: the section's formats for the other linears (compressed-tensors refuses bf16 experts beside
    packed INT4 / FP4 linears only)."""
    from moepress.compress import formats
    from moepress.compress.quant.int4 import effective_group
    from moepress.exporters.fused_moe import FUSES_EXPERTS
    from moepress.exporters.kernel_widths import TRTLLM_INT4_MOE_GROUP, fp4_widths_ok

    skipped = {n: why for n, (o, i) in shapes.items() if (why := f.skip(o, i, g))}
    reasons = "; ".join(sorted(set(skipped.values())))
    groups = {n: effective_group(i, g) for n, (_, i) in shapes.items()} if f.element == "int4" else {}
    if skipped and len(skipped) < len(shapes):
        return fused[0], (f"leaves the routed experts' {', '.join(skipped)} unquantized ({reasons}) beside their "
                          f"quantized {', '.join(n for n in shapes if n not in skipped)}"), FUSES_EXPERTS[fused[0]]
    packs = any(getattr(formats.FORMATS.get(str(x)), "element", None) in ("int4", "fp4") for x in formats_run)
    if skipped and packs and "compressed-tensors" in fused:  # every projection: bf16 experts beside packed linears
        return "compressed-tensors", f"leaves every routed-expert projection unquantized ({reasons})", UNPACKED
    if not skipped and len(set(groups.values())) > 1:
        return fused[0], (f"with quantize.group_size {g} groups the routed experts' projections unlike each other "
                          f"({', '.join(f'{n}: group {x}' for n, x in groups.items())})"), FUSES_EXPERTS[fused[0]]
    # INT4 experts TensorRT-LLM loads at all (W4A8 of Mixtral / Qwen3-MoE; the others hf-modelopt refuses at any group)
    if not skipped and "hf-modelopt" in fused and f.trtllm_loads_experts(family) \
            and set(groups.values()) - {TRTLLM_INT4_MOE_GROUP}:
        return "hf-modelopt", (f"with quantize.group_size {g} groups the routed experts by "
                               f"{', '.join(map(str, sorted(set(groups.values()))))}"), TRTLLM_INT4_EXPERTS
    w, h = next(iter(shapes.values()))  # the gate projection: expert width out, hidden size in
    if not skipped and f.element == "fp4" and not fp4_widths_ok(h, w):
        return fused[0], f"gives routed experts of hidden {h} and expert width {w}", FP4_WIDTHS
    return None
