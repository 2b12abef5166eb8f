"""``tensorrt``: a TensorRT engine from the ``onnx`` export with the ``tensorrt`` Python API
(exporters/builders/tensorrt_engine.py: strongly typed network, timing cache, optional
hardware-compatibility level), run as ``python -m moepress.exporters.builders.tensorrt_engine``;
build.sh also names the equivalent trtexec command.

The plan budgets the ONNX engine's memory (exporters/plan.py, runtime ``onnx``: one GPU, no KV
cache, experts computed densely).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from moepress.exporters.builders.base import Builder, Context, script


def commands(ctx: Context) -> list[list[str]]:
    onnx = ctx.artifact if ctx.artifact.is_file() else sorted(ctx.artifact.glob("*.onnx"))[0]
    hw = ctx.cfg.hardware_compatibility
    cmd = ["python", "-m", "moepress.exporters.builders.tensorrt_engine", str(onnx),
           str(ctx.out / "engine" / "model.engine"), "--max-batch", str(ctx.plan.max_batch),
           "--max-seq-len", str(ctx.plan.max_seq_len), "--timing-cache", str(ctx.out / "timing.cache"),
           "--hardware-compatibility", hw]
    return [["mkdir", "-p", str(ctx.out / "engine")], cmd]


def files(ctx: Context, cmds: list[list[str]]) -> tuple[dict[str, str], list[list[str]]]:
    """build.sh, with the trtexec equivalent of the build as a comment."""
    # imported here, not by this package's __init__: `python -m ...tensorrt_engine` runs that module as a
    # program, which must not find it already imported
    from moepress.exporters.builders.tensorrt_engine import trtexec_command

    p, out = ctx.plan, ctx.out.resolve()
    alt = " ".join(shlex.quote(c) for c in trtexec_command(
        Path(cmds[1][3]), out / "engine" / "model.engine", p.max_batch, p.max_seq_len, out / "timing.cache",
        ctx.cfg.hardware_compatibility))
    return {"build.sh": script(cmds, f"# equivalent with trtexec:\n# {alt}")}, cmds


BUILDER = Builder(
    "tensorrt", "onnx", commands, requires=("tensorrt",),
    install="tensorrt is not installed: pip install tensorrt (or moepress[tensorrt]) on a GPU machine",
    description="TensorRT engine from the onnx export (tensorrt Python API, strongly typed)",
    runtime="onnx", files=files, hardware_compatibility=True, consumer="tensorrt",
)
