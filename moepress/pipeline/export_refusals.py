"""What the exports (those that fuse a layer's routed experts: hf-modelopt, compressed-tensors; and the others)
would refuse of a quantize not yet run: the preflight's checks (moepress/pipeline/preflight.py) asked of one quantize
section, for the standalone `moepress quantize` to say before it runs."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.preflight import (
    refuse_block_grid,
    refuse_ct_forms,
    refuse_expert_schemes,
    refuse_fused_blocks,
    refuse_modelopt_experts,
    refuse_written_formats,
)


def quantize_export_refusals(quantize: dict, model: Path) -> dict[str, str]:
    """What each export that fuses a layer's routed experts (hf-modelopt, compressed-tensors) would refuse of the
    quantize section ``quantize``'s output for ``model``, by export: first the experts' form (INT4 weight-only
    experts, which no runtime loads from a Model-Optimizer checkpoint; AWQ's unfolded pre_quant_scale, which
    compressed-tensors has no form for), then the widths (the routed experts' scheme, FP4 kernel widths, partial
    FP8 blocks); and each other export of the model's family: a format it does not write, and hf-fp8-block's
    block format given to no linear whose 128x128 grid every runtime computes: the preflight's checks of a recipe.
    A standalone `moepress quantize` says them before it runs, so that hours of quantizing are not followed by the
    export's refusal."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters import exporters
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
        except MoepressError as e:
            out[export] = str(e).removeprefix(f"recipe export.formats {export}: ").removeprefix(f"--format {export}: ")
    reg = exporters()
    for export in [e for e, x in reg.items() if e not in out and (x.families is None or adapter.family in x.families)]:
        try:  # the format it writes (trtllm-ckpt, onnx, hf-fp8-block: one each), then hf-fp8-block's grid
            refuse_written_formats(recipe, [export], reg)
            refuse_block_grid(recipe, model, [export])
        except MoepressError as e:
            out[export] = str(e).removeprefix(f"recipe export.formats {export}: ")
    return dict(sorted(out.items()))
