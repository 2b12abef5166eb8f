"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1; the reference is IST-DASLab/gptq ``gptq.py``) for
symmetric group-wise INT4 weights.

Columns are quantized left to right in blocks; each column's rounding error is spread over
the not-yet-quantized columns through the Cholesky factor of the damped inverse Hessian
H = 2 X^T X / n of the layer inputs. Group scales (amax / 7 of the *updated* weights) are
fixed when a group's first column is reached. ``act_order`` processes columns by decreasing
diag(H); scales stay per contiguous group of the original column order (their position in the
stored [out, in / group] tensor never moves), so the output has the same layout as RTN.
"""

from __future__ import annotations

import torch

from moepress.compress.quant import int4


def hessian_update(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/n sum x x^T over rows of x [t, in]; returns (H, n)."""
    x = x.reshape(-1, x.shape[-1]).double()
    t = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    if t == 0:
        return H, n
    H = H * (n / (n + t)) + (2.0 / (n + t)) * (x.T @ x)
    return H, n + t


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], H [in, in] -> (int8 values in [-8, 7] [out, in], float32 scales [out, in / group])."""
    W = w.double().clone()
    out, cols = W.shape
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    n_groups = cols // group_size
    scales = torch.zeros(out, n_groups, dtype=torch.float64)
    have = torch.zeros(n_groups, dtype=torch.bool)
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = int(perm[b0 + j])
            g = col // group_size
            if not have[g]:
                # scales of group g from the current (error-updated) weights of its columns
                members = inv[g * group_size:(g + 1) * group_size]
                cur = torch.cat([W1, W[:, b1:]], dim=1)
                pos = members - b0
                ok = pos >= 0
                amax = torch.zeros(out, dtype=torch.float64)
                if ok.any():
                    amax = cur[:, pos[ok]].abs().amax(dim=1)
                scales[:, g] = (amax / int4.INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
                have[g] = True
            s = scales[:, g]
            wcol = W1[:, j]
            q = (wcol / s).round().clamp(-8, 7)
            Q1[:, j] = q
            err = (wcol - q * s) / Hinv1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * Hinv1[j, j:].unsqueeze(0)
            Err1[:, j] = err
        Q[:, b0:b1] = Q1
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return Q[:, inv].to(torch.int8), scales.float()
