"""``fp8``: E4M3 weights with one scale per tensor, static (calibrated) per-tensor activations.

Stored: ``P.weight`` F8_E4M3 [out, in], ``P.weight_scale`` F32 [] (dequant = q * s), ``P.input_scale``
F32 [] (amax / 448). Linears fused into one GEMM by TensorRT-LLM (q/k/v, gate/up) share one weight
scale (modelopt's ``preprocess_linear_fusion``). TensorRT-LLM QuantAlgo ``FP8``; compressed-tensors
``float-quantized`` with strategy tensor (compressed_tensors/compressors/naive_quantized/base.py).
"""

import torch

import moepress.compress.formats._fp8 as _fp8
from moepress.compress.formats.base import Format, QuantContext, Quantized
from moepress.compress.quant import fp8


def quantize(ws: list[torch.Tensor], ctx: QuantContext) -> Quantized:
    shared = fp8.scale_from_amax(torch.stack([w.abs().amax() for w in ws]).amax())
    return Quantized(_fp8.each(ws, lambda w: fp8.quantize_tensor(w, shared)))


def ct_scheme(group, targets):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=_fp8.ct_args(strategy="tensor"),
                              input_activations=_fp8.ct_args(strategy="tensor"))


FORMAT = Format(
    name="fp8", description="E4M3 per-tensor weights, static per-tensor activations",
    element="fp8", scale="tensor", activation="static", archs=(89, 90, 100, 120), quant_algo="FP8",
    calibrated=True, alternatives=("fp8-block", "fp8-dynamic", "int4-awq", "nvfp4"),
    stored=("weight", "weight_scale", "input_scale"),
    quantize=quantize, stored_bytes=lambda out_f, in_f: out_f * in_f + 4 + 4,
    modelopt_entry=_fp8.modelopt_entry("FP8"),
    modelopt_group=lambda group: {"input_activations": _fp8.GROUP_ARGS, "weights": _fp8.GROUP_ARGS},
    modelopt_flat_group=True,
    ct_format="float-quantized", ct_scheme=ct_scheme, decode=_fp8.decode,
)
