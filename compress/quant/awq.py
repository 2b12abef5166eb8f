"""AWQ pre-quantization scales (activation-aware weight quantization, Lin et al. 2023), the
"awq_lite" search Model-Optimizer runs (modelopt/torch/quantization/model_calib.py, awq_lite):

    act_scale    = mean over tokens of |x|                       per input channel
    weight_scale = mean over output rows of |w| / max|w| of its quantization group
    s(alpha)     = clamp(act_scale^alpha / (weight_scale^(1-alpha) + tiny), 1e-4, 1e4)
    s           /= sqrt(max(s) * min(s))
    alpha*       = argmin over alpha in {0, 0.1, ..., 1} of mean (x W^T - (x / s) Q(W * s)^T)^2

The stored ``pre_quant_scale`` is 1 / s: a consumer multiplies the input by it and uses the
quantized weight Q(W * s) (= Q(W / pre_quant_scale)). Linears that read the same input (q/k/v;
gate/up, fused into one GEMM by TensorRT-LLM) get one shared scale, searched on their summed loss.
"""

from __future__ import annotations

import torch

from moepress.compress.quant import int4

TINY = torch.finfo(torch.float32).tiny


def weight_scale(ws: list[torch.Tensor], group: int) -> torch.Tensor:
    rows = []
    for w in ws:
        out, inp = w.shape
        g = w.float().abs().reshape(out, inp // group, group)
        rows.append((g / (g.amax(dim=-1, keepdim=True) + TINY)).reshape(out, inp))
    return torch.cat(rows).mean(dim=0)


def candidate_scales(act: torch.Tensor, wsc: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (act.float().pow(alpha) / (wsc.pow(1 - alpha) + TINY)).clamp(min=1e-4, max=1e4)
    return s / (s.max() * s.min()).sqrt()


def fake_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    q, s = int4.quantize(w, group)
    return int4.dequantize(q, s)


@torch.no_grad()
def search(ws: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor, group: int,
           n_grid: int = 10) -> tuple[torch.Tensor, float, float]:
    """Best shared pre_quant_scale for the linears ``ws`` (each [out, in]) reading inputs ``x`` [n, in].

    Returns (pre_quant_scale [in] float32, alpha, relative output error at alpha).
    """
    x = x.float()
    ref = [x @ w.float().T for w in ws]
    norm = sum(float((r * r).sum()) for r in ref) or 1.0
    wsc = weight_scale(ws, group)
    best = (float("inf"), 0.0, torch.ones_like(act_mean, dtype=torch.float32))
    for k in range(n_grid + 1):
        alpha = k / n_grid  # modelopt: torch.arange(0, 1 + step, step), step 0.1
        s = candidate_scales(act_mean, wsc, alpha)
        xs = x / s
        err = 0.0
        for w, r in zip(ws, ref, strict=True):
            y = xs @ fake_int4(w.float() * s, group).T
            err += float(((y - r) ** 2).sum())
        if err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return (1.0 / s).float(), alpha, err / norm
