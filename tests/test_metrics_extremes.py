"""The check's extremes over every batch (``calib/metrics.py``): ``kl_max`` / ``kl_p99`` of the per-position
KL divergence and ``cosine_min`` of the per-token cosine, against numpy on the same numbers (float64 softmax,
``numpy.quantile``'s linear interpolation). The worst position sits in the first of two batches, so that a
statistic taken over the last batch only, or a mean, fails."""

import math

import numpy as np
import pytest
import torch

from moepress.calib.metrics import LayerStats, LogitStats, hidden_error, perplexity, quantile, token_kl


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


def test_kl_is_never_negative_for_logits_one_float32_step_apart():
    """Two runtimes' logits a float32 rounding apart: KL(p || q) >= 0 (Gibbs' inequality), but the float64
    sum gives about -5e-16 at a third of the positions; a negative kl_mean / kl_max must not reach a report."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 32, 50, generator=g)
    cand = ref.clone()
    cand[..., 0] = torch.nextafter(ref[..., 0], torch.tensor(float("inf")))
    lr, lc = np.log(_softmax(ref.double().numpy())), np.log(_softmax(cand.double().numpy()))
    assert ((np.exp(lr) * (lr - lc)).sum(-1) < 0).any()  # the premise: rounding alone goes below zero
    kl = token_kl(ref, cand)
    assert kl.shape == (64,) and bool((kl >= 0).all()) and float(kl.max()) < 1e-12
    st = LogitStats()
    st.add(ref, cand, torch.zeros(2, 32, dtype=torch.long))
    m = st.summary()
    assert 0.0 <= m["kl_mean"] < 1e-12 and m["kl_max"] >= 0.0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_over_several_chunks_is_every_positions(monkeypatch):
    """A 160k vocabulary is cut into chunks of a few positions: with chunks of 3 positions (and a short last
    one) every position's KL is still its own, against numpy on the whole [T, V] at once."""
    from moepress.calib import metrics

    g = torch.Generator().manual_seed(2)
    ref, cand = torch.randn(2, 7, 40, generator=g), torch.randn(2, 7, 40, generator=g)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 3 * 40)
    got = metrics.token_kl(ref, cand).numpy()
    np.testing.assert_allclose(got, _np_kl(ref.double().numpy(), cand.double().numpy()), rtol=1e-12, atol=1e-15)


def test_nll_over_several_chunks_is_every_predicted_tokens(monkeypatch):
    """The NLL is taken a sequence's positions at a time (no [B, S, V] float64 temporary): with chunks of
    3 positions (and a short last one) it still sums every position's NLL of its next token, against
    numpy's log-softmax of the whole [B, S, V] at once; the last position predicts nothing."""
    from moepress.calib import metrics

    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(2, 8, 40, generator=g), torch.randint(0, 40, (2, 8), generator=g)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 3 * 40)
    got, n = metrics.nll_sum(logits, ids)
    x = logits.double().numpy()[:, :-1]
    lp = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    want = -np.take_along_axis(lp, ids.numpy()[:, 1:, None], -1).sum()
    assert n == 2 * 7 and abs(got - want) <= 1e-12 * abs(want)


def test_identical_hidden_states_with_zero_tokens_agree_perfectly():
    """A token whose state is zero in both runs (identical runs) has cosine 1 and error 0, not the 0 / 0 of
    the formulas: a self-check would otherwise fail --min-cosine on it."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, 16, generator=g)
    h[1, 2] = 0.0
    cos, rel = hidden_error(h, h.clone())
    assert float(cos[6]) == 1.0 and rel.tolist() == [0.0] * 8  # token [1, 2]: zero in both
    np.testing.assert_allclose(cos.numpy(), 1.0, rtol=0, atol=1e-15)
    st = LayerStats()
    st.add(h, h.clone())
    m = st.summary()
    assert m["cosine_min"] >= 1 - 1e-15 and m["rel_error"] == m["rel_error_p99"] == 0.0


def test_rel_error_p99_is_the_99th_percentile_over_every_token():
    g = torch.Generator().manual_seed(4)
    st, rels = LayerStats(), []
    for _ in range(2):
        ref = torch.randn(4, 30, 16, generator=g)
        cand = ref + torch.rand(4, 30, 1, generator=g) * torch.randn(4, 30, 16, generator=g)
        st.add(ref, cand)
        r, c = ref.double().reshape(-1, 16).numpy(), cand.double().reshape(-1, 16).numpy()
        rels.append(np.linalg.norm(c - r, axis=-1) / np.linalg.norm(r, axis=-1))
    rel = np.concatenate(rels)
    m = st.summary()
    assert abs(m["rel_error_p99"] - np.quantile(rel, 0.99)) <= 1e-12
    assert abs(m["rel_error"] - rel.mean()) <= 1e-12


@pytest.mark.parametrize("n,q", [(1, 0.99), (1, 0.5), (5, 1.0), (5, 0.0), (4, 0.99)])
def test_quantile_at_the_ends_equals_numpy(n, q):
    """One token (a single-window check) or q at an end: numpy.quantile's linear interpolation, no IndexError."""
    x = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert quantile(x, q) == pytest.approx(float(np.quantile(x.numpy(), q)), abs=1e-15)
    st = LayerStats()
    st.add(torch.ones(1, 1, 4), torch.ones(1, 1, 4) * 1.5)  # one token: relative error 0.5
    assert st.summary()["rel_error_p99"] == pytest.approx(0.5, abs=1e-15)


def test_perplexity_of_nan_logits_is_nan_and_tokens_are_every_position():
    """NaN logits (a broken candidate) give a NaN perplexity as numpy's exp(nan), not inf; ``tokens`` is
    the positions compared (KL and top-1 are over every position, perplexity over the next-token ones)."""
    ids = torch.zeros(2, 5, dtype=torch.long)
    bad = torch.full((2, 5, 8), float("nan"))
    assert math.isnan(perplexity([bad], [ids])) and math.isnan(float(np.exp(np.nan)))
    st = LogitStats()
    st.add(bad, torch.zeros(2, 5, 8), ids)
    m = st.summary()
    assert math.isnan(m["ppl_reference"]) and m["ppl_candidate"] == pytest.approx(8.0)  # uniform over 8
    assert m["tokens"] == 10 and st.predicted == 8
