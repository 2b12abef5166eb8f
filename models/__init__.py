"""The tiny MoE models bundled for tests and the default `moepress run` (trained offline by tools/train_tiny.py),
and test fixtures derived from them (``FIXTURES``: not in ``BUNDLED``, which the README and the default
run iterate; written by tools/make_odd_width.py, make_kimi_int4.py, make_mxfp4.py)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = ("tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3")
DEFAULT = "tiny-qwen3-moe"
# tiny-mixtral with expert width 192: not a multiple of the INT4 group / FP8 block size (128);
# tiny-deepseek-v3 stored as Kimi K2 Thinking ships (model_type kimi_k2, routed experts compressed-tensors
# pack-quantized INT4 group 32: tools/make_kimi_int4.py); tiny-qwen3-moe with compressed-tensors MXFP4
# experts (tools/make_mxfp4.py)
FIXTURES = ("tiny-mixtral-w192", "tiny-kimi-k2-int4", "tiny-qwen3-moe-mxfp4")


def path(name: str = DEFAULT) -> Path:
    """Directory of a bundled model or test fixture."""
    return HERE / name


def all_paths() -> list[Path]:
    return [path(n) for n in BUNDLED]


def resolve(arg: str) -> Path:
    """A checkpoint directory, or the name of a bundled model (e.g. ``tiny-qwen3-moe``)."""
    from moepress.errors import MoepressError

    p = Path(arg)
    if p.exists():
        return p
    if arg in BUNDLED or arg in FIXTURES:
        return path(arg)
    raise MoepressError(f"{arg}: no such checkpoint directory (bundled models: {', '.join(BUNDLED)}; test "
                        f"fixtures: {', '.join(FIXTURES)})")
