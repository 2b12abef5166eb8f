"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) for symmetric group-wise INT4 weights, with
Model-Optimizer's numerics (modelopt 0.47: modelopt/torch/quantization/model_calib.py ``gptq``,
utils/calib_utils.py ``update_hessian``, ``compute_hessian_inverse``, ``gptq_blockwise_update``,
adapted there from IST-DASLab/FP-Quant ``gptq.py``; the original is IST-DASLab/gptq ``gptq.py``).

    H      = 2/n sum_t x_t x_t^T over the layer's calibration inputs     (quantize/stats.py; hessian_update
             is its float64 reference form)
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
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    if t == 0:
        return H, n
    H = H * (n / (n + t)) + (2.0 / (n + t)) * (x.T @ x)
    return H, n + t


# Inputs wider than this get a float32 Hessian and factor (one [in, in] float64 matrix of an
# 18432-wide input is 2.7 GB, more than the whole stored Kimi K2 layer 0 that reads it: float64 could
# never meet "GPTQ within 2x the stored layer"); float32 is the precision of the reference
# implementations (IST-DASLab gptq.py, modelopt calib_utils.update_hessian) and of the GPU path.
# Up to it, float64 (every bundled model's widths, and Kimi K2's 7168 and 2048).
WIDE_INPUT = 8192
# the working copy of the weight is processed in chunks of at most this many bytes of output rows
# (GPTQ rounds each row independently given the factor: the same bits whatever the chunks,
# tests/test_quant_memory.py); weights under it are done in one piece
ROW_CHUNK_BYTES = 64 << 20


def hessian_dtype(width: int) -> torch.dtype:
    """The precision of a ``width``-wide input's Hessian, its factor and the GPTQ updates."""
    return torch.float32 if width > WIDE_INPUT else torch.float64


def hessian_inverse_factor(H: torch.Tensor, w: torch.Tensor | None, damp: float = 0.01,
                           overwrite: bool = False, dead: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1 (in :func:`hessian_dtype`) for weight ``w`` [out, in].

    ``overwrite``: H (already in that dtype) is the caller's to destroy: the factor is computed in
    its memory. ``dead``: w's all-zero columns, if the caller has them."""
    if not damp > 0:
        raise ValueError(f"GPTQ: damp must be > 0, got {damp}")
    dtype = hessian_dtype(H.shape[0])
    if not (overwrite and H.dtype == dtype):
        H = H.to(dtype, copy=True)
    dead = (w == 0).all(dim=0) if dead is None else dead
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # H += damp * mean(diag H) * I, without the I
    # LAPACK works on column-major memory: torch's out= on a row-major H copies it into a temporary.
    # A wide (float32) H is handed over as its column-major view H.mT instead, so nothing else is
    # allocated (LAPACK then reads H's upper triangle, equal to the lower one up to the rounding of
    # x^T x: a float32-only path, new numerics anyway); float64 keeps the bits of the out-of-place calls.
    A = H.mT if dtype == torch.float32 else H
    try:
        torch.linalg.cholesky(A, out=A)
        torch.cholesky_inverse(A, out=A)
        return torch.linalg.cholesky(A, upper=True, out=A)
    except (RuntimeError, torch.linalg.LinAlgError):
        # modelopt's fallback (compute_hessian_inverse): identity, i.e. plain round-to-nearest
        log.warning("GPTQ: Hessian not positive definite after damping; round-to-nearest for this weight")
        return torch.eye(H.shape[0], dtype=dtype, device=H.device)


def _permute_sym_(H: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """H[perm][:, perm] in H's own memory: columns permuted a block of rows at a time, then rows a block
    of columns at a time (each block's new values come from the block itself, so one block of scratch
    suffices, in a few large copies: kernel launches on a GPU). Same values as index_select."""
    for r0 in range(0, H.shape[0], rows):
        H[r0:r0 + rows] = H[r0:r0 + rows].index_select(1, perm)
    for c0 in range(0, H.shape[1], rows):
        H[:, c0:c0 + rows] = H[:, c0:c0 + rows].index_select(0, perm)
    return H


def factor(H: torch.Tensor, w: torch.Tensor | None, damp: float = 0.01, act_order: bool = False,
           overwrite: bool = False, dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(column order, upper Cholesky factor of the damped H^-1 in that order) for weight ``w``.

    It depends on ``w`` only through its all-zero columns (``dead``, when the caller has them: then
    ``w`` is unused), so linears that read the same input (gate/up, q/k/v) share one:
    :func:`gptq_quantize_shared`. The factorisation, O(in^3), is the bulk of GPTQ's cost at real widths.
    ``overwrite``: H is the caller's to destroy (the permutation and the factor reuse its memory).
    """
    perm = (torch.argsort(torch.diag(H).double(), descending=True, stable=True) if act_order
            else torch.arange(H.shape[0], device=H.device))
    dtype = hessian_dtype(H.shape[0])
    if overwrite and H.dtype == dtype:
        Hp = _permute_sym_(H, perm) if act_order else H
    else:
        Hp = H.index_select(0, perm).index_select(1, perm).to(dtype)
    dead = dead_columns(w) if dead is None else dead
    return perm, hessian_inverse_factor(Hp, w, damp, overwrite=True, dead=dead[perm])


def row_chunks(out: int, cols: int, itemsize: int) -> list[tuple[int, int]]:
    """Row ranges of at most ROW_CHUNK_BYTES of ``cols`` values of ``itemsize`` bytes (one if it fits)."""
    step = max(1, ROW_CHUNK_BYTES // (cols * itemsize))
    return [(0, out)] if out <= step else [(r, min(r + step, out)) for r in range(0, out, step)]


def _float_rows(w: torch.Tensor, r0: int, r1: int, in_scale: torch.Tensor | None) -> torch.Tensor:
    """Rows r0:r1 of the weight GPTQ rounds: ``w.float() / in_scale`` (AWQ's smoothed weight), made a
    slice at a time from ``w`` as stored (a bf16 weight is never copied whole into float32)."""
    if in_scale is None:
        # a copy of the caller's (GPTQ updates it in place); bf16 -> float32, float64 kept as it was
        return w[r0:r1].to(torch.promote_types(w.dtype, torch.float32), copy=True)
    return w[r0:r1].float() / in_scale[None, :]


def dead_columns(w: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The all-zero columns of ``w.float() / in_scale``, a slice of rows at a time."""
    dead = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    for r0, r1 in row_chunks(w.shape[0], w.shape[1], 4):
        dead &= (_float_rows(w, r0, r1, in_scale) == 0).all(dim=0)
    return dead


def gptq_quantize_shared(ws: list[torch.Tensor], H: torch.Tensor, group_size: int = 128, damp: float = 0.01,
                         act_order: bool = False, overwrite: bool = False,
                         in_scale: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gptq_quantize` of each weight in ``ws`` (all reading the input whose Hessian is ``H``),
    factorising H once when their all-zero columns agree (the results are the same either way).
    ``overwrite``: H is the caller's to destroy (then factorised in its own memory). ``in_scale``:
    the weights rounded are ``w.float() / in_scale`` (AWQ's smoothing), made a slice of rows at a time."""
    dead = [dead_columns(w, in_scale) for w in ws]
    if all(torch.equal(d, dead[0]) for d in dead):
        shared = factor(H, None, damp, act_order, overwrite=overwrite, dead=dead[0])
        return [gptq_quantize(w, None, group_size, damp, act_order, factorized=shared, in_scale=in_scale)
                for w in ws]
    return [gptq_quantize(w, H, group_size, damp, act_order, in_scale=in_scale, dead=d)
            for w, d in zip(ws, dead, strict=True)]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor | None, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128,
                  factorized: tuple[torch.Tensor, torch.Tensor] | None = None,
                  in_scale: torch.Tensor | None = None, dead: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], H [in, in] -> (int8 values in [-8, 7] [out, in], float32 scales [out, in / group]).

    Dequantized weight = int4.dequantize(q, scales); the scales are exactly RTN's
    (``int4.group_scales(w, group)``), only the rounding of each column differs. ``factorized``:
    :func:`factor`'s result for this H, damp, act_order and w's zero columns (H then unused).
    ``in_scale``: the weight rounded is ``w.float() / in_scale``; ``dead``: its all-zero columns.
    ``w`` is read a slice of rows at a time (GPTQ rounds each row independently given the factor:
    the same bits whatever the slices), so only one slice exists in the factor's precision.
    """
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"GPTQ: in_features {cols} is not a multiple of group_size {group_size}")
    if factorized is None:
        factorized = factor(H, None, damp, act_order, dead=dead_columns(w, in_scale) if dead is None else dead)
    perm, U = factorized
    scales = torch.empty(out, cols // group_size, dtype=torch.float32, device=w.device)
    Q = torch.empty(out, cols, dtype=torch.int8, device=w.device)
    for r0, r1 in row_chunks(out, cols, U.element_size()):
        wr = _float_rows(w, r0, r1, in_scale)
        scales[r0:r1] = int4.group_scales(wr, group_size)  # float32, from the original weight
        Q[r0:r1] = _rows(wr, scales[r0:r1], perm if act_order else None, U, group_size, block_size)
        del wr
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q, scales


def _rows(w: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor | None, U: torch.Tensor, group_size: int,
          block_size: int) -> torch.Tensor:
    """GPTQ's column loop (module docstring) over the rows ``w`` [rows, in] -> int8 values in the order
    ``perm`` (None: in order, and a float32 ``w`` of a float32 factor is updated in place)."""
    cols = w.shape[1]
    W = w.to(U.dtype) if perm is None else w.to(U.dtype)[:, perm]
    if perm is None:
        perm = torch.arange(cols, device=w.device)
    gsc = scales.to(U.dtype)
    Q = torch.empty(W.shape, dtype=torch.int8, device=w.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        cs = gsc[:, perm[b0:b1] // group_size]  # each column's group scale (its original group)
        W1 = W[:, b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            s = cs[:, j]
            q = (W1[:, j] / s).round().clamp(-8, 7)
            Q[:, b0 + j] = q
            err = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            Err1[:, j] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    return Q
