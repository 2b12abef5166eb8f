"""NVFP4: E2M1 values (compress/quant/fp4.py) in blocks of 16 along the input dimension, one FP8 E4M3
scale per block, one FP32 global scale per tensor. Model-Optimizer 0.47's numerics, reproduced
bit for bit (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``, ``NVFP4QTensor``):

- ``weight_scale_2`` = amax(W) / (6 * 448) (``get_weights_scaling_factor_2``; for linears fused into
  one GEMM, the max over them: modelopt's ``preprocess_linear_fusion`` unifies their amax);
- ``weight_scale`` = amax(block) / (6 * weight_scale_2), 0 -> 1, clamped to [2**-9, 448], cast to
  E4M3 (``get_weights_scaling_factor``, ``_cast_per_block_scale_to_fp8``);
- ``weight`` = E2M1 codes of W / (weight_scale * weight_scale_2) packed two per byte, [out, in/2]
  (``quantize``, ``_cast_fp4``); dequantized W = value * weight_scale * weight_scale_2.

Activations (``input_scale`` = amax(x) / (6 * 448), ``get_activation_scaling_factor``) are quantized
at run time per block of 16 with that global scale: :func:`fake_quant_input` follows
Model-Optimizer 0.47's fake quant ``modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py``
``fp4_fake_quant_kernel`` with ``common/nvfp4_quant.py`` ``fp8_quantize_scale``.
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp4
from moepress.compress.quant.exact import div
from moepress.compress.quant.fp8 import FP8_DTYPE, FP8_MAX

BLOCK = 16
_SCALE_MIN = 2.0**-9  # the smallest E4M3 subnormal


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 second-level scale of a tensor whose max |x| is ``amax``: amax / (6 * 448)
    (``weight_scale_2``, ``input_scale``)."""
    # never zero: an all-zero weight's blocks would divide 0 by 0 (NaN E4M3 scales; modelopt's too)
    return div(amax.float(), fp4.E2M1_MAX * FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def block_scales(w: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [out, in/16] of ``w`` [out, in] (in a multiple of 16) under ``scale_2``."""
    amax = w.float().reshape(*w.shape[:-1], -1, BLOCK).abs().amax(-1)
    s = amax / (fp4.E2M1_MAX * scale_2.float())
    s[s == 0] = 1.0
    return s.clamp(min=_SCALE_MIN, max=FP8_MAX).to(FP8_DTYPE)


def quantize(w: torch.Tensor, scale_2: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] (in a multiple of 16) -> (packed uint8 [out, in/2], E4M3 [out, in/16], FP32 [])."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4: the last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    w = w.float()
    s2 = global_scale(w.abs().amax()) if scale_2 is None else scale_2.float()
    s = block_scales(w, s2)
    scaled = w.reshape(*w.shape[:-1], -1, BLOCK) / (s.float() * s2).unsqueeze(-1)
    return fp4.pack(fp4.cast_e2m1(scaled.reshape(w.shape))), s, s2.reshape(())


def dequantize(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [out, in/2], E4M3 [out, in/16], FP32 []) -> W [out, in] in ``dtype``."""
    v = fp4.unpack_values(packed)
    v = v.reshape(*v.shape[:-1], -1, BLOCK) * (scale.float() * scale_2.float()).unsqueeze(-1)
    return v.reshape(*packed.shape[:-1], -1).to(dtype)


def fake_quant_input(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x (last dim a multiple of 16) quantized as the NVFP4 GEMM quantizes its input, returned in
    x's dtype: per block of 16, scale = E4M3(min(amax / (6 * input_scale), 448)) * input_scale (1
    where that is under 1e-5), then each value rounded to E2M1 of x / scale."""
    shape, dtype = x.shape, x.dtype
    gs = input_scale.float().reshape(())
    gs = torch.where(gs > 0, gs, torch.full_like(gs, 1e-12))
    xb = x.float().reshape(*shape[:-1], -1, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    s = (amax / (fp4.E2M1_MAX * gs)).clamp(max=FP8_MAX).to(FP8_DTYPE).float() * gs
    s = torch.where(s >= 1e-5, s, torch.ones_like(s))
    q = fp4.round_e2m1(xb.abs() / s) * s
    return torch.where(xb >= 0, q, -q).reshape(shape).to(dtype)


__all__ = ["BLOCK", "block_scales", "dequantize", "fake_quant_input", "global_scale", "quantize"]
