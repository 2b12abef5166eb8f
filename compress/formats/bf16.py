"""``bf16``: unquantized weights (what the planner sizes and the targets run everywhere)."""

from moepress.compress.formats.base import Format

FORMAT = Format(
    name="bf16", description="unquantized BF16 weights",
    element="bf16", scale=None, activation="none", archs=(80, 86, 89, 90, 100, 120),
    alternatives=(), stored=("weight",), stored_bytes=lambda out_f, in_f: 2 * out_f * in_f,
)
