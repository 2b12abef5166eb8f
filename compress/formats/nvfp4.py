"""``nvfp4``: E2M1 weights with an FP8 E4M3 scale per 16 input channels and an FP32 global scale,
activations quantized alike at run time with a calibrated global scale (TensorRT-LLM QuantAlgo
``NVFP4``, Blackwell sm100/sm120). Numerics: compress/quant/nvfp4.py (Model-Optimizer 0.47's).

Stored (Model-Optimizer 0.47's unified HF layout, ``modelopt/torch/export/unified_export_hf.py`` /
``quant_utils.py``): ``P.weight`` U8 [out, in/2] (two E2M1 codes per byte, low nibble = even input
channel), ``P.weight_scale`` F8_E4M3 [out, in/16], ``P.weight_scale_2`` F32 [] (amax / (6 * 448)),
``P.input_scale`` F32 [] (calibrated amax / (6 * 448)). ``hf_quant_config.json``:
``{"quant_algo": "NVFP4", "group_size": 16}`` (quant_utils.process_layer_quant_config).

Linears that TensorRT-LLM fuses into one GEMM (q/k/v, gate/up) share ``weight_scale_2`` (modelopt's
``preprocess_linear_fusion``); routed experts share ``input_scale`` per projection and keep their own
``weight_scale_2``: TensorRT-LLM's NVFP4 fused MoE takes one input scale per projection for all
experts (the max, ``tensorrt_llm/_torch/modules/fused_moe/quantization.py``
NVFP4FusedMoEMethod.load_all_fp4_weight_scales_and_alphas) and per-expert alphas from each expert's
``weight_scale_2``.

An input width that is not a multiple of 16 cannot be stored (the block scale grid and the FP4 GEMM
need whole blocks; vLLM's ModelOptNvFp4LinearMethod refuses such layers): the linear stays bf16
and is reported skipped, as INT4 does with widths no group divides.

compressed-tensors ``nvfp4-pack-quantized`` (compressed-tensors 0.20.1
``compressors/nvfp4/base.py`` NVFP4PackedCompressor, preset ``NVFP4`` in
``quantization/quant_scheme.py``): ``weight_packed`` = our ``weight`` bytes (same nibble order,
``compressors/nvfp4/helpers.py``), ``weight_scale`` = our E4M3 scales, and the global scales in that
library's reciprocal convention, ``weight_global_scale`` = 1 / weight_scale_2 and
``input_global_scale`` = 1 / input_scale, shape [1] (``quantization/utils/helpers.py``
generate_gparam: 448 * 6 / amax; ``lifecycle/forward.py`` dequantizes with scale / global_scale).
"""

from __future__ import annotations

import torch

from moepress.compress.formats.base import Format, QuantContext, Quantized
from moepress.compress.quant import fp4, nvfp4
from moepress.compress.quant.fp8 import FP8_DTYPE

GROUP = nvfp4.BLOCK


def skip(out_f: int, in_f: int, group_size: int) -> str | None:
    """An input width that is not whole blocks stays unquantized (``group_size``: not used, the block is fixed)."""
    return f"in_features {in_f} not a multiple of the NVFP4 block {GROUP}" if in_f % GROUP else None


def quantize(ws: list[torch.Tensor], ctx: QuantContext) -> Quantized:
    """NVFP4 weights of linears that share an input: one ``weight_scale_2`` for the group."""
    why = skip(*ws[0].shape, 0)
    if why:
        return Quantized(skipped=why)
    s2 = nvfp4.global_scale(torch.stack([w.abs().amax() for w in ws]).amax())
    tensors = []
    for w in ws:
        q, s, s2_ = nvfp4.quantize(w, s2)
        tensors.append({"weight": q, "weight_scale": s, "weight_scale_2": s2_})
    return Quantized(tensors, group=GROUP)


def decode_stored(t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return nvfp4.dequantize(t["weight"], t["weight_scale"], t["weight_scale_2"], dtype)


def input_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / (6 * 448), never zero (an input calibration never saw gets the smallest normal)."""
    return nvfp4.global_scale(amax).clamp(min=torch.finfo(torch.float32).tiny)


def stored_bytes(out_f: int, in_f: int, *, scalars: int = 2) -> float:
    """Packed E2M1 + E4M3 block scales + FP32 scalars; a width not a multiple of 16 stays bf16."""
    if in_f % GROUP:
        return 2 * out_f * in_f
    return out_f * in_f / 2 + out_f * in_f / GROUP + 4 * scalars


def modelopt_entry(algo: str):
    def entry(group: int | None) -> dict:
        return {"quant_algo": algo, "group_size": GROUP}
    return entry


_FP4_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP}


def modelopt_group(group: int | None) -> dict:
    """modelopt 0.47 convert_hf_config._quant_algo_to_group_config("NVFP4")."""
    return {"input_activations": dict(_FP4_ARGS), "weights": dict(_FP4_ARGS)}


def ct_scheme_of(preset: str):
    def scheme(group: int | None, targets: list[str]):
        from compressed_tensors.quantization import QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        return QuantizationScheme(targets=targets, **PRESET_SCHEMES[preset])
    return scheme


def ct_tensors(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our stored tensors -> compressed-tensors' nvfp4-pack-quantized ones (see the module doc)."""
    out = {"weight_packed": t["weight"], "weight_scale": t["weight_scale"],
           "weight_global_scale": (1.0 / t["weight_scale_2"].float()).reshape(1)}
    if "input_scale" in t:
        out["input_global_scale"] = (1.0 / t["input_scale"].float()).reshape(1)
    return out


FORMAT = Format(
    name="nvfp4",
    split_unit=(1, 16), description="E2M1 weights + activations, E4M3 scale per 16, FP32 global scale (Blackwell)",
    element="fp4", scale="group", activation="static", archs=(100, 120), quant_algo="NVFP4",
    # nvfp4-a16 first: the same weights with bf16 activations, which TensorRT-LLM runs from sm80 (W4A16_NVFP4, a
    # dequantizing MoE) and vLLM with Marlin
    calibrated=True, weight_scale_2=True, alternatives=("nvfp4-a16", "int4-awq", "w4a8-awq", "fp8-block", "fp8"),
    stored=("weight", "weight_scale", "weight_scale_2", "input_scale"),
    quantize=quantize, skip=skip, stored_bytes=stored_bytes,
    modelopt_entry=modelopt_entry("NVFP4"), modelopt_group=modelopt_group,
    modelopt_flat_group=True,
    ct_format="nvfp4-pack-quantized", ct_scheme=ct_scheme_of("NVFP4"),
    decode_stored=decode_stored, weight_scale_dtype=FP8_DTYPE,
    input_scale_of=input_scale, input_quant=nvfp4.fake_quant_input, ct_tensors=ct_tensors, identity_top=fp4.E2M1_MAX,
)
