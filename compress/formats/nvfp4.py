"""``nvfp4``: E2M1 weights with an FP8 E4M3 scale per 16 values and an FP32 global scale
(TensorRT-LLM QuantAlgo ``NVFP4``, Blackwell sm100/sm120). Planned by `moepress plan` and
`build`; `moepress quantize` does not write it yet (no quantizer)."""

from moepress.compress.formats.base import Format

FORMAT = Format(
    name="nvfp4", description="E2M1 weights, E4M3 scale per 16, FP32 global scale (Blackwell)",
    element="fp4", scale="group", activation="static", archs=(100, 120), quant_algo="NVFP4",
    alternatives=("int4-awq", "w4a8-awq", "fp8-block", "fp8"),
    stored=("weight", "weight_scale", "weight_scale_2", "input_scale"),
    stored_bytes=lambda out_f, in_f: out_f * in_f / 2 + out_f * in_f / 16 + 4 + 4,
)
