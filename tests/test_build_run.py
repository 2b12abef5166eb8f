"""A real (not --dry-run) build's orchestration, with stand-ins for what needs a GPU.

Stand-ins, clearly not the real consumers: the GPU facts (an H100, as ``gpu_info`` reports one),
a ``trtllm-build`` script on PATH that writes what the real one writes (``rank{N}.engine`` +
``config.json`` in --output_dir, the timing cache), a ``tensorrt_llm`` package with ``LLM`` /
``SamplingParams`` / ``llmapi.KvCacheConfig`` for the smoke script, and the accuracy check (the
check stage's ``engine`` kind needs TensorRT). What is real: the commands moepress runs, where
they write (OUT.partial, renamed when complete), the logs, the manifest and build.json. The GPU
runs of the real tools are tests/test_build.py's ``gpu``-marked tests.
"""

import json
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import save_file

from moepress import models
from moepress.cli import build as B
from moepress.errors import MoepressError
from moepress.exporters import environment as E
from moepress.pipeline import preflight

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "sm": 90, "count": 8, "cuda": "12.8", "driver": "570.86"}

FAKE_TRTLLM_BUILD = """#!{python}
import argparse, json, os, sys
ap = argparse.ArgumentParser()
ap.add_argument("--checkpoint_dir"); ap.add_argument("--output_dir"); ap.add_argument("--output_timing_cache")
ap.add_argument("--workers", type=int)
a, rest = ap.parse_known_args()
if os.environ.get("FAKE_FAIL"):
    print("[TensorRT-LLM][ERROR] Assertion failed: out of memory", file=sys.stderr)
    sys.exit(1)
cfg = json.load(open(os.path.join(a.checkpoint_dir, "config.json")))
os.makedirs(a.output_dir, exist_ok=True)
for r in range(cfg["mapping"]["world_size"]):
    open(os.path.join(a.output_dir, "rank%d.engine" % r), "wb").write(b"engine")
with open(os.path.join(a.output_dir, "config.json"), "w") as f:
    json.dump({{"pretrained_config": cfg, "build_config": {{"flags": rest}}}}, f)
open(a.output_timing_cache, "wb").write(b"cache")
print("Total time of building all engines: 00:00:01")
"""

FAKE_TRTLLM = {
    "__init__.py": """
class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw
class _Out:
    def __init__(self, text):
        self.outputs = [type("C", (), {"text": text})()]
class LLM:
    def __init__(self, model, **kw):
        import json, os
        assert os.path.isfile(os.path.join(model, "hf_quant_config.json"))
        self.kw = kw
    def generate(self, prompts, params):
        return [_Out(" Paris tp=%d ep=%d" % (self.kw["tensor_parallel_size"], self.kw["moe_expert_parallel_size"]))]
""",
    "llmapi.py": """
class KvCacheConfig:
    def __init__(self, dtype="auto", **kw):
        self.dtype = dtype
""",
}


@pytest.fixture
def gpu_here(monkeypatch, tmp_path):
    """An H100 'present', tensorrt_llm 'importable', the stand-in trtllm-build on PATH, the check recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "trtllm-build"
    exe.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pkg = tmp_path / "site" / "tensorrt_llm"
    pkg.mkdir(parents=True)
    for name, text in FAKE_TRTLLM.items():
        (pkg / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setattr(E, "gpu_info", lambda: dict(H100))
    monkeypatch.setattr(E, "_importable", lambda mod: True)
    calls = []

    def check(engine, reference, progress=None):
        calls.append((engine, reference, sorted(p.name for p in engine.iterdir())))
        return {"passed": True, "kind": "engine"}

    monkeypatch.setattr(B, "accuracy_check", check)
    return calls


def _ckpt(d, source):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architecture": "MixtralForCausalLM", "dtype": "bfloat16",
        "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 2},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}, "moe": {"num_experts": 8, "top_k": 2}}))
    for r in range(2):
        save_file({"transformer.ln_f.weight": torch.ones(4)}, str(d / f"rank{r}.safetensors"))
    (d / "export.json").write_text(json.dumps({"format": "trtllm-ckpt", "source": str(source)}))
    return d


def test_trtllm_engine_real_build(gpu_here, tmp_path):
    src = models.path("tiny-mixtral")
    ckpt, out = _ckpt(tmp_path / "ckpt", src), tmp_path / "engine-h100"
    res = B.build(ckpt, "h100", out, dry_run=False)
    # the engine landed in OUT (built into OUT.partial, renamed when complete)
    assert sorted(p.name for p in (out / "engine").iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    assert (out / "timing.cache").read_bytes() == b"cache" and not (tmp_path / "engine-h100.partial").exists()
    # the check ran on the built engine, against the model the export came from
    (engine, reference, files), = gpu_here
    assert engine == tmp_path / "engine-h100.partial" / "engine" and reference == src.resolve()
    assert files == ["config.json", "rank0.engine", "rank1.engine"]
    assert res["accuracy"] == {"passed": True, "kind": "engine"}
    # the record: GPU facts, the command as run (into OUT.partial) and its exit status
    assert res["environment"]["sm"] == 90 and res["environment"]["gpu"] == H100["gpu"]
    log, = res["logs"]
    assert log["returncode"] == 0
    assert "--output_dir " + str(tmp_path / "engine-h100.partial" / "engine") in log["command"]
    assert "Total time of building" in log["stdout_tail"]
    written = json.loads((out / "build.json").read_text())
    assert written["dry_run"] is False and written["commands"] == res["commands"]
    m = json.loads((out / "moepress-manifest.json").read_text())
    assert m["environment"]["sm"] == 90 and "engine/rank0.engine" in m["files"]
    assert set(m["inputs"]["sha256"]) == {"config.json", "rank0.safetensors", "rank1.safetensors", "export.json"}


def test_failed_command_leaves_nothing(gpu_here, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    ckpt = _ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    with pytest.raises(MoepressError, match=r"^trtllm-build failed \(exit 1\): \[TensorRT-LLM\]\[ERROR\] Assertion "
                                            r"failed: out of memory$"):
        B.build(ckpt, "h100", tmp_path / "e", dry_run=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_wrong_gpu_refused_before_anything_runs(gpu_here, tmp_path):
    ckpt = _ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    with pytest.raises(MoepressError, match=r"this GPU is NVIDIA H100 80GB HBM3 \(sm90\), the target l40s is sm89"):
        B.build(ckpt, "l40s", tmp_path / "e", dry_run=False)
    assert not (tmp_path / "e").exists() and gpu_here == []


def test_trtllm_pytorch_smoke(gpu_here, tmp_path):
    d = tmp_path / "hfm"
    d.mkdir()
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}))
    res = B.build(d, "h100", tmp_path / "bundle", dry_run=False, gpus=2)
    # the smoke generation ran through the LLM API with the planned parallelism
    assert res["smoke"] == {"prompt": "The capital of France is", "text": " Paris tp=2 ep=2"}
    assert "trtllm-serve" not in " ".join(log["command"] for log in res["logs"])  # the server is serve.sh's job
    assert "trtllm-serve" in (tmp_path / "bundle" / "serve.sh").read_text()
    # the export's FP8 KV cache is what the plan budgets and the options name
    assert res["plan"]["kv_cache_dtype"] == "fp8"
    assert "  dtype: fp8" in (tmp_path / "bundle" / "extra_llm_api_options.yaml").read_text()
    assert gpu_here == []  # no engine to check: the smoke generation is the check


FAILED_CHECK = {"passed": False, "kind": "engine", "error_jump": None,
                "gates": [{"metric": "top1_agreement", "value": 0.5, "op": ">=", "threshold": 0.95,
                           "option": "--min-top1", "passed": False}]}


def test_an_engine_that_fails_its_check_fails_the_build(gpu_here, tmp_path, monkeypatch, cli_run):
    """Exit 1 as a failed `moepress check` (it was exit 0: a CI job built and shipped a failing engine); the
    engine and its record are kept."""
    monkeypatch.setattr(B, "accuracy_check", lambda engine, reference, progress=None: FAILED_CHECK)
    ckpt = _ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "out", "--quiet")
    assert r.exit_code == 1, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "engine accuracy check failed: top1_agreement 0.5 < min 0.95" in err[0], r.stderr
    assert (tmp_path / "out" / "engine" / "rank0.engine").is_file()
    assert json.loads((tmp_path / "out" / "build.json").read_text())["accuracy"]["passed"] is False


def test_run_fails_on_a_failed_engine_check_and_a_refusal_replaces_the_old_build(gpu_here, tmp_path, monkeypatch,
                                                                                 cli_run):
    import moepress.checks

    monkeypatch.setattr(moepress.checks, "run_check", lambda *a, **k: FAILED_CHECK)
    recipe = {"model": "tiny-mixtral", "check": None, "export": {"formats": ["trtllm-ckpt"], "tp": 2, "ep": 2},
              "build": {"targets": ["h100"], "max_seq_len": 512, "dry_run": False}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    r = cli_run("run", tmp_path / "r.yaml", "-o", tmp_path / "run", "--quiet")
    assert r.exit_code == 1 and "build:h100:trtllm-engine" in r.stderr, r.output
    built = tmp_path / "run" / "build" / "h100-trtllm-engine"
    assert (built / "engine" / "rank0.engine").is_file()
    # the same run with a build the target refuses: the refusal alone, not beside the earlier engine (the
    # preflight, switched off here, refuses this one before any stage: tests/test_preflight_builds.py)
    monkeypatch.setattr(preflight, "refuse_unplannable", lambda *a, **k: None)
    recipe["build"]["max_seq_len"] = 4_000_000_000
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    r = cli_run("run", tmp_path / "r.yaml", "-o", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in built.iterdir()) == ["refused.txt"]
