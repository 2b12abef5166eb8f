"""A routed expert above the evidence rule is calibrated on its own routed tokens: the
statistics its gate/up and down groups are quantized from are those of the MoE-input rows routed to it
(recomputed here from the layer's MoE input and the adapter's routing, which replicates transformers)."""

from __future__ import annotations

import torch

import moepress.compress.quantize.config as qconfig
from moepress import models
from moepress.calib.distributed import DistEnv
from moepress.compress.quantize import QuantConfig
from moepress.compress.quantize import experts as experts_mod
from moepress.compress.quantize.calibrated import CalibratedLayer, expert_hidden
from moepress.compress.stream import StreamedModel


def test_routed_expert_statistics_come_from_its_own_tokens(monkeypatch):
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)  # every expert with MIN_EXPERT_TOKENS is "routed"
    added = {}
    real_add = experts_mod.ExpertBatch.add

    def spy(self, fmt, names, ws, st):
        added[tuple(names)] = st
        return real_add(self, fmt, names, ws, st)

    monkeypatch.setattr(experts_mod.ExpertBatch, "add", spy)
    sm = StreamedModel(models.path("tiny-qwen3-moe"))
    ids = torch.randint(1, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    (i, layer), *_ = sm.layers(0)
    seen = []
    h = layer.moe.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    hs = sm.embed([ids])
    # observe() runs the layer with the hook in place: the MoE input as the layer computes it
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-gptq"), DistEnv())
    outs = cl.observe(hs)
    h.remove()
    X = torch.cat(seen)
    _, _, idx = sm.adapter.route(layer.moe, X)
    cl.quantize_non_experts()
    cl.quantize_experts()
    assert outs is not None
    fa, checked = layer.ffn_attr, 0
    for e, ex in enumerate(layer.moe.experts):
        x_e = X[(idx == e).any(-1)]
        if x_e.shape[0] < qconfig.MIN_EXPERT_TOKENS:
            continue
        g, u, d = (f"{fa}.experts.{e}.{n}" for n in ex.names)
        st = added[(g, u)]
        assert st.n == x_e.shape[0], e
        torch.testing.assert_close(st.S, x_e.double().T @ x_e.double(), rtol=1e-9, atol=1e-9)
        h_e = expert_hidden(ex, cl.linears[g].weight.float(), cl.linears[u].weight.float(), x_e)
        std = added[(d,)]
        assert std.n == x_e.shape[0], e
        torch.testing.assert_close(std.S, h_e.double().T @ h_e.double(), rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked >= 2, checked  # the premise: experts above the rule exist (measured: 16)
