"""The reroute search's error from per-token inner products (``compress/prune/search.py``
``PairProducts``): the products equal float64 dot products of the cached expert outputs, whichever
way they were computed (a token's first experts all at once, or a few added later, past the table's
capacity), and the error they give equals the post-block error evaluated on the outputs directly; the
search's reference states, computed a few rows at a time, are exactly those computed all at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moepress.compress.arch import get_adapter
from moepress.compress.prune.evidence import RouteRecorder
from moepress.compress.prune.search import ExpertOutputs, PairProducts, RerouteSearch, rms_normalize

TINY = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=32,
            intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)


def _moe(g: torch.Generator):
    with torch.device("meta"):
        moe = get_adapter(TINY).build_layer(0).moe
    moe.to_empty(device="cpu")
    for p in moe.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return moe


def test_pair_products_equal_float64_dot_products_of_the_cached_outputs(monkeypatch):
    g = torch.Generator().manual_seed(3)
    moe = _moe(g)
    T, H = 100, TINY["hidden_size"]
    x = torch.randn(T, H, generator=g)
    out = ExpertOutputs(x, moe)
    ref, base = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g) * 3
    pp = PairProducts(out, ref, base, chunk_bytes=8 * 6 * H * 7)  # 7 tokens (or fewer pairs) a chunk
    calls = {"all": 0, "pairs": 0}
    for name, key in (("_products", "all"), ("_pair_products", "pairs")):
        real = getattr(PairProducts, name)
        monkeypatch.setattr(PairProducts, name, lambda self, *a, _r=real, _k=key: (calls.__setitem__(
            _k, calls[_k] + 1), _r(self, *a))[1])
    first = torch.stack([torch.randperm(32, generator=g)[:6] for _ in range(T)])  # 6 experts a token
    tt = torch.arange(T)[:, None].expand(T, 6)
    pp.ensure(tt.reshape(-1), first.reshape(-1))
    cap = pp.p.shape[1]
    for _ in range(3):  # later: one more expert for a few tokens at a time, past the capacity
        toks = torch.randperm(T, generator=g)[:10]
        free = [[e for e in range(32) if pp.loc[t, e] < 0] for t in toks.tolist()]
        more = torch.tensor([f[int(torch.randint(len(f), (1,), generator=g))] for f in free])
        pp.ensure(toks, more)
    assert calls["all"] >= 1 and calls["pairs"] >= 3 and pp.p.shape[1] > cap
    assert not (pp.loc[tt, first] < 0).any()
    for t in range(T):
        es = (pp.loc[t] >= 0).nonzero(as_tuple=True)[0]
        la = pp.loc[t, es]
        assert sorted(la.tolist()) == list(range(int(pp.cnt[t])))  # locals 0.. without gaps
        assert torch.equal(pp.lslot[t, la], out.slot[t, es])
        f = out.gather(out.slot[t, es]).double()  # the cached rows, as the search uses them
        want = f @ f.T
        got = pp.gram[t][la[:, None], la[None, :]]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pp.p[t, la], f @ ref[t].double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pp.q[t, la], f @ base[t].double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recorded", [True, False])
def test_reference_states_in_row_chunks_are_those_of_the_whole_tensors(recorded):
    """``RerouteSearch._reference`` works ``work`` bytes of rows at a time (7 rows here): the routed output y0,
    b = post-block state - y0, ref = n(b + y0) and their float64 per-token products are bit for bit the
    whole-tensor formulas, on recorded batches whose boundaries do not fall on the chunks'; y0 is kept only
    as the target of a search without a recorded state."""
    g = torch.Generator().manual_seed(4)
    moe = _moe(g)
    T, H, k = 100, TINY["hidden_size"], TINY["num_experts_per_tok"]
    x, res, blk = (torch.randn(T, H, generator=g) for _ in range(3))
    idx = torch.stack([torch.randperm(32, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    rec = RouteRecorder(T, T, 0)
    rec.parts = [(x, None, idx, w)]
    rec.state = [res[:60] + blk[:60], res[60:] + blk[60:]] if recorded else []  # as attach's hooks add them
    s = RerouteSearch.__new__(RerouteSearch)  # the state _reference reads, without a layer's search
    s.ev, s.budget, s.T, s.work = SimpleNamespace(recorder=rec), SimpleNamespace(top_k=k), T, 8 * k * H * 7
    s.out = ExpertOutputs(x, moe)
    s._reference(idx, w)
    y0 = s.out.combine(torch.arange(T), idx, w)
    if not recorded:
        yd = y0.double()
        assert torch.equal(s.y0, y0) and s.base is None and s.ref is None
        assert torch.equal(s.rr, (yd * yd).sum(-1)) and s.ref_sq == float((yd * yd).sum(-1).sum())
        return
    base = res + blk - y0
    ref = rms_normalize(base + y0)
    rd, bd = ref.double(), base.double()
    assert s.y0 is None and torch.equal(s.base, base) and torch.equal(s.ref, ref)
    assert torch.equal(s.rr, (rd * rd).sum(-1)) and torch.equal(s.rb, (rd * bd).sum(-1))
    assert torch.equal(s.bb, (bd * bd).sum(-1)) and s.ref_sq == float((rd * rd).sum(-1).sum())
