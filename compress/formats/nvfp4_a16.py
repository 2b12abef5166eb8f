"""``nvfp4-a16``: NVFP4 weights (as ``nvfp4``: E2M1, E4M3 scale per 16, FP32 ``weight_scale_2``) with
bf16 activations: no ``input_scale``, no calibration.

Model-Optimizer 0.47 names it ``w4a16_nvfp4`` (``modelopt/torch/export/quant_utils.py``
get_quantization_format: an NVFP4 weight quantizer with the input quantizer disabled) and writes
``{"quant_algo": "W4A16_NVFP4", "group_size": 16}`` (process_layer_quant_config); vLLM's ModelOpt
loader accepts ``W4A16_NVFP4`` (``vllm/model_executor/layers/quantization/modelopt.py`` QUANT_ALGOS),
TensorRT-LLM has QuantAlgo ``W4A16_NVFP4`` (tensorrt_llm/quantization/mode.py). Stored tensors and
the compressed-tensors form (``nvfp4-pack-quantized``, preset ``NVFP4A16``: weights only) as nvfp4.

Weight-only, so no FP4 tensor cores are needed: vLLM runs it through its Marlin FP4 kernels on sm80+
(model_executor/layers/quantization/utils/marlin_utils_fp4.py, "Weight-only FP4 compression will be used
leveraging the Marlin kernel"; the MARLIN NvFp4 MoE backend), TensorRT-LLM main (2026-11) through
W4A16NVFP4CutlassFusedMoEMethod, which dequantizes to the activation dtype (SM80+), so its targets are
Ampere on, as MXFP4's; on Blackwell it is the 4-bit weight-only format.
"""

from functools import partial

import moepress.compress.formats.nvfp4 as _nv
from moepress.compress.formats.base import Format
from moepress.compress.quant.fp8 import FP8_DTYPE

_W = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": _nv.GROUP}

FORMAT = Format(
    name="nvfp4-a16",
    split_unit=(1, 16), description="E2M1 weights, E4M3 scale per 16, FP32 global scale; bf16 activations",
    element="fp4", scale="group", activation="none", archs=(80, 86, 89, 90, 100, 120), quant_algo="W4A16_NVFP4",
    weight_scale_2=True, alternatives=("int4-awq", "int4-gptq", "nvfp4", "fp8"),
    stored=("weight", "weight_scale", "weight_scale_2"),
    quantize=_nv.quantize, skip=_nv.skip, stored_bytes=partial(_nv.stored_bytes, scalars=1),
    modelopt_entry=_nv.modelopt_entry("W4A16_NVFP4"), modelopt_group=lambda group: {"weights": dict(_W)},
    modelopt_flat_group=True,
    ct_format="nvfp4-pack-quantized", ct_scheme=_nv.ct_scheme_of("NVFP4A16"),
    decode_stored=_nv.decode_stored, weight_scale_dtype=FP8_DTYPE, ct_tensors=_nv.ct_tensors,
)
