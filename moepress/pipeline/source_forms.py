"""Where a recipe has no quantize section, its exports take the model as it is stored (a prune keeps the stored
bytes of what it keeps): the preflight's checks of that stored form (moepress/pipeline/preflight.py asks them)."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError


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
                                f"has no quantize section; expected quantize.format {either(ways)}")


def refuse_stored_forms(model: Path, exports: list[str], reg: dict) -> None:
    """An export that refuses the model's stored form (``Exporter.refuse_input``: FP4 weights for onnx, a
    moepress_quant.json layout it does not write, packed tensors), in a recipe with no quantize section to change
    that form: the prune keeps the stored bytes and the layout of the experts it keeps, so the export would refuse
    its output too (short of a rule for some expert indices, whose experts the prune might all drop)."""
    for name in exports:
        check = getattr(reg.get(name), "refuse_input", None)
        if check is None:
            continue
        try:
            check(model)
        except MoepressError as e:
            raise MoepressError(f"recipe export.formats {name}: {str(e).removeprefix(f'--format {name}: ')}") from None


def either(ways: list[str]) -> str:
    """"a, b or c" (one way: "a")."""
    return ", ".join(ways[:-1]) + (" or " if ways[1:] else "") + ways[-1]
