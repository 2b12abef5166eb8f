"""The tiny MoE models bundled for tests and the default `moepress run` (trained offline by tools/train_tiny.py)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = ("tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3")
DEFAULT = "tiny-qwen3-moe"


def path(name: str = DEFAULT) -> Path:
    """Directory of a bundled model."""
    return HERE / name


def all_paths() -> list[Path]:
    return [path(n) for n in BUNDLED]


def resolve(arg: str) -> Path:
    """A checkpoint directory, or the name of a bundled model (e.g. ``tiny-qwen3-moe``)."""
    from moepress.errors import MoepressError

    p = Path(arg)
    if p.exists():
        return p
    if arg in BUNDLED:
        return path(arg)
    raise MoepressError(f"{arg}: no such checkpoint directory (bundled models: {', '.join(BUNDLED)})")
