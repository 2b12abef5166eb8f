"""`moepress calib prepare | stats`."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import click

from moepress.cli.options import (
    FRACTION,
    PATH,
    Group,
    calib_options,
    device_option,
    measured,
    model_argument,
    model_label,
    output_options,
    progress_options,
    remember_output,
    resolve_model,
    run_measured,
    weight_only_notes,
)
from moepress.errors import MoepressError
from moepress.outputs import OutputLock, output_dir, refuse_existing, refuse_overlap


@click.group("calib", cls=Group)
def calib_group():
    """Calibration data (prepare a token file, reused by every stage) and routing statistics."""


def _prepare_text(path: Path, side: dict, cached: bool) -> str:
    srcs = "; ".join(f"{s['spec']}: {s['samples']} samples" for s in side["sources"])
    return (f"{path}: {side['num_samples']} samples x {side['seq_len']} tokens ({side['tokens']} tokens), "
            f"seed {side['seed']}, tokenizer {side['tokenizer']['sha256'][:12]}"
            f"{' (from the cache)' if cached else ''}; {srcs}")


@contextmanager
def _parent_folders(path: Path):
    """``path``'s folder, made for the command and removed again (the folders it made, while empty) where the
    command fails: a refused `calib prepare -o new/sub/t.safetensors` left new/sub behind."""
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # the deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as e:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, MoepressError):
            raise MoepressError(f"{path.parent}: cannot create the folder ({e.strerror})") from None
        raise


@calib_group.command("prepare")
@model_argument
@calib_options
@click.option("-o", "--output", "output", required=True, type=PATH, callback=remember_output,
              help="Token file to write: NAME.safetensors or NAME.pt, with NAME.<ext>.json describing it. "
                   "Any stage takes it back as --calib FILE, with the same --seq-len and at most its --num-samples.")
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
@progress_options
def prepare_cmd(model, calib, num_samples, seq_len, seed, trust_remote_code, output, force, quiet, json_out):
    """Tokenize and sample MODEL's calibration set into a token file (reused from the cache when it
    holds the same tokenizer, sources and parameters)."""
    from moepress.calib.data import calibration_set
    from moepress.progress import Progress

    src = resolve_model(model)
    if not output.name.endswith((".safetensors", ".pt")):
        raise MoepressError(f"-o {output}: expected a file name ending in .safetensors or .pt")
    # a .safetensors file inside the model would read as one of its shards; over a --calib file, it replaced its input
    from moepress.calib.sources import local_paths

    refuse_overlap(output, (src, *local_paths(calib)), "-o ")
    # held from the exists check to the rename: a second `prepare -o` of the same file at once is refused (both
    # wrote, one's samples were lost, and both said "wrote")
    lock = OutputLock(output.with_name(output.name + ".lock"),
                      f"-o {output}: another moepress process is writing it ({output.name}.lock is locked)")
    with _parent_folders(output):
        lock.acquire()
        try:
            prog = Progress.from_flags(quiet, json_out)
            cs, side, memory = _prepare(output, force, lambda: calibration_set(
                src, calib, num_samples, seq_len, seed, trust_remote_code, progress=prog))
        finally:
            lock.release()
    out = {"output": str(output), "path": str(output), "cached": cs.cached, **side, "memory": memory}
    click.echo(json.dumps(out) if json_out else _prepare_text(output, side, cs.cached))


def _prepare(output: Path, force: bool, build):
    """(calibration set, sidecar, memory) of the token file ``output`` that ``build()``'s set is written to: one that
    exists is refused without ``force`` (a sidecar of ours alone is what a run killed between the two writes left:
    no token file to keep; any other file by its name may be the user's)."""
    from moepress.calib.cache import orphan_sidecar, save_token_file
    from moepress.calib.sources import sidecar_path

    for p in (output, *(() if orphan_sidecar(output) else (sidecar_path(output),))):
        if p.exists() and not force:
            raise MoepressError(f"{p}: exists (pass --force to replace it)")
    if output.is_dir():
        raise MoepressError(f"{output}: is a directory; expected a file name ending in .safetensors or .pt")
    cs, memory = measured(None, build)
    meta = {k: v for k, v in cs.meta.items() if k != "file"}
    try:
        return cs, save_token_file(output, cs.input_ids, cs.source, meta), memory
    except OSError as e:
        raise MoepressError(f"{output}: cannot write ({e.strerror})") from None


@calib_group.command("stats")
@model_argument
@calib_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples per forward batch (under torchrun, whole batches are split across ranks).")
@click.option("--rare", type=FRACTION, default=0.1, show_default=True,
              help="An expert is rarely routed when its share of the routing slots is below RARE x the uniform "
                   "share 1/E.")
@click.option("--absmax", is_flag=True,
              help="Also write input_absmax.safetensors: per linear input, the max |x| per channel.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Compute dtype of the layer stream (routers stay float32 where the family keeps them so).")
@device_option
@output_options
@progress_options
def stats_cmd(model, calib, num_samples, seq_len, seed, trust_remote_code, batch_size, rare, absmax, dtype,
              device, output, force, quiet, json_out):
    """Routing statistics of MODEL over its calibration set, streamed one layer at a time.

    Writes OUT/stats.json (per MoE layer and expert: routed tokens, share of the layer's
    top-k routing slots (sums to 1 over the experts), gate-weight mass (the routing weights
    applied, DeepSeek's routed_scaling_factor included), mean expert output norm, REAP saliency
    and the tokens it counts; the summary; the calibration set),
    OUT/routing.safetensors (the float64 sums and co-selection counts, RoutingStats.load; under
    torchrun the sums are added per rank, so their last bits differ from one process's),
    OUT/heatmap.png (routing-slot share per layer x expert, never-routed experts marked) and
    OUT/summary.txt; prints the summary (JSON with --json).

    Under `torchrun --nproc_per_node N -m moepress calib stats ...` the batches are split
    across ranks and the statistics reduced (gloo on CPU, NCCL on GPUs); rank 0 writes.
    """
    import torch

    from moepress.calib import distributed as dist
    from moepress.calib.data import calibration_set
    from moepress.calib.stats import collect, render, summarize
    from moepress.progress import Progress

    # joined first: a rank refusing before it joined left the others waiting in the group's start-up
    env = dist.init(device=device)
    config = {"calib": list(calib), "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
              "batch_size": batch_size, "rare": rare, "absmax": absmax, "dtype": dtype}
    dist.agree(env, {**config, "force": force})
    src = resolve_model(model)
    from moepress.calib.sources import local_paths

    refuse_overlap(output, (src, *local_paths(calib)), "-o ")
    refuse_existing(output_dir(output), force)
    prog = Progress.from_flags(quiet or not env.is_main, json_out and env.is_main)
    for line in weight_only_notes(src):
        prog.info(line)
    cs = dist.run_main_first(env, lambda: calibration_set(src, calib, num_samples, seq_len, seed,
                                                          trust_remote_code, progress=prog))
    # the same tokens and the same weights on every rank (a relative path, another node's copy)
    dist.agree_on_read(env, "calibration samples", hashlib.sha256(cs.input_ids.numpy().tobytes()).hexdigest()[:16])
    dist.agree_on_input(env, src)
    batches = dist.shard(cs.batches(batch_size), env.rank, env.world_size)
    (stats, amax, facts), memory = run_measured(device, collect, src, batches, absmax=absmax, progress=prog,
                                                dtype=getattr(torch, dtype),
                                                share="rank 0's share: " if env.enabled else "")
    dist.all_reduce_routing(stats, env)
    if absmax:
        amax = dist.all_reduce_absmax(amax, env)
    summary = summarize(stats, rare)
    tokens = int(cs.input_ids.numel())
    text = render(summary, facts, tokens)
    if env.is_main:
        _write_stats(output, force, (model, src), config, cs, env.world_size,
                     (stats, amax if absmax else None, facts, summary, text))
        click.echo(json.dumps({"output": str(output), "tokens": tokens, "world_size": env.world_size,
                               **summary, "memory": memory}) if json_out else text + f"\nwrote {output}")
    dist.barrier(env)
    # on success only: after a lost peer, tearing the group down can abort this rank (SIGABRT) after its one-line
    # error; the CLI then leaves without it (calib.distributed.abandon)
    dist.shutdown()


def _write_stats(output, force, model_src, config, cs, world_size, measured) -> None:
    """OUT/stats.json, summary.txt, routing.safetensors, input_absmax.safetensors (with --absmax), heatmap.png and
    the manifest, renamed into place complete (CheckpointWriter). ``measured``: (stats, amax or None, facts,
    summary, the summary's text)."""
    from moepress.calib.heatmap import plot_share
    from moepress.calib.stats import per_expert
    from moepress.compress.checkpoint import CheckpointWriter

    (model, src), (stats, amax, facts, summary, text) = model_src, measured
    calib_meta = {k: v for k, v in cs.meta.items() if k != "file"}
    tokens = int(cs.input_ids.numel())
    title = f"{model_label(model, src)}: routing-slot share per layer x expert ({tokens} calibration tokens, " \
            f"top-{facts['top_k']})"
    with CheckpointWriter(output, force=force, sources=(src,)) as w:
        w.manifest.update({"stage": "calib-stats", "config": config,
                           "inputs": {"model": str(src), "calibration": calib_meta.get("key"),
                                      "calibration_tokens": tokens}, "world_size": world_size})
        w.write_json("stats.json", {"model": str(src), **facts, "world_size": world_size,
                                    "calibration": calib_meta, "summary": summary, "layers": per_expert(stats)})
        w.write_text("summary.txt", text + "\n")
        stats.save(w.partial / "routing.safetensors")
        if amax is not None:
            from safetensors.torch import save_file

            save_file(amax, str(w.partial / "input_absmax.safetensors"), metadata={"format": "moepress-input-absmax"})
        plot_share(stats, w.partial / "heatmap.png", title)


COMMANDS = [calib_group]
