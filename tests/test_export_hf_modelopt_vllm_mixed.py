"""MIXED_PRECISION hf-modelopt exports as vLLM 0.33.0 reads their ``quantized_layers`` (read from the 0.33.0 wheel's
sources, not run: no GPU here; the facts are tests/consumer_names.py VLLM_MIXED_LINEAR / VLLM_MIXED_MOE).
ModelOptMixedPrecisionConfig.get_quant_method gives a linear whose entry's quant_algo is outside LINEAR_ALGOS
(W4A16_AWQ, W4A16_GPTQ, W4A8_AWQ) an UnquantizedLinearMethod and routed experts outside its MoE list none, so their
packed INT4 weights do not fit the bf16 parameters and their scales have none: vLLM fails loading. The export says
so (export.json misloaded_by: vllm) exactly where the consumer's lists reject an entry; our keys (full module
names, per-expert entries, q/k/v apart) are the ones its _resolve_quant_algo looks up."""

from __future__ import annotations

import json

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export
from tests import consumer_names as cn


def _export(tmp_path, model: str, fmt: str, rules) -> tuple[dict, dict]:
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path(model), q, QuantConfig(format=fmt, rules=rules, num_samples=2, seq_len=32))
    export(q, e, ExportConfig(format="hf-modelopt"))
    return json.loads((e / "export.json").read_text()), json.loads((e / "hf_quant_config.json").read_text())


def vllm_rejects(quantized_layers: dict) -> list[str]:
    """The entries vLLM 0.33.0's MIXED_PRECISION config would not quantize (consumer facts, not our code)."""
    return sorted(n for n, e in quantized_layers.items()
                  if e["quant_algo"].upper() not in (cn.VLLM_MIXED_MOE if ".experts." in n else cn.VLLM_MIXED_LINEAR))


@pytest.mark.parametrize("model,fmt,rules", [
    ("tiny-qwen3-moe", "nvfp4", (("self_attn.*", "int4-awq"),)),  # INT4 attention: unquantized to vLLM
    ("tiny-qwen3-moe", "nvfp4", (("self_attn.*", "fp8"),)),  # FP8 beside NVFP4: read
    ("tiny-qwen3-moe", "nvfp4", (("self_attn.*", "fp8-dynamic"),)),  # FP8_PER_CHANNEL_PER_TOKEN linears: read
    ("tiny-mixtral", "w4a8-awq", (("self_attn.*", "fp8"),)),  # W4A8_AWQ experts (TensorRT-LLM's): not to vLLM
])
def test_vllm_misload_is_declared_where_its_mixed_precision_lists_reject_an_entry(tmp_path, model, fmt, rules):
    info, hq = _export(tmp_path, model, fmt, rules)
    q = hq["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    # the keys vLLM looks up: full module names with "model.", one entry per expert projection
    assert all(n.startswith("model.layers.") for n in q["quantized_layers"])
    bad = vllm_rejects(q["quantized_layers"])
    assert ("vllm" in info["misloaded_by"]) == bool(bad), (bad, info["misloaded_by"])
    if bad:
        why = info["misloaded_why"]["vllm"]
        assert info["misloaded_by"]["vllm"] == "0.33.0" and "fails loading" in why
        kinds = {q["quantized_layers"][n]["quant_algo"] for n in bad}
        assert all(k in why for k in kinds), (kinds, why)
        assert any(n.startswith("vLLM ") for n in info["consumer_notes"])
