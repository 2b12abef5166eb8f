"""A streamed loop holds one built layer at a time: when layer i+1 is built, layer i is gone or its weights are
(released to the meta device). A loop variable still naming the previous layer kept one more stored layer on the
GPU while the next was built (Kimi K2 in FP8: about 17 GB)."""

from __future__ import annotations

import weakref

import pytest
import torch

from moepress import models
from moepress.compress.stream import StreamedModel

MODEL = models.path("tiny-mixtral")


@pytest.fixture
def held(monkeypatch):
    """The layers built before each build that are still alive with their weights, per build."""
    built, out = [], []
    orig = StreamedModel.build_layer

    def build_layer(self, i, state):
        alive = [r() for r in built]
        out.append([m.layer_idx for m in alive if m is not None and any(not p.is_meta for p in m.parameters())])
        del alive
        layer = orig(self, i, state)
        built.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(StreamedModel, "build_layer", build_layer)
    return out


def test_forward_holds_one_layer_at_a_time(held):
    sm = StreamedModel(str(MODEL))
    sm.forward([torch.randint(0, 100, (1, 8))])
    assert len(held) == sm.num_layers and held == [[]] * sm.num_layers


def test_calib_stats_holds_one_layer_at_a_time(held):
    from moepress.calib.stats import collect

    collect(MODEL, [torch.randint(0, 100, (1, 8))])
    assert len(held) > 1 and held == [[]] * len(held)
