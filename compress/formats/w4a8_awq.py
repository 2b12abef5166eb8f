"""``w4a8-awq``: INT4 AWQ weights with FP8 activations (TensorRT-LLM ``W4A8_AWQ``).

Stored as int4-awq plus ``P.input_scale`` F32 [] (static FP8 scale of x * pre_quant_scale) and
``P.weight_scale_2`` F32 [] (amax(W / pre_quant_scale) / 448, Model-Optimizer's second weight
quantizer; compress/quant/w4a8.py). Model-Optimizer writes its config group's weights with type
float (modelopt/torch/export/convert_hf_config.py 0.47); we keep its form. No compressed-tensors form,
folded or not: vLLM's compressed-tensors W4A8-FP8 takes dynamic per-token activations only
(vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py ``_is_fp8_w4a8``;
compressed-tensors' W4AFP8 preset, quant_scheme.py 0.20), not this static per-tensor input_scale.
"""

from functools import partial

import moepress.compress.formats._int4 as _int4
from moepress.compress.formats.base import Format

_FP8 = {"dynamic": False, "num_bits": 8, "type": "float"}


def _modelopt_group(group: int | None) -> dict:
    return {"input_activations": {**_FP8, "group_size": group},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group}}


FORMAT = Format(
    name="w4a8-awq",
    split_unit=None, description="INT4 AWQ weights + FP8 activations (TensorRT-LLM W4A8_AWQ)",
    element="int4", scale="group", activation="static", archs=(89, 90), quant_algo="W4A8_AWQ",
    calibrated=True, awq=True, weight_scale_2=True, alternatives=("int4-awq", "nvfp4", "fp8"),
    stored=("weight", "weight_scale", "pre_quant_scale", "input_scale", "weight_scale_2"),
    quantize=partial(_int4.quantize, use_awq=True, use_gptq=False, fp8_input=True, with_scale_2=True), skip=_int4.skip,
    stored_bytes=partial(_int4.stored_bytes, awq_scale=True, scalars=2),
    modelopt_entry=_int4.modelopt_entry("W4A8_AWQ", awq_scale=True), modelopt_group=_modelopt_group,
    decode=_int4.decode,
    trtllm_moe_families=("mixtral", "qwen3_moe"), trtllm_moe_why=_int4.TRTLLM_W4A8_MOE,
)
