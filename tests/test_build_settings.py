"""Build settings and GPU-target facts (oracles: TensorRT-LLM's own source, NVIDIA
datasheets, TensorRT's hardware-compatibility levels; never moepress's own tables)."""

import json
import shlex

import pytest

from helpers import trtllm_ckpt
from moepress import models
from moepress.errors import MoepressError
from moepress.exporters import environment as E
from moepress.exporters.artifacts import artifact_format, kv_cache_declared
from moepress.exporters.build import build
from moepress.exporters.builders import BUILDERS
from moepress.exporters.targets import get_target

L40S = {"gpu": "NVIDIA L40S", "sm": 89, "count": 1, "cuda": "12.8", "driver": "570.86"}


def _modelopt(d, model, algo="FP8", kv=None):
    """An hf-modelopt export: the model's config.json + hf_quant_config.json (modelopt's nested shape)."""
    d.mkdir()
    (d / "config.json").write_text((models.path(model) / "config.json").read_text())
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv}}))
    return d


@pytest.mark.parametrize("target", ["l4", "l40s"])
def test_fp8_context_fmha_is_enabled_on_ada_with_an_fp8_kv_cache(tmp_path, target):
    """TensorRT-LLM's attention op: "FP8 FMHA can only be enabled on sm_89, sm_90, sm_100, sm_103, sm_120 or
    sm_121" (its fp8_context_fmha pre-check): an FP8 engine for Ada (L4, L40S: sm89) gets it too. With paged
    context FMHA it needs an FP8 KV cache (builder.py build(): "FP8 Paged Context FMHA is disabled because it must
    be used together with fp8 KV Cache"): without one the flag was written and dropped with a warning."""
    with_kv = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), kv="FP8")
    cmd = shlex.split(build(with_kv, target, tmp_path / "b")["commands"][0])
    assert cmd[cmd.index("--use_fp8_context_fmha") + 1] == "enable"
    without = trtllm_ckpt(tmp_path / "ckpt2", models.path("tiny-mixtral"))
    assert "--use_fp8_context_fmha" not in build(without, target, tmp_path / "b2")["commands"][0]


@pytest.mark.parametrize("name,gbs", [
    ("a100-40gb", 1555), ("a100-80gb", 2039), ("l4", 300), ("l40s", 864), ("h100", 3350), ("h100-pcie", 2000),
    ("h200", 4800), ("b200", 8000)])
def test_memory_bandwidth_is_the_datasheets(name, gbs):
    """NVIDIA datasheets (A100, L4, L40S, H100 SXM5 3.35 TB/s / PCIe 2 TB/s, H200 4.8 TB/s, HGX B200 8 TB/s);
    what `moepress targets` prints."""
    assert get_target(name).bandwidth_gbs == gbs


def test_pytorch_bundle_keeps_ep_apart_from_tp(tmp_path):
    """tp 2 with ep 1 (experts split by moe_tp 2): serve.sh, the LLM API options and smoke.py all say ep 1
    (trtllm-serve --ep_size = moe_expert_parallel_size, tensorrt_llm/commands/serve.py)."""
    import yaml

    art, out = _modelopt(tmp_path / "mo", "tiny-qwen3-moe"), tmp_path / "b"
    res = build(art, "h100", out, gpus=2, ep=1)
    assert (res["plan"]["tp"], res["plan"]["ep"]) == (2, 1)
    serve = shlex.split(res["commands"][0])
    assert serve[serve.index("--tp_size") + 1] == "2" and serve[serve.index("--ep_size") + 1] == "1"
    opts = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert (opts["tensor_parallel_size"], opts["moe_expert_parallel_size"]) == (2, 1)
    smoke = (out / "smoke.py").read_text()
    assert "tensor_parallel_size=2," in smoke and "moe_expert_parallel_size=1," in smoke


def test_asked_kv_cache_dtype_wins_over_the_exports_calibrated_one(tmp_path):
    """An hf-modelopt export declaring an FP8 KV cache is budgeted as FP8 by default, but an explicit
    --kv-cache-dtype nvfp4 (B200: TensorRT-LLM's NVFP4 KV cache, KvCacheConfig.dtype "nvfp4") is what the
    plan, the LLM API options and smoke.py get."""
    import yaml

    art = _modelopt(tmp_path / "mo", "tiny-qwen3-moe", kv="FP8")
    assert build(art, "b200", tmp_path / "d")["plan"]["kv_cache_dtype"] == "fp8"
    out = tmp_path / "b"
    res = build(art, "b200", out, kv_cache_dtype="nvfp4")
    assert res["plan"]["kv_cache_dtype"] == "nvfp4" and res["config"]["kv_cache_dtype"] == "nvfp4"
    assert yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())["kv_cache_config"]["dtype"] == "nvfp4"
    assert 'KvCacheConfig(dtype="nvfp4")' in (out / "smoke.py").read_text()


def test_same_compute_capability_engine_is_not_portable(monkeypatch):
    """TensorRT's SAME_COMPUTE_CAPABILITY level runs the engine only on GPUs of the builder's compute
    capability; only AMPERE_PLUS runs on every sm80+ GPU. An L40S (sm89) cannot build it for an A10G (sm86)."""
    monkeypatch.setattr(E, "_importable", lambda mod: True)
    b, a10g = BUILDERS["tensorrt"], get_target("a10g")
    with pytest.raises(MoepressError, match="the target a10g is sm86"):
        E.check_environment(b, a10g, 1, gpu=L40S, hardware_compatibility="same_compute_capability")
    assert E.check_environment(b, a10g, 1, gpu=L40S, hardware_compatibility="ampere_plus") == L40S


def test_kv_cache_scheme_of_other_widths_is_not_fp8(tmp_path):
    """compressed-tensors kv_cache_scheme: only an 8-bit float scheme is an FP8 KV cache (a 4-bit float one,
    e.g. NVFP4 attention quantization, is not)."""
    def declared(scheme):
        d = tmp_path / str(scheme["num_bits"])
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"quantization_config": {"kv_cache_scheme": scheme}}))
        return kv_cache_declared(d)

    assert declared({"type": "float", "num_bits": 8}).name == "fp8"
    assert declared({"type": "float", "num_bits": 4}) is None


def test_trtllm_ckpt_kv_cache_is_read_from_its_quantization(tmp_path):
    """A TensorRT-LLM checkpoint declares its KV cache in config.json quantization.kv_cache_quant_algo
    (docs/source/architecture/checkpoint.md): what the model card reports as carried."""
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization"]["kv_cache_quant_algo"] = "FP8"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert kv_cache_declared(ckpt).name == "fp8"


def test_trtllm_ckpt_fp8_kv_cache_is_what_the_engine_plan_budgets(tmp_path):
    """A trtllm-ckpt's quantization.kv_cache_quant_algo FP8 fixes the engine's KV cache
    (docs/source/architecture/checkpoint.md): with no --kv-cache-dtype, plan.json and build.json say fp8
    (1 byte per cached value), not the model's bf16."""
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization"]["kv_cache_quant_algo"] = "FP8"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    res = build(ckpt, "h100", tmp_path / "b")
    assert res["plan"]["kv_cache_dtype"] == "fp8" and res["config"]["kv_cache_dtype"] == "fp8"


def test_trtllm_ckpt_ep_is_the_checkpoints(tmp_path):
    """A trtllm-ckpt is already split: its mapping's moe_ep_size (moe_tp_size * moe_ep_size = tp_size,
    tensorrt_llm/mapping.py) is the plan's EP even when --ep is not given; world 2 with moe_ep 1 is tp 2, ep 1."""
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), world=2, ep=1)
    res = build(ckpt, "h100", tmp_path / "b")
    assert (res["plan"]["gpus"], res["plan"]["tp"], res["plan"]["ep"]) == (2, 2, 1)
    assert res["config"]["ep"] == 1


def test_flat_moe_keys_of_a_trtllm_ckpt_get_the_moe_plugin(tmp_path):
    """TensorRT-LLM's convert_checkpoint.py scripts that write the MoE config flat (``moe_num_experts``,
    ``moe_top_k`` beside ``mapping``) make MoE checkpoints too: trtllm-build gets --moe_plugin for them."""
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["moe"]
    cfg.update(moe_num_experts=8, moe_top_k=2)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    cmd = shlex.split(build(ckpt, "h100", tmp_path / "b")["commands"][0])
    assert cmd[cmd.index("--moe_plugin") + 1] == "bfloat16"


@pytest.mark.parametrize("model_type,arch", [("qwen3_moe", "MyMoeForCausalLM"), ("my_moe", "Qwen3MoeForCausalLM")])
def test_auto_map_needs_both_a_native_config_and_model_class(tmp_path, model_type, arch):
    """TensorRT-LLM's PyTorch backend loads a checkpoint natively only when it reads the config (its own class or
    transformers' for the model_type) and has a model class for architectures[0] (register_auto_model): either
    one missing behind an auto_map is the checkpoint's own code."""
    from moepress.exporters.builders import trtllm_pytorch

    why = trtllm_pytorch.remote_code(tmp_path, {"auto_map": {"AutoConfig": "x.C"}, "model_type": model_type,
                                                "architectures": [arch]})
    assert why is not None and "auto_map" in why


def test_nvidia_smi_compute_cap_keeps_its_minor():
    """nvidia-smi --query-gpu=compute_cap prints major.minor (8.9 for Ada, 8.6 for GA10x): the minor decides
    which engine kind a build makes (sm89 FP8 kernels are not sm80's)."""
    assert E.parse_nvidia_smi("NVIDIA L40S, 8.9, 570.86.15\n")[0]["sm"] == 89
    assert E.parse_nvidia_smi("NVIDIA A10G, 8.6, 570.86.15\n")[0]["sm"] == 86


def test_pipeline_parallel_trtllm_ckpt_is_refused(tmp_path):
    """A trtllm-ckpt whose mapping has pp_size 2 (tensorrt_llm/mapping.py: world = tp x pp) is split in a way
    moepress does not plan (tp / ep only): refused with the file and field, not planned as tp-only."""
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), world=2, ep=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mapping"].update(tp_size=1, pp_size=2, moe_tp_size=1)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoepressError, match=r"config\.json: mapping\.pp_size 2: .*re-export with pp_size 1"):
        build(ckpt, "h100", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_mixed_precision_modelopt_export_is_planned_in_its_routed_experts_format(tmp_path):
    """Model-Optimizer writes quant_algo MIXED_PRECISION with a quantized_layers map (module -> {quant_algo})
    when layers differ (modelopt 0.47 torch/export/quant_utils.py, get_quant_config); the engine's format is
    the routed experts' (what TensorRT-LLM's fused MoE loads), even where a dense FP8 module sorts first."""
    (tmp_path / "config.json").write_text((models.path("tiny-mixtral") / "config.json").read_text())
    layers = {"model.layers.0.mlp.down_proj": {"quant_algo": "FP8"},  # sorts before the experts
              "model.layers.1.mlp.experts.0.down_proj": {"quant_algo": "W4A16_AWQ", "group_size": 128},
              "model.layers.1.self_attn.q_proj": {"quant_algo": "FP8"}}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}}))
    assert artifact_format(tmp_path, "hf-modelopt", None) == "int4-awq"
