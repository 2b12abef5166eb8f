"""Builders on hand-made artifact directories: detection, dry-run command lines, refusals, GPU tests."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import trtllm_ckpt
from moepress import models
from moepress.errors import MoepressError
from moepress.exporters.build import build, detect_artifact
from moepress.exporters.builders import trtllm_pytorch

KIMI = "tests/data/kimi-k2-config.json"


@pytest.fixture
def mixtral():
    return models.path("tiny-mixtral")


@pytest.fixture
def ckpt(tmp_path, mixtral):
    return trtllm_ckpt(tmp_path / "ckpt", mixtral)


@pytest.fixture
def onnx_dir(tmp_path):
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"\x08\x09")  # detection only looks at the name
    (d / "export.json").write_text(json.dumps({"format": "onnx", "source": str(models.path("tiny-qwen3-moe"))}))
    return d


def _modelopt(d, config: dict, algo="FP8_BLOCK_SCALES"):
    """An hf-modelopt export: HF config.json + hf_quant_config.json (modelopt's nested shape)."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None}}))
    return d


def _fp8_block(d, config: dict):
    """An hf-fp8-block export (or a released DeepSeek-V3 / Kimi K2 checkpoint): DeepSeek's block-FP8 config.json."""
    d.mkdir()
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return d


def test_detect(ckpt, onnx_dir, tmp_path):
    assert detect_artifact(ckpt) == "trtllm-ckpt"
    assert detect_artifact(onnx_dir) == "onnx"
    cfg = json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text())
    assert detect_artifact(_modelopt(tmp_path / "mo", cfg)) == "hf-modelopt"
    assert detect_artifact(_fp8_block(tmp_path / "fb", cfg)) == "hf-fp8-block"
    with pytest.raises(MoepressError, match="not a build input"):
        detect_artifact(models.path("tiny-mixtral"))
    per_tensor = tmp_path / "pt"  # transformers' FP8 config without blocks: not DeepSeek's block FP8
    per_tensor.mkdir()
    (per_tensor / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic"}}))
    with pytest.raises(MoepressError, match="not a build input"):
        detect_artifact(per_tensor)


def test_build_into_the_current_directory_keeps_it(ckpt, tmp_path, monkeypatch):
    """`moepress build ... -o . --force` renamed the current directory aside and removed it: the shell was left in a
    deleted directory and the build at a new one of the same name. Its entries are replaced in place, as the
    checkpoint writer does."""
    out = tmp_path / "here"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (out / "moepress-manifest.json").write_text("{}")  # an earlier output
    monkeypatch.chdir(out)
    build(ckpt, "h100", ".", force=True, dry_run=True)
    assert os.getcwd() == str(out) and os.path.samefile(".", out)
    assert (out / "build.json").is_file() and not (out / "old.txt").exists()
    assert not any(p.name.startswith("here.") for p in tmp_path.iterdir())  # no partial, nothing retired


def test_trtllm_engine_dry_run(cli_run, ckpt, tmp_path):
    out = tmp_path / "new" / "eng"  # a parent that does not exist yet is made (it failed on the lock file)
    r = cli_run("build", ckpt, "--target", "h100", "-o", out, "--dry-run", "--max-batch", "4", "--max-seq-len", "1000")
    assert r.exit_code == 0, r.output
    assert "trtllm-build" in r.output
    res = json.loads((out / "build.json").read_text())
    cmd = shlex.split(res["commands"][0])
    assert cmd[:5] == ["trtllm-build", "--checkpoint_dir", str(ckpt.resolve()), "--output_dir",
                       str((out / "engine").resolve())]
    flags = dict(zip(cmd[5::1], cmd[6::1], strict=False))
    assert flags["--max_batch_size"] == "4" and flags["--max_seq_len"] == "1000"
    assert flags["--max_num_tokens"] == "4000" and flags["--workers"] == "2"
    assert flags["--moe_plugin"] == "bfloat16" and flags["--gemm_plugin"] == "bfloat16"  # the checkpoint dtype
    # FP8 on sm90 but no FP8 KV cache: trtllm-build turns FP8 paged context FMHA off (tests/test_build_settings.py)
    assert "--use_fp8_context_fmha" not in flags
    assert "--gather_context_logits" in cmd  # the accuracy check reads context logits
    assert (out / "build.sh").read_text().splitlines()[-1] == res["commands"][0]
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["gpus"], plan["tp"], plan["ep"], plan["format"]) == (2, 2, 2, "fp8")
    m = json.loads((out / "moepress-manifest.json").read_text())
    assert m["stage"] == "build" and "rank0.safetensors" in m["inputs"]["sha256"]
    assert not (tmp_path / "new" / "eng.partial").exists()


def test_trtllm_engine_refusals(ckpt, tmp_path, mixtral):
    # the engine's format is the trtllm-ckpt's: suggest what a trtllm-ckpt holds, naming the export
    with pytest.raises(MoepressError, match=rf"^{re.escape(str(ckpt))}: the trtllm-ckpt export is fp8: FP8 needs "
                       r"sm89\+; A100 80GB SXM is sm80: export the original model as a bf16 trtllm-ckpt"):
        build(ckpt, "a100", tmp_path / "o1")
    with pytest.raises(MoepressError, match=r"--gpus 4: .* exported for world_size 2; use --gpus 2"):
        build(ckpt, "h100", tmp_path / "o2", gpus=4)
    bf16 = trtllm_ckpt(tmp_path / "bf16", mixtral, quant_algo=None, world=1, ep=1)
    res = build(bf16, "a100", tmp_path / "o3")
    assert "--use_fp8_context_fmha" not in res["commands"][0]
    assert not (tmp_path / "o1").exists()  # nothing written on a refusal
    # OUT not empty without --force
    with pytest.raises(MoepressError, match=r"output directory is not empty \(pass --force"):
        build(bf16, "a100", tmp_path / "o3")
    build(bf16, "l4", tmp_path / "o3", force=True)


def test_build_force_never_leaves_a_half_removed_build(cli_run, onnx_dir, tmp_path, monkeypatch):
    """--force over an earlier build removed OUT file by file before the new one was moved in: a kill
    meanwhile left a build.json / build.sh without their manifest at OUT."""
    from pathlib import Path

    import moepress.exporters.build as build_mod

    out = tmp_path / "b"
    args = ("build", onnx_dir, "--target", "l40s", "-o", out, "--dry-run", "--force")
    assert cli_run(*args).exit_code == 0
    files = sorted(p.name for p in out.iterdir())

    def remove_one_then_die(path, *a, **k):
        next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
        raise KeyboardInterrupt  # the kill, one file into the removal

    monkeypatch.setattr(build_mod.shutil, "rmtree", remove_one_then_die)
    cli_run(*args)
    assert sorted(p.name for p in out.iterdir()) == files  # the new build, whole


def test_tensorrt_dry_run(cli_run, onnx_dir, tmp_path):
    out = tmp_path / "trt"
    r = cli_run("build", onnx_dir, "--target", "l40s", "-o", out, "--dry-run", "--hardware-compatibility",
                "ampere_plus")
    assert r.exit_code == 0, r.output
    sh = (out / "build.sh").read_text()
    cmd = shlex.split(sh.strip().splitlines()[-1])
    assert cmd[:3] == ["python", "-m", "moepress.exporters.builders.tensorrt_engine"]
    assert cmd[3] == str((onnx_dir / "model.onnx").resolve())
    assert cmd[cmd.index("--hardware-compatibility") + 1] == "ampere_plus"
    assert cmd[cmd.index("--timing-cache") + 1] == str((out / "timing.cache").resolve())
    assert "# trtexec --onnx=" in sh and "--stronglyTyped" in sh and "--hardwareCompatibilityLevel=ampere+" in sh
    assert "--maxShapes=input_ids:8x1024" in sh


@pytest.mark.parametrize("model,algo,loads", [
    ("tiny-mixtral", "W4A16_AWQ", False), ("tiny-qwen3-moe", "W4A16_GPTQ", False),
    ("tiny-deepseek-v3", "W4A8_AWQ", False), ("tiny-mixtral", "W4A8_AWQ", True)])
def test_trtllm_pytorch_refuses_int4_experts_its_fused_moe_cannot_load(cli_run, tmp_path, model, algo, loads):
    """TensorRT-LLM's fused MoE runs INT4 experts only as W4A8 in Model-Optimizer's layout (DeepSeek-V3 /
    Kimi: its own W4A8_CUSTOM layout): the bundle was written for experts that would not load."""
    cfg = json.loads((models.path(model) / "config.json").read_text())
    art = _modelopt(tmp_path / "mo", cfg, algo)
    r = cli_run("build", art, "--target", "h100", "--reference", models.path(model), "-o", tmp_path / "b",
                "--dry-run")
    if loads:
        assert r.exit_code == 0, r.output
        return
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "routed experts do not load" in lines[0] and ("WInt4AFP8" in lines[0] or "W4A8_CUSTOM" in lines[0])
    assert not (tmp_path / "b").exists()


def test_trtllm_pytorch_bundle_kimi(cli_run, tmp_path):
    """Kimi K2 block-FP8 (an hf-fp8-block export, or Kimi K2 as released) on H200: 16 GPUs (2 nodes), tp 16,
    ep 16 (tests/test_plan.py's arithmetic)."""
    cfg = json.loads(open(KIMI).read())
    art = _fp8_block(tmp_path / "kimi-fp8", cfg)
    out = tmp_path / "bundle"
    r = cli_run("build", art, "--target", "h200", "-o", out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["builder"] == "trtllm-pytorch" and res["format"] == "fp8-block"
    serve = shlex.split(res["commands"][0])
    assert serve[:6] == ["mpirun", "-np", "16", "--npernode", "8", "trtllm-llmapi-launch"]
    s = serve[6:]
    assert s[:4] == ["trtllm-serve", str(art.resolve()), "--backend", "pytorch"]
    assert s[s.index("--tp_size") + 1] == "16" and s[s.index("--ep_size") + 1] == "16"
    assert s[s.index("--extra_llm_api_options") + 1] == str((out / "extra_llm_api_options.yaml").resolve())
    import yaml

    opts = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert opts["tensor_parallel_size"] == 16 and opts["moe_expert_parallel_size"] == 16
    assert opts["kv_cache_config"]["dtype"] == "auto"
    # the smoke generation build.sh runs (after the MPI launcher), against a stub tensorrt_llm
    smoke = shlex.split(res["commands"][-1])
    smoke = smoke[smoke.index("python"):]
    assert smoke == ["python", str((out / "smoke.py").resolve()), str(art.resolve())]
    calls, stdout = _run_smoke(tmp_path / "stub", smoke[1:])
    plan = json.loads((out / "plan.json").read_text())
    assert calls == [
        {"call": "LLM", "model": str(art.resolve()), "tensor_parallel_size": 16, "moe_expert_parallel_size": 16,
         "max_batch_size": plan["max_batch"], "max_seq_len": plan["max_seq_len"],
         "kv_cache_config": {"dtype": "auto"}},  # no trust_remote_code: the config has no auto_map
        {"call": "generate", "prompts": ["The capital of France is"],
         "sampling": {"max_tokens": 16, "temperature": 0.0}}]
    # what a real build records from the smoke run's last stdout line
    assert trtllm_pytorch.finish([{"stdout_tail": stdout}])["smoke"] == \
        {"prompt": "The capital of France is", "text": " Paris."}
    # the same export on L40S: block FP8 needs Hopper
    r = cli_run("build", art, "--target", "l40s", "-o", tmp_path / "b2", "--dry-run")
    assert r.exit_code == 2 and f"{art}: the hf-fp8-block export is fp8-block: FP8-BLOCK runs in TensorRT-LLM on " \
        "sm90/sm100 only (its hardware support matrix); L40S is sm89: re-quantize the original model with --format " \
        "fp8 --rule 'self_attn.kv_b_proj=none' --rule " \
        "'self_attn.q_a_proj=none' --rule 'self_attn.kv_a_proj_with_mqa=none', then export hf-modelopt" in r.output, \
        r.output  # the MLA projections TensorRT-LLM misreads kept bf16 (build refuses them: modelopt_misloads)
    # on A100 no format of either export runs DeepSeek experts: the refusal names both exports, then bf16 ones
    r = cli_run("build", art, "--target", "a100-80gb", "-o", tmp_path / "b3", "--dry-run")
    assert r.exit_code == 2 and "no format an hf-fp8-block or hf-modelopt export holds runs there with deepseek_v3 " \
        "experts TensorRT-LLM loads; export the original bf16 model as onnx (builder tensorrt)" in r.output, r.output


def test_hf_modelopt_block_fp8_experts_are_refused(cli_run, tmp_path):
    """TensorRT-LLM's fused MoE reads block-FP8 expert scales only as DeepSeek's weight_scale_inv
    (consumer_names.TRTLLM_MOE_BLOCK_SCALE), so an hf-modelopt export with block-FP8 experts (written by a
    moepress before export refused it) is refused by build in one line, naming hf-fp8-block."""
    art = _modelopt(tmp_path / "kimi-fp8", json.loads(open(KIMI).read()))
    r = cli_run("build", art, "--target", "h200", "-o", tmp_path / "b", "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "weight_scale_inv" in lines[0], r.output
    assert "export the quantized checkpoint as hf-fp8-block" in lines[0] and not (tmp_path / "b").exists()


# A stand-in for the part of TensorRT-LLM's LLM API that smoke.py calls (tensorrt_llm/llmapi/llm.py:
# LLM(model, **llm_args).generate(prompts, SamplingParams) -> [RequestOutput(.outputs[i].text)]); it
# records each call as one JSON line in $STUB_TRTLLM_LOG.
STUB = {
    "tensorrt_llm/__init__.py": """
        import json, os
        from types import SimpleNamespace

        def _record(**call):
            with open(os.environ["STUB_TRTLLM_LOG"], "a") as f:
                f.write(json.dumps(call) + "\\n")

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, model, **kw):
                kw = {k: getattr(v, "kw", v) for k, v in kw.items()}
                _record(call="LLM", model=model, **kw)

            def generate(self, prompts, sampling_params):
                _record(call="generate", prompts=prompts, sampling=sampling_params.kw)
                return [SimpleNamespace(outputs=[SimpleNamespace(text=" Paris.")]) for _ in prompts]
    """,
    "tensorrt_llm/llmapi.py": """
        class KvCacheConfig:
            def __init__(self, **kw):
                self.kw = kw
    """,
}


def _run_smoke(stub, argv: list[str]) -> tuple[list[dict], str]:
    """Run smoke.py with the stub tensorrt_llm first on the path: (recorded calls, stdout)."""
    for rel, text in STUB.items():
        (stub / rel).parent.mkdir(parents=True, exist_ok=True)
        (stub / rel).write_text(textwrap.dedent(text))
    log = stub / "calls.jsonl"
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stub), "STUB_TRTLLM_LOG": str(log)})
    assert p.returncode == 0, p.stderr
    return [json.loads(ln) for ln in log.read_text().splitlines()], p.stdout


def test_bad_input(cli_run, ckpt, onnx_dir, tmp_path):
    cases = [
        (("build", ckpt, "--target", "tpu-v5"), "--target tpu-v5: unknown GPU target"),
        (("build", ckpt, "--target", "h100", "--builder", "tensorrt"), "use --builder trtllm-engine"),
        (("build", tmp_path / "missing", "--target", "h100"), "no such export"),
        # the export's mapping fixes the split (the plan said ep 1 of an ep-2 engine)
        (("build", ckpt, "--target", "h100", "--ep", "1"), "--ep 1: " + str(ckpt) + " was exported with moe_ep_size 2"),
        (("build", ckpt, "--target", "h100", "--max-seq-len", "1025"), "has max_position_embeddings 1024"),
        (("build", onnx_dir, "--target", "h100", "--ep", "2"), "--ep 2: a TensorRT engine from the ONNX export"),
        # accepted before: build.sh byte for byte the bf16 one, the plan "KV cache fp8" beside "no KV cache"
        (("build", onnx_dir, "--target", "h100", "--kv-cache-dtype", "fp8"),
         "--kv-cache-dtype fp8: a TensorRT engine from the ONNX export has no KV cache"),
    ]
    for args, msg in cases:
        r = cli_run(*args, "-o", tmp_path / "x", "--dry-run")
        assert r.exit_code == 2, r.output
        assert msg in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, msg", [
    ({"mapping": {"world_size": "x"}}, "mapping.world_size 'x': expected a whole number >= 1"),
    ({"mapping": {"world_size": None}}, "mapping.world_size None: expected a whole number >= 1"),
    ({"mapping": "oops"}, "mapping 'oops': expected an object"),
    ({"mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 2}},
     "expected world_size = tp_size x pp_size x cp_size and moe_tp_size x moe_ep_size x moe_cluster_size = tp_size"),
    ({"mapping": {"world_size": 4, "tp_size": 4, "moe_ep_size": 4}}, "rank2.safetensors is missing"),
    ({"quantization": "fp8"}, "quantization 'fp8': expected an object"),
], ids=["world-str", "world-null", "mapping-str", "moe-tp-x-ep", "ranks-missing", "quantization-str"])
def test_a_malformed_trtllm_ckpt_config_is_one_line(cli_run, ckpt, tmp_path, edit, msg):
    """A hand-edited mapping or quantization of a trtllm-ckpt's config.json ended `build` in a ValueError,
    AttributeError or ZeroDivisionError traceback, exit 1."""
    p = ckpt / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **edit}))
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_an_hf_export_whose_config_disagrees_with_its_tensors_is_refused(cli_run, tmp_path):
    """An hf-modelopt export plans from its own config.json: one saying 24 experts beside tensors of 8 was planned
    (and its build written) with 24, exit 0."""
    from helpers import cli_quantized
    from moepress.exporters import ExportConfig, export

    q = cli_quantized(tmp_path / "q", "tiny-mixtral", "--format", "fp8", "--num-samples", "2", "--seq-len", "32")
    export(q, tmp_path / "e", ExportConfig(format="hf-modelopt"))
    assert cli_run("build", tmp_path / "e", "--target", "h100", "-o", tmp_path / "ok", "--dry-run").exit_code == 0
    p = tmp_path / "e" / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "num_local_experts": 24}))
    r = cli_run("build", tmp_path / "e", "--target", "h100", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "config.json says num_local_experts=24 but layer 0 stores 8 routed experts" in r.output


def test_a_mapping_with_keys_moepress_does_not_read_builds(cli_run, ckpt, tmp_path):
    """TensorRT-LLM's own Mapping.to_dict writes more than the sizes checked (rank, gpus_per_node, attention-DP
    fields, a moe_cluster_size): those are not refused."""
    p = ckpt / "config.json"
    c = json.loads(p.read_text())
    c["mapping"].update(rank=0, gpus_per_node=8, moe_cluster_size=1, attn_tp_size=-1, enable_attention_dp=False)
    p.write_text(json.dumps(c))
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 0, r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_real_build_without_gpu_exits_2(cli_run, ckpt, onnx_dir, tmp_path):
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "e")
    assert r.exit_code == 2
    assert "no CUDA device" in r.output and "tensorrt_llm is not installed: pip install moepress[trtllm]" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    r = cli_run("build", onnx_dir, "--target", "l4", "-o", tmp_path / "t")
    assert r.exit_code == 2 and "tensorrt is not installed" in r.output


# ---- GPU integration (skipped here: no CUDA device / TensorRT) ---------------------------------

def _has(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _local_target():
    from moepress.exporters.environment import gpu_info
    from moepress.exporters.targets import TARGETS

    sm = gpu_info().get("sm")
    return next((t.name for t in TARGETS.values() if t.sm == sm), None)


def _export_and_build(tmp_path, model: str, fmt: str):
    """Export a bundled model to ``fmt`` and build it for this GPU: (target name, build result)."""
    from moepress.cli.build import build
    from moepress.exporters import ExportConfig, export

    src = models.path(model)
    export(src, tmp_path / fmt, ExportConfig(format=fmt))
    target = _local_target()
    if target is None:
        pytest.skip("this GPU's SM is not in the target catalog")
    return target, build(tmp_path / fmt, target, tmp_path / "engine", dry_run=False, max_seq_len=256, max_batch=2,
                         reference=src)


def _check_passed(res: dict) -> None:
    """The engine's accuracy check ran (moepress/checks, kind engine) and passed its default gates
    (perplexity +2%, top-1 0.95, KL 0.05): a bf16 / FP8 engine of a bundled model is that close."""
    acc = res["accuracy"]
    assert "error" not in acc and "skipped" not in acc, acc
    assert acc["passed"] is True and acc["failed"] == [], acc.get("gates")
    assert {g["metric"] for g in acc["gates"] if g["passed"] is True} >= {"ppl_increase", "top1_agreement"}


@pytest.mark.gpu
@pytest.mark.skipif(not _has("tensorrt"), reason="tensorrt not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_tensorrt_engine_from_onnx_export(tmp_path):
    target, res = _export_and_build(tmp_path, "tiny-qwen3-moe", "onnx")
    assert (tmp_path / "engine" / "engine" / "model.engine").is_file()
    from moepress.exporters.targets import get_target

    assert res["environment"]["sm"] == get_target(target).sm
    _check_passed(res)


@pytest.mark.gpu
@pytest.mark.skipif(not _has("tensorrt_llm"), reason="tensorrt_llm not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_trtllm_engine_fromtrtllm_ckpt(tmp_path):
    _, res = _export_and_build(tmp_path, "tiny-mixtral", "trtllm-ckpt")
    assert (tmp_path / "engine" / "engine" / "rank0.engine").is_file()
    _check_passed(res)
    shutil.rmtree(tmp_path / "engine")


def test_trtllm_engine_plan_counts_the_embedding_each_rank_holds(tmp_path, cli_run):
    """trtllm-ckpt writes the vocab embedding whole on every rank (use_parallel_embedding false): the plan
    divided it by TP (2 GB per GPU too few for a Kimi-sized vocabulary at TP 8). Measured here: within
    0.2% of a rank's tensors (TensorRT-LLM's routers are float32, the plan's bf16)."""
    from safetensors import safe_open

    ck = tmp_path / "ck"
    assert cli_run("export", "tiny-mixtral", "--format", "trtllm-ckpt", "--tp", "2", "--ep", "2", "-o", ck,
                   "--quiet").exit_code == 0
    r = cli_run("build", ck, "--target", "h100", "--dry-run", "-o", tmp_path / "b", "--quiet")
    assert r.exit_code == 0, r.output
    planned = json.loads((tmp_path / "b" / "plan.json").read_text())["bytes_per_gpu"]["weights"]
    with safe_open(str(ck / "rank0.safetensors"), "pt") as h:
        stored = sum(h.get_tensor(k).nbytes for k in h.keys())
    assert abs(planned / stored - 1) < 0.004, (planned, stored)


def test_mixed_hf_modelopt_export_is_judged_by_its_experts_format(cli_run, tmp_path):
    """A MIXED_PRECISION hf-modelopt export is planned and checked with its routed experts' format
    (hf_quant_config.json quantized_layers): FP8 experts beside a block-FP8 o_proj build (they were refused as
    block-FP8 experts, the quantize --format); block-FP8 experts are refused whatever the top-level format. q/k/v
    FP8 per tensor: block FP8, their [128, 64, 64] rows are refused by hf-modelopt (the runtimes' fused scale grid)."""
    q, e = tmp_path / "q", tmp_path / "e"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "--rule", "mlp.experts.*=fp8", "--rule",
                   "self_attn.[qkv]_proj=fp8", "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "hf-modelopt", "-o", e, "--quiet").exit_code == 0
    r = cli_run("build", e, "--target", "h200", "-o", tmp_path / "b", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["format"] == "fp8", r.output
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    art = _modelopt(tmp_path / "mixed", cfg, algo="MIXED_PRECISION")
    hq = json.loads((art / "hf_quant_config.json").read_text())
    hq["quantization"]["quantized_layers"] = {"model.layers.0.mlp.experts.0.up_proj": {"quant_algo": "fp8_pb_wo"},
                                              "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"}}
    (art / "hf_quant_config.json").write_text(json.dumps(hq))
    r = cli_run("build", art, "--target", "h200", "-o", tmp_path / "b2", "--dry-run")
    assert r.exit_code == 2 and "weight_scale_inv" in r.stderr and not (tmp_path / "b2").exists(), r.output

    # a Model-Optimizer algorithm moepress has no format of: the build was sized as bf16 without a word
    qc = {"quant_method": "modelopt", "quant_algo": "W4A8_MXFP4_FP8"}
    art = _modelopt(tmp_path / "mx", {**cfg, "quantization_config": qc}, algo="W4A8_MXFP4_FP8")
    from helpers import assert_one_line_error

    assert_one_line_error(cli_run("build", art, "--target", "b200", "-o", tmp_path / "b3", "--dry-run"),
                          f"{art / 'config.json'}: quantization_config (quant_algo W4A8_MXFP4_FP8) names no weight "
                          "format moepress sizes")
    assert not (tmp_path / "b3").exists()


def test_an_onnx_export_of_a_packed_int4_checkpoint_is_planned_as_the_graph_holds_it(cli_run, tmp_path):
    """The onnx export decodes Kimi's compressed-tensors INT4 experts into bf16 initializers (export.json
    weight_schemes ["none"]); the TensorRT build plan must count them so, not as the source stores them."""
    art = tmp_path / "onnx"
    assert cli_run("export", "tiny-kimi-k2-int4", "--format", "onnx", "-o", art, "--quiet").exit_code == 0
    assert json.loads((art / "export.json").read_text())["onnx"]["weight_schemes"] == ["none"]
    r = cli_run("build", art, "--target", "h100", "--dry-run", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["format"] == "bf16"


def test_hardware_compatibility_is_refused_where_the_builder_would_not_apply_it(cli_run, ckpt, tmp_path):
    """Only the tensorrt builder (an onnx export) sets TensorRT's hardware-compatibility level; a trtllm-ckpt
    build accepted the option, recorded it in build.json as its config and never passed it to trtllm-build."""
    from helpers import assert_one_line_error

    r = cli_run("build", ckpt, "--target", "h100-sxm", "--dry-run", "--hardware-compatibility", "ampere_plus",
                "-o", tmp_path / "b")
    assert_one_line_error(r, "--hardware-compatibility ampere_plus", "trtllm-engine builder")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("which", ["ckpt", "onnx_dir"])
def test_trust_remote_code_is_refused_where_the_builder_runs_no_checkpoint_code(cli_run, request, tmp_path, which):
    """trtllm-build (a trtllm-ckpt) and TensorRT (an onnx export) load no checkpoint Python; the flag was taken and
    granted nothing. Only the trtllm-pytorch builder's scripts run it (test_faults.py)."""
    from helpers import assert_one_line_error

    art = request.getfixturevalue(which)
    r = cli_run("build", art, "--target", "h100-sxm", "--dry-run", "--trust-remote-code", "-o", tmp_path / "b")
    builder = "trtllm-engine" if which == "ckpt" else "tensorrt"
    assert_one_line_error(r, "--trust-remote-code", f"the {builder} builder", "expected no --trust-remote-code")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("opt", ["--gpus", "--ep", "--tp"])
def test_a_size_below_one_is_refused_before_the_export_s_own_is_suggested(cli_run, ckpt, tmp_path, opt):
    """`build CKPT --gpus 0` on a trtllm-ckpt answered "re-export with `moepress export --tp 0`"."""
    from helpers import assert_one_line_error

    r = cli_run("build", ckpt, "--target", "h100-sxm", "--dry-run", opt, "0", "-o", tmp_path / "b")
    line = assert_one_line_error(r, f"{opt}: expected a positive number, got 0")
    assert "re-export" not in line


@pytest.mark.parametrize("hw,level", [("none", "kNONE"), ("ampere_plus", "kAMPERE_PLUS"),
                                      ("same_compute_capability", "kSAME_COMPUTE_CAPABILITY")])
def test_the_trtexec_equivalent_asks_for_the_same_hardware_level(tmp_path, hw, level):
    """build.sh's trtexec line parsed as trtexec parses it (TensorRT samples/common/sampleOptions.cpp at
    v11.1-1-ga892d222: --hardwareCompatibilityLevel absent or exactly "none" -> kNONE, lower-cased "ampere+" ->
    kAMPERE_PLUS, lower-cased "samecomputecapability" -> kSAME_COMPUTE_CAPABILITY, anything else refused): the
    level the Python build was asked for."""
    from moepress.exporters.builders.tensorrt_engine import trtexec_command

    def parsed(v: str) -> str:
        if v in ("none", ""):
            return "kNONE"
        return {"ampere+": "kAMPERE_PLUS", "samecomputecapability": "kSAME_COMPUTE_CAPABILITY"}[v.lower()]

    cmd = trtexec_command(tmp_path / "m.onnx", tmp_path / "e.plan", 8, 256, tmp_path / "t.cache", hw=hw)
    given = [a.split("=", 1)[1] for a in cmd if a.startswith("--hardwareCompatibilityLevel=")]
    assert parsed(given[0] if given else "") == level, cmd


def test_same_compute_capability_on_a_tensorrt_without_it_is_refused_in_one_line_before_the_parse(
        tmp_path, monkeypatch, capsys):
    """TensorRT < 10.9 has no SAME_COMPUTE_CAPABILITY level (python/src/infer/pyCore.cpp gains it at v10.9.0): the
    engine builder refuses it in one line, exit 2, before the ONNX parse (minutes on a large export) and with
    no traceback. A stand-in tensorrt module of 10.8 whose Logger fails if anything reaches it."""
    import types

    from moepress.exporters.builders import tensorrt_engine

    class Level:
        NONE, AMPERE_PLUS = 0, 1

    def reached(*a, **k):
        raise AssertionError("the build went on past the refusal")

    trt = types.SimpleNamespace(__version__="10.8.0", HardwareCompatibilityLevel=Level, Logger=reached,
                                Builder=reached, OnnxParser=reached)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    rc = tensorrt_engine.main([str(tmp_path / "model.onnx"), str(tmp_path / "e.plan"),
                               "--hardware-compatibility", "same_compute_capability"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "10.9 and newer" in err and "TensorRT 10.8.0" in err
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.parametrize("cut", ["short", "gone"])
def test_an_artifact_cut_short_after_its_export_is_refused(cli_run, onnx_dir, tmp_path, cut):
    """A file whose size is not the one the artifact's manifest lists (a copy cut short, a file gone): --dry-run
    planned it and exited 0, and a build would record the manifest's hashes for other bytes."""
    from helpers import assert_one_line_error
    from moepress.manifest import file_digests, write_manifest

    (onnx_dir / "generation_config.json").write_text("{}")
    write_manifest(onnx_dir, {"stage": "export", "files": file_digests(onnx_dir)})
    if cut == "short":
        (onnx_dir / "model.onnx").write_bytes(b"\x08")
    else:
        (onnx_dir / "generation_config.json").unlink()
    r = cli_run("build", onnx_dir, "--target", "l40s", "-o", tmp_path / "t", "--dry-run")
    name, now = ("model.onnx", "1 bytes") if cut == "short" else ("generation_config.json", "missing")
    assert_one_line_error(r, f"{name}: {now}; its moepress-manifest.json lists", "export it again")
    assert not (tmp_path / "t").exists()
