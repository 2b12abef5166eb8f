"""``int4-gptq``: INT4 weights in groups of input channels rounded by GPTQ; bf16 activations.

Stored as int4-awq without ``pre_quant_scale`` (modelopt's layout); TensorRT-LLM QuantAlgo
``W4A16_GPTQ``; compressed-tensors ``pack-quantized`` (int4 symmetric, strategy group:
``weight_packed`` I32 [out, in/8], ``weight_scale`` [out, in/group], ``weight_shape``;
compressed_tensors/compressors/pack_quantized/base.py).
"""

from functools import partial

import moepress.compress.formats._int4 as _int4
from moepress.compress.formats.base import Format

FORMAT = Format(
    name="int4-gptq",
    split_unit=None, description="INT4 weights, GPTQ",
    element="int4", scale="group", activation="none", archs=(80, 86, 89, 90), quant_algo="W4A16_GPTQ",
    calibrated=True, gptq=True, alternatives=("int4-awq", "w4a8-awq", "nvfp4", "fp8"),
    stored=("weight", "weight_scale"),
    quantize=partial(_int4.quantize, use_awq=False, use_gptq=True), skip=_int4.skip,
    stored_bytes=_int4.stored_bytes,
    modelopt_entry=_int4.modelopt_entry("W4A16_GPTQ", awq_scale=False), modelopt_group=_int4.modelopt_group,
    ct_format="pack-quantized", ct_scheme=_int4.ct_scheme,
    decode=_int4.decode,
    trtllm_moe_families=(), trtllm_moe_why=_int4.TRTLLM_W4A16_MOE,
)
