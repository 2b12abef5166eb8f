"""GPTQ and the AWQ scale search over a batch of weights with identical shapes (a layer's routed
experts), as a few large tensor ops instead of one small op per expert; same numerics as
:mod:`gptq` and :mod:`awq` (the Hessian's precision :func:`gptq.hessian_dtype`), and on the CPU the same
bits (the CPU never batches an input wider than ``gptq.WIDE_INPUT``: one such Hessian and its factors pass
compress/quantize/experts.py's batch budget, so it goes one by one).

Batch layout: ``W`` [B, K, out, in] holds K weights (an expert's gate and up, or its down) of B
items (experts); item b's K weights read one input, whose Hessian is ``H[b]`` [in, in] (one
factorisation per item, as :func:`gptq.gptq_quantize_shared`) and whose calibration rows are
``xs[b]`` (row counts differ from item to item).

Why the bits are the same as one item at a time (``exact``, the default on the CPU):
  * elementwise ops (scales, rounding, the column updates, fake quant) are the same IEEE operation
    on the same operands whatever the batch around them; ``pow``, which is not correctly rounded
    and whose CPU kernel treats a tensor's tail apart, runs per item with ``exact``;
  * torch's CPU batched LAPACK (cholesky, cholesky_inverse) calls LAPACK once per matrix;
  * max / min / argsort (stable) are exact;
  * sums and matmuls may add in another order once batched, so with ``exact`` they run per item,
    on contiguous slices of the same shapes as the one-by-one call (python loops of E BLAS calls:
    cheap next to the 2 x in column steps that batching saves).
Without ``exact`` (an accelerator, where one kernel per op is the point) they run batched, with
zero-padded rows for items with fewer calibration rows (a zero row adds nothing to a sum).
"""

from __future__ import annotations

import logging

import torch

from moepress.compress.quant import awq, int4
from moepress.compress.quant.awq import TINY
from moepress.compress.quant.exact import div
from moepress.compress.quant.gptq import hessian_dtype

log = logging.getLogger(__name__)


def exact_default(t: torch.Tensor) -> bool:
    """Bit-identical to one-by-one (per-item reductions and matmuls) where that is cheap: the CPU."""
    return t.device.type == "cpu"


def group_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`int4.group_scales` of every [out, in] matrix of ``w`` [..., out, in]."""
    g = w.float().abs().reshape(*w.shape[:-1], w.shape[-1] // group, group).amax(dim=-1)
    return div(g, int4.INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fake_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`awq.fake_int4` (RTN quantize + dequantize) of every matrix of ``w`` [..., out, in]."""
    s = group_scales(w, group)[..., None]
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    q = (g / s).round().clamp(-8, 7).to(torch.int8)
    return (q.float() * s).reshape(w.shape)


def _row_mean(diag: torch.Tensor, exact: bool) -> torch.Tensor:
    if not exact:
        return diag.mean(-1)
    return torch.stack([torch.mean(diag[b].contiguous()) for b in range(diag.shape[0])])


@torch.no_grad()
def factor(H: torch.Tensor, dead: torch.Tensor, damp: float = 0.01, act_order: bool = False,
           exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`gptq.factor`: ``H`` [B, in, in] (overwritten), ``dead`` [B, in] the all-zero
    weight columns of each item -> (column order [B, in], upper Cholesky factor of the damped H^-1
    in that order [B, in, in], in :func:`gptq.hessian_dtype` of ``in``). An item whose damped H is not
    positive definite gets the identity (round to nearest), as one-by-one."""
    if not damp > 0:
        raise ValueError(f"GPTQ: damp must be > 0, got {damp}")
    exact = exact_default(H) if exact is None else exact
    B, n, _ = H.shape
    H = H.to(hessian_dtype(n))
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=-1, descending=True, stable=True)
        H = H.gather(1, perm[:, :, None].expand(B, n, n)).gather(2, perm[:, None, :].expand(B, n, n))
        dead = dead.gather(1, perm)
    else:
        perm = torch.arange(n, device=H.device).expand(B, n).contiguous()
    H.masked_fill_(dead[:, :, None] | dead[:, None, :], 0)
    diag = H.diagonal(dim1=1, dim2=2)
    diag.masked_fill_(dead, 1)
    diag.add_(damp * _row_mean(diag, exact)[:, None])  # H += damp * mean(diag H) * I
    L, info = torch.linalg.cholesky_ex(H)
    del H
    L[info != 0] = torch.eye(n, dtype=L.dtype, device=L.device)  # replaced by the identity below
    U = torch.cholesky_inverse(L)
    del L
    U, info2 = torch.linalg.cholesky_ex(U, upper=True)
    bad = (info != 0) | (info2 != 0)
    if bool(bad.any()):
        log.warning("GPTQ: Hessian not positive definite after damping; round-to-nearest for %d of %d weights",
                    int(bad.sum()), B)
        U[bad] = torch.eye(n, dtype=U.dtype, device=U.device)
    return perm, U


# On the CPU the column loop streams its block of columns [items, K, out, block] once per column:
# items are taken a few at a time so that block stays in cache (one batch of a whole layer's experts
# would stream it from memory on every column)
CPU_BLOCK_BYTES = 1 << 20


@torch.no_grad()
def gptq(W: torch.Tensor, perm: torch.Tensor, U: torch.Tensor, group: int, block_size: int = 128,
         exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`gptq.gptq_quantize` with :func:`factor`'s (perm, U): ``W`` [B, K, out, in]
    -> (int8 values in [-8, 7] [B, K, out, in], float32 scales [B, K, out, in / group])."""
    exact = exact_default(W) if exact is None else exact
    B, K, out, cols = W.shape
    if cols % group:
        raise ValueError(f"GPTQ: in_features {cols} is not a multiple of group_size {group}")
    step = max(1, CPU_BLOCK_BYTES // (K * out * min(block_size, cols) * 8)) if W.device.type == "cpu" else B
    if step >= B:
        return _gptq(W, perm, U, group, block_size, exact)
    parts = [_gptq(W[b:b + step], perm[b:b + step], U[b:b + step], group, block_size, exact)
             for b in range(0, B, step)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def _gptq(W: torch.Tensor, perm: torch.Tensor, U: torch.Tensor, group: int, block_size: int,
          exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, out, cols = W.shape
    scales = group_scales(W, group)  # from the original weight
    sd = scales.to(U.dtype)
    idx = perm[:, None, None, :].expand(B, K, out, cols)
    W = W.to(U.dtype).gather(-1, idx)
    Q = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        cs = sd.gather(-1, (perm[:, b0:b1] // group)[:, None, None, :].expand(B, K, out, b1 - b0))
        W1 = W[..., b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[:, b0:b1, b0:b1]
        for j in range(b1 - b0):
            s = cs[..., j]
            q = (W1[..., j] / s).round().clamp(-8, 7)
            Q[..., b0 + j] = q
            err = (W1[..., j] - q * s) / U1[:, j, j][:, None, None]
            W1[..., j:] -= err.unsqueeze(-1) * U1[:, j, j:][:, None, None, :]
            Err1[..., j] = err
        if b1 < cols:
            _lazy_update(W, Err1, U, b0, b1, exact)
    inv = torch.argsort(perm, dim=-1)
    return Q.gather(-1, inv[:, None, None, :].expand(B, K, out, cols)), scales


def _lazy_update(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, b0: int, b1: int, exact: bool) -> None:
    """W[..., b1:] -= Err1 @ U[b0:b1, b1:] for every item (per weight with ``exact``)."""
    if not exact:
        W[..., b1:] -= Err1 @ U[:, None, b0:b1, b1:]
        return
    for b in range(W.shape[0]):
        Ub = U[b, b0:b1, b1:]
        for k in range(W.shape[1]):
            W[b, k, :, b1:] -= Err1[b, k] @ Ub


def _padded(xs: list[torch.Tensor], width: int, device) -> torch.Tensor:
    T = max((x.shape[0] for x in xs), default=0)
    out = torch.zeros(len(xs), T, width, device=device)
    for b, x in enumerate(xs):
        out[b, :x.shape[0]] = x.float()
    return out


def _sq_err(y: torch.Tensor, r: torch.Tensor, rows: list[int], exact: bool) -> list[float]:
    """sum over rows and outputs of (y - r)^2 per item (y, r [B, T, out]; rows beyond rows[b] are padding)."""
    if not exact:
        return ((y - r) ** 2).sum((1, 2)).tolist()
    return [float(((y[b, :n] - r[b, :n]) ** 2).sum()) for b, n in enumerate(rows)]


def _sq_sum(r: torch.Tensor, rows: list[int], exact: bool) -> list[float]:
    """sum of r^2 per item (r [B, T, out])."""
    if not exact:
        return (r * r).sum((1, 2)).tolist()
    return [float((r[b, :n] * r[b, :n]).sum()) for b, n in enumerate(rows)]


def _mm_t(x: torch.Tensor, w: torch.Tensor, rows: list[int], exact: bool) -> torch.Tensor:
    """x [B, T, in] @ w[b].T [in, out] per item -> [B, T, out] (only the first rows[b] rows per item)."""
    if not exact:
        return x @ w.transpose(-1, -2)
    out = torch.zeros(x.shape[0], x.shape[1], w.shape[-2], device=x.device)
    for b, n in enumerate(rows):
        out[b, :n] = x[b, :n] @ w[b].T
    return out


@torch.no_grad()
def awq_search(W: torch.Tensor, xs: list[torch.Tensor], act_mean: torch.Tensor, group: int, n_grid: int = 10,
               exact: bool | None = None) -> list[tuple[torch.Tensor, float, float]]:
    """Batched :func:`awq.search`: ``W`` [B, K, out, in] (item b's K linears share a scale),
    ``xs`` item b's sample rows [n_b, in], ``act_mean`` [B, in] -> per item (pre_quant_scale [in]
    float32, alpha, relative output error at alpha)."""
    exact = exact_default(W) if exact is None else exact
    B, K, out, inp = W.shape
    rows = [int(x.shape[0]) for x in xs]
    x = _padded(xs, inp, W.device)
    W = W.float()
    ref = [_mm_t(x, W[:, k], rows, exact) for k in range(K)]
    norm = [sum(v) or 1.0 for v in zip(*[_sq_sum(r, rows, exact) for r in ref], strict=True)]
    wsc = _weight_scale(W, group, exact)  # [B, in]
    act = act_mean.float()
    best = [(float("inf"), 0.0, torch.ones_like(act[b])) for b in range(B)]
    for k_a in range(n_grid + 1):
        alpha = k_a / n_grid  # modelopt: torch.arange(0, 1 + step, step), step 0.1
        s = _candidate_scales(act, wsc, alpha, exact)
        xs_ = x / s[:, None, :]
        Wq = fake_int4(W * s[:, None, None, :], group)
        err = [0.0] * B
        for k in range(K):
            for b, e in enumerate(_sq_err(_mm_t(xs_, Wq[:, k], rows, exact), ref[k], rows, exact)):
                err[b] += e
        for b in range(B):
            if err[b] < best[b][0]:
                best[b] = (err[b], alpha, s[b])
    return [((1.0 / s_b).float(), alpha, e / nb) for (e, alpha, s_b), nb in zip(best, norm, strict=True)]


def _candidate_scales(act: torch.Tensor, wsc: torch.Tensor, alpha: float, exact: bool) -> torch.Tensor:
    """:func:`awq.candidate_scales` per item ([B, in]). ``pow`` is not correctly rounded and the CPU
    kernel takes a vector path for the body of a tensor and a scalar one for its tail, so an item's
    values would depend on where its row falls in the batch: with ``exact`` each row is its own call."""
    if exact:
        return torch.stack([awq.candidate_scales(act[b], wsc[b], alpha) for b in range(act.shape[0])])
    s = (act.pow(alpha) / (wsc.pow(1 - alpha) + TINY)).clamp(min=1e-4, max=1e4)
    return s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()


def _weight_scale(W: torch.Tensor, group: int, exact: bool) -> torch.Tensor:
    """:func:`awq.weight_scale` per item: mean over the K weights' rows of |w| / its group's max."""
    B, K, out, inp = W.shape
    g = W.abs().reshape(B, K, out, inp // group, group)
    r = (g / (g.amax(dim=-1, keepdim=True) + TINY)).reshape(B, K * out, inp)
    if not exact:
        return r.mean(dim=1)
    return torch.stack([r[b].mean(dim=0) for b in range(B)])
