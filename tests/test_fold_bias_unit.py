"""LayerFolder._fold_bias scales the source linear's bias by p IN PLACE (the calibration that follows
reads the folded module) and records it for the writer in the stored dtype; a linear without a bias is left alone."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from moepress.compress.quantize.fold import LayerFolder


def _folder(stored=torch.bfloat16):
    f = SimpleNamespace(_stored_dtype=lambda name: stored, cl=SimpleNamespace(res=SimpleNamespace(tensors={})))
    f._store = lambda *a: LayerFolder._store(f, *a)
    return f


def test_fold_bias_scales_in_place_and_records_the_stored_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=True)
    b0 = lin.bias.detach().clone()
    p = torch.rand(6) + 0.5
    f = _folder()
    LayerFolder._fold_bias(f, lin, "model.layers.0.self_attn.v_proj", p)
    want = (b0 * p).to(torch.bfloat16)
    rec = f.cl.res.tensors["model.layers.0.self_attn.v_proj.bias"]
    assert rec.dtype == torch.bfloat16 and torch.equal(rec, want)
    assert torch.equal(lin.bias.data, want.to(lin.bias.dtype))  # the module the calibration reads next


def test_fold_bias_without_bias_records_nothing():
    lin = nn.Linear(8, 6, bias=False)
    f = _folder()
    LayerFolder._fold_bias(f, lin, "x", torch.ones(6))
    assert f.cl.res.tensors == {}
