"""``fp8-dynamic``: E4M3 weights with one scale per output channel, FP8 activations per token.

Stored: ``P.weight`` F8_E4M3, ``P.weight_scale`` F32 [out]; no input scale (computed per token
at run time). [out] is Model-Optimizer's shape (0.47 ``quant_utils.to_quantized_weight`` divides by
``weights_scaling_factor[:, None]``) and the one its loaders allocate: TensorRT-LLM's
``FP8RowwiseLinearMethod`` (``_torch/modules/linear.py``: ``torch.empty(out_features)``, filled by ``copy_``)
and vLLM 0.33's ``KFp8StaticChannel`` (``quantization/modelopt.py``: ``(output_size_per_partition,)``, shape
asserted on load); compressed-tensors' channel scale is [out, 1] (``Format.ct_scale``). TensorRT-LLM QuantAlgo
``FP8_PER_CHANNEL_PER_TOKEN``; compressed-tensors ``float-quantized``, weights strategy channel, dynamic per-token
input.
"""

import torch

import moepress.compress.formats._fp8 as _fp8
from moepress.compress.formats.base import Format, QuantContext, Quantized
from moepress.compress.quant import fp8


def _channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = fp8.quantize_channel(w)
    return q, s.reshape(-1)


def quantize(ws: list[torch.Tensor], ctx: QuantContext) -> Quantized:
    return Quantized(_fp8.each(ws, _channel))


def ct_scheme(group, targets):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=_fp8.ct_args(strategy="channel"),
                              input_activations=_fp8.ct_args(dynamic=True, strategy="token"))


FORMAT = Format(
    name="fp8-dynamic", description="per-channel weights, per-token dynamic activations",
    element="fp8", scale="channel", activation="token", archs=(90,), quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
    alternatives=("fp8", "fp8-block", "int4-awq", "nvfp4"), stored=("weight", "weight_scale"),
    quantize=quantize, stored_bytes=lambda out_f, in_f: out_f * in_f + 4 * out_f,
    modelopt_entry=_fp8.modelopt_entry("FP8_PER_CHANNEL_PER_TOKEN"),
    modelopt_group=lambda group: {"input_activations": _fp8.GROUP_ARGS,
                                  "weights": {**_fp8.GROUP_ARGS, "strategy": "channel"}},
    ct_format="float-quantized", ct_scheme=ct_scheme, decode=_fp8.decode,
    # TensorRT-LLM has no FP8 rowwise fused MoE: _torch/modules/fused_moe/fused_moe_cutlass.py _QUANT_SUPPORT_TABLE /
    # _get_quant_method and fused_moe_trtllm_gen.py _SUPPORTED_QUANT_ALGOS lack FP8_PER_CHANNEL_PER_TOKEN
    # (layers/moe.py, engine path: "MOE Does not support FP8 rowwise quantize")
    trtllm_moe_families=(), trtllm_moe_why="TensorRT-LLM's fused MoE has no FP8 per-channel (rowwise) method "
    "(fused_moe_cutlass.py _QUANT_SUPPORT_TABLE)",
)
