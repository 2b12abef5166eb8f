"""`moepress build`, `targets`, `plan` (issue #7): GPU targets, deployment plans, engine builds."""

from __future__ import annotations

import json

import click

from moepress.cli.options import model_argument, output_options, progress_options, resolve_model
from moepress.errors import MoepressError

FORMAT_HELP = "bf16 | fp8 | fp8-block | fp8-dynamic | int4-awq | int4-gptq | w4a8-awq | nvfp4"


def _plan_options(f):
    f = click.option("--kv-cache-dtype", type=click.Choice(["bf16", "fp8", "nvfp4"]), default="bf16",
                     show_default=True, help="KV-cache dtype the plan budgets for.")(f)
    f = click.option("--max-batch", type=int, default=8, show_default=True,
                     help="Concurrent sequences the KV cache must hold.")(f)
    f = click.option("--max-seq-len", type=int, default=4096, show_default=True,
                     help="Tokens per sequence (prompt + output).")(f)
    f = click.option("--ep", type=int, default=None,
                     help="Expert-parallel size (divides the routed experts and --gpus; default: the largest "
                          "that does).")(f)
    f = click.option("--tp", type=int, default=None, help="Tensor-parallel size (= --gpus).")(f)
    f = click.option("--gpus", type=int, default=None,
                     help="GPU count (default: the smallest that holds the model: 1, 2, 4, 8, then whole nodes).")(f)
    f = click.option("--target", "target", required=True, metavar="TARGET",
                     help="GPU target (`moepress targets`), e.g. h100, h200, a100-80gb, l40s, b200.")(f)
    return f


@click.command("targets")
@click.option("--json", "json_out", is_flag=True, help="Print the catalog as JSON.")
def targets_cmd(json_out):
    """The GPU targets: compute capability, memory, bandwidth, interconnect, formats each runs."""
    from moepress.exporters.targets import TARGETS, render

    if json_out:
        click.echo(json.dumps({k: t.to_dict() for k, t in TARGETS.items()}, indent=2))
    else:
        click.echo(render())


@click.command("plan")
@model_argument
@_plan_options
@click.option("--format", "fmt", default=None, metavar="FORMAT",
              help=f"Weight format ({FORMAT_HELP}); default: the checkpoint's own.")
@click.option("--json", "json_out", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, target, gpus, tp, ep, max_seq_len, max_batch, kv_cache_dtype, fmt, json_out):
    """Does MODEL fit TARGET in FORMAT, on how many GPUs, with which TP / EP.

    MODEL: a checkpoint, a config-only directory or a config .json file (a pruned checkpoint's
    config counts its remaining experts). Bytes per GPU: weights (attention and dense parts split
    by TP, routed experts by EP), KV cache for --max-batch x --max-seq-len, activations, 10% reserve.
    """
    from moepress.exporters.plan import plan, render

    src = model if model.endswith(".json") else str(resolve_model(model))
    p = plan(src, target, fmt, gpus=gpus, tp=tp, ep=ep, max_seq_len=max_seq_len, max_batch=max_batch,
             kv_cache_dtype=kv_cache_dtype)
    click.echo(json.dumps(p.to_dict(), indent=2) if json_out else render(p))


@click.command("build")
@click.argument("artifact", metavar="ARTIFACT")
@_plan_options
@click.option("--builder", type=click.Choice(["trtllm-engine", "tensorrt", "trtllm-pytorch"]), default=None,
              help="Force a builder (default: from the export: trtllm-ckpt -> trtllm-engine, onnx -> tensorrt, "
                   "hf-modelopt -> trtllm-pytorch).")
@click.option("--reference", default=None, metavar="MODEL",
              help="The original model: planning source when the export does not name it, and the accuracy "
                   "check's reference.")
@click.option("--hardware-compatibility", type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
              default="none", show_default=True, help="TensorRT hardware-compatibility level (tensorrt builder).")
@click.option("--dry-run", is_flag=True, help="Plan and write the commands (build.sh, plan.json) without building.")
@output_options
@progress_options
def build_cmd(artifact, target, gpus, tp, ep, max_seq_len, max_batch, kv_cache_dtype, builder, reference,
              hardware_compatibility, dry_run, output, force, quiet, json_out):
    """Build ARTIFACT (a `moepress export` output) for one GPU TARGET into OUT.

    The export picks the builder. --dry-run prints the plan and the exact commands and writes them
    into OUT (build.sh, plan.json, build.json); a real build checks the GPU's compute capability
    against the target, runs the commands, records the manifest and checks the engine's accuracy.
    """
    from moepress.exporters.build import build, render
    from moepress.progress import Progress

    if reference is not None:
        reference = str(resolve_model(reference))
    prog = Progress(mode="json" if json_out else "quiet" if quiet else "human")
    res = build(artifact, target, output, dry_run=dry_run, builder=builder, gpus=gpus, tp=tp, ep=ep,
                max_seq_len=max_seq_len, max_batch=max_batch, force=force, reference=reference,
                kv_cache_dtype=kv_cache_dtype, hardware_compatibility=hardware_compatibility, progress=prog)
    click.echo(json.dumps(res, default=str) if json_out else render(res))


COMMANDS = [build_cmd, targets_cmd, plan_cmd]
__all__ = ["COMMANDS", "MoepressError"]
