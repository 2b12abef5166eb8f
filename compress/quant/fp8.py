"""FP8 (E4M3) weights: per-tensor and 128x128 block scales.

Block layout is DeepSeek-V3's (deepseek-ai/DeepSeek-V3 README_WEIGHTS.md): a float8_e4m3fn
weight [out, in] and a float32 ``weight_scale_inv`` [ceil(out/128), ceil(in/128)];
dequantized weight = fp8 block * its scale_inv (partial edge blocks included). Model-Optimizer
0.47 exports the same grid as [ceil(out/128), 1, ceil(in/128), 1] (:func:`modelopt_block`); every
reader here takes both (:func:`block_grid`).
"""

from __future__ import annotations

import math
import threading

import torch

from moepress.compress.quant.exact import div
from moepress.errors import MoepressError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
DEFAULT_BLOCK = (128, 128)


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    return scale.repeat_interleave(br, 0)[: shape[0]].repeat_interleave(bc, 1)[:, : shape[1]]


_SCRATCH = threading.local()


def _scratch(n: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of n elements on ``device``, reused across calls (one per thread, grown as needed)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n or buf.device != device:
        buf = _SCRATCH.buf = None  # drop the old one first
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n]


def quantize_block(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (fp8 weight, float32 scale_inv per block). scale_inv = amax / 448.

    ``w`` may be bf16 or float32; the division is done in float32 either way (bf16 -> float32
    is exact), so both give the same bytes.
    """
    out, inp = w.shape
    br, bc = block
    pr, pc = (-out) % br, (-inp) % bc
    if pr or pc:  # partial edge blocks: zero padding changes no block's max |w|; cut back after
        q, scale = quantize_block(torch.nn.functional.pad(w, (0, pc, 0, pr)), block)
        return q[:out, :inp].contiguous(), scale
    nr, nc = out // br, inp // bc
    q = torch.empty(out, inp, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(nr, nc, dtype=torch.float32, device=w.device)
    # a few block rows at a time, so the float32 working copy stays in the CPU's cache instead of
    # streaming a whole expert through memory several times: the pass is bound by compute, not by the
    # memory bus the cores share. Blocks are independent, so the bytes are those of one whole-tensor pass.
    step = max(1, _CHUNK // max(1, br * inp) if w.device.type == "cpu" else nr)
    for r in range(0, nr, step):
        k = min(step, nr - r)
        rows = slice(r * br, (r + k) * br)
        scale[r:r + k] = _quantize_rows(w[rows].reshape(k, br, nc, bc), q[rows].view(k, br, nc, bc))
    return q, scale


_CHUNK = 1 << 20  # float32 elements per working copy (4 MiB: an L2/L3 slice, one Kimi K2 expert block row)


def _quantize_rows(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Whole blocks ``v`` [k, br, nc, bc] -> fp8 into ``q`` (same view); returns their scales [k, nc]."""
    # in float32 in a reused scratch buffer: no fresh pages per tensor (a mixed bf16/float32 division
    # takes torch's slow CPU path; fresh buffers cost page faults); bf16 -> float32 is exact
    f = _scratch(v.numel(), v.device).view(v.shape)
    f.copy_(v)
    # max |w| per block (no |w| buffer), reduced along the contiguous last dim first (a contiguous
    # reduction), then across rows; a max is exact in any order
    amax = torch.maximum(f.amax(dim=3), f.amin(dim=3).neg()).amax(dim=1)
    scale = div(amax, FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    f.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q.copy_(f)
    return scale


def block_grid(scale: torch.Tensor) -> torch.Tensor:
    """A block scale as the 2-D grid [ceil(out/128), ceil(in/128)] (DeepSeek's ``weight_scale_inv``, or any
    checkpoint that stores the grid): Model-Optimizer's [ceil(out/128), 1, ceil(in/128), 1]
    (:func:`modelopt_block`) viewed without its two singleton dims; any other tensor as it is."""
    if scale.ndim == 4 and scale.shape[1] == 1 and scale.shape[3] == 1:
        return scale.reshape(scale.shape[0], scale.shape[2])
    return scale


def modelopt_block(scale: torch.Tensor) -> torch.Tensor:
    """A block scale grid as Model-Optimizer 0.47 exports FP8_PB_WO: [ceil(out/128), 1, ceil(in/128), 1]
    (the block quantizer's amax keeps its reshape's singleton dims: get_weight_scaling_factor of a
    ``block_sizes={-1: 128, -2: 128}`` weight quantizer, export/quant_utils.py), the shape vLLM 0.33 allocates
    (model_executor/layers/quantization/modelopt.py ``KFp8Block128.create_weights``); TensorRT-LLM's
    FP8BlockScalesLinearMethod squeezes it (_torch/modules/linear.py, main 2026-11)."""
    g = block_grid(scale)
    return g.reshape(g.shape[0], 1, g.shape[1], 1)


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [out, in] times its block scales (the 2-D grid or Model-Optimizer's 4-D form: :func:`block_grid`)."""
    scale_inv = block_grid(scale_inv)
    out, inp = q.shape
    br, bc = block
    if out % br or inp % bc or tuple(scale_inv.shape) != (out // br, inp // bc):  # partial edge blocks
        return (q.float() * _expand_blocks(scale_inv.float(), tuple(q.shape), block)).to(dtype)
    # whole blocks: the scale broadcast over each block's view (same products, no expanded copy)
    v = q.float().view(out // br, br, inp // bc, bc).mul_(scale_inv.float()[:, None, :, None])
    return v.view(out, inp).to(dtype)


def block_size_of(config: dict) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` (DeepSeek-V3's [128, 128] when absent), refused
    unless it is two positive integers."""
    qc = config.get("quantization_config") or {}
    bs = (qc.get("weight_block_size") if isinstance(qc, dict) else None) or DEFAULT_BLOCK
    if not isinstance(bs, (list, tuple)) or len(bs) != 2 or not all(isinstance(b, int) and b > 0 for b in bs):
        raise MoepressError(f"config.json: quantization_config.weight_block_size is {bs!r}; expected two positive "
                            "integers (DeepSeek-V3: [128, 128])")
    return int(bs[0]), int(bs[1])


# ---- per-tensor / per-channel weights, activation fake-quant ---------------------------------
# Model-Optimizer's FP8 numerics (modelopt/torch/export/quant_utils.py: get_scaling_factor =
# amax / maxbound (448 for E4M3); to_quantized_weight = (weight / scale).to(float8_e4m3fn)).

def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax -> FP8 scale (amax / 448), never zero (an all-zero tensor gets the smallest normal)."""
    return div(amax.float(), FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def identity_exact_input_scale(s: torch.Tensor, top: float = 1.0) -> torch.Tensor:
    """The static input scale ``s`` raised to the nearest ``s' >= s`` for which ``1 / (top * s')`` is an E4M3
    value (<= 448), so that a runtime dequantizing the weight through an identity matrix gets it back
    unscaled. ``top`` is the code 1.0 becomes: 1 for an FP8 per-tensor input (1.0 -> fp8(1 / s')), 6 for NVFP4
    (a block holding one 1.0 gets the E4M3 block scale (1 / s') / 6 and the E2M1 code 6). Activations then clip
    at a range under 12.5% wider (one E4M3 step: 3 mantissa bits, for 1 / (top * s) in E4M3's normal range
    [2^-6, 448]): never more clipping. s under 1 / (top * 448) (an input whose amax is under 1) is raised to it.

    Why: vLLM 0.33 splits an MLA ``kv_b_proj`` into W_UK / W_UV at load
    (model_executor/layers/attention/mla_attention.py:417 ``split_kv_b_proj``) through
    ``get_and_maybe_dequant_weights`` (model_executor/layers/quantization/utils/quant_utils.py:513-570).
    Only ``Fp8LinearMethod`` takes its weight * weight_scale path (:538); Model-Optimizer's
    ``ModelOptLinearMethod`` (modelopt.py:2560, "FP8": static tensor activations, :2716-2723) and
    compressed-tensors' ``CompressedTensorsW8A8Fp8`` run ``quant_method.apply(layer, eye)`` (:560-569),
    which quantizes the identity with the static input scale (input_quant_fp8.py:216-220:
    fp8(clamp(1 * (1/s), 448))): every weight comes back times q(1/s) * s, up to 6.25% off, and
    far more when 1/s > 448 saturates. NVFP4's linears (ModelOptNvFp4LinearMethod, CompressedTensorsW4A4Fp4 on
    Blackwell) quantize the identity with csrc's ``cvt_warp_fp16_to_fp4`` (block scale e4m3(G / 6), G = 1 / s;
    code e2m1(G / scale)): times e2m1(G / sf) * sf / G, up to 6% off. With 1 / (top * s') an E4M3 value v the
    code is exactly ``top`` and the factor top * v * s' is 1 (float32). ``s`` with no such s' (1 / (top * s)
    under E4M3's smallest subnormal 2^-9) is returned as is."""
    s = s.float()
    q = torch.reciprocal(s * top).clamp(max=FP8_MAX).to(FP8_DTYPE)  # the nearest E4M3 v to 1 / (top * s)
    # keep v when the runtime's float32 1 / (top * v) is still >= s (not v against fl(1/s): an s whose 1/s is
    # already an E4M3 value must keep it, whatever a float32 ulp says); else the E4M3 value below
    bits = q.view(torch.uint8)  # torch.where takes no float8 on CPU before torch 2.7
    v = torch.where(torch.reciprocal(q.float() * top) >= s, bits, bits - 1).view(FP8_DTYPE).float()
    return torch.where(v > 0, torch.reciprocal(v * top), s)


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor: w -> (fp8 weight, float32 scalar scale); dequantized = q * scale."""
    if scale is None:
        scale = scale_from_amax(w.float().abs().amax())
    return (w.float() / scale).to(FP8_DTYPE), scale.float().reshape(())


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: w [out, in] -> (fp8 weight, float32 scale [out, 1])."""
    scale = scale_from_amax(w.float().abs().amax(dim=1, keepdim=True))
    return (w.float() / scale).to(FP8_DTYPE), scale


def requantize(q: torch.Tensor, scale: float, new_scale: float) -> torch.Tensor:
    """FP8 values at ``scale`` re-rounded to ``new_scale`` (>= scale); exact when equal."""
    if scale == new_scale:
        return q
    return (q.float() * (scale / new_scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scale_layout_error(q_shape, s_shape) -> str | None:
    """Why an FP8 weight's ``weight_scale`` is none of the layouts :func:`dequantize` reads (None if it is
    one): per tensor, per channel ([out] as Model-Optimizer writes it, [out, 1] as compressed-tensors does)
    or 128x128 blocks. A group scale [out, in / g] or blocks of
    another size (compressed-tensors ``strategy: group`` / ``block_structure``) would otherwise be
    read as 128x128 blocks. Block scales in Model-Optimizer's 4-D form are read as their grid (:func:`block_grid`)."""
    s_shape = tuple(s_shape)
    if len(s_shape) == 4 and s_shape[1] == s_shape[3] == 1:
        s_shape = (s_shape[0], s_shape[2])
    if math.prod(s_shape) == 1 or len(q_shape) != 2 or s_shape in ((q_shape[0], 1), (q_shape[0],)):
        return None
    grid = tuple(-(-d // b) for d, b in zip(q_shape, DEFAULT_BLOCK, strict=True))
    if s_shape == grid:
        return None
    return (f"has shape {list(s_shape)}; expected [] (per tensor), [{q_shape[0]}] or [{q_shape[0]}, 1] (per "
            f"channel) or {list(grid)} (128x128 blocks) for weight {list(q_shape)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-tensor ([] scale), per-channel ([out] or [out, 1]) or 128x128 block ([ceil(out/128), ceil(in/128)], or
    Model-Optimizer's [ceil(out/128), 1, ceil(in/128), 1]); any other scale shape is a ValueError (see
    :func:`scale_layout_error`)."""
    why = scale_layout_error(tuple(q.shape), tuple(scale.shape))
    if why is not None:
        raise ValueError(f"weight_scale {why}")
    if scale.numel() == 1:  # per tensor in any shape: compressed-tensors' static FP8 stores [1]
        return (q.float() * scale.float().reshape(())).to(dtype)
    s = block_grid(scale.float())
    if s.ndim == 1 and q.ndim == 2:  # per channel, Model-Optimizer's [out]: one scale per row
        s = s.reshape(-1, 1)
    if s.ndim == 2 and tuple(s.shape) != (q.shape[0], 1):
        return dequantize_block(q, s, DEFAULT_BLOCK, dtype)
    return (q.float() * s).to(dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static FP8 activation quantization, back to x's dtype: clamp(x / s) -> e4m3 -> * s."""
    s = scale.to(x.dtype)
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype) * s


def fake_quant_per_token(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Dynamic FP8 activations: one scale per token (``group`` None) or per token and ``group``
    channels (DeepSeek-V3's 1x128 activation blocks for block-FP8 weights); a width that is not a multiple
    of ``group`` gets one scale per token."""
    shape = x.shape
    xs = x if group is None else x.reshape(*shape[:-1], -1, group) if shape[-1] % group == 0 else x
    s = scale_from_amax(xs.detach().abs().amax(dim=-1, keepdim=True)).to(x.dtype)
    return ((xs / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype) * s).reshape(shape)
