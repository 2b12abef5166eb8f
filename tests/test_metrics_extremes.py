"""The check's extremes over every batch (``calib/metrics.py``): ``kl_max`` / ``kl_p99`` of the per-position
KL divergence and ``cosine_min`` of the per-token cosine, against numpy on the same numbers (float64 softmax,
``numpy.quantile``'s linear interpolation). The worst position sits in the first of two batches, so that a
statistic taken over the last batch only, or a mean, fails."""

import numpy as np
import torch

from moepress.calib.metrics import LayerStats, LogitStats


def _np_kl(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    lr = r - np.log(np.exp(r - r.max(-1, keepdims=True)).sum(-1, keepdims=True)) - r.max(-1, keepdims=True)
    lc = c - np.log(np.exp(c - c.max(-1, keepdims=True)).sum(-1, keepdims=True)) - c.max(-1, keepdims=True)
    return (np.exp(lr) * (lr - lc)).sum(-1).reshape(-1)


def test_kl_max_and_p99_are_over_every_position_of_every_batch():
    g = torch.Generator().manual_seed(0)
    st, kls = LogitStats(), []
    for b in range(2):
        ref = torch.randn(2, 7, 50, generator=g, dtype=torch.float64)
        cand = ref + 0.1 * torch.randn(2, 7, 50, generator=g, dtype=torch.float64)
        if b == 0:
            cand[1, 3] = ref[1, 3] + 3.0 * torch.randn(50, generator=g, dtype=torch.float64)  # the worst position
        st.add(ref, cand, torch.randint(0, 50, (2, 7), generator=g))
        kls.append(_np_kl(ref.numpy(), cand.numpy()))
    kl = np.concatenate(kls)
    m = st.summary()
    assert np.argmax(kl) < kl.size // 2  # the worst is in the first batch
    assert abs(m["kl_max"] - kl.max()) <= 1e-12 * kl.max()
    assert abs(m["kl_p99"] - np.quantile(kl, 0.99)) <= 1e-12 * kl.max()
    assert abs(m["kl_mean"] - kl.mean()) <= 1e-12 * kl.max() and m["kl_max"] > 2 * m["kl_mean"]


def test_cosine_min_is_the_worst_token_of_every_batch():
    g = torch.Generator().manual_seed(1)
    st, cos = LayerStats(), []
    for b in range(2):
        ref = torch.randn(3, 5, 16, generator=g)
        cand = ref + 0.05 * torch.randn(3, 5, 16, generator=g)
        if b == 0:
            cand[2, 1] = -ref[2, 1] + 0.1 * torch.randn(16, generator=g)  # the worst token: nearly opposite
        st.add(ref, cand)
        r, c = ref.double().reshape(-1, 16).numpy(), cand.double().reshape(-1, 16).numpy()
        cos.append((r * c).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1)))
    cos = np.concatenate(cos)
    m = st.summary()
    assert np.argmin(cos) < cos.size // 2 and cos.min() < 0
    assert abs(m["cosine_min"] - cos.min()) <= 1e-12
    assert abs(m["cosine"] - cos.mean()) <= 1e-12
