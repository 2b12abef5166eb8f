"""The MoE input the experts are calibrated on after an AWQ fold must be the input the
folded layer really feeds its experts (x * p, p the post-attention norm's vector), computed here by running
the folded layer itself (independent of how fold.py rescales its recorded inputs)."""

from __future__ import annotations

import torch

import moepress.compress.quantize.config as qconfig
from moepress import models
from moepress.calib.distributed import DistEnv
from moepress.compress.quantize import QuantConfig
from moepress.compress.quantize import fold as fold_mod
from moepress.compress.quantize.calibrated import CalibratedLayer
from moepress.compress.stream import StreamedModel


def test_folded_moe_inputs_are_what_the_folded_layer_feeds_its_experts(monkeypatch):
    monkeypatch.setattr(fold_mod.LayerFolder, "_stored_dtype", lambda self, rel: torch.float32)
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)
    sm = StreamedModel(models.path("tiny-qwen3-moe"))
    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    (i, layer), *_ = sm.layers(0)
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True), DistEnv())
    hs = sm.embed([ids])
    cl.observe(hs)
    folder = fold_mod.LayerFolder(cl)
    folder.plan()
    folder.apply()
    (moe_fold,) = [f for f in folder.folds if f.source == "post_attention_layernorm"]
    assert float(moe_fold.p.log().abs().max()) > 0.05  # the premise: a vector far from 1 (measured 0.086)
    for n, lin in cl.linears.items():  # the folded model: W / p on the readers' columns, rows scaled
        if n in cl.weights.cols or n in cl.weights.rows:
            lin.weight = torch.nn.Parameter(cl.weights[n], requires_grad=False)
    seen = []
    h = layer.moe.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    sm.run_layer(layer, hs)
    h.remove()
    # measured 1.3e-6 abs; inputs divided by p instead: 0.19 relative
    torch.testing.assert_close(torch.cat(cl.moe_inputs), torch.cat(seen), rtol=1e-5, atol=3e-6)  # measured 1.3e-6 abs


def test_v_proj_is_not_folded_when_the_kv_cache_is_quantized():
    """--kv-cache fp8: v_scale is the amax of the values observed before the fold; scaling v_proj's rows
    by o_proj's vector would change the cached values and leave v_scale wrong (fold.py plan)."""
    sm = StreamedModel(models.path("tiny-qwen3-moe"))
    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    (i, layer), *_ = sm.layers(0)
    sources = {}
    for kv in (None, "fp8"):
        cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True, kv_cache=kv), DistEnv())
        cl.observe(sm.embed([ids]))
        folder = fold_mod.LayerFolder(cl)
        folder.plan()
        sources[kv] = {f.source for f in folder.folds}
    assert "self_attn.v_proj" in sources[None]  # the premise: without a kv cache, v -> o is folded
    assert "self_attn.v_proj" not in sources["fp8"]


def test_shared_expert_is_scored_on_every_token_in_the_moe_fold(monkeypatch):
    """The post-attention vector is searched over every reader of the MoE input: each routed expert on its
    routed tokens, the shared expert (not routed: it reads every token) on all of them (fold.py _moe_fold)."""
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)
    sm = StreamedModel(models.path("tiny-deepseek-v3"))
    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    real = fold_mod.LayerFolder._shared_vector

    def spy(self, parts, own, X, group):
        seen.update(parts=parts, own=own, X=X)
        return real(self, parts, own, X, group)

    monkeypatch.setattr(fold_mod.LayerFolder, "_shared_vector", spy)
    hs = sm.embed([ids])
    for i, layer in sm.layers(0):  # noqa: B007 (the first MoE layer's index is used below)
        if layer.moe is not None:
            break
        hs = sm.run_layer(layer, hs)
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True, group_size=32), DistEnv())
    cl.observe(hs)
    fold_mod.LayerFolder(cl).plan()
    X, idx = seen["X"], torch.cat(cl.routes)
    n = len(layer.moe.experts)
    assert layer.moe.shared_experts is not None and len(seen["parts"]) == n + 1
    for e in range(n):
        want = X[(idx == e).any(-1)][: qconfig.AWQ_SAMPLE_ROWS]
        assert torch.equal(seen["parts"][e][1], want), e
    shared_rows = seen["parts"][n][1]
    assert torch.equal(shared_rows, X[: qconfig.AWQ_SAMPLE_ROWS]) and torch.equal(seen["own"][n], shared_rows)


def test_norm_folds_are_exact_with_the_norm_rounded_to_its_stored_dtype():
    """The folded norm is stored in bf16: the readers must divide by the vector the rounded norm carries
    (round(g * p) / g), so that norm / reader column = the original g to float32 rounding; dividing by
    the searched p leaves the bf16 rounding of g * p (up to 2^-9 per channel) in the model."""
    sm = StreamedModel(models.path("tiny-qwen3-moe"))
    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    (i, layer), *_ = sm.layers(0)
    norms = ("input_layernorm", "post_attention_layernorm")
    g = {n: getattr(layer, n).weight.detach().float().clone() for n in norms}
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True), DistEnv())
    cl.observe(sm.embed([ids]))
    folder = fold_mod.LayerFolder(cl)
    folder.plan()
    folder.apply()
    assert cl.res.tensors["input_layernorm.weight"].dtype == torch.bfloat16  # the premise: stored rounded
    for f in folder.folds:
        if f.source in norms:
            new = getattr(layer, f.source).weight.detach().float()
            assert not torch.equal(new, g[f.source])  # the premise: something was folded
            for r in f.readers:
                torch.testing.assert_close(new / cl.weights.cols[r], g[f.source], rtol=2.4e-7, atol=0, msg=r)
