"""``mxfp4``: E2M1 weights with one power-of-two E8M0 scale per 32 input channels (OCP MX v1.0),
bf16 activations; no calibration. Numerics: compress/quant/fp4.py ``mx_quantize`` (the scale choice
of compressed-tensors 0.20.1 / vLLM's MXFP4 reference, ``quantization/utils/mxfp_utils.py``).

Stored (our quantize output): ``P.weight`` U8 [out, in/2] (E2M1 pairs, low nibble = even input
channel), ``P.weight_scale`` U8 [out, in/32] (E8M0, scale = 2 ** (byte - 127)).

Its consumer here is compressed-tensors ``mxfp4-pack-quantized`` (compressed-tensors 0.20.1
``compressors/mxfp4/base.py`` MXFP4PackedCompressor, preset ``MXFP4A16``: ``weight_packed`` = our
bytes, ``weight_scale`` = our E8M0 bytes), read by transformers' CompressedTensors integration and
served by vLLM's ``CompressedTensorsW4A16Mxfp4`` (FP4 Marlin, get_min_capability 80) and SGLang's
(per-expert MoE: CompressedTensorsW4A16Mxfp4MoE). Model-Optimizer's HF export has no MXFP4 entry
that its consumers read (vLLM's ModelOpt QUANT_ALGOS lists none, ``vllm/.../quantization/modelopt.py``),
so ``hf-modelopt`` refuses it. A width that is not a multiple of 32 stays bf16 (reported skipped).
"""

from __future__ import annotations

import torch

from moepress.compress.formats.base import Format, QuantContext, Quantized
from moepress.compress.quant import fp4

GROUP = fp4.MX_BLOCK


def skip(out_f: int, in_f: int, group_size: int) -> str | None:
    """An input width that is not whole blocks stays unquantized (``group_size``: not used, the block is fixed)."""
    return f"in_features {in_f} not a multiple of the MXFP4 block {GROUP}" if in_f % GROUP else None


def quantize(ws: list[torch.Tensor], ctx: QuantContext) -> Quantized:
    why = skip(*ws[0].shape, 0)
    if why:
        return Quantized(skipped=why)
    tensors = []
    for w in ws:
        q, s = fp4.mx_quantize(w)
        tensors.append({"weight": q, "weight_scale": s})
    return Quantized(tensors, group=GROUP)


def decode(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return fp4.mx_dequantize(q, s, dtype)


def stored_bytes(out_f: int, in_f: int) -> float:
    if in_f % GROUP:
        return 2 * out_f * in_f
    return out_f * in_f / 2 + out_f * in_f / GROUP


def ct_scheme(group: int | None, targets: list[str]):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return QuantizationScheme(targets=targets, **PRESET_SCHEMES["MXFP4A16"])


def ct_tensors(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"weight_packed": t["weight"], "weight_scale": t["weight_scale"]}


FORMAT = Format(
    name="mxfp4",
    split_unit=(1, 32), description="E2M1 weights, E8M0 scale per 32 (OCP MX); bf16 activations",
    element="fp4", scale="group", activation="none", archs=(80, 86, 89, 90, 100, 120), quant_algo="W4A16_MXFP4",
    alternatives=("nvfp4-a16", "int4-gptq", "int4-awq", "fp8"), stored=("weight", "weight_scale"),
    quantize=quantize, skip=skip, stored_bytes=stored_bytes,
    ct_format="mxfp4-pack-quantized", ct_scheme=ct_scheme, decode=decode, weight_scale_dtype=torch.uint8,
    ct_tensors=ct_tensors,
    # moepress writes MXFP4 for compressed-tensors only (its hf-modelopt layout has no MXFP4 entry, trtllm-ckpt no
    # FP4): no TensorRT-LLM path loads these experts, whatever the GPU
    trtllm_moe_families=(), trtllm_moe_why="moepress exports MXFP4 as compressed-tensors only (vLLM, SGLang)",
)
