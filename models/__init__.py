"""The tiny MoE models bundled for tests and the default `moepress run` (trained by train_tiny.py)."""

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
