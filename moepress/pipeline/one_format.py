"""A quantize section whose rules give every linear of the model one format, read as that format: the preflight's
export checks of one format (no rules) then ask it as the quantize stage will write it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moepress.errors import MoepressError


def as_one_format(recipe: dict, model: Path) -> dict:
    """``recipe`` with its quantize section's rules folded into quantize.format where they and the format give every
    linear of ``model`` the same one (``{"*": "fp8"}``: every export refuses the output as it refuses quantize.format
    fp8); else ``recipe`` itself."""
    from moepress.calib.config import CalibConfig
    from moepress.compress import formats
    from moepress.compress.quantize import QuantConfig
    from moepress.compress.quantize.free import model_linear_names
    from moepress.compress.stream import StreamedModel

    q = recipe.get("quantize") or {}
    if not q.get("rules"):
        return recipe
    cfg = QuantConfig.from_recipe(q, CalibConfig.from_recipe(recipe["calib"]))
    given = {cfg.format_of(rel, full) for rel, full in model_linear_names(StreamedModel(model, prefetch=False))}
    one = given.pop() if len(given) == 1 else None
    if one is None or one not in formats.FORMATS:
        return recipe
    return {**recipe, "quantize": {**q, "format": one, "rules": {}}}


@contextmanager
def read_as_one_format(recipe: dict, model: Path) -> Iterator[dict]:
    """:func:`as_one_format` of ``recipe``, for checks of one format; their refusal of a folded recipe says that the
    rules gave the format, and that the format it names replaces them (a rule outranks quantize.format)."""
    one = as_one_format(recipe, model)
    try:
        yield one
    except MoepressError as e:
        if one is recipe:
            raise
        raise MoepressError(f"{e} (quantize.rules give every linear {one['quantize']['format']}: replace them by "
                            "the quantize.format named)") from None
