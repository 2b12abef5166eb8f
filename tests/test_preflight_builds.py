"""Build plans `moepress build` refuses (a GPU count the heads or the ONNX engine cannot take, a trtllm-ckpt's world
size against build.gpus, max_seq_len past the model, a model that does not fit the target) are refused by run's
preflight, naming the recipe key, before any stage; they used to be recorded in refused.txt after prune, quantize
and export, and the run exited 0. The build itself is the oracle: each refused recipe's export is built and refused."""

from __future__ import annotations

import pytest
from test_run import write_recipe

from helpers import assert_one_line_error
from moepress import models
from moepress.calib.data import calibration_batches
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.exporters.build import build
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import normalise

MODEL = "tiny-qwen3-moe"  # 4 attention heads, 2 KV heads, 16 experts, max_position_embeddings 1024
FP8 = {"format": "fp8"}

# (export, build section, the build's own options, what the preflight's line says)
REFUSED = [
    ("onnx", {"targets": ["h100"], "gpus": 2}, {"gpus": 2},
     "build.targets h100 (onnx export): build.gpus 2: a TensorRT engine from the ONNX export runs on one GPU"),
    ("trtllm-ckpt", {"targets": ["h100"], "gpus": 2}, {"gpus": 2},
     "build.gpus 2: the trtllm-ckpt export is written for world size 1 (export.tp); expected build.gpus 1"),
    ("hf-modelopt", {"targets": ["h100"], "gpus": 3}, {"gpus": 3},
     "build.gpus 3: tp 3 does not divide the 4 attention heads"),
    ("hf-modelopt", {"targets": ["h100"], "max_seq_len": 4096}, {"max_seq_len": 4096},
     "build.max_seq_len 4096: "),
    # one token (prompt and output share the count) leaves none to generate: planned and built before
    ("onnx", {"targets": ["h100"], "max_seq_len": 1}, {"max_seq_len": 1}, "build.max_seq_len 1: expected at least 2"),
    ("trtllm-ckpt", {"targets": ["h100"], "max_seq_len": 1}, {"max_seq_len": 1},
     "build.max_seq_len 1: expected at least 2"),
    ("onnx", {"targets": ["l4"], "max_batch": 4096}, {"max_batch": 4096},
     "build.targets l4 (onnx export): the ONNX engine needs"),
    ("hf-modelopt", {"targets": ["l4"], "gpus": 1, "max_batch": 40960}, {"gpus": 1, "max_batch": 40960},
     "build.gpus 1: fp8 needs"),
    ("trtllm-ckpt", {"targets": ["l4"], "max_batch": 40960}, {"max_batch": 40960}, "export.tp 1: fp8 needs"),
]


def _preflight(**sections) -> None:
    raw = {"model": MODEL, "check": None, "quantize": FP8, **sections}
    preflight(normalise(raw), models.path(raw["model"]))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base, src = tmp_path_factory.mktemp("builds"), models.path(MODEL)
    q = base / "q"
    quantize_checkpoint(src, q, QuantConfig(format="fp8", sequential=False),
                        batches=calibration_batches(src, (), 2, 32, 0, 2))
    return {f: export(q, base / f, ExportConfig(format=f)) and base / f for f in ("onnx", "trtllm-ckpt", "hf-modelopt")}


@pytest.mark.parametrize("fmt,section,options,needle", REFUSED)
def test_a_plan_the_build_refuses_is_refused_before_any_stage(exports, tmp_path, fmt, section, options, needle):
    with pytest.raises(MoepressError) as e:
        _preflight(export={"formats": [fmt]}, build=section)
    assert str(e.value).startswith("recipe: build.targets ") and needle in str(e.value), str(e.value)
    with pytest.raises(MoepressError):  # the build of that export refuses it: the preflight asked what it will ask
        build(exports[fmt], section["targets"][0], tmp_path / "b", reference=models.path(MODEL), **options)


def test_plans_the_build_takes_pass(exports, tmp_path):
    """The default recipe's exports and targets; a trtllm-ckpt at tp 4 / ep 4 over the 8 experts a half prune
    keeps; an FP8 KV cache the quantize calibrates into the export halves the cache the fit budgets."""
    _preflight(prune={"ratio": 0.25}, export={"formats": ["hf-modelopt", "compressed-tensors", "onnx", "trtllm-ckpt"]},
               build={"targets": ["h100-sxm", "l40s", "b200"]})
    _preflight(prune={"ratio": 0.5}, export={"formats": ["trtllm-ckpt"], "tp": 4, "ep": 4}, build={"targets": ["h100"]})
    with pytest.raises(MoepressError, match="build.gpus 1: fp8 needs"):
        _preflight(export={"formats": ["hf-modelopt"]}, build={"targets": ["l4"], "gpus": 1, "max_batch": 24000})
    _preflight(quantize={**FP8, "kv_cache": "fp8"}, export={"formats": ["hf-modelopt"]},
               build={"targets": ["l4"], "gpus": 1, "max_batch": 24000})
    for fmt in exports:
        build(exports[fmt], "h100", tmp_path / fmt, reference=models.path(MODEL))


def test_onnx_beside_an_export_that_splits_keeps_its_refusal_recorded():
    """build.gpus is one count for every export; an onnx engine runs on one GPU, so its build beside an hf-modelopt
    on two is refused in the run's refused.txt, not the recipe."""
    _preflight(export={"formats": ["hf-modelopt", "onnx"]}, build={"targets": ["h100"], "gpus": 2})


def test_run_refuses_a_gpu_count_the_heads_cannot_split_before_the_prune(cli_run, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", model=MODEL, quantize=FP8, export={"formats": ["hf-modelopt"]},
                       build={"targets": ["h100"], "gpus": 3}, check=None)
    assert_one_line_error(cli_run("run", rec, "-o", tmp_path / "run"), "build.gpus 3: tp 3 does not divide")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("quantize,fmt", [
    # hf-fp8-block carries no KV cache: its build budgets the model's dtype, whatever the quantize calibrated
    ({"format": "fp8-block", "kv_cache": "fp8"}, "hf-fp8-block"),
    # one format beside linears a rule leaves unquantized: the build plans the export's quant_algo (fp8)
    ({"format": "fp8", "rules": {"self_attn.*": "none"}}, "hf-modelopt"),
])
def test_the_fit_is_planned_as_the_build_reads_the_export(tmp_path, quantize, fmt):
    """Both passed the preflight (an FP8 KV cache assumed; no plan for rules with `none`) and the build refused after
    every other stage: the build of the real export is the oracle."""
    src = models.path(MODEL)
    section = {"targets": ["h100"], "gpus": 1, "max_batch": 100000}
    with pytest.raises(MoepressError, match="build.gpus 1: .* needs"):
        _preflight(quantize=quantize, export={"formats": [fmt]}, build=section)
    rules = tuple((k, v) for k, v in quantize.get("rules", {}).items())
    q = tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format=quantize["format"], kv_cache=quantize.get("kv_cache"), rules=rules,
                                            sequential=False), batches=calibration_batches(src, (), 2, 32, 0, 2))
    export(q, tmp_path / fmt, ExportConfig(format=fmt))
    with pytest.raises(MoepressError, match="--gpus 1: .* needs"):
        build(tmp_path / fmt, "h100", tmp_path / "b", reference=src, gpus=1, max_batch=100000)


def test_a_real_build_this_machine_cannot_run_is_refused_before_any_stage(monkeypatch):
    """build.dry_run false where the build would find no CUDA device (or not the target's GPU, or its packages
    absent): refused naming the key, with what the build itself would say (exporters/environment.py); the run
    recorded each build refused after every other stage and exited 0. With the GPU and the packages there, taken."""
    from moepress.exporters import environment

    build_section = {"targets": ["h100"], "dry_run": False}
    monkeypatch.setattr(environment, "gpu_info", lambda: {})
    with pytest.raises(MoepressError) as e:
        _preflight(export={"formats": ["hf-modelopt"]}, build=build_section)
    assert str(e.value).startswith("recipe: build.dry_run false: build.targets h100 (hf-modelopt export, "), e.value
    assert "no CUDA device" in str(e.value) and "expected build.dry_run true" in str(e.value), e.value
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "sm": 90, "count": 1, "cuda": "12.8", "driver": "570"}
    monkeypatch.setattr(environment, "gpu_info", lambda: dict(h100))
    monkeypatch.setattr(environment, "_importable", lambda mod: True)
    _preflight(export={"formats": ["hf-modelopt"]}, build=build_section)
