"""What each runtime accepts, copied from its sources: the names checked by test_consumer_names.py.

These are facts read from the consumers' code (file and version beside each list), kept as data so
that the README's consumer table and our exporters' names are tested against them, never against
our own code. When a consumer release changes its lists, update the list and its citation.

Model-Optimizer checkpoints (``hf_quant_config.json`` / config.json ``quantization_config``) are
matched on ``quant_algo``; compressed-tensors checkpoints on (format, weight numerics, activation
handling), the parts each consumer's scheme dispatch reads.
"""

from __future__ import annotations

# --- Model-Optimizer layout: accepted top-level quant_algo values ---------------------------------

# NVIDIA/TensorRT-LLM main (read 2026-11): tensorrt_llm/quantization/mode.py ``class QuantAlgo`` (the
# PyTorch backend builds QuantAlgo(quant_algo)); tensorrt_llm/quantization/modelopt_config.py
# ``parse_modelopt_quant_config`` canonicalises the exact string "fp8_pb_wo" to FP8_BLOCK_SCALES.
# W4A16_NVFP4 (main 2026-11): tensorrt_llm/_torch/modules/fused_moe/fused_moe_cutlass.py imports
# W4A16NVFP4CutlassFusedMoEMethod (quantization.py: FP4 experts dequantized to the activation dtype, SM80+),
# linears W4A16NVFP4LinearMethod; tests/unittest .. test_quant_mode_distinguishes_w4a16_nvfp4_from_w4a4_nvfp4.
TRTLLM_QUANT_ALGO = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4",
    "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "W4A16_NVFP4", "NO_QUANT",
}
TRTLLM_ALIASES = {"fp8_pb_wo": "FP8_BLOCK_SCALES"}
# ...and for MoE layers (every model moepress writes): tensorrt_llm/_torch/modules/fused_moe/
# fused_moe_cutlass.py ``_get_quant_method`` sends every INT4 per-group mode to WInt4AFP8FusedMoEMethod
# (quantization.py), whose load_quant_scales reads each expert's input_scale and weight_scale_2: weight-only
# INT4 experts (W4A16_AWQ / W4A16_GPTQ) do not load. W4A8_AWQ loads for Mixtral / Qwen3-MoE (DeepSeek-V3 /
# Kimi K2 use its own W4A8_CUSTOM layout: the format registry's trtllm_moe_families, plan / build).
# Block-FP8 experts go to DeepSeekFP8BlockScalesFusedMoEMethod, whose load_expert_all_weight_scale_fp8_block_scale
# reads each expert's scale as "{e}.w1/w3/w2.weight_scale_inv" (VANILLA loading mode) only: a Model-Optimizer
# checkpoint's "weight_scale" is not read (older releases: KeyError; main 2026-11: the scales stay torch.empty).
TRTLLM_MOE_REFUSED = {"W4A16_AWQ", "W4A16_GPTQ", "FP8_BLOCK_SCALES", "FP8_PER_CHANNEL_PER_TOKEN"}
TRTLLM_MOE_BLOCK_SCALE = "weight_scale_inv"

# vLLM 0.33.0: vllm/model_executor/layers/quantization/modelopt.py ``LINEAR_ALGOS`` + "MIXED_PRECISION"
# (``QUANT_ALGOS``); the quant_algo read is upper-cased first (``str(quant_method).upper()``).
VLLM_MODELOPT = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                 "MIXED_PRECISION"}
# ...and for MoE layers (every model moepress writes): ModelOptFp8Config.FusedMoEMethodCls is
# ModelOptFp8MoEMethod whatever the FP8 quant_algo, per-tensor weight scales [E, 2] / [E] and static
# input scales only, so per-channel (FP8_PER_CHANNEL_PER_TOKEN) and block (FP8_PB_WO) experts do not
# load; NVFP4 / W4A16_NVFP4 experts go to ModelOptNvFp4FusedMoE (modelopt.py). Re-read in the vLLM 0.33.0
# wheel (2026-12): unchanged for a top-level quant_algo. Only under MIXED_PRECISION does 0.33.0 take block-FP8
# experts (_BLOCK_FP8_MOE_ALGOS "FP8_PB_WO" / "FP8_BLOCK_SCALES" -> quantization/fp8.py Fp8MoEMethod), and then
# under DeepSeek's names: it registers w13_weight_scale_inv [E, 2*ceil(I/128), ceil(H/128)] / w2_weight_scale_inv
# (3-D), so a Model-Optimizer checkpoint's experts.N.*.weight_scale ([ceil(out/128), 1, ceil(in/128), 1]) has no
# parameter to go to (fused_moe/routed_experts.py RoutedExperts.load_weights: AttributeError; models/deepseek_v2.py
# load_weights: params_dict KeyError). So no block-FP8 experts of a Model-Optimizer checkpoint load in 0.33.0.
VLLM_MODELOPT_MOE = {"FP8", "NVFP4", "W4A16_NVFP4", "MIXED_PRECISION"}

# vLLM 0.33.0 (wheel, 2026-12) MIXED_PRECISION: modelopt.py ModelOptMixedPrecisionConfig. _resolve_quant_algo finds
# a layer's entry in quantized_layers under its full module name ("model.layers.0.self_attn.q_proj", no prefix
# stripped; only lm_head and language_model.model. <-> model.language_model. are tried besides), a fused
# qkv_proj / gate_up_proj / fused_qkv_a_proj through its parts (packed_modules_mapping; parts of different
# quant_algo: ValueError), the routed experts through any key under "<prefix>." (per-expert entries: the first one
# found). get_quant_method upper-cases the entry's quant_algo and takes, for a linear, only LINEAR_ALGOS; any other
# (W4A16_AWQ, W4A16_GPTQ, W4A8_AWQ, ...) or an unlisted linear gets UnquantizedLinearMethod (a bf16 weight: a packed
# INT4 one fails its weight_loader's shape check, its scales have no parameter); for routed experts only the
# algos below, any other returns None (unquantized experts: fails likewise). Attention KV-cache scales only for
# Attention layers (not MLAAttention).
VLLM_MIXED_LINEAR = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8"}
VLLM_MIXED_MOE = {"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8"}  # + FP8_PB_WO under weight_scale_inv names (above)

# SGLang 0.5.23: python/sglang/srt/configs/model_config.py ``_parse_modelopt_quant_config``: "FP8",
# "MXFP8", "MIXED_PRECISION" and any quant_algo containing "FP4" (-> modelopt_fp4, whose
# ModelOptFp4Config.from_config accepts "FP8", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4",
# layers/quantization/modelopt_quant.py); anything else is not a ModelOpt checkpoint to it. MIXED_PRECISION is
# parsed, but loads only as model_config.py:1855-1865 routes it: with an NVFP4 / W4A16_NVFP4 entry to
# ModelOptMixedPrecisionConfig (layers quantized only as SGLANG_MIXED; fused linears resolved through the model
# class's packed_modules_mapping: not Mixtral's qkv_proj, not DeepSeek's dense / shared gate_up_proj), else to
# W4AFp8Config (block-FP8 linears and INT4 experts under weight_scale_inv: no Model-Optimizer export loads there).
# Checked per export by tools/sglang_check.py (tests/test_export_sglang_rules.py).
SGLANG_MIXED = {"FP8", "NVFP4", "W4A16_NVFP4"}  # + FP8_PB_WO / MXFP8 under DeepSeek's weight_scale_inv names
SGLANG_MODELOPT = {"FP8", "MXFP8", "MIXED_PRECISION", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"}


def modelopt_accepts(consumer: str, algo: str) -> bool:
    """Does ``consumer`` load a Model-Optimizer checkpoint whose quant_algo is ``algo``?"""
    if consumer == "TensorRT-LLM":
        name = TRTLLM_ALIASES.get(algo, algo)
        return name in TRTLLM_QUANT_ALGO and name not in TRTLLM_MOE_REFUSED
    if consumer == "vLLM":
        return algo.upper() in VLLM_MODELOPT & VLLM_MODELOPT_MOE
    if consumer == "SGLang":
        return algo in SGLANG_MODELOPT or "FP4" in algo
    return False  # transformers 5.24: no "modelopt" entry in quantizers/auto.py AUTO_QUANTIZER_MAPPING


# --- compressed-tensors: accepted (format, weights, activations) ----------------------------------
# weights: "<type><bits>/<strategy>"; activations: None (weight-only), "static/tensor",
# "dynamic/token", "dynamic/group", "dynamic/tensor_group" (NVFP4's per-16 local scale).

# vLLM 0.33.0: vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
# ``_get_scheme_from_parts`` (_is_wNa16_group_channel, _is_fp8_w8a8 / _is_fp8_w8a16,
# _is_nvfp4_format, _is_mxfp4).
VLLM_CT = {
    ("pack-quantized", "int4/group", None), ("pack-quantized", "int4/channel", None),
    ("float-quantized", "float8/tensor", "static/tensor"), ("float-quantized", "float8/channel", "dynamic/token"),
    ("float-quantized", "float8/block", "dynamic/group"), ("float-quantized", "float8/tensor", None),
    ("float-quantized", "float8/channel", None),
    ("nvfp4-pack-quantized", "float4/tensor_group", "dynamic/tensor_group"),
    ("nvfp4-pack-quantized", "float4/tensor_group", None),
    ("mxfp4-pack-quantized", "float4/group", None),
}

# SGLang 0.5.23: python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py
# ``_get_scheme_from_parts`` (_is_wNa16_group_channel, _is_fp8_w8a8, _is_fp8_w8a16, _is_fp4a4_nvfp4,
# _is_fp4a16_nvfp4); MXFP4 only for fused MoE layers (_is_mxfp4_moe), not the dense ones.
SGLANG_CT = VLLM_CT - {("mxfp4-pack-quantized", "float4/group", None)}

# NVIDIA/TensorRT-LLM main (read 2026-11): tensorrt_llm/_torch/models/checkpoints/hf/compressed_tensors.py
# maps only compressed-tensors NVFP4 (weight_packed / weight_global_scale / input_global_scale) onto
# its NVFP4 loaders; weight-only NVFP4 becomes W4A16_NVFP4
# (test_load_hf_quant_config_detects_nvfp4_w4a16_compressed_tensors).
TRTLLM_CT = {("nvfp4-pack-quantized", "float4/tensor_group", "dynamic/tensor_group"),
             ("nvfp4-pack-quantized", "float4/tensor_group", None)}

# transformers 5.24: quantizers/quantizer_compressed_tensors.py hands the checkpoint to
# compressed-tensors' ModelCompressor, which decompresses every format it has a compressor for
# (compressed_tensors CompressionFormat); the formats below are those our exports use. Not
# nvfp4-pack-quantized: transformers 5.24 decompresses a MoE's NVFP4 experts without their
# weight_global_scale (tests/test_nvfp4.py pins it), so an NVFP4 MoE loads wrong there.
TRANSFORMERS_CT_FORMATS = {"pack-quantized", "float-quantized", "naive-quantized", "mxfp4-pack-quantized"}
# Nor block FP8 on MoE experts: transformers 5.24 integrations/compressed_tensors.py merges FP8 experts as
# weight * weight_scale, which fails for a [out/128, in/128] scale of more than one block
# (tests/test_export_ct.py pins it).
TRANSFORMERS_CT_WEIGHTS_NOT = {"float8/block"}


def ct_accepts(consumer: str, key: tuple) -> bool:
    """Does ``consumer`` load a compressed-tensors checkpoint whose scheme is ``key``?"""
    if consumer == "transformers":
        return key[0] in TRANSFORMERS_CT_FORMATS and key[1] not in TRANSFORMERS_CT_WEIGHTS_NOT
    return key in {"TensorRT-LLM": TRTLLM_CT, "vLLM": VLLM_CT, "SGLang": SGLANG_CT}[consumer]


CONSUMERS = ("TensorRT-LLM", "vLLM", "SGLang", "transformers")
