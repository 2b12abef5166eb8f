"""What a preflight refusal of an export names instead (recipe.refuse_unavailable_exports): only quantize sections
and export formats this preflight takes, found by asking its own checks of each candidate, so that no refusal sends
a recipe to another refusal (tests/test_refusal_routes.py follows every one)."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.recipe import (
    expert_inputs,
    refuse_ct_expert_groups,
    refuse_ct_forms,
    refuse_fused_blocks,
    refuse_unavailable_exports,
)


def refuse_unquantized(recipe: dict, model: Path, exports: list[str], reg: dict) -> None:
    """An export of a moepress quantize output only (Exporter.quantized_only: hf-modelopt, compressed-tensors) in a
    recipe without a quantize section whose model is no quantize output either (the export refused it after prune),
    naming the quantize formats it takes (hints.plain_quantize)."""
    from moepress.exporters.hf_common import open_source
    from moepress.exporters.hints import plain_quantize

    for name in exports if recipe.get("quantize") is None else ():
        if getattr(reg.get(name), "quantized_only", ()) and (s := open_source(model)).layout is None:
            ways = [w.replace(" --group-size ", " with quantize.group_size ") for w in
                    (plain_quantize(s, f, name) for f in reg[name].quantized_only) if w] or ["fp8"]
            raise MoepressError(f"recipe export.formats {name}: it exports a moepress quantize output and the recipe "
                                f"has no quantize section; expected quantize.format "
                                f"{', '.join(ways[:-1])}{' or ' if ways[1:] else ''}{ways[-1]}")


def ct_ways(recipe: dict, model: Path | None, changes: list[tuple[str, dict]]) -> list[str]:
    """The ``changes`` (label, quantize keys) after which this preflight's compressed-tensors checks take the recipe,
    each with the quantize.group_size an INT4 format needs (the largest that quantizes the experts alike)."""
    from moepress.compress import formats
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quantize.config import GROUP_SIZES

    if model is None:
        return [label for label, _ in changes]
    reader = CheckpointReader(model)
    adapter = get_adapter(reader.config, reader.names())
    widths = expert_inputs(adapter) if adapter.experts_key() else []
    ways = []
    for label, change in changes:
        q = {**recipe["quantize"], **change}
        f = formats.FORMATS[q["format"]]
        for g in (None, *sorted(GROUP_SIZES, reverse=True)) if f.element == "int4" else (None,):
            r = {**recipe, "quantize": {**q, **({"group_size": g} if g else {})}}
            try:
                refuse_ct_forms(r, ["compressed-tensors"])  # no model: its refusal names no ways
                if f.scale == "block":
                    refuse_fused_blocks(r, model, ["compressed-tensors"])
                refuse_ct_expert_groups(r, ["compressed-tensors"], widths)
            except MoepressError:
                continue
            ways.append(label + (f" with quantize.group_size {g}" if g else ""))
            break
    return ways


def other_exports(recipe: dict, model: Path, fmt: str, reg: dict) -> str:
    """For the family refusal of export ``fmt``: the other exports this preflight takes of the recipe's quantize
    output (the exporter's own hint reads the model, which the quantize changes)."""
    ways = []
    for other in (x for x in reg if x != fmt):
        try:
            refuse_unavailable_exports({**recipe, "export": {**recipe["export"], "formats": [other]}}, model)
        except MoepressError:
            continue
        ways.append(other)
    q = recipe["quantize"]
    what = f"quantize.format {q['format']}" if q.get("format") and not q.get("rules") else "its quantize section"
    return (f"for this recipe ({what}): expected export.formats {', '.join(ways[:-1])}{' or ' if ways[1:] else ''}"
            f"{ways[-1]}" if ways else "")
