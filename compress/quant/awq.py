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

Then the clip search of the original AWQ (mit-han-lab/llm-awq ``auto_clip_layer``; modelopt's
``awq_clip``, which its ``awq_full`` runs after awq_lite): each (row, group) of the smoothed
weight W_s gets the clip ratio r in {1, 0.975, ..., 0.5} whose group scale r * amax / 7
minimises the error of that group's partial dot product over the calibration rows,

    err(r) = sum_t (x_t,g . (w_g - Q_r(w_g)))^2 = d_g^T C_g d_g,   C_g = sum_t x_t,g x_t,g^T

(x = the smoothed input x * pre_quant_scale; C_g the group's [group, group] block of the input
covariance, so every row is scored on all sampled tokens at the cost of one small matmul).
r = 1 is plain amax / 7, so a clipped group is never worse than round-to-nearest on the sample.
modelopt sums the same per-token loss over 64-127 strided tokens per forward call
(``x[0::max(1, n // 64)]``, modelopt 0.47 model_calib.py awq_clip) on an 11-ratio grid; we use the AWQ
sample (up to 1024 rows), a 21-ratio grid and, for W4A8, the FP8-quantized smoothed input (our choice:
modelopt's W4A8 awq_full clips on the unquantized input and then re-calibrates the weight's amax, which
undoes the clip).
The stored format is unchanged: only the ``weight_scale`` values (and the rounding) differ.

By default (QuantConfig.awq_gptq) neither RTN nor the clip search rounds the smoothed weight:
GPTQ does (gptq.py), with amax / 7 group scales, on the smoothed input's Hessian (the clip
ratios are chosen for round-to-nearest, so the clip search runs only with --no-awq-gptq; the
measurements behind the default are in the README's quantization table).
"""

from __future__ import annotations

import torch

from moepress.compress.quant import int4
from moepress.compress.quant.exact import div

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


def _grid(ws: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor, group: int, n_grid: int):
    """The alpha grid's candidate scales and their summed squared output errors (float64, on the device: read
    by the caller at once, not one host read per candidate and linear), and the reference outputs' norm."""
    x = x.float()
    ref = [x @ w.float().T for w in ws]
    norm = x.new_zeros((), dtype=torch.float64)
    for r in ref:  # in order, in float64: the sums a Python float accumulated
        norm = norm + (r * r).sum().double()
    wsc = weight_scale(ws, group)
    scales, errs = [], []
    for k in range(n_grid + 1):
        s = candidate_scales(act_mean, wsc, k / n_grid)  # modelopt: torch.arange(0, 1 + step, step), step 0.1
        xs, err = x / s, norm.new_zeros(())
        for w, r in zip(ws, ref, strict=True):
            err = err + ((xs @ fake_int4(w.float() * s, group).T - r) ** 2).sum().double()
        scales.append(s)
        errs.append(err)
    return scales, errs, norm


def first_best(errs: list[torch.Tensor]) -> torch.Tensor:
    """The index (0-d, on the errors' device, no host read) that keeping candidate 0 unless a later error is
    strictly less selects: the first of equal minima; a NaN error never wins, and one at index 0 is kept."""
    e = torch.stack(errs)
    e = torch.where(e.isnan(), torch.inf, e)
    e[0] = torch.where(errs[0].isnan(), -torch.inf, e[0])
    return torch.argmin(e)


@torch.no_grad()
def search(ws: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor, group: int,
           n_grid: int = 10) -> tuple[torch.Tensor, float, float]:
    """Best shared pre_quant_scale for the linears ``ws`` (each [out, in]) reading inputs ``x`` [n, in].

    Returns (pre_quant_scale [in] float32, alpha, relative output error at alpha).
    """
    scales, errs, norm = _grid(ws, x, act_mean, group, n_grid)
    norm, *errs = torch.stack([norm, *errs]).tolist()  # one host read
    best = (float("inf"), 0.0, torch.ones_like(act_mean, dtype=torch.float32))
    for k, (err, s) in enumerate(zip(errs, scales, strict=True)):
        if err < best[0]:
            best = (err, k / n_grid, s)
    err, alpha, s = best
    return (1.0 / s).float(), alpha, err / (norm or 1.0)


@torch.no_grad()
def search_vector(ws: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor, group: int,
                  n_grid: int = 10) -> torch.Tensor:
    """:func:`search`'s pre_quant_scale, chosen on the device (no host read)."""
    scales, errs, norm = _grid(ws, x, act_mean, group, n_grid)
    ones = torch.ones_like(act_mean, dtype=torch.float32)
    k = first_best([norm.new_full((), float("inf")), *errs])  # candidate 0: none finite keeps the ones
    return (1.0 / torch.stack([ones, *scales])[k]).float()


# llm-awq auto_clip's grid (n_grid 20, max_shrink 0.5: 1, 0.975, ..., 0.5), a superset of modelopt
# awq_clip's (0.5, 0.55, ..., 0.95, 1: every ratio modelopt tries is tried, and finer steps between);
# 1.0 comes first so that a tie (a group no calibration row touches: every loss is 0) keeps amax / 7
CLIP_RATIOS = tuple(1.0 - 0.5 * k / 20 for k in range(21))
MODELOPT_CLIP_RATIOS = (*(round(0.5 + 0.05 * k, 2) for k in range(10)), 1.0)  # its order: ties go to 0.5


@torch.no_grad()
def clip_scales(w: torch.Tensor, x: torch.Tensor, group: int,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Group scales [out, in / group] (float32) for the smoothed weight ``w`` [out, in]: per (row,
    group) the first of ``ratios`` whose clipped amax / 7 minimises the partial output
    error on the rows of ``x`` [n, in] (the smoothed inputs, as the consumer's GEMM reads them)."""
    out, inp = w.shape
    G = inp // group
    xg = x.float().reshape(-1, G, group)
    C = torch.einsum("ngi,ngj->gij", xg, xg)  # [G, group, group]: sum over rows of x_g x_g^T
    wg = w.float().reshape(out, G, group)
    amax = wg.abs().amax(-1)
    best_err = torch.full((out, G), float("inf"), device=w.device)
    best = torch.zeros(out, G, device=w.device)
    for r in ratios:
        s = div(amax * r, int4.INT4_MAX).clamp(min=TINY)
        d = wg - (wg / s[..., None]).round().clamp(-8, 7) * s[..., None]
        err = torch.einsum("ogi,gij,ogj->og", d, C, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best



def _weights(ws):
    return ws() if callable(ws) else ws


@torch.no_grad()
def search_shared(parts: list[tuple], act_mean: torch.Tensor, group: int, n_grid: int = 10,
                  tie=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre_quant_scale shared by several groups of linears that read the same input channels, each
    group on its own rows of that input: ``parts`` = [(weights, rows x [n, in]), ...], weights a list of
    [out, in] tensors or a function returning it (made when needed: one expert's at a time), e.g. every
    routed expert's gate/up on the tokens routed to it and the shared expert's on all. The grid and
    the candidate scales are :func:`search`'s, with the weight statistic over all the linears (rows
    weighted equally) and the loss summed over the parts. ``tie`` (optional) maps a candidate to the
    vectors a fold can hold (compress/quantize/fold.py: GQA's o_proj). No smoothing (s = 1; the ratio 0
    of the original AWQ grid, mit-han-lab/llm-awq awq/quantize/auto_scale.py ``_search_module_scale``:
    x_max ** 0) is scored first and kept on a tie: modelopt's grid has no identity (its alpha 0 is
    1 / weight_scale), and a folded vector, which every reader of the input must share, could
    otherwise be worse on the calibration loss than leaving the input unsmoothed.

    Returns, on the device without a host read (a fold searches once per routed expert): the
    pre_quant_scale [in] float32, the candidate's index (0-d; 0: no smoothing, k: alpha (k - 1) / n_grid,
    :func:`alpha_of`) and its :func:`shared_error`."""
    wsum, rows = None, 0
    for ws, _ in parts:
        for w in _weights(ws):
            out, inp = w.shape
            g = w.float().abs().reshape(out, inp // group, group)
            r = (g / (g.amax(dim=-1, keepdim=True) + TINY)).reshape(out, inp).sum(0)
            wsum, rows = (r if wsum is None else wsum + r), rows + out
    wsc = wsum / rows
    scales = [torch.ones_like(act_mean, dtype=torch.float32)]
    for k in range(n_grid + 1):
        s = candidate_scales(act_mean, wsc, k / n_grid)
        scales.append(s if tie is None else tie(s))
    errs = [shared_error(parts, s, group) for s in scales]
    k = first_best(errs)
    return (1.0 / torch.stack(scales)[k]).float(), k, torch.stack(errs)[k]


def alpha_of(k: int, n_grid: int = 10) -> float | None:
    """The alpha of :func:`search_shared`'s candidate ``k`` (None: no smoothing)."""
    return None if k == 0 else (k - 1) / n_grid


def shared_error(parts: list[tuple], s: torch.Tensor, group: int) -> torch.Tensor:
    """Squared output error (0-d float64, on the device), summed over the parts' linears and rows, of smoothing
    by ``s`` and rounding to nearest: sum ||(x / s) Q(W * s)^T - x W^T||^2."""
    err = s.new_zeros((), dtype=torch.float64)
    for ws, x in parts:
        if x.shape[0] == 0:
            continue
        x = x.float()
        for w in _weights(ws):
            err = err + ((x / s) @ fake_int4(w.float() * s, group).T - x @ w.float().T).pow(2).sum().double()
    return err
