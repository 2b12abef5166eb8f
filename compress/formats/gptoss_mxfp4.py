"""Input decoder for gpt-oss's MXFP4 experts: ``P_blocks`` U8 [E, R, G, 16] (two E2M1 values per
byte, low nibble first: 32 values per block) and ``P_scales`` U8 [E, R, G] (E8M0 exponents, bias
127), for ``P`` = ``...mlp.experts.gate_up_proj`` / ``...mlp.experts.down_proj``.

Read as transformers reads it (transformers 5.24 ``integrations/mxfp4.py``
``convert_moe_packed_tensors``): E2M1 values times 2 ** (exponent - 127), exact in float32 and in
the requested dtype (quant/fp4.mx_dequantize), rows of ``G * 32`` values, then dims 1 and 2 swapped.
One difference: an exponent byte of 255, NaN in the OCP MX spec, decodes to NaN here, where
transformers' ``ldexp`` gives +-inf (or 0).
The result is the [E, G*32, R] parameter of transformers' ``GptOssExperts`` (``x @ W``; for
``gate_up_proj`` [E, hidden, 2 * intermediate]). moepress has no gpt-oss architecture adapter: this
is the tensor-level decoder the reader offers (``CheckpointReader.weight("...experts.gate_up_proj")``).
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp4
from moepress.errors import MoepressError

BLOCKS, SCALES = "_blocks", "_scales"


def packed_aliases(names) -> dict[str, str]:
    """{``P``: ``P_blocks``} for each gpt-oss MXFP4 tensor among the stored ``names``."""
    names = set(names)
    return {n[: -len(BLOCKS)]: n for n in names if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names}


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(blocks [..., R, G, 16], scales [..., R, G]) -> [..., G*32, R] in ``dtype`` (see the module doc)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.ndim < 3:
        raise ValueError(f"blocks {blocks.dtype} {list(blocks.shape)} / scales {scales.dtype} {list(scales.shape)}: "
                         "expected uint8 [..., R, G, 16] and uint8 [..., R, G]")
    return fp4.mx_dequantize(blocks.flatten(-2), scales, dtype).transpose(-1, -2).contiguous()


def decode(reader, base: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The dequantized ``base`` when it is stored as gpt-oss ``base_blocks`` + ``base_scales``."""
    if base + BLOCKS not in reader or base + SCALES not in reader:
        return None
    try:
        return dequantize(reader.get(base + BLOCKS), reader.get(base + SCALES), dtype)
    except ValueError as e:
        raise MoepressError(f"{reader.path}: tensor '{base}{BLOCKS}': {e}") from None


DECODERS = (decode,)
