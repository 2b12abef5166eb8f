"""FP4 (E2M1) elements and their E8M0 scales: the value table, round / cast to a 4-bit code, two codes
per byte, and the power-of-two E8M0 scale byte. Shared by NVFP4 (E4M3 scale per 16, ``nvfp4.py``)
and MXFP4 (E8M0 scale per 32), written by the quantizers and read by the checkpoint decoders.

Code: bit 3 = sign, bits 0-2 = index into ``[0, .5, 1, 1.5, 2, 3, 4, 6]`` (OCP MX spec v1.0 E2M1).
Rounding is to nearest, ties to even code, saturating at 6, and the sign bit follows ``x < 0``
(so a small negative value that rounds to zero is stored as code 8, -0): Model-Optimizer 0.47
``modelopt/torch/quantization/qtensor/nvfp4_tensor.py`` ``NVFP4QTensor._cast_fp4``.

Byte layout: element ``2j`` in the low nibble, ``2j + 1`` in the high nibble, along the last dim.
Both consumers agree: Model-Optimizer 0.47 ``nvfp4_tensor.py`` (``(q[..., 1::2] << 4) | q[..., 0::2]``)
and ``mxfp4_tensor.py`` (``fuse_uint4_to_uint8``); compressed-tensors 0.20.1
``compressors/nvfp4/helpers.py`` (``pack_fp4_to_uint8`` / ``unpack_fp4_from_uint8``: low nibble first);
gpt-oss's MXFP4 ``_blocks`` use the same order (transformers ``integrations/mxfp4.py``).

E8M0: one unsigned byte, scale = 2 ** (byte - 127); 255 is NaN (OCP MX spec v1.0 section 5.4;
compressed-tensors 0.20.1 ``compressors/mx_utils.py`` ``decompress_mx_scale``).
"""

from __future__ import annotations

import functools

import torch

E2M1_MAX = 6.0
# value of each 4-bit code (Model-Optimizer 0.47 nvfp4_tensor.py e2m1_values)
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
# midpoints between neighbouring magnitudes; a tie rounds to the even code (the odd-indexed bounds
# 0.75, 1.75, 3.5 round up, the others down)
_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_ODD_BOUNDS = _BOUNDS[[1, 3, 5]]
E8M0_BIAS = 127
E8M0_NAN = 255


def cast_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Already-scaled values -> uint8 codes 0..15 (same shape), rounded as documented above."""
    x = x.float()
    sign = (x < 0).to(torch.uint8)
    mag = x.abs()
    bounds, odd, _ = _tables(mag.device)  # searchsorted and == refuse a CPU table beside CUDA values
    code = torch.searchsorted(bounds, mag.contiguous(), out_int32=True).to(torch.uint8)
    tie = (mag.unsqueeze(-1) == odd).any(-1).to(torch.uint8)
    return (sign << 3) + code + tie


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(_BOUNDS, _ODD_BOUNDS, E2M1_VALUES) on ``device``, copied once per device: a copy from host memory to a GPU
    waits for it (a stream sync), at every decode of every expert's weight."""
    return _BOUNDS.to(device), _ODD_BOUNDS.to(device), E2M1_VALUES.to(device)


def e2m1_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes -> their E2M1 values in ``dtype``."""
    return _tables(codes.device)[2][codes.long()].to(dtype)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Already-scaled values rounded to the nearest E2M1 value (float32): the fake quant of :func:`cast_e2m1`."""
    return e2m1_values(cast_e2m1(x))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] -> bytes [..., ceil(n/2)], element 2j low nibble, 2j+1 high; an odd ``n``
    gets a zero high nibble in its last byte."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Bytes [..., m] -> uint8 codes [..., n] (``n`` defaults to 2m): inverse of :func:`pack`."""
    packed = packed.to(torch.uint8)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return codes if n is None else codes[..., :n]


def unpack_values(packed: torch.Tensor, n: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bytes [..., m] -> E2M1 values [..., n] in ``dtype`` (unscaled)."""
    return e2m1_values(unpack(packed, n), dtype)


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, or torch.float8_e8m0fnu) -> float32 scales 2 ** (byte - 127); 255 -> NaN."""
    if scale.dtype != torch.uint8:
        scale = scale.view(torch.uint8)
    e = scale.to(torch.int32)
    # the float32 bits of 2 ** (e - 127) (exact on every device, unlike a math-library exp2): the exponent
    # field e for e >= 1, the subnormal 2 ** -127 (bit 22) for e = 0
    out = torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23).view(torch.float32)
    return torch.where(e == E8M0_NAN, torch.full_like(out, float("nan")), out)


MX_BLOCK = 32


def mx_scale_bytes(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes of MXFP4 blocks whose max |x| is ``amax``: amax rounded to a power of two (up from
    a mantissa of 1.75), divided by 4 = 2**floor(log2 6), so the block max lands at 4..7 (saturating
    at 6). compressed-tensors 0.20.1 ``quantization/utils/mxfp_utils.py`` generate_mx_scales /
    round_to_power_2 (vLLM's ``tests/quantization/reference_mxfp4.py``), clamped to 0..254; a block
    holding NaN or Inf gets E8M0's NaN (255), which the quantize stage refuses."""
    a = amax.float().contiguous()
    field = (a.view(torch.int32) + (1 << 21)) >> 23  # float32 exponent field after rounding the mantissa
    e = (field - 2).clamp(0, E8M0_NAN - 1)
    return torch.where(torch.isfinite(a), e, E8M0_NAN).to(torch.uint8)


def mx_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] (in a multiple of 32) -> (packed E2M1 [..., in/2], E8M0 bytes [..., in/32])."""
    if w.shape[-1] % MX_BLOCK:
        raise ValueError(f"MXFP4: the last dimension {w.shape[-1]} is not a multiple of {MX_BLOCK}")
    wb = w.float().reshape(*w.shape[:-1], -1, MX_BLOCK)
    e = mx_scale_bytes(wb.abs().amax(-1))
    codes = cast_e2m1(wb / e8m0_decode(e).unsqueeze(-1))
    return pack(codes.reshape(w.shape)), e


def mx_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [..., in/2], E8M0 [..., in/32]) -> W [..., in] in ``dtype``."""
    v = unpack_values(packed)
    v = v.reshape(*v.shape[:-1], -1, MX_BLOCK) * e8m0_decode(scale).unsqueeze(-1)
    return v.reshape(*packed.shape[:-1], -1).to(dtype)


__all__ = ["E2M1_MAX", "E2M1_VALUES", "E8M0_BIAS", "MX_BLOCK", "cast_e2m1", "e2m1_values", "e8m0_decode",
           "mx_dequantize", "mx_quantize", "mx_scale_bytes", "pack", "round_e2m1",
           "unpack", "unpack_values"]
