"""`moepress build`: turn an export into what runs on one GPU target.

Every build: the export's files say its kind (exporters/artifacts.py), which picks the builder
(exporters/builders/: ``trtllm-engine`` for trtllm-ckpt, ``tensorrt`` for onnx, ``trtllm-pytorch``
for hf-modelopt; ``--builder`` forces one of the same kind); plan (exporters/plan.py: format on
target, parallelism, memory) -> OUT/plan.json and OUT/build.sh (the exact commands) -> with
``dry_run`` stop there; otherwise check the GPU present (compute capability of the target,
enough devices) and the packages (exporters/environment.py), run, and record the manifest (GPU,
SM, driver, CUDA, TensorRT / TensorRT-LLM versions, flags, input hashes).

The accuracy check of a built engine against the original model is the caller's (the ``check``
argument: ``moepress build`` and ``moepress run`` pass the check stage, moepress/checks/); it
runs on the engine before OUT is complete, and its result is part of build.json.

Remote code: no generated script or command runs the checkpoint's own Python unless
``trust_remote_code`` was given (``--trust-remote-code``, recipes' ``build.trust_remote_code``);
without it, an export that a builder cannot load natively (``Builder.remote_code``, e.g.
exporters/builders/trtllm_pytorch.py) is refused before anything is written.

OUT is written as OUT.partial and renamed into place when complete; a failed build leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import moepress.exporters.kv_cache as kv_cache
from moepress.errors import MoepressError
from moepress.exporters import builders, environment
from moepress.exporters.artifacts import (
    artifact_dir,
    artifact_format,
    consumer_misload,
    declared_kv_refusal,
    detect_artifact,
    fixed_by_artifact,
    read_json,
    source_model,
)
from moepress.exporters.builders import BUILDERS, BuildConfig, Builder, Context
from moepress.exporters.builders.tensorrt_engine import HW_LEVELS
from moepress.exporters.plan import KVCacheRefused, Plan, check_sizes, plan
from moepress.exporters.plan import render as render_plan
from moepress.exporters.targets import Target, get_target
from moepress.manifest import MANIFEST_NAME, file_digests, read_manifest, resized, versions, write_manifest
from moepress.outputs import OutputLock, clear_retired, install, output_dir, refuse_existing

# (engine directory, reference model, progress) -> the check's record
Check = Callable[[Path, Path, object], dict]


@dataclass(frozen=True)
class BuildOptions:
    """What the caller asks of one build (``moepress build``'s flags, a recipe's build section)."""

    dry_run: bool = True
    builder: str | None = None  # None: the export's own
    gpus: int | None = None
    tp: int | None = None
    ep: int | None = None
    max_seq_len: int | None = None  # None: plan's default (4096, or the model's maximum if smaller)
    max_batch: int = 8
    force: bool = False  # replace a non-empty OUT
    reference: str | Path | None = None  # the original model (planning source, the check's reference)
    kv_cache_dtype: str = kv_cache.DEFAULT
    hardware_compatibility: str = "none"  # tensorrt builder only
    trust_remote_code: bool = False  # let generated scripts run the checkpoint's own Python (never implied)


@dataclass
class _Job:
    kind: str
    builder: Builder
    source: Path
    out: Path  # OUT as given
    ctx: Context


def _plan(artifact: Path, kind: str, t: Target, fmt: str, source: Path, o: BuildOptions, gpus, ep, kv,
          runtime: str) -> Plan:
    """The plan of the export's source on ``t``; its refusals name the export where the export fixed what
    was refused (its format, a trtllm-ckpt's GPU count), since the plan reads the source model only."""
    try:
        return plan(source, t, fmt, gpus=gpus, tp=o.tp, ep=ep, max_seq_len=o.max_seq_len, max_batch=o.max_batch,
                    kv_cache_dtype=kv, runtime=runtime, export=kind)
    except MoepressError as e:
        if str(e).startswith(f"the {kind} export is "):  # the format refusal: plan knows the source, not the export
            raise MoepressError(f"{artifact}: {e}") from None
        if kv != o.kv_cache_dtype and isinstance(e, KVCacheRefused):  # the export's own KV cache, not asked for
            raise declared_kv_refusal(artifact, e) from None
        if kind != "trtllm-ckpt" or not str(e).startswith(f"--gpus {gpus}:"):
            raise
        # the split is fixed by the export: suggest re-exporting for the GPU count that fits
        best = plan(source, t, fmt, max_seq_len=o.max_seq_len, max_batch=o.max_batch, kv_cache_dtype=kv,
                    runtime=runtime, export=kind)
        raise MoepressError(f"{artifact}: exported for world_size {gpus}, which cannot hold it on {t.gpu} "
                            f"({str(e).split(': ', 1)[1].split(': use')[0]}); re-export with `moepress export "
                            f"--format trtllm-ckpt --tp {best.gpus} --ep {best.ep}`") from None


def _resolve(artifact: Path, target: str | Target, out: Path, o: BuildOptions) -> _Job:
    """Everything a build needs to know before it writes: the export, builder, format and plan."""
    if not artifact.exists():
        raise MoepressError(f"{artifact}: no such export")
    t = target if isinstance(target, Target) else get_target(target)
    kind = detect_artifact(artifact)
    b = builders.choose(kind, o.builder, artifact)
    check_sizes({"--gpus": o.gpus, "--tp": o.tp, "--ep": o.ep})  # before an export's sizes are suggested
    if o.hardware_compatibility not in HW_LEVELS:
        raise MoepressError(f"--hardware-compatibility {o.hardware_compatibility}: expected none, ampere_plus "
                            f"or same_compute_capability")
    if o.hardware_compatibility != "none" and not b.hardware_compatibility:
        raise MoepressError(f"--hardware-compatibility {o.hardware_compatibility}: only a TensorRT engine built from "
                            f"an onnx export takes it; the {b.name} builder ({kind} export) would not apply it")
    if b.runtime == "onnx" and o.kv_cache_dtype != kv_cache.DEFAULT:  # would change the plan's words only
        raise MoepressError(f"--kv-cache-dtype {o.kv_cache_dtype}: a TensorRT engine from the ONNX export has no KV "
                            "cache (each call runs the whole sequence); expected no --kv-cache-dtype, or the "
                            "trtllm-ckpt / hf-modelopt exports")
    config = read_json(artifact_dir(artifact) / "config.json") or {}
    if b.remote_code is not None and not o.trust_remote_code:
        why = b.remote_code(artifact_dir(artifact), config)
        if why is not None:
            raise MoepressError(f"{why}; pass --trust-remote-code (a recipe: build.trust_remote_code: true) "
                                f"to let the build run it")
    bad = consumer_misload(artifact_dir(artifact), b.consumer) if b.consumer else None
    if bad is not None:
        raise MoepressError(f"{artifact_dir(artifact) / 'export.json'}: the export says {b.consumer} <= {bad[0]} "
                            f"{bad[1]}; quantize again as its consumer_notes say (the --rule flags or formats they "
                            f"name) and export that, or build for another runtime")
    source = source_model(artifact, kind, o.reference)
    if source is None:
        raise MoepressError(f"{artifact}: cannot find the model it was exported from (export.json has no "
                            f"existing source); pass --reference MODEL")
    source = source.resolve()
    if o.reference is not None:
        _refuse_other_reference(Path(o.reference), source)
    if source == artifact.resolve():  # an HF checkpoint export plans from its own config: checked against its tensors
        from moepress.compress.checkpoint import CheckpointReader
        from moepress.compress.stream import StreamedModel

        if (reader := CheckpointReader(source)).has_weights:  # (a config-only directory plans from the config)
            StreamedModel(reader, prefetch=False)
    fmt = artifact_format(artifact, kind, source)
    gpus, ep, kv = fixed_by_artifact(kind, artifact, config, o.gpus, o.ep, o.kv_cache_dtype)
    p = _plan(artifact, kind, t, fmt, source, o, gpus, ep, kv, b.runtime)
    if p.unloadable:
        raise MoepressError(f"{artifact}: {p.unloadable} (builder {b.name})")
    cfg = BuildConfig(t.name, b.name, fmt, gpus, o.tp, ep, p.max_seq_len, o.max_batch, kv, o.hardware_compatibility,
                      o.trust_remote_code)
    return _Job(kind, b, source, out, Context(artifact.resolve(), out.resolve(), t, p, cfg, config))


def _workdir(out: Path, force: bool) -> Path:
    """OUT.partial, empty; an existing OUT refused unless the build may replace it (outputs.refuse_existing)."""
    refuse_existing(out, force)
    work = out.with_name(out.name + ".partial")
    clear_retired(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _write(job: _Job, work: Path, o: BuildOptions, progress, check: Check | None) -> dict:
    """The plan, the builder's files and commands, a real build when asked, build.json and the manifest."""
    b, ctx = job.builder, job.ctx
    cmds = b.commands(ctx)
    extra, cmds = b.files(ctx, cmds)
    files = {"plan.json": json.dumps(ctx.plan.to_dict(), indent=2) + "\n", **extra}
    for fn, text in files.items():
        (work / fn).write_text(text)
        if fn.endswith(".sh"):
            os.chmod(work / fn, 0o755)
    result = {"builder": b.name, "artifact": str(ctx.artifact), "artifact_kind": job.kind, "source": str(job.source),
              "target": ctx.target.name, "format": ctx.cfg.format, "dry_run": o.dry_run,
              "commands": [shlex.join(c) for c in cmds], "plan": ctx.plan.to_dict(),
              "config": dataclasses.asdict(ctx.cfg), "out": str(job.out)}
    if not o.dry_run:
        result.update(_run(b, ctx, cmds, work, o.reference or job.source, progress, check))
    (work / "build.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _manifest(work, ctx, result)
    return result


def build(artifact: str | Path, target: str | Target, out: str | Path, cfg: BuildOptions | None = None, *,
          progress=None, check: Check | None = None, **flags) -> dict:
    """Plan and (unless ``cfg.dry_run``) build ``artifact`` for ``target`` into ``out``; returns build.json.

    ``flags``: :class:`BuildOptions` fields, for a call without an options object. ``check``: the
    accuracy check a real build runs on the engine it built (None: recorded as skipped).
    """
    if cfg is not None and flags:
        raise TypeError("build(): pass the options as cfg or as keywords, not both")
    o = cfg if cfg is not None else BuildOptions(**flags)
    out = output_dir(out, [Path(artifact)])
    job = _resolve(Path(artifact), target, out, o)
    _refuse_resized(artifact_dir(Path(artifact)))
    out.parent.mkdir(parents=True, exist_ok=True)  # as the other stages' -o (the lock file sits beside OUT)
    lock = OutputLock(out.with_name(out.name + ".partial.lock"),
                      f"{out}: another moepress process is writing it ({out}.partial is locked)")
    lock.acquire()
    try:
        work = _workdir(out, o.force)
        try:
            result = _write(job, work, o, progress, check)
            install(work, out)  # the old OUT moved aside whole, then replaced: never half-removed at OUT
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        lock.release()
    return result


def _refuse_resized(adir: Path) -> None:
    """An artifact whose files are no longer the sizes its manifest lists (a truncated copy): built, or planned
    with --dry-run, it would fail in the builder or record the manifest's hashes for other bytes."""
    bad = resized(adir)
    if bad:
        f, now, was = bad[0]
        raise MoepressError(f"{adir / f}: {'missing' if now is None else f'{now} bytes'}; its {MANIFEST_NAME} lists "
                            f"{was} bytes; expected the files `moepress export` wrote (export it again)")


def _manifest(work: Path, ctx: Context, result: dict) -> None:
    adir = artifact_dir(ctx.artifact)
    known = read_manifest(adir).get("files", {})
    # input hashes: the artifact's own manifest when it has one (hashing a 1 TB export again costs
    # minutes), else every file of it
    inputs = {k: v["sha256"] for k, v in known.items()} if known else \
        {k: v["sha256"] for k, v in file_digests(adir).items()}
    write_manifest(work, {"stage": "build", "config": dataclasses.asdict(ctx.cfg),
                          "inputs": {"artifact": str(ctx.artifact), "sha256": inputs},
                          "environment": result.get("environment", {}), "commands": result["commands"],
                          "versions": versions(), "files": file_digests(work)})


def _run_commands(b: Builder, ctx: Context, cmds: list[list[str]], work: Path) -> list[dict]:
    """The commands, which write into OUT, run against OUT.partial; their logs."""
    fin = str(ctx.out)
    logs = []
    for c in cmds:
        if b.server is not None and b.server in c:
            continue  # a server: the bundle starts it
        cc = [str(work) + a[len(fin):] if a.startswith(fin) else a for a in c]
        cc = [sys.executable if a == "python" else a for a in cc]  # this interpreter (its moepress, its tensorrt)
        r = subprocess.run(cc, capture_output=True, text=True)
        logs.append({"command": shlex.join(cc), "returncode": r.returncode, "stdout_tail": r.stdout[-4000:],
                     "stderr_tail": r.stderr[-4000:]})
        if r.returncode != 0:
            raise MoepressError(f"{cc[0]} failed (exit {r.returncode}): "
                                f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return logs


def _refuse_other_reference(ref: Path, source: Path) -> None:
    """--reference of another model than the export's (family, widths, vocabulary): the engine's accuracy check, after
    the build, would refuse it; a dry run never asked."""
    keys = ("model_type", "hidden_size", "vocab_size")
    a, b = ({k: (read_json(p / "config.json") or {}).get(k) for k in keys} for p in (ref, source))
    if diff := [k for k in keys if a[k] != b[k]]:
        raise MoepressError(f"--reference {ref}: {', '.join(f'{k} {a[k]!r}' for k in diff)}, where the export's source "
                            f"{source} has {', '.join(f'{k} {b[k]!r}' for k in diff)}; expected the model it was "
                            "exported from")


def _run(b: Builder, ctx: Context, cmds: list[list[str]], work: Path, reference: str | Path, progress,
         check: Check | None) -> dict:
    """A real build: environment check, the commands, the smoke / accuracy check."""
    gpu = environment.check_environment(b, ctx.target, ctx.plan.gpus,
                                        hardware_compatibility=ctx.cfg.hardware_compatibility)
    env = {**gpu, **environment.package_versions()}
    res = {"environment": env, "logs": _run_commands(b, ctx, cmds, work)}
    if b.finish is not None:
        res.update(b.finish(res["logs"]))
    elif check is None:
        res["accuracy"] = {"skipped": "no accuracy check was given (moepress build and moepress run check the engine)"}
    else:
        try:
            res["accuracy"] = check(work / "engine", reference, progress)
        except MoepressError as e:  # keep the built engine; the failed check is part of the record
            res["accuracy"] = {"passed": False, "error": str(e)}
    return res


def render(res: dict) -> str:
    p = Plan(**res["plan"])
    lines = [f"builder    {res['builder']} ({res['artifact_kind']} export {res['artifact']})",
             render_plan(p), "commands"] + [f"  {c}" for c in res["commands"]]
    extra = BUILDERS[res["builder"]].written
    lines.append(f"written    {res['out']}/build.sh, plan.json, build.json" + "".join(f", {f}" for f in extra))
    if not res["dry_run"]:
        acc = res.get("accuracy", {})
        lines.append(f"accuracy   {json.dumps(acc.get('gates', acc), default=str)[:200]}")
    return "\n".join(lines)


__all__ = ["BUILDERS", "BuildConfig", "BuildOptions", "Builder", "Context", "build", "detect_artifact", "render"]
