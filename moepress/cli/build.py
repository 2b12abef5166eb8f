"""`moepress build`, `targets`, `plan`: GPU targets, deployment plans, engine builds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from moepress.cli.options import (
    TEXT,
    Command,
    measured,
    model_argument,
    output_options,
    progress_options,
    resolve_model,
)
from moepress.errors import CheckFailed, MoepressError
from moepress.exporters import kv_cache


class _RegistryOption(click.Option):
    """An option whose help text and choices come from a registry, read when the help is shown or the
    value checked: the format and builder registries import torch, which `moepress --help` should not."""

    def __init__(self, *args, help_text: Callable[[], str] | None = None,
                 choices: Callable[[], list[str]] | None = None, **kw):
        super().__init__(*args, **kw)
        self._help_text, self._choices = help_text, choices

    def _load(self) -> None:
        if self._help_text is not None:
            self.help = self._help_text()
        if self._choices is not None:
            self.type = click.Choice(self._choices())

    def get_help_record(self, ctx):
        self._load()
        return super().get_help_record(ctx)

    def type_cast_value(self, ctx, value):
        if value is not None:
            self._load()
        return super().type_cast_value(ctx, value)


def _format_help() -> str:
    from moepress.compress import formats

    return f"Weight format ({' | '.join(formats.FORMATS)}); default: the checkpoint's own."


def _builders() -> dict:
    from moepress.exporters.builders import BUILDERS

    return BUILDERS


def _builder_help() -> str:
    pairs = ", ".join(f"{' / '.join(b.kinds)} -> {b.name}" for b in _builders().values())
    return f"Force a builder (default: from the export: {pairs})."


def _hw_levels() -> list[str]:
    from moepress.exporters.builders.tensorrt_engine import HW_LEVELS

    return list(HW_LEVELS)


def _plan_options(f):
    f = click.option("--kv-cache-dtype", type=click.Choice(list(kv_cache.KV_CACHE)), default=kv_cache.DEFAULT,
                     show_default=True, help="KV-cache dtype the plan budgets for (bf16: the quantized cache the "
                                             "checkpoint or export declares, if any, as its runtime uses it).")(f)
    f = click.option("--max-batch", type=int, default=8, show_default=True,
                     help="Concurrent sequences the KV cache must hold.")(f)
    f = click.option("--max-seq-len", type=int, default=None,
                     help="Tokens per sequence (prompt + output), at most the model's max_position_embeddings "
                          "[default: 4096, or that maximum if smaller].")(f)
    f = click.option("--ep", type=int, default=None,
                     help="Expert-parallel size (divides the routed experts and --gpus; default: the largest "
                          "that does).")(f)
    f = click.option("--tp", type=int, default=None, help="Tensor-parallel size (= --gpus).")(f)
    f = click.option("--gpus", type=int, default=None,
                     help="GPU count (default: the smallest that holds the model: 1, 2, 4, 8, then whole nodes).")(f)
    f = click.option("--target", "target", required=True, metavar="TARGET",
                     help="GPU target (`moepress targets`), e.g. h100, h200, a100-80gb, l40s, b200.")(f)
    return f


@click.command("targets", cls=Command)
@click.option("--json", "json_out", is_flag=True, help="Print the catalog as JSON.")
def targets_cmd(json_out):
    """The GPU targets: compute capability, memory, bandwidth, interconnect, formats each runs."""
    from moepress.exporters.targets import TARGETS, render

    if json_out:
        click.echo(json.dumps({k: t.to_dict() for k, t in TARGETS.items()}, indent=2))
    else:
        click.echo(render())


@click.command("plan", cls=Command)
@model_argument
@_plan_options
@click.option("--format", "fmt", cls=_RegistryOption, default=None, metavar="FORMAT", help_text=_format_help)
@click.option("--bits", type=click.Choice(["4", "8"]), default=None,
              help="Without --format: plan the format TARGET runs for weights of this width (4 bits: NVFP4 on "
                   "Blackwell, INT4 AWQ before it), with the reason in the plan's notes.")
@click.option("--json", "json_out", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, target, gpus, tp, ep, max_seq_len, max_batch, kv_cache_dtype, fmt, bits, json_out):
    """Does MODEL fit TARGET in FORMAT, on how many GPUs, with which TP / EP.

    MODEL: a checkpoint, a config-only directory or a config .json file (a pruned checkpoint's
    config counts its remaining experts). Bytes per GPU: weights (attention and dense parts split
    by TP, routed experts by EP), KV cache for --max-batch x --max-seq-len, activations, 10% reserve.
    """
    from moepress.exporters.plan import KVCacheRefused, plan, render

    if fmt is not None and bits is not None:
        raise MoepressError(f"--bits {bits} with --format {fmt}: --bits chooses a format; give one of them")
    src = model if model.endswith(".json") else str(resolve_model(model))
    from moepress.exporters.artifacts import declared_kv_refusal, kv_cache_declared

    declared = None
    if kv_cache_dtype == kv_cache.DEFAULT and not model.endswith(".json"):  # as `moepress build` budgets it
        declared = kv_cache_declared(Path(src))  # the quantized KV cache the checkpoint says its runtime uses
        kv_cache_dtype = declared.name if declared is not None else kv_cache_dtype
    try:
        p = plan(src, target, fmt, gpus=gpus, tp=tp, ep=ep, max_seq_len=max_seq_len, max_batch=max_batch,
                 kv_cache_dtype=kv_cache_dtype, bits=int(bits) if bits else None)
    except KVCacheRefused as e:
        raise (declared_kv_refusal(Path(src), e) if declared is not None else e) from None
    click.echo(json.dumps(p.to_dict(), indent=2) if json_out else render(p))


def accuracy_check(engine, reference, progress=None) -> dict:
    """The check stage (moepress/checks/, kind ``engine``) on a built engine against the original model."""
    from moepress.checks.config import CheckConfig
    from moepress.checks.runner import run_check

    return run_check(engine, reference, CheckConfig(kind="engine"), progress=progress)


def build(artifact, target, out, cfg=None, *, progress=None, **flags) -> dict:
    """exporters.build.build with the engine's accuracy check after a real build (what `moepress build` runs)."""
    from moepress.exporters.build import build as build_artifact

    return build_artifact(artifact, target, out, cfg, progress=progress, check=accuracy_check, **flags)


@click.command("build", cls=Command)
@click.argument("artifact", metavar="ARTIFACT", type=TEXT)
@_plan_options
@click.option("--builder", cls=_RegistryOption, default=None, choices=lambda: list(_builders()),
              help_text=_builder_help)
@click.option("--reference", default=None, metavar="MODEL", type=TEXT,
              help="The original model: planning source when the export does not name it, and the accuracy "
                   "check's reference.")
@click.option("--hardware-compatibility", cls=_RegistryOption, default="none", show_default=True,
              choices=_hw_levels, help="TensorRT hardware-compatibility level (tensorrt builder).")
@click.option("--dry-run", is_flag=True, help="Plan and write the commands (build.sh, plan.json) without building.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let the generated scripts run the checkpoint's own Python code (config.json / "
                   "tokenizer_config.json auto_map); without it an export that needs it is refused.")
@output_options
@progress_options
def build_cmd(artifact, target, gpus, tp, ep, max_seq_len, max_batch, kv_cache_dtype, builder, reference,
              hardware_compatibility, dry_run, trust_remote_code, output, force, quiet, json_out):
    """Build ARTIFACT (a `moepress export` output) for one GPU TARGET into OUT.

    The export picks the builder. --dry-run prints the plan and the exact commands and writes them
    into OUT (build.sh, plan.json, build.json); a real build checks the GPU's compute capability
    against the target, runs the commands, records the manifest and checks the engine's accuracy.
    """
    from moepress.exporters.build import BuildOptions, render
    from moepress.progress import Progress

    if reference is not None:
        reference = str(resolve_model(reference))
    if trust_remote_code:  # refused by the flag only: a recipe's build.trust_remote_code is for all its builds
        _refuse_unused_remote_code(artifact, builder)
    prog = Progress.from_flags(quiet, json_out)
    opts = BuildOptions(dry_run=dry_run, builder=builder, gpus=gpus, tp=tp, ep=ep, max_seq_len=max_seq_len,
                        max_batch=max_batch, force=force, reference=reference, kv_cache_dtype=kv_cache_dtype,
                        hardware_compatibility=hardware_compatibility, trust_remote_code=trust_remote_code)
    # a real build checks the engine on the GPU: its peak is the GPU's (none on a dry run's CPU-only machine)
    from moepress.device import resolve

    res, memory = measured(resolve("auto"), lambda: build(artifact, target, output, opts, progress=prog))
    click.echo(json.dumps({"output": str(output), **res, "memory": memory}, default=str) if json_out
               else render(res))
    acc = res.get("accuracy") or {}
    if acc.get("passed") is False:  # the engine is kept (and recorded); the job fails as a check does
        raise CheckFailed(f"engine accuracy check failed: {engine_failure(acc)} ({res['out']})")


def _refuse_unused_remote_code(artifact: str, builder: str | None) -> None:
    """--trust-remote-code with a builder whose commands load no checkpoint code (TensorRT from ONNX, trtllm-build
    from a trtllm-ckpt): the flag would grant nothing, so it is refused as --hardware-compatibility is."""
    from pathlib import Path

    from moepress.exporters.artifacts import detect_artifact
    from moepress.exporters.builders import choose

    path = Path(artifact)
    if not path.exists():  # the build names it
        return
    kind = detect_artifact(path)
    b = choose(kind, builder, path)
    if b.remote_code is None:
        raise MoepressError(f"--trust-remote-code: the {b.name} builder ({kind} export) runs none of the "
                            "checkpoint's own code; expected no --trust-remote-code")


def engine_failure(acc: dict) -> str:
    """What failed in the engine's check: the check's own error, or its failing gates."""
    from moepress.checks.config import failure_line

    if acc.get("error"):
        return acc["error"]
    return failure_line(acc.get("gates") or [], acc.get("error_jump"), acc.get("layers"))


COMMANDS = [build_cmd, targets_cmd, plan_cmd]
__all__ = ["COMMANDS", "MoepressError", "accuracy_check", "build"]
