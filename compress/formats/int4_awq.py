"""``int4-awq``: INT4 weights in groups of input channels, AWQ ``pre_quant_scale``; bf16 activations.

Stored (Model-Optimizer's unified HF layout, modelopt/torch/export/quant_utils.py 0.47):
``P.weight`` U8 [out/2, in] (two rows per byte, low nibble = even row), ``P.weight_scale`` F32
[out, in/group] (amax / 7), ``P.pre_quant_scale`` F32 [in] (the input is multiplied by it).
TensorRT-LLM QuantAlgo ``W4A16_AWQ`` (tensorrt_llm/quantization/mode.py). AWQ's smoothing vector
has no place in compressed-tensors' schemes: only a folded checkpoint (``quantize --awq-fold``,
compress/quantize/fold.py: no ``pre_quant_scale``, the smoothing in the norms / v_proj / up_proj, as
llm-compressor writes AWQ) is compressed-tensors ``pack-quantized`` (as int4-gptq); the exporter
refuses an unfolded one.
"""

from functools import partial

import moepress.compress.formats._int4 as _int4
from moepress.compress.formats.base import Format

FORMAT = Format(
    name="int4-awq",
    split_unit=None, description="INT4 weights, AWQ scales (GPTQ rounding)",
    element="int4", scale="group", activation="none", archs=(80, 86, 89, 90), quant_algo="W4A16_AWQ",
    calibrated=True, awq=True, alternatives=("int4-gptq", "w4a8-awq", "nvfp4", "fp8"),
    stored=("weight", "weight_scale", "pre_quant_scale"),
    quantize=partial(_int4.quantize, use_awq=True, use_gptq=False), skip=_int4.skip,
    stored_bytes=partial(_int4.stored_bytes, awq_scale=True),
    modelopt_entry=_int4.modelopt_entry("W4A16_AWQ", awq_scale=True), modelopt_group=_int4.modelopt_group,
    ct_format="pack-quantized", ct_scheme=_int4.ct_scheme,  # folded only (--awq-fold)
    decode=_int4.decode,
    trtllm_moe_families=(), trtllm_moe_why=_int4.TRTLLM_W4A16_MOE,
)
