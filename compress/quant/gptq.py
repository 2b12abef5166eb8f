"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) for symmetric group-wise INT4 weights, with
Model-Optimizer's numerics (modelopt 0.47: modelopt/torch/quantization/model_calib.py ``gptq``,
utils/calib_utils.py ``update_hessian``, ``compute_hessian_inverse``, ``gptq_blockwise_update``,
adapted there from IST-DASLab/FP-Quant ``gptq.py``; the original is IST-DASLab/gptq ``gptq.py``).

    H      = 2/n sum_t x_t x_t^T over the layer's calibration inputs     (hessian_update)
    dead   = all-zero weight columns (modelopt): their H row/column is zeroed and H_ii = 1
    H     += damp * mean(diag H) * I   (damp > 0, so a channel no calibration token touched,
             H_ii == 0 and hence its whole H row zero, is decoupled: it is rounded to nearest and
             spreads no error. IST-DASLab instead zeroes such weight columns; we keep the weight,
             as modelopt does, since the channel may well be active at inference.)
    U      = upper Cholesky factor of H^-1
    scales = amax / 7 of each group of ``group_size`` input channels of the ORIGINAL weight,
             fixed before any update (modelopt runs max_calibrate before the GPTQ loop; IST-DASLab's
             ``static_groups=True``; llm-compressor likewise takes its observer's scales up front)
    for each block of ``block_size`` columns, each column j in it:
        q_j = clamp(round(w_j / s_j), -8, 7);   e_j = (w_j - q_j s_j) / U_jj
        w_k -= e_j U_jk for the block's later columns k; after the block, the remaining columns
        get the block's errors at once (lazy batch update: Err @ U[block, rest]).

Also the rounding of ``int4-awq`` / ``w4a8-awq`` (QuantConfig.awq_gptq, the default): the AWQ-smoothed
weight W / pre_quant_scale on the Hessian of the smoothed input x * pre_quant_scale, which is
diag(pqs) H diag(pqs) of the raw input's H (llm-compressor's AWQ + GPTQ stacking).

``act_order``: columns are processed by decreasing diag(H) (IST-DASLab's ``actorder``). The
processing order is the only thing it changes: each column keeps the scale of its own contiguous
group in the ORIGINAL column order, so ``scales[:, g]`` always covers original columns
g*group .. (g+1)*group-1 and no g_idx is needed. That is deliberate: the INT4 layout TensorRT-LLM
and modelopt's export read (weight [out/2, in] + weight_scale [out, in/group], see int4.py) has no
g_idx, so groups formed in the permuted order (IST-DASLab's act_order without static groups, or
llm-compressor's GROUP act-order with its ``weight_g_idx``) could not be stored in it.
"""

from __future__ import annotations

import logging

import torch

from moepress.compress.quant import int4

log = logging.getLogger(__name__)


def hessian_update(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/n sum x x^T over the rows of x [..., in] (float64); returns (H, n).

    Same incremental average as modelopt's ``update_hessian``; an empty x (an expert that got no
    tokens) leaves (H, n) unchanged.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    t = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    if t == 0:
        return H, n
    H = H * (n / (n + t)) + (2.0 / (n + t)) * (x.T @ x)
    return H, n + t


def hessian_inverse_factor(H: torch.Tensor, w: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1 (float64) for weight ``w`` [out, in]."""
    if not damp > 0:
        raise ValueError(f"GPTQ: damp must be > 0, got {damp}")
    H = H.double().clone()
    dead = (w == 0).all(dim=0)
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # H += damp * mean(diag H) * I, without the I
    try:  # one [in, in] float64 matrix alive besides the caller's at each step (in=7168: 411 MB each)
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        return torch.linalg.cholesky(Hinv, upper=True)
    except (RuntimeError, torch.linalg.LinAlgError):
        # modelopt's fallback (compute_hessian_inverse): identity, i.e. plain round-to-nearest
        log.warning("GPTQ: Hessian not positive definite after damping; round-to-nearest for this weight")
        return torch.eye(w.shape[1], dtype=torch.float64)


def factor(H: torch.Tensor, w: torch.Tensor, damp: float = 0.01,
           act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(column order, upper Cholesky factor of the damped H^-1 in that order) for weight ``w``.

    It depends on ``w`` only through its all-zero columns, so linears that read the same input
    (gate/up, q/k/v) share one: :func:`gptq_quantize_shared`. The factorisation is the bulk of
    GPTQ's cost at real sizes (an in=7168 Hessian: ~9 s of ~15 s per [2048, 7168] weight, 2 cores).
    """
    perm = (torch.argsort(torch.diag(H.double()), descending=True, stable=True) if act_order
            else torch.arange(H.shape[0]))
    Hp = H.index_select(0, perm).index_select(1, perm)
    return perm, hessian_inverse_factor(Hp, w[:, perm], damp)


def gptq_quantize_shared(ws: list[torch.Tensor], H: torch.Tensor, group_size: int = 128, damp: float = 0.01,
                         act_order: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gptq_quantize` of each weight in ``ws`` (all reading the input whose Hessian is ``H``),
    factorising H once when their all-zero columns agree (the results are the same either way)."""
    dead = [(w == 0).all(dim=0) for w in ws]
    shared = factor(H, ws[0], damp, act_order) if all(torch.equal(d, dead[0]) for d in dead) else None
    return [gptq_quantize(w, H, group_size, damp, act_order, factorized=shared) for w in ws]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128,
                  factorized: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], H [in, in] -> (int8 values in [-8, 7] [out, in], float32 scales [out, in / group]).

    Dequantized weight = int4.dequantize(q, scales); the scales are exactly RTN's
    (``int4.group_scales(w, group)``), only the rounding of each column differs. ``factorized``:
    :func:`factor`'s result for this H, damp, act_order and w's zero columns.
    """
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"GPTQ: in_features {cols} is not a multiple of group_size {group_size}")
    scales = int4.group_scales(w, group_size)  # float32, from the original weight
    perm, U = factorized if factorized is not None else factor(H, w, damp, act_order)
    W = w.double()[:, perm].clone()
    col_scale = scales.double().repeat_interleave(group_size, dim=1)[:, perm]
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            s = col_scale[:, b0 + j]
            q = (W1[:, j] / s).round().clamp(-8, 7)
            Q[:, b0 + j] = q
            err = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            Err1[:, j] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scales
