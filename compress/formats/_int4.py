"""The INT4 weight quantizer the three INT4 formats share (int4-awq, int4-gptq, w4a8-awq).

Model-Optimizer's INT4 numerics (modelopt/torch/export/quant_utils.py, 0.47: group scales amax / 7,
``pack_int4_in_uint8``); AWQ scale search and clip search (compress/quant/awq.py, modelopt's
awq_lite / awq_clip); GPTQ rounding (compress/quant/gptq.py). With AWQ and ``awq_gptq`` the
smoothed weight W / pre_quant_scale is rounded by GPTQ on the smoothed input's Hessian
diag(pqs) H diag(pqs) (llm-compressor's AWQ + GPTQ stacking); the stored format is the same.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from moepress.compress.formats.base import GROUP, QuantContext, Quantized
from moepress.compress.quant import awq, fp8, gptq, int4, w4a8

# TensorRT-LLM main (read 2026-12): tensorrt_llm/_torch/modules/fused_moe/fused_moe_cutlass.py
# ``_get_quant_method`` sends every INT4 per-group mode (W4A16_AWQ / W4A16_GPTQ / W4A8_AWQ) to
# ``WInt4AFP8FusedMoEMethod`` (quantization.py), sm89/sm90 only, 128-wide groups; its
# ``load_quant_scales`` reads each expert's ``input_scale`` and ``weight_scale_2``; and
# models/modeling_deepseekv3.py loads INT4 experts in its ``W4A8_CUSTOM`` layout (``weight_scale_inv``,
# pre-packed weights, the input scale fused with pre_quant_scale), not Model-Optimizer's.
TRTLLM_W4A16_MOE = ("TensorRT-LLM's fused MoE runs INT4 experts only as W4A8 (WInt4AFP8FusedMoEMethod reads each "
                    "expert's input_scale and weight_scale_2, which weight-only INT4 has not)")
TRTLLM_W4A8_MOE = ("TensorRT-LLM loads DeepSeek-V3 / Kimi K2 INT4 experts in its own W4A8_CUSTOM layout "
                   "(modeling_deepseekv3.py), not Model-Optimizer's")


def _smoothing(ws: list[torch.Tensor], st, group: int, use_awq: bool) -> tuple[torch.Tensor | None, float | None]:
    """AWQ's pre_quant_scale for the group (identity scales for an expert without statistics)."""
    if use_awq and st is not None and st.n > 0:
        pqs, alpha, _ = awq.search(ws, st.sample(), st.act_mean, group)
        return pqs, alpha
    if use_awq:
        return torch.ones(ws[0].shape[1], device=ws[0].device), None
    return None, None


def _hessian(st, pqs: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """The Hessian of the input the quantized weight reads (x * pqs with AWQ), made once here: a new
    tensor, or S's own memory when this call alone reads the statistics (``st.single_use``)."""
    if not needed or st is None or st.n <= 0 or (st.S is None and not st.taken):
        return None
    H = st.make_hessian(take=st.single_use)  # 2 S / n
    if pqs is not None:  # diag(pqs) H diag(pqs), in place
        H.mul_(pqs.double()[:, None]).mul_(pqs.double()[None, :])
    return H


def _clip_input(st, pqs: torch.Tensor | None, fp8_input: bool) -> torch.Tensor:
    """The GEMM's input the clip search evaluates (awq.py); W4A8 sees the FP8 activations its GEMM runs on
    (moepress's choice: modelopt 0.47's W4A8 awq_full clips on the unquantized input, then re-calibrates
    the weight's amax, which undoes the clip)."""
    x = st.sample() * pqs[None, :] if pqs is not None else st.sample()
    if fp8_input:
        x = fp8.fake_quant(x, fp8.scale_from_amax((st.amax * pqs if pqs is not None else st.amax).amax()))
    return x


def act_order_of(ctx: QuantContext, use_awq: bool) -> QuantContext:
    """``ctx`` with GPTQ's column order decided: unset (None) means act order for AWQ + GPTQ and in
    order for plain GPTQ (compress/quantize/config.py says what measured it)."""
    if ctx.gptq_act_order is not None:
        return ctx
    return dataclasses.replace(ctx, gptq_act_order=use_awq)


def skip(out_f: int, in_f: int, group_size: int) -> str | None:
    """Why an [out_f, in_f] linear stays unquantized: no group of at most ``group_size`` divides its inputs, or
    an odd row count (modelopt's pack_int4_in_uint8 holds two output rows per byte too)."""
    if int4.effective_group(in_f, group_size) is None:
        return f"in_features {in_f} is over --group-size {group_size} and not a multiple of it"
    if out_f % 2:
        return f"out_features {out_f} is odd: INT4 packs two output rows per byte"
    return None


def quantize(ws: list[torch.Tensor], ctx: QuantContext, *, use_awq: bool, use_gptq: bool,
             fp8_input: bool = False, with_scale_2: bool = False) -> Quantized:
    """INT4 weights of linears that share an input (one pre_quant_scale, one Hessian factorisation)."""
    st = ctx.stats
    ctx = act_order_of(ctx, use_awq)
    why = next(filter(None, (skip(*w.shape, ctx.group_size) for w in ws)), None)  # the inputs are shared
    if why:
        return Quantized(skipped=why)
    group = int4.effective_group(ws[0].shape[1], ctx.group_size)
    # folded AWQ (fold.py): weights and statistics arrive smoothed; GPTQ / clip as for AWQ, nothing stored
    pqs, alpha = _smoothing(ws, st, group, use_awq and not ctx.awq_folded)
    H = _hessian(st, pqs, use_gptq or (use_awq and ctx.awq_gptq))
    clip_x = None
    if use_awq and H is None and ctx.awq_clip and st is not None and st.n > 0:
        clip_x = _clip_input(st, pqs, fp8_input)
    if H is not None:
        # H is this call's own (_hessian): factorised in its memory; the weights (float32, or bf16 as
        # stored) are read a slice of rows at a time, so no whole float32 copy is made here
        rounded = gptq.gptq_quantize_shared(ws, H, group, ctx.gptq_damp, ctx.gptq_act_order, overwrite=True,
                                            in_scale=pqs)
        del H  # the factor goes before the packing's temporaries come
        return Quantized(stored(ws, rounded, pqs, with_scale_2), pqs, alpha, group)
    rounded = []
    for w in ws:
        wq = w.float() / pqs[None, :] if pqs is not None else w.float()
        if clip_x is not None:
            s = awq.clip_scales(wq, clip_x, group)
            rounded.append((int4.quantize_with_scales(wq, s), s))
        else:
            rounded.append(int4.quantize(wq, group))
    return Quantized(stored(ws, rounded, pqs, with_scale_2), pqs, alpha, group)


def reads_stored(f) -> bool:
    """Whether format ``f`` quantizes with this module's :func:`quantize`, which reads a weight of any
    float dtype exactly (bf16 as stored: GPTQ a slice of rows at a time in float32, the rest through
    ``w.float()``), so its caller need not make a float32 copy first."""
    q = f.quantize
    return isinstance(q, partial) and q.func is quantize


def stored(ws: list[torch.Tensor], rounded, pqs: torch.Tensor | None, with_scale_2: bool) -> list[dict]:
    """The tensors a group's linears store: packed INT4 + group scales per linear, the shared AWQ
    ``pre_quant_scale``, and W4A8's one ``weight_scale_2`` for the fused group (w4a8.py)."""
    tensors = []
    for q, s in rounded:
        t = {"weight": int4.pack_int4(q), "weight_scale": s}
        if pqs is not None:
            t["pre_quant_scale"] = pqs
        tensors.append(t)
    if with_scale_2:
        s2 = w4a8.weight_scale_2(ws, pqs)
        for t in tensors:
            t["weight_scale_2"] = s2
    return tensors


def decode(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return int4.dequantize(int4.unpack_int4(q), s, dtype)


def stored_bytes(out_f: int, in_f: int, *, awq_scale: bool = False, scalars: int = 0, group: int = GROUP,
                 scale_bytes: int = 4) -> float:
    """Packed INT4 + F32 group scales (+ F32 pre_quant_scale [in], + F32 scalars); a linear whose
    in_features is not a multiple of the group stays bf16 (int4.effective_group). ``scale_bytes``: 2 for a
    checkpoint storing its group scales in bf16 (compressed-tensors: Kimi K2 Thinking)."""
    n = out_f * in_f
    if (in_f > group and in_f % group) or out_f % 2:  # left bf16 (quantize: skipped)
        return 2 * n
    groups = -(-in_f // group)  # in_f < group: one group per row (the group is clamped)
    return n / 2 + scale_bytes * out_f * groups + (4 * in_f if awq_scale else 0) + 4 * scalars


def modelopt_entry(algo: str, *, awq_scale: bool):
    """One layer's entry in hf_quant_config.json (modelopt quant_utils.process_layer_quant_config)."""
    def entry(group: int | None) -> dict:
        e = {"quant_algo": algo, "group_size": group, "has_zero_point": False}
        return {**e, "pre_quant_scale": True} if awq_scale else e
    return entry


def modelopt_group(group: int | None) -> dict:
    """config.json's compressed-tensors-style group (modelopt convert_hf_config._quant_algo_to_group_config)."""
    return {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": group}}


def ct_scheme(group: int | None, targets: list[str]):
    """compressed-tensors pack-quantized: int4 symmetric, strategy group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, dynamic=False, strategy="group", group_size=group))
