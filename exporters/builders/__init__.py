"""Builders: one module per builder, each declaring a :class:`~.base.Builder` (the export kind it
takes, its commands and hooks); they are assembled here. The export's kind picks the builder
(``--builder`` forces one of the same kind).

``tensorrt_engine`` is not a builder but the program the ``tensorrt`` builder runs
(``python -m moepress.exporters.builders.tensorrt_engine``).
"""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.exporters.builders import tensorrt, trtllm_engine, trtllm_pytorch
from moepress.exporters.builders.base import BuildConfig, Builder, Context

BUILDERS: dict[str, Builder] = {b.BUILDER.name: b.BUILDER for b in (trtllm_engine, tensorrt, trtllm_pytorch)}


def for_artifact(kind: str) -> Builder:
    """The builder of an export of kind ``kind`` (artifacts.detect_artifact)."""
    return next(b for b in BUILDERS.values() if kind in b.kinds)


def choose(kind: str, name: str | None, artifact: Path) -> Builder:
    """``--builder name`` (None: the export's own), refused unless it builds this kind of export."""
    if name is None:
        return for_artifact(kind)
    if name not in BUILDERS:
        raise MoepressError(f"--builder {name}: expected one of {', '.join(BUILDERS)}")
    if kind not in BUILDERS[name].kinds:
        raise MoepressError(f"--builder {name}: it builds from a {' or '.join(BUILDERS[name].kinds)} export, "
                            f"{artifact} is a {kind} export; use --builder {for_artifact(kind).name}")
    return BUILDERS[name]


__all__ = ["BUILDERS", "BuildConfig", "Builder", "Context", "choose", "for_artifact"]
