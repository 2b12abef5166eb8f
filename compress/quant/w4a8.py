"""W4A8_AWQ (TensorRT-LLM's ``QuantAlgo.W4A8_AWQ``): INT4 group-wise weights with an AWQ
``pre_quant_scale``, FP8 (E4M3) per-tensor static activations.

Model-Optimizer quantizes the weight with a SequentialQuantizer [INT4 blocks, FP8 per tensor]
and exports (modelopt/torch/export/quant_utils.py: get_weight_scaling_factor takes the first
quantizer's scale for a SequentialQuantizer, get_weight_scaling_factor_2 the second's
amax / 448, to_quantized_weight packs W4A8_AWQ exactly like INT4_AWQ):

    weight          U8 [out/2, in]     int4.pack_int4(round(W_s / weight_scale) clamped to [-8, 7])
    weight_scale    F32 [out, in/g]    amax of each group of W_s / 7              (W_s = W / pre_quant_scale)
    weight_scale_2  F32 []             amax(W_s) / 448
    pre_quant_scale F32 [in]           the input is multiplied by it (AWQ, see awq.py)
    input_scale     F32 []             amax(x * pre_quant_scale) / 448

Linears fused into one GEMM by TensorRT-LLM (gate/up = w1/w3, q/k/v) share ``pre_quant_scale``,
``weight_scale_2`` and ``input_scale``: TensorRT-LLM's WInt4AFP8FusedMoEMethod
(tensorrt_llm/_torch/modules/fused_moe/quantization.py, load_quant_scales) takes the max of the
w1 and w3 input_scale / pre_quant_scale / weight_scale_2 per expert (fc31_act_scale =
pre_quant_scale / input_scale, fc31_alpha = weight_scale_2 * input_scale) and divides the stored
group ``weight_scale`` by ``weight_scale_2`` itself — so the stored weight_scale is the real
amax / 7; its load_expert_w3_w1_weight reads the stored weight as "[(N//2)*I4x2, K], two int4 elts
in output dim packed into one", modelopt's pack_int4_in_uint8 order (int4.py). Storing the
shared values makes that max exact. Pass every fused weight to :func:`weight_scale_2`.

:func:`dequantize` gives q x weight_scale, what TensorRT-LLM's SM90 fused MoE applies; its dense W4A8 GEMM
(_torch/modules/linear.py W4A8_AWQ_LinearMethod, CUTLASS mixed_input_utils.hpp dequantize_A_kblock) rounds
q x fp16(weight_scale / weight_scale_2) to E4M3 first, a rounding left out here (README, W4A8 section).
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp8, int4


def smoothed(w: torch.Tensor, pre_quant_scale: torch.Tensor | None) -> torch.Tensor:
    """W / pre_quant_scale (the weight the INT4 quantizer sees), float32."""
    return w.float() if pre_quant_scale is None else w.float() / pre_quant_scale.float()[None, :]


def weight_scale_2(ws: list[torch.Tensor], pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One FP8 per-tensor scale for the (fused) weights ``ws``: max |W / pre_quant_scale| / 448, shape []."""
    amax = torch.stack([smoothed(w, pre_quant_scale).abs().amax() for w in ws]).amax()
    return fp8.scale_from_amax(amax).reshape(())


def quantize(w: torch.Tensor, group: int, pre_quant_scale: torch.Tensor | None = None,
             scale_2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out/2, in], weight_scale F32 [out, in/group], weight_scale_2 F32 [])."""
    ws = smoothed(w, pre_quant_scale)
    q, s = int4.quantize(ws, group)
    return int4.pack_int4(q), s, (scale_2 if scale_2 is not None else weight_scale_2([w], pre_quant_scale))


def dequantize(packed: torch.Tensor, weight_scale: torch.Tensor, pre_quant_scale: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the consumer's GEMM applies to ``x * pre_quant_scale`` (pre_quant_scale None),
    or folded back to act on the raw input x (pre_quant_scale given)."""
    w = int4.dequantize(int4.unpack_int4(packed), weight_scale)
    if pre_quant_scale is not None:
        w = w * pre_quant_scale.float()[None, :]
    return w.to(dtype)


def input_scale(act_amax: torch.Tensor, pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Static FP8 input scale of x * pre_quant_scale from the per-channel |x| maxima, shape []."""
    a = act_amax.float() if pre_quant_scale is None else act_amax.float() * pre_quant_scale.float()
    return fp8.scale_from_amax(a.amax()).reshape(())
