"""Run's preflight of the build section: each (target, export a builder takes) planned as `moepress build` will plan
it (exporters/plan.py), on the model as the prune leaves it, before any stage runs: a build the target refuses
stops the run before hours of prune, quantize and export, not after them."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.recipe import export_config

# the plan's option names (`moepress build`'s flags), as a recipe spells them; a trtllm-ckpt's GPU count is its
# export's world size (export.tp: moepress writes pp_size 1), its EP size export.ep
_KEYS = {"--max-seq-len": "build.max_seq_len", "--max-batch": "build.max_batch", "--gpus": "build.gpus"}
_CKPT_KEYS = {"--gpus": "export.tp", "--ep": "export.ep", "--tp": "export.tp"}
KV_CARRIED = ("hf-modelopt", "trtllm-ckpt")


def refuse_unplannable(recipe: dict, model: Path, stage, src: str = "recipe") -> None:
    """Each build target's plan of each export in export.formats that a builder takes: the GPU count (build.gpus, or a
    trtllm-ckpt's export.tp) against the target, the heads and the experts the prune keeps (``stage``: the preflight's
    PruneStage, None without a prune), build.max_seq_len against the model, and the fit on the target. Planned in the
    format the build reads of the export (:func:`planned_format`), every linear in it; where that is not one format
    the plan is left to the build, but for a trtllm-ckpt's world size."""
    from moepress.exporters.builders import BUILDERS
    from moepress.exporters.shape import model_shape

    b = recipe.get("build")
    exports = (recipe.get("export") or {}).get("formats") or []
    built = [(x, bd) for x in exports for bd in BUILDERS.values() if x in bd.kinds]
    if b is None or not b["targets"] or not built:
        return
    shape = model_shape(stage.adapter.config_with_experts(stage.budget.keep) if stage is not None else model)
    name = f"{model} (as the prune leaves it)" if stage is not None else str(model)
    splits = [x for x, bd in built if bd.runtime != "onnx"]
    fmts = {x: planned_format(recipe, model, x) for x, _ in built}
    gpu = None if b["dry_run"] else _gpu()  # asked once (nvidia-smi), not per target and export
    for target in b["targets"]:
        for export, builder in built:
            if builder.runtime == "onnx" and splits and b["gpus"] not in (None, 1):
                continue  # build.gpus is the other exports' count: the onnx build's refusal is recorded beside them
            try:
                gpus = _plan(recipe, shape, target, export, builder.runtime, fmts[export])
            except MoepressError as e:
                why = _recipe_words(str(e).removeprefix(f"--target {target}: "), export, name)
                raise MoepressError(f"{src}: build.targets {target} ({export} export): {why}") from None
            if gpu is not None:
                _refuse_missing(builder, target, gpus, gpu, export, src)


def _gpu() -> dict:
    from moepress.exporters import environment

    return environment.gpu_info()


def _refuse_missing(builder, target: str, gpus: int | None, gpu: dict, export: str, src: str) -> None:
    """A real build (build.dry_run false) this machine cannot run: no CUDA device, another GPU than the target's, too
    few of them, the builder's packages or commands absent (exporters/environment.py, as the build asks); the run
    recorded each such build refused after every other stage and exited 0."""
    from moepress.exporters import environment
    from moepress.exporters.targets import get_target

    try:
        environment.check_environment(builder, get_target(target), gpus or 1, gpu=gpu)
    except MoepressError as e:
        why = str(e).removesuffix(" (use --dry-run to write the plan and commands)")
        raise MoepressError(f"{src}: build.dry_run false: build.targets {target} ({export} export, {builder.name} "
                            f"builder): {why}; expected build.dry_run true (the plans and commands) on this machine") \
            from None


def _plan(recipe: dict, shape, target: str, export: str, runtime: str, fmt: str | None) -> int | None:
    """The build's plan (exporters/build.py _resolve), with what the export fixes: a trtllm-ckpt's world size and EP
    size, a KV cache the quantize calibrates into an export that carries it. ``fmt`` None (no one format the build
    reads of the export: :func:`planned_format`): the world size only. Returns the plan's GPU count (None: the build
    decides it)."""
    from moepress.exporters import kv_cache
    from moepress.exporters.plan import KVCacheRefused, plan

    b, q = recipe["build"], recipe.get("quantize") or {}
    gpus, ep = b["gpus"], None
    if export == "trtllm-ckpt":
        cfg = export_config(recipe["export"], export)
        if gpus is not None and gpus != cfg.tp:
            raise MoepressError(f"build.gpus {gpus}: the trtllm-ckpt export is written for world size {cfg.tp} "
                                f"(export.tp); expected build.gpus {cfg.tp}, or no build.gpus (the export fixes it)")
        gpus, ep = cfg.tp, cfg.ep
    if fmt is None:
        return gpus
    # the exports that carry a calibrated KV cache (artifacts.kv_cache_declared): hf-fp8-block and onnx hold none
    kv = q.get("kv_cache") if export in KV_CARRIED and q.get("kv_cache") in kv_cache.KV_CACHE else kv_cache.DEFAULT
    try:
        p = plan(shape, target, fmt, gpus=gpus, ep=ep, max_seq_len=b["max_seq_len"], max_batch=b["max_batch"],
                 kv_cache_dtype=kv, runtime=runtime, export=export)
    except KVCacheRefused as e:  # the recipe asks the KV cache by quantize.kv_cache, which the export carries
        if kv == kv_cache.DEFAULT:
            raise
        raise MoepressError(f"quantize.kv_cache {kv}: {e.why}; expected no quantize.kv_cache for this target") \
            from None
    if p.unloadable:
        raise MoepressError(p.unloadable)
    return p.gpus


def planned_format(recipe: dict, model: Path, export: str) -> str | None:
    """The weight format the build will plan ``export`` in (exporters/artifacts.artifact_format): hf-fp8-block's
    block FP8, the quantize's one format (rules leaving some linears unquantized beside it included), onnx's
    quantize.format (the layout's), hf-modelopt's routed experts' one format; None where that is not one format."""
    from moepress.exporters.fused_moe import routed_names
    from moepress.exporters.own_format import default_format
    from moepress.pipeline.one_format import as_one_format
    from moepress.pipeline.rule_layouts import planned_source

    if export == "hf-fp8-block":
        return "fp8-block"
    if recipe.get("quantize") is None:
        return default_format(model, ct=export != "onnx")
    q = as_one_format(recipe, model)["quantize"]
    if not q.get("rules") or export == "onnx":
        return q["format"]
    s = planned_source(recipe, model)
    given = {n: m["format"] for n, m in s.layout["modules"].items()}
    one = set(given.values())
    if len(one) > 1 and export == "hf-modelopt":  # MIXED_PRECISION: the plan reads the routed experts' quant_algo
        one = {f for n, f in given.items() if n in routed_names(s)}
    return one.pop() if len(one) == 1 else None


def _recipe_words(msg: str, export: str, name: str) -> str:
    """A plan's refusal in the recipe's keys: its flags as build (or a trtllm-ckpt's export) keys, its model as
    the recipe's."""
    for flag, key in ({**_KEYS, **_CKPT_KEYS} if export == "trtllm-ckpt" else _KEYS).items():
        msg = msg.replace(flag, key)
    return msg.replace("<config>", name)
