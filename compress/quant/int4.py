"""INT4 weights (symmetric, group-wise), as Model-Optimizer exports them for W4A16_AWQ / W4A8_AWQ.

Numerics (modelopt/torch/export/quant_utils.py: get_scaling_factor, pack_int4_in_uint8):
scale per (row, group of ``group_size`` input channels) = amax / 7; q = round(w / scale)
clamped to [-8, 7]; dequantized = q * scale. Packing: two rows per byte along the OUTPUT
dimension — byte [j, c] holds row 2j in its low nibble and row 2j+1 in its high nibble, so a
[out, in] weight is stored as uint8 [out / 2, in] (TensorRT-LLM's interleaved int4 layout is
produced from this at load time).

Group size: ``group_size`` input channels, clamped to in_features when the linear is narrower;
in_features must then be divisible by the group (else the linear is left unquantized and
reported: compress/formats/_int4.py ``skip``).
"""

from __future__ import annotations

import torch

from moepress.compress.quant.exact import div

INT4_MAX = 7


def effective_group(in_features: int, group_size: int) -> int | None:
    """The group actually used for a linear with ``in_features`` inputs, or None if impossible."""
    g = min(group_size, in_features)
    return g if in_features % g == 0 else None


def group_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> float32 scales [out, in / group] = amax / 7 (never zero)."""
    out, inp = w.shape
    amax = w.float().abs().reshape(out, inp // group, group).amax(dim=-1)
    return div(amax, INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Signed int4 values (int8 tensor in [-8, 7]) for the given group scales."""
    out, inp = w.shape
    group = inp // scales.shape[1]
    return (w.float() / scales.repeat_interleave(group, dim=1)).round().clamp(-8, 7).to(torch.int8)


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 values in [-8, 7], float32 scales [out, in / group]) (RTN)."""
    s = group_scales(w, group)
    return quantize_with_scales(w, s), s


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    group = q.shape[1] // scales.shape[1]
    return (q.float() * scales.float().repeat_interleave(group, dim=1)).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-8, 7] -> uint8 [out / 2, in]; low nibble = even row (modelopt's layout)."""
    if q.shape[0] % 2:
        raise ValueError(f"cannot pack {tuple(q.shape)}: the output dimension must be even")
    lo = q[0::2].to(torch.int16) & 0x0F
    hi = q[1::2].to(torch.int16) & 0x0F
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out / 2, in] -> int8 [out, in] in [-8, 7] (inverse of :func:`pack_int4`)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int8, device=packed.device)
    out[0::2], out[1::2] = lo.to(torch.int8), hi.to(torch.int8)
    return out
