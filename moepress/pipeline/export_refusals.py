"""What the exports that fuse a layer's routed experts (hf-modelopt, compressed-tensors), and hf-fp8-block, would
refuse of a quantize not yet run: the preflight's checks (moepress/pipeline/preflight.py) asked of one quantize
section, for the standalone `moepress quantize` to say before it runs."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.preflight import (
    refuse_ct_forms,
    refuse_expert_schemes,
    refuse_fused_blocks,
    refuse_modelopt_experts,
)
from moepress.pipeline.rule_layouts import refuse_rule_layouts
from moepress.pipeline.structure_checks import refuse_block_grid


def quantize_export_refusals(quantize: dict, model: Path) -> dict[str, str]:
    """What each export that fuses a layer's routed experts (hf-modelopt, compressed-tensors) would refuse of the
    quantize section ``quantize``'s output for ``model``, by export: first the experts' form (INT4 weight-only
    experts, which no runtime loads from a Model-Optimizer checkpoint; AWQ's unfolded pre_quant_scale, which
    compressed-tensors has no form for), then the widths (the routed experts' scheme, FP4 kernel widths, partial
    FP8 blocks); and hf-fp8-block's: a block format given to no linear whose 128x128 grid every runtime computes.
    The preflight's checks of a recipe (rules of several formats: of the layout they write); an export that does not
    write the format at all is not named (every quantize would be told of it).
    A standalone `moepress quantize` says them before it runs, so that hours of quantizing are not followed by the
    export's refusal."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.fused_moe import FUSES_EXPERTS

    reader = CheckpointReader(model)
    adapter = get_adapter(reader.config, reader.names())
    recipe = {"calib": {}, "quantize": quantize}
    out = {}
    for export in FUSES_EXPERTS:
        try:  # the experts' form first: a family no group size makes loadable is not told to change its group size
            refuse_modelopt_experts(recipe, adapter, [export])
            refuse_ct_forms(recipe, [export], model)
            refuse_expert_schemes(recipe, [export], adapter)
            refuse_fused_blocks(recipe, model, [export])
            refuse_rule_layouts(recipe, model, [export])  # rules of several formats: the layout they write
        except MoepressError as e:
            out[export] = str(e).removeprefix(f"recipe export.formats {export}: ").removeprefix(
                f"recipe: export.formats {export}: ").removeprefix(f"--format {export}: ")
    try:  # a block format given to no linear hf-fp8-block writes in blocks (another format: not one it takes)
        refuse_block_grid(recipe, model, ["hf-fp8-block"])
    except MoepressError as e:
        out["hf-fp8-block"] = str(e).removeprefix("recipe export.formats hf-fp8-block: ")
    return dict(sorted(out.items()))
