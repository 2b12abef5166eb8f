"""Device-independent rounding of divisions by a constant.

CUDA turns ``tensor / python_number`` into a multiplication by the number's float reciprocal
(PyTorch ``aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu``: "if the second input is a CPU
scalar, compute a * reciprocal(b) ... may lose one bit of precision"); the CPU divides. Scales such
as amax / 448 would then differ in the last bit between the two, and so would the bytes written.
A divisor that is a tensor on the dividend's device is divided, correctly rounded, on both.
"""

from __future__ import annotations

import torch


def div(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` rounded as IEEE division on every device (``c`` exact in ``t``'s dtype, e.g. 448, 7, 6)."""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


__all__ = ["div"]
