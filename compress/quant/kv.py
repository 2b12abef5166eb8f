"""FP8 KV-cache scales (``--kv-cache fp8``; modelopt's ``kv_cache_quant_algo: FP8``).

Model-Optimizer stores per attention layer ``model.layers.N.self_attn.k_scale`` and ``v_scale``,
F32 scalars = amax / 448 of the keys / values the cache holds (modelopt/torch/export/
quant_utils.py: get_kv_cache_scaling_factor reads the k/v bmm quantizers' amax and divides by
448; TensorRT-LLM and vLLM read the same names). We take the amax of the k / v projection
outputs during calibration (for DeepSeek's MLA, the compressed ``kv_a_proj_with_mqa`` output is
what is cached, and gives both scales).
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp8

NAMES = ("k_scale", "v_scale")


def observe(amax: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Running amax of a k or v projection's output."""
    a = out.detach().abs().amax().float()
    return a if amax is None else torch.maximum(amax, a)


def quantize(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K or V tensor -> (fp8 values, F32 [] scale); dequantized = q * scale."""
    s = kv_scale(t.detach().abs().amax()) if scale is None else scale
    return (t.float() / s).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def kv_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax -> the stored F32 scalar (amax / 448, never zero)."""
    return fp8.scale_from_amax(amax).reshape(())
