"""Past WIDE_INPUT the batched column loop divides by its scales in float32, as one-by-one GPTQ
does, not in float64: a weight whose quotient w / s rounds to 3.5 in float32 (-> 4) but is just below it in float64
(-> 3) gets the one-by-one integer (tests/test_batched_experts.py's random weights hit no such tie)."""
from __future__ import annotations

import torch

from moepress.compress.quant import batched, gptq

IN, GROUP = 32, 32
AMAX, W0 = 0.7793108820915222, 0.3896554410457611  # float32 W0 / s == 3.5, float64 W0 / s < 3.5 (s = AMAX / 7)


def test_a_float32_tie_rounds_as_one_by_one(monkeypatch):
    monkeypatch.setattr(gptq, "WIDE_INPUT", IN - 1)
    W = torch.zeros(1, 1, 2, IN)
    W[0, 0, :, 0] = W0
    W[0, 0, :, 1] = AMAX
    W[0, 0, :, 2:] = 0.01 * torch.arange(1, IN - 1)
    s = batched.group_scales(W, GROUP)[0, 0, 0, 0]
    assert (W[0, 0, 0, 0] / s).round() == 4 and (W[0, 0, 0, 0].double() / s.double()).round() == 3  # the tie
    H = torch.eye(IN)[None] * 2.0
    dead = torch.stack([(W[b, 0] == 0).all(0) for b in range(1)])
    perm, U = batched.factor(H.clone(), dead, 0.01, False)
    Q, S = batched.gptq(W, perm, U, GROUP, block_size=16)
    q, s1 = gptq.gptq_quantize(W[0, 0], H[0].clone(), GROUP, 0.01, False, block_size=16)
    assert int(q[0, 0]) == 4
    assert torch.equal(Q[0, 0], q) and torch.equal(S[0, 0], s1)
