"""What the three FP8 formats share: their decoder, config groups and compressed-tensors args.

Model-Optimizer's FP8 numerics (modelopt/torch/export/quant_utils.py 0.47: scale = amax / 448,
weight = (w / scale).to(float8_e4m3fn)); compress/quant/fp8.py has the tensor functions.
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp8

# modelopt convert_hf_config._quant_algo_to_group_config's FP8 quantizer args
GROUP_ARGS = {"dynamic": False, "num_bits": 8, "type": "float"}


def decode(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return fp8.dequantize(q, s, dtype)


def modelopt_entry(algo: str):
    def entry(group: int | None) -> dict:
        return {"quant_algo": algo}
    return entry


def ct_args(**kw):
    """compressed-tensors QuantizationArgs for FP8 E4M3, symmetric."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**{"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, **kw})


def each(ws: list[torch.Tensor], fn) -> list[dict[str, torch.Tensor]]:
    out = []
    for w in ws:
        q, s = fn(w)
        out.append({"weight": q, "weight_scale": s})
    return out
