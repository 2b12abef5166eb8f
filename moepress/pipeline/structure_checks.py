"""Checks of run's preflight that ask the model's structure as a stage after the quantize would see it:
hf-fp8-block's 128x128 grids, trtllm-ckpt's tensor / expert parallel mapping, and the formats quantize rules give
against the build targets (moepress/pipeline/preflight.py calls them before any stage)."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.recipe import export_config, recipe_keys


def refuse_block_grid(recipe: dict, model: Path, exports: list[str]) -> None:
    """hf-fp8-block where no linear it would write in block FP8 has a 128x128 grid every runtime computes as stored
    (shape.block_linears): none the quantize section gives a block format, or, without one, none of a bf16 model.
    The export refuses that output (hf_fp8_block.export_hf_fp8_block), after the quantize."""
    from moepress.calib.config import CalibConfig
    from moepress.compress import formats
    from moepress.compress.quantize import QuantConfig
    from moepress.exporters.hf_common import open_source
    from moepress.exporters.hints import FP8_THEN_CT
    from moepress.exporters.shape import block_linears

    q = recipe.get("quantize")
    if "hf-fp8-block" not in exports or q is None and ((s := open_source(model)).layout is not None or s.block_fp8):
        return  # a quantize output or a block-FP8 checkpoint: the export asks its stored modules, as stored
    cfg = QuantConfig.from_recipe(q, CalibConfig.from_recipe(recipe["calib"])) if q is not None else None
    given = [(full, ok) for rel, full, ok in block_linears(model)
             if cfg is None or getattr(formats.FORMATS.get(cfg.format_of(rel, full) or ""), "scale", None) == "block"]
    if given and not any(ok for _, ok in given):
        what = "this quantize gives block FP8" if cfg is not None else f"of {model}"
        raise MoepressError(f"recipe export.formats hf-fp8-block: no linear {what} (e.g. {given[0][0]}) has a "
                            "128x128 block grid every runtime computes as stored; expected input widths (and routed "
                            f"experts' widths) that are multiples of 128: {FP8_THEN_CT}")


def refuse_mapping(recipe: dict, model: Path, stage, src: str = "recipe") -> None:
    """trtllm-ckpt's export.tp and export.ep against the model's heads, KV heads, expert width and the experts the
    prune keeps (``stage``: its PruneStage, None without one): trtllm_ckpt.check_mapping, which the export asks."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.trtllm_ckpt import SUPPORTED, check_mapping

    if "trtllm-ckpt" not in ((recipe.get("export") or {}).get("formats") or []):
        return
    if stage is not None:
        adapter = get_adapter(stage.adapter.config_with_experts(stage.budget.keep))
    else:
        reader = CheckpointReader(model)
        adapter = get_adapter(reader.config, reader.names())
    if adapter.family in SUPPORTED:  # another family: refuse_unavailable_exports names the exports it takes
        with recipe_keys(src, "export"):
            cfg = export_config(recipe["export"], "trtllm-ckpt")
            check_mapping(adapter, cfg.tp, cfg.ep)


def refuse_rule_formats(recipe: dict, src: str = "recipe") -> None:
    """A build target that cannot run a format quantize.rules give (targets.check_format; quantize.format itself is
    asked by refuse_unbuildable): the build refuses its export after the quantize."""
    from moepress.compress import formats
    from moepress.exporters.targets import TARGETS, get_target

    q = recipe.get("quantize") or {}
    given = [f for f in dict.fromkeys([q.get("format"), *(q.get("rules") or {}).values()])
             if getattr(formats.FORMATS.get(f or ""), "scale", None) is not None]
    for name in (recipe.get("build") or {}).get("targets") or ():
        t = get_target(name)
        for fmt in given[1:] if q.get("format") in given else given:  # quantize.format: refuse_unbuildable's
            if not t.supports(fmt):
                runs = [k for k, x in TARGETS.items() if all(x.supports(f) for f in given)]  # and the others
                other = f"a target that runs every format of the quantize ({', '.join(runs[:4])}), or " if runs else ""
                raise MoepressError(f"{src}: build.targets {name}: quantize.rules give {fmt}, which {t.gpu} (sm{t.sm}) "
                                    f"does not run; expected {other}rules of formats it runs")


def refuse_tensorrt_int4_blocks(recipe: dict, model: Path, src: str = "recipe") -> None:
    """An onnx export built for a target (TensorRT) of INT4 linears whose group is not a block TensorRT takes
    (kernel_widths.TENSORRT_INT4_BLOCKS: 64 or 128; a linear of fewer input features than the group is grouped by its
    width, compress/quant/int4.py effective_group, DeepSeek's 32-wide kv_b_proj input included): the build refuses
    the export after quantize and export."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quant.int4 import effective_group
    from moepress.compress.quantize import QuantConfig
    from moepress.compress.quantize.free import formatted_linears
    from moepress.compress.stream import StreamedModel
    from moepress.exporters.kernel_widths import TENSORRT_INT4_BLOCKS

    targets = (recipe.get("build") or {}).get("targets") or []
    if not targets or recipe.get("quantize") is None or "onnx" not in (recipe.get("export") or {}).get("formats", []):
        return
    cfg = QuantConfig.from_recipe(recipe["quantize"], CalibConfig.from_recipe(recipe["calib"]))
    bad, ins = {}, {}
    for _, rel, f, _, in_f, skip in formatted_linears(StreamedModel(model, prefetch=False), cfg.format_of,
                                                      cfg.group_size):
        if f.element == "int4":
            ins[rel] = in_f  # skipped at this group too: another group may quantize it
            if skip is None and (g := effective_group(in_f, cfg.group_size)) not in TENSORRT_INT4_BLOCKS:
                bad.setdefault(rel, (g, in_f))
    if bad:
        raise MoepressError(_int4_blocks_refusal(src, targets[0], bad, ins, cfg.group_size))


def _int4_blocks_refusal(src: str, target: str, bad: dict, ins: dict, group_size: int) -> str:
    """The refusal of INT4 groups TensorRT does not take (``bad``: linear -> (group, inputs); ``ins``: every INT4
    linear -> its inputs), naming the group size under which the most linears fall in TensorRT's blocks (inputs
    not a multiple of it are left bf16, as quantize does) and rules keeping bf16 those it would group otherwise
    (narrower inputs: one group per row); never advice that leaves no linear quantized (quantize refuses that)."""
    from moepress.compress.quant.int4 import effective_group
    from moepress.exporters.fused_moe import pattern
    from moepress.exporters.kernel_widths import TENSORRT_INT4_BLOCKS

    rel, (g, in_f) = next(iter(bad.items()))
    blocks = sorted(TENSORRT_INT4_BLOCKS, reverse=True)
    taken = {b: [r for r, i in ins.items() if effective_group(i, b) in blocks] for b in blocks}
    group = max(blocks, key=lambda b: (len(taken[b]), b))
    if not taken[group]:  # no group puts one linear in a block TensorRT takes
        ways = ["a quantize of other formats (quantize.format or quantize.rules)"]
    else:
        none = [r for r, i in ins.items() if effective_group(i, group) not in (*blocks, None)]
        ways = ([f"quantize.group_size {group}"] if group != group_size else []) + \
            ([f"quantize.rules {{{', '.join(f'{r}: none' for r in pattern(none).split(', '))}}}"] if none else [])
    return (f"{src}: build.targets {target}: the onnx export's TensorRT engine takes INT4 blocks of "
            f"{' or '.join(map(str, blocks))}, and this quantize groups {pattern([rel])} ({in_f} inputs) by {g}; "
            f"expected {' and '.join(ways)}, or onnx built for no target")
