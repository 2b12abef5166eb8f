"""hf-modelopt exports as SGLang 0.5.23 loads them (read from its sources, not run: no GPU here;
tools/sglang_check.py re-implements its loader's names, shapes and assertions).

* DeepSeek-V3's FP8 KV-cache scales: SGLang reads Model-Optimizer's ``self_attn.k_proj.k_scale`` as the scale
  of its MLA latent cache (models/deepseek_common/deepseek_weight_loader.py:514-523), and its trtllm_mla decode
  multiplies the attention logits by it while writing the cache unscaled (layers/attention/
  trtllm_mla_backend.py:955-974): with the decompressed keys' scale (~0.01) every decode step's attention is
  flattened, silently. The export leaves them out; ``kv_cache_quant_algo`` stays FP8 (a scale-1.0 FP8 cache, as
  vLLM and TensorRT-LLM run it).
* An FP4 kv_b_proj: SGLang splits its packed bytes into w_kc / w_vc without dequantizing them
  (deepseek_weight_loader.py:639-762) and fails at the first forward; the export says so and names the rule
  that keeps kv_b_proj bf16.
* Mixtral's KV scales: SGLang's mixtral.py looks ``k_proj.k_scale`` up as ``qkv_proj.k_scale`` (KeyError).
"""

from __future__ import annotations

import json

import pytest
import torch

from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export


def _export(tmp_path, model, **kw):
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path(model), q, QuantConfig(num_samples=2, seq_len=32, **kw))
    export(q, e, ExportConfig(format="hf-modelopt"))
    return q, e, json.loads((e / "export.json").read_text())


def test_mla_kv_scales_are_left_out_so_sglang_keeps_its_latent_cache_at_scale_one(tmp_path):
    q, e, info = _export(tmp_path, "tiny-deepseek-v3", format="fp8", kv_cache="fp8")
    assert any(n.endswith(".k_scale") for n in CheckpointReader(q).names())  # quantize measured them
    assert not [n for n in CheckpointReader(e).names() if n.endswith((".k_scale", ".v_scale"))]
    assert json.loads((e / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert any("latent cache" in n for n in info["consumer_notes"])
    # a k_scale and a v_scale per layer left out, and export.json counts the tensors it wrote, not those
    layers = json.loads((q / "config.json").read_text())["num_hidden_layers"]
    assert len(info["dropped"]) == 2 * layers
    names = list(CheckpointReader(e).names())
    assert info["tensors"] == len(names) == len(list(CheckpointReader(q).names())) - 2 * layers


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_mha_kv_scales_are_written_and_what_sglang_does_with_them_is_said(tmp_path, model):
    """vLLM reads them for Qwen3-MoE and Mixtral, so they stay; SGLang skips Qwen3-MoE's (a note) and fails
    loading Mixtral's (misloaded_by)."""
    _, e, info = _export(tmp_path, model, format="fp8", kv_cache="fp8")
    assert any(n.endswith("self_attn.k_proj.k_scale") for n in CheckpointReader(e).names())
    fails = model == "tiny-mixtral"
    assert ("sglang" in info["misloaded_by"]) == fails
    assert any(n.startswith("SGLang <= 0.5.23 " + ("fails" if fails else "skips")) for n in info["consumer_notes"])


def test_without_kv_scales_sglang_is_not_said_to_fail_on_them(tmp_path):
    """Mixtral quantized without --kv-cache: the export holds no k_scale for SGLang's mixtral.py to look up as
    qkv_proj.k_scale, so nothing is said to fail (nor to be skipped)."""
    _, e, info = _export(tmp_path, "tiny-mixtral", format="fp8")
    assert not [n for n in CheckpointReader(e).names() if n.endswith((".k_scale", ".v_scale"))]
    assert info["misloaded_by"] == {} and not [n for n in info["consumer_notes"] if "KV-cache" in n]


def test_fp4_kv_b_proj_is_said_to_fail_in_sglang_and_the_named_rule_exports_one_it_loads(tmp_path):
    _, _, info = _export(tmp_path / "a", "tiny-deepseek-v3", format="nvfp4-a16")
    why = info["misloaded_why"]["sglang"]
    # TensorRT-LLM fails on a quantized kv_b_proj too (tests/test_export_hf_modelopt_trtllm_mla.py)
    assert info["misloaded_by"] == {"sglang": "0.5.23", "tensorrt_llm": "main 2026-09"} and "kv_b_proj" in why
    rule = why.split("--rule '")[1].split("'")[0]
    pat, fmt = rule.split("=")
    _, e, info = _export(tmp_path / "b", "tiny-deepseek-v3", format="nvfp4-a16", rules=((pat, fmt),))
    assert info["misloaded_by"] == {}
    r = CheckpointReader(e)
    assert r.get_dtype("model.layers.1.self_attn.kv_b_proj.weight") == torch.bfloat16
    assert r.get_dtype("model.layers.1.self_attn.q_b_proj.weight") == torch.uint8
    exclude = json.loads((e / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "model.layers.1.self_attn.kv_b_proj" in exclude


def test_an_int4_kv_b_proj_is_not_said_to_be_fp4(tmp_path):
    """An INT4-AWQ kv_b_proj (packed int4 weights, Model-Optimizer's W4A16_AWQ) is not an NVFP4 one, whose packed FP4
    bytes SGLang 0.5.23 splits undequantized (deepseek_weight_loader.py:639-762): whatever SGLang does with it,
    the export must not call it FP4 (SGLang misreads this MIXED_PRECISION export for another reason: with no
    NVFP4 layer in it, it loads it as W4AFp8Config; tests/test_export_sglang_rules.py)."""
    _, _, info = _export(tmp_path, "tiny-deepseek-v3", format="fp8", rules=(("self_attn.kv_b_proj", "int4-awq"),))
    why = info["misloaded_why"].get("sglang", "")
    assert "FP4 MLA kv_b_proj" not in why and "packed bytes" not in why and "W4AFp8Config" in why, why
