"""The layout a quantize section's rules would write (moepress_quant.json's modules: each linear's format and group),
made from the model's linears before any stage, so that run's preflight asks each export's own refusals of it. Rules
that give several formats (or one format beside linears left unquantized) passed the preflight's checks of one
format, and the export refused the quantize output after prune and quantize."""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.recipe import recipe_keys

# what the exports' refusals name as their source: the output the quantize stage will write, not the model
OUTPUT = Path("the quantize output of these quantize.rules")


def planned_source(recipe: dict, model: Path):
    """``model`` as an export would open the quantize output of ``recipe``'s rules (exporters.hf_common.Source, the
    model's reader with the planned layout: a linear the rules give a format whose ``skip`` holds its shape is
    listed as the quantize stage lists it, else as skipped), or None for a quantize section without rules. Made
    once per quantize section and model: the preflight asks it of every export and build (a pass over every linear
    of the model each time, some 70,000 on Kimi K2)."""
    q = recipe.get("quantize") or {}
    if not q.get("rules"):
        return None
    config = Path(model) / "config.json"  # a model rewritten in place is planned again
    stamp = (config.stat().st_mtime_ns, config.stat().st_size) if config.is_file() else None
    return _planned(json.dumps([q, recipe["calib"]], sort_keys=True, default=str), str(model), stamp)


@functools.lru_cache(maxsize=4)
def _planned(sections: str, model: str, stamp):
    """:func:`planned_source` of the quantize and calib sections ``sections`` (JSON) for ``model`` as its config.json
    was at ``stamp``: the cache's key."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quant.int4 import effective_group
    from moepress.compress.quantize import QuantConfig
    from moepress.compress.quantize.free import formatted_linears
    from moepress.compress.stream import StreamedModel
    from moepress.exporters.hf_common import Source, open_source

    q, calib = json.loads(sections)
    cfg = QuantConfig.from_recipe(q, CalibConfig.from_recipe(calib))
    sm = StreamedModel(model, prefetch=False)
    modules, skipped = {}, []
    for i, rel, f, _, in_f, skip in formatted_linears(sm, cfg.format_of, cfg.group_size):
        full = sm.adapter.layer_prefix(i) + rel
        if skip is not None:
            skipped.append({"module": full, "reason": skip})
            continue
        # the group the stage records (compress/quantize/group.py: inputs per scale column)
        group = effective_group(in_f, cfg.group_size) if f.element == "int4" else \
            f.split_unit[1] if f.element == "fp4" else None
        modules[full] = {"format": f.name, **({"group": group} if group else {})}
    s = open_source(model)  # its messages name the output, not the model (whose tensors it reads)
    return Source(OUTPUT, s.reader, s.adapter, {"format": cfg.format, "modules": modules, "skipped": skipped,
                                                "awq_fold": cfg.awq_fold})


def refuse_rule_layouts(recipe: dict, model: Path, exports: list[str], src: str = "recipe") -> None:
    """Each export's refusals of the layout ``recipe``'s rules would write (:func:`planned_source`): a format it
    does not write (Exporter.writes_format), trtllm-ckpt's one quant_algo for every decoder linear, onnx's one
    format for a projection of every expert of a layer (it stacks them), compressed-tensors' and hf-modelopt's own
    checks of a layout (one compressed-tensors format, fused parts alike, experts alike)."""
    from moepress.exporters import exporters
    from moepress.exporters.compressed_tensors import layout_schemes
    from moepress.exporters.hf_modelopt import refuse_hf_modelopt

    s = planned_source(recipe, model)
    if s is None or not s.layout["modules"]:
        return
    modules, reg = s.layout["modules"], exporters()
    for x in exports:
        _refuse_unwritten(s, x, getattr(reg.get(x), "writes_format", None), src)
    with recipe_keys(src, "export"):
        if "trtllm-ckpt" in exports:
            _refuse_partly_quantized(s)
        if "onnx" in exports:
            _refuse_unlike_stacks(s)
        with _rules_decide():  # the exports' own lines, whose hints name formats and flags
            if "compressed-tensors" in exports:
                layout_schemes(OUTPUT, s)
            if "hf-modelopt" in exports:
                refuse_hf_modelopt(s, OUTPUT, modules)


@contextmanager
def _rules_decide():
    """An export's refusal of the layout, with what decides it: its hints name formats and flags, which a rule
    outranks."""
    try:
        yield
    except MoepressError as e:
        raise MoepressError(f"{e} (asked of the layout quantize.rules write: a rule outranks quantize.format, so "
                            "change the rules)") from None


def _refuse_unwritten(s, export: str, writes, src: str = "recipe") -> None:
    """A format the rules give that ``export`` does not write, naming the linears it goes to."""
    from moepress.compress import formats
    from moepress.exporters.fused_moe import pattern

    by_format: dict[str, list[str]] = {}
    for n, m in s.layout["modules"].items():
        by_format.setdefault(m["format"], []).append(n)
    bad = sorted(f for f in by_format if writes is not None and not writes(formats.FORMATS[f]))
    if bad:
        ok = [n for n, g in formats.produced().items() if writes(g)]
        raise MoepressError(f"{src}: export.formats {export}: quantize.rules give {bad[0]} to "
                            f"{pattern(by_format[bad[0]])}, which {export} does not write; expected rules of "
                            f"{' or '.join(ok)}, or {export} removed from export.formats")


def _refuse_partly_quantized(s) -> None:
    """trtllm-ckpt writes one quant_algo for every decoder linear but the routers
    (exporters/trtllm_refusals.refuse_partly_fp8): none left unquantized beside FP8 ones."""
    from moepress.exporters.fused_moe import pattern
    from moepress.exporters.hf_common import decoder_linears

    plain = [n for n in decoder_linears(s.reader, s.adapter) if n not in s.layout["modules"]]
    if plain:
        raise MoepressError(f"--format trtllm-ckpt: quantize.rules leave {len(plain)} decoder linears unquantized "
                            f"({pattern(plain)}) beside quantized ones; the export writes one quant_algo for every "
                            "linear but the routers: expected rules that quantize every decoder linear alike, or "
                            "hf-modelopt for mixed precision")


def _refuse_unlike_stacks(s) -> None:
    """onnx stacks a layer's experts into one weight per projection (exporters/onnx_graph.GraphBuilder.weight):
    every expert's projection in one format, or all of them unquantized."""
    from moepress.exporters.fused_moe import routed_linears

    for _, names in sorted(routed_linears(s).items()):
        by_proj: dict[str, dict[str, str]] = {}
        for n in names:
            proj = n.rsplit(".", 1)[1]
            by_proj.setdefault(proj, {})[n] = (s.layout["modules"].get(n) or {}).get("format", "unquantized")
        for kinds in by_proj.values():
            (a, fa), *rest = kinds.items()
            b, fb = next(((n, k) for n, k in rest if k != fa), (None, None))
            if b is not None:
                raise MoepressError(f"--format onnx: quantize.rules give {b} {fb} and {a} {fa}; the onnx export "
                                    "stacks a layer's experts, which takes one format for every expert: expected "
                                    "rules that give every expert of a layer the same format")
