"""A streamed loop holds one built layer at a time: when layer i+1 is built, layer i is gone or its weights are
(released to the meta device). A loop variable still naming the previous layer kept one more stored layer on the
GPU while the next was built (Kimi K2 in FP8: about 17 GB)."""

from __future__ import annotations

import gc
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
        # every module of each earlier layer, with weights of its own (a module can outlive its layer: an
        # attention module in a reference cycle); weights kept as stored (FP8, packed INT4) are buffers
        alive = [(j, r()) for j, refs in built for r in refs]
        out.append(sorted({j for j, m in alive if m is not None and any(
            not t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))}))
        del alive
        layer = orig(self, i, state)
        built.append((i, [weakref.ref(m) for m in layer.modules()]))
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


def test_a_checks_candidate_with_an_fp8_kv_cache_holds_one_layer_at_a_time(held, tmp_path):
    """Its layers keep their attention observers (the cache's FP8 rounding) while they run: the observer held
    its module, which held the observer, so each dropped layer lived until the garbage collector ran.
    Collection off for the check; every layer built, the candidate's and the reference's, counted."""
    from moepress.checks import CheckConfig, run_check
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    cand = tmp_path / "fp8-kv"
    quantize_checkpoint(MODEL, cand, QuantConfig(format="fp8", kv_cache="fp8", num_samples=2, seq_len=16))
    gc.collect()
    gc.disable()
    try:
        run_check(cand, MODEL, CheckConfig(max_samples=2, seq_len=16, max_ppl_increase=None, min_top1=None,
                                           max_kl=None))
    finally:
        gc.enable()
    assert len(held) > 4 and held == [[]] * len(held), held
