"""Every alternative a refusal names is itself accepted for the same input, over the bundled models' matrix of
quantize format x export (run's preflight, the exports of the bf16 models and of a calibration-free quantize) and of
format x export x GPU target (build's format check): no refusal sends the user to another refusal.

The decision functions are called directly (no export is written): run's preflight (``refuse_unavailable_exports``)
is the oracle for "quantize with F (flags), then export X" (on these models it refuses exactly the default
quantize + export pairs the exporters refuse: REPORT of helper R, session 38), build's format check
(``check_runtime_format``) plus what a build refuses of an hf-modelopt export (``trtllm_misloads``) for "re-quantize
with F, then export X". Found by it: trtllm-ckpt sent fp8-dynamic to hf-modelopt (which refuses fp8-dynamic
experts); hf-modelopt and compressed-tensors of a bf16 model named w4a8-awq for DeepSeek, fp8-block for models
whose fused q/k/v or widths are no whole 128-row blocks, int4-gptq at a group DeepSeek's experts take two ways;
run's preflight named compressed-tensors formats it refuses itself, and hf-fp8-block to a DeepSeek recipe that
quantizes otherwise; build sent DeepSeek from hf-fp8-block on an L4 to an fp8 hf-modelopt export it refuses."""

from __future__ import annotations

import ast
import functools
import re

import pytest

from moepress import models
from moepress.compress import formats
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.exporters.runtime_formats import check_runtime_format
from moepress.exporters.shape import model_shape
from moepress.exporters.targets import TARGETS
from moepress.pipeline.preflight import refuse_unavailable_exports
from moepress.pipeline.recipe import normalise

MODELS = ("tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3")
EXPORTS = ("hf-modelopt", "hf-fp8-block", "compressed-tensors", "trtllm-ckpt", "onnx")
FORMATS = (None, *formats.produced())
RUNTIME = {"hf-modelopt": "trtllm", "hf-fp8-block": "trtllm", "trtllm-ckpt": "trtllm-engine", "onnx": "onnx"}
FMT = r"[\w-]+"


def _preflight(model: str, q: dict | None, ex: str) -> str | None:
    """run's preflight of quantize section ``q`` (None: no quantize) then export ``ex``: its refusal, or None."""
    return _preflight_of(model, repr(q), ex)


@functools.cache
def _preflight_of(model: str, q: str, ex: str) -> str | None:
    raw = {"model": model, "quantize": ast.literal_eval(q), "export": {"formats": [ex]}, "check": None}
    try:
        refuse_unavailable_exports(normalise(raw), models.path(model))
    except MoepressError as e:
        return str(e)
    return None


def _flags(flags: str) -> list[dict]:
    """Quantize changes for "--format F (or G, H --awq-fold) --group-size N --awq-fold --rule 'p=f'": one per format."""
    alts = re.sub(r"\(or ([^)]*)\)", "", flags)
    group = re.search(r"--group-size (\d+)", alts)
    base = {"group_size": int(group.group(1))} if group else {}
    rules = dict(r.split("=") for r in re.findall(r"--rule '([^']*)'", flags))
    if rules:
        base["rules"] = rules
    if "--awq-fold" in alts:
        base["awq_fold"] = True
    first = re.search(rf"--format ({FMT})", alts)
    out = [{**base, **({"format": first.group(1)} if first else {})}]
    for other in re.findall(r"\(or ([^)]*)\)", flags):
        for item in other.split(", "):
            f, own = item.split()[0], re.search(r"--group-size (\d+)", item)
            if f in formats.FORMATS:
                out.append({**{k: v for k, v in base.items() if k != "awq_fold"}, "format": f,
                            **({"awq_fold": True} if "--awq-fold" in item else {}),
                            **({"group_size": int(own.group(1))} if own else {})})
    return out


def _alternatives(msg: str, refusing: str) -> list[tuple[dict, str]]:
    """(quantize changes, export) for each way ``msg`` names: CLI steps ("quantize with FLAGS, then export X",
    "run moepress quantize --format F first", "export X", "use --format X") and recipe keys ("expected
    quantize.format F or G", "quantize.group_size N", "quantize.awq_fold: true", "export.formats X")."""
    hint, out = msg.split(": ", 1)[1], []
    for *flags, ex in re.findall(rf"quantize (?:with (.*?)|them and the linears fused with them in another format "
                                rf"\((.*?)\)), then export ({FMT})", hint):
        out += [(c, ex) for c in _flags(flags[0] or flags[1])]
    hint = re.sub(rf"quantize (?:with|them[^;]*?) [^;]*?, then export {FMT}", "", hint)
    for flags in re.findall(r"quantize with ([^;,]*)", hint):  # then this export again
        fmts = re.search(rf"--format ({FMT}(?: or {FMT})*)", flags)
        for f in fmts.group(1).split(" or ") if fmts else [None]:
            out += [(c, refusing) for c in _flags(re.sub(r"--format \S+( or \S+)*", f"--format {f}" if f else "",
                                                         flags))]
    hint = re.sub(r"quantize with [^;,]*", "", hint)
    for f in re.findall(rf"\(moepress quantize --format ({FMT})\)", hint):  # what the refusing export writes
        out.append(({"format": f}, refusing))
    for flags in re.findall(r"run moepress quantize (.*?) first", hint):
        out += [(c, refusing) for c in _flags(flags)]
    for names in re.findall(rf"(?:export|use --format|export\.formats) ({FMT}(?:(?:, | or ){FMT})*)", hint):
        out += [({}, ex) for ex in re.split(r", | or ", names) if ex in EXPORTS]
    out += [({}, ex) for ex in re.findall(rf"\(({FMT}) takes them\)", hint)]
    # a preflight's "expected" names recipe values (an export's describes what it writes: "expected bf16 or FP8 ...")
    expected = hint.rpartition("; expected ")[2] if msg.startswith("recipe") and "; expected " in hint else ""
    for item in re.split(r", or |, | or ", re.sub(r"\([^)]*\)", "", expected.removeprefix("one of "))):
        group = re.search(r"quantize\.group_size (\d+)", item)
        change = {"group_size": int(group.group(1))} if group else {}
        first = re.match(rf"(?:quantize\.format )?({FMT})", item)
        if item.startswith("quantize.awq_fold: true"):
            out.append(({"awq_fold": True, **change}, refusing))
        elif first and first.group(1) in formats.FORMATS:
            out.append(({"format": first.group(1), **change}, refusing))
        elif change:
            out.append((change, refusing))
    return [(c, ex) for c, ex in out if (c, ex) != ({}, refusing)]  # not the refusal's own subject


@functools.cache
def _shape(model: str):
    return model_shape(models.path(model))


@functools.cache
def _linears(model: str) -> list[tuple[str, str]]:
    from moepress.compress.quantize.free import model_linear_names
    from moepress.compress.stream import StreamedModel

    return model_linear_names(StreamedModel(models.path(model), prefetch=False))


@functools.cache
def _built(model: str, q: str, ex: str, target: str) -> str | None:
    """Why build refuses ``ex`` of ``model`` quantized as ``q`` for ``target`` (None: it plans it): the preflight,
    the format check and, for hf-modelopt, what TensorRT-LLM misreads (artifacts.consumer_misload)."""
    from moepress.exporters.hf_common import open_source
    from moepress.exporters.modelopt_misloads import trtllm_misloads

    q = eval(q)
    if (why := _preflight(model, q or None, ex)) is not None:
        return why
    fmt = q.get("format") or "bf16"
    try:
        check_runtime_format(TARGETS[target], fmt, _shape(model), RUNTIME[ex], ex)
    except MoepressError as e:
        return str(e)
    if ex != "hf-modelopt":
        return None
    cfg = QuantConfig(format=fmt, rules=tuple(q.get("rules", {}).items()))
    modules = {full: {"format": f} for rel, full in _linears(model) if (f := cfg.format_of(rel, full))}
    s = open_source(models.path(model))
    return "; ".join(trtllm_misloads(s, modules)) or None


def _build_alternatives(msg: str) -> list[tuple[dict, str]]:
    """(quantize, export) for "re-quantize the original model with FLAGS, then export X" and "export the original
    (bf16) model as (a bf16) X (builder B) or Y"."""
    out = [(c, ex) for flags, ex in re.findall(rf"re-quantize the original model with (.*?), then export ({FMT})", msg)
           for c in _flags(flags)]
    bf16 = re.search(r"export the original (?:bf16 )?model as (?:a bf16 )?(.*)", msg)
    names = re.split(r" or |, ", re.sub(r" ?\([^)]*\)", "", bf16.group(1))) if bf16 else []
    return out + [({}, ex) for ex in names if ex in EXPORTS]


def test_every_alternative_a_refusal_names_is_accepted(tmp_path):
    dead = []

    def follow(where: str, msg: str, model: str, q: dict | None, refusing: str, oracle=_preflight) -> None:
        assert len(msg.splitlines()) == 1, msg
        for change, ex in _alternatives(msg, refusing):
            q2 = {**(q or {}), **change, "rules": {**(q or {}).get("rules", {}), **change.get("rules", {})}}
            q2 = {k: v for k, v in q2.items() if v != {}} or None
            if (why := oracle(model, q2, ex)) is not None:
                dead.append(f"{where}: {msg}\n    -> {ex} after quantize {q2}: {why}")

    for model in MODELS:
        for f in FORMATS:
            for ex in EXPORTS:  # run's preflight
                q = {"format": f} if f else None
                if (msg := _preflight(model, q, ex)) is not None:
                    follow(f"run {model} {f} {ex}", msg, model, q, ex)
        # the exports themselves, of the bf16 model and of a calibration-free quantize
        for f, exports in ((None, ("hf-modelopt", "compressed-tensors")),
                           ("fp8-dynamic", ("hf-modelopt", "trtllm-ckpt"))):
            src = models.path(model)
            if f:
                quantize_checkpoint(src, src := tmp_path / f"{model}-{f}", QuantConfig(format=f))
            for ex in exports:
                try:
                    export(src, tmp_path / "out" / f"{model}-{f}-{ex}", ExportConfig(format=ex))
                except MoepressError as e:
                    follow(f"export {model} {f} {ex}", str(e), model, {"format": f} if f else None, ex)
                else:  # the oracle: what the preflight refuses, the export refuses
                    if _preflight(model, {"format": f} if f else None, ex) is not None:
                        dead.append(f"export {model} {f} {ex}: taken, though run's preflight refuses it")
        # build: what each export kind holds, on every target (an export the preflight refuses is never built)
        for f in ("bf16", *formats.produced()):
            for ex, runtime in RUNTIME.items():
                if _preflight(model, {"format": f} if f != "bf16" else None, ex) is not None:
                    continue
                for t in TARGETS:
                    try:
                        check_runtime_format(TARGETS[t], f, _shape(model), runtime, ex)
                    except MoepressError as e:
                        for change, to in _build_alternatives(str(e)):
                            if (why := _built(model, repr(change), to, t)) is not None:
                                dead.append(f"build {model} {f} {ex} {t}: {e}\n    -> {to} after quantize {change}: "
                                            f"{why}")
    assert not dead, "\n".join(dict.fromkeys(dead))


@pytest.mark.parametrize("kind, held", [("trtllm-ckpt", "TRTLLM_CKPT_FORMATS"), ("onnx", "ONNX_FORMATS")])
def test_the_planners_list_of_what_an_export_holds_is_what_its_exporter_writes(kind, held):
    """runtime_formats keeps its own tuples (the planner does not import the exporters, which import onnx): they
    must name exactly the formats the exporter's ``writes_format`` takes, and bf16."""
    from moepress.compress import formats
    from moepress.exporters import exporters, runtime_formats

    writes = exporters()[kind].writes_format
    expected = {f.name for f in formats.FORMATS.values() if writes(f)} | {runtime_formats.UNQUANTIZED}
    assert set(getattr(runtime_formats, held)) == expected
