"""Prune keeps a checkpoint's quantized linears as stored with their scales and decodes them at each call
(compress/moe.py ``StoredLinear.keep``): DeepSeek-V3 / Kimi K2 block FP8, Kimi K2 Thinking's compressed-tensors
pack-quantized INT4 experts, MXFP4 experts. A layer costs its stored bytes, not four (FP8) to eight (INT4) times
them in float32 (a Kimi K2 MoE layer: ~17 GB stored in FP8, ~68 GB in float32). The pruned checkpoint is the
one a float32 copy of each layer gives, byte for byte; a merged expert is re-encoded to its stored form as soon
as it is refit, so at most one of them is held in float32."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from helpers import heldout_scores, to_block_fp8
from moepress import models
from moepress.compress import stream
from moepress.compress.moe import StoredLinear
from moepress.compress.prune import METHODS, PruneConfig, prune_checkpoint, surgery
from moepress.compress.prune.holdout import split_folds

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _ids(seed: int) -> list[torch.Tensor]:
    return [torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed))]


def _result(d) -> tuple[dict, list]:
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}
    rep = json.loads((d / "prune_report.json").read_text())
    return shards, [rep["layers"], rep.get("plans"), rep.get("merge")]


@pytest.fixture(scope="module")
def block_fp8(tmp_path_factory):
    src = tmp_path_factory.mktemp("fp8") / "src"
    to_block_fp8(models.path("tiny-deepseek-v3"), src)
    return src


@pytest.mark.parametrize("source,method", [("block-fp8", "auto"), ("block-fp8", "merge"), ("block-fp8", "lookahead"),
                                           ("block-fp8", "merge-sequential"), ("tiny-kimi-k2-int4", "auto"),
                                           ("tiny-kimi-k2-int4", "merge"), ("tiny-qwen3-moe-mxfp4", "reroute")])
def test_quantized_linears_stay_as_stored_and_the_pruned_checkpoint_is_the_float32_layers(
        tmp_path, monkeypatch, block_fp8, source, method):
    src = block_fp8 if source == "block-fp8" else models.path(source)
    kept: list[dict] = []
    keep = StoredLinear.keep

    def spy(self, reader, name, stored):
        kept.append({n: t.dtype for n, t in stored.items()})
        keep(self, reader, name, stored)

    written = surgery.write_from_layer

    def check_written(w, reader, adapter, i, layer, kept_experts, merged=None):
        # a merged expert's down projection holds its re-encoded stored bytes, not a float32 copy
        for c in merged or {}:
            down = layer.moe.experts[int(c)].linears()[2]
            assert isinstance(down, StoredLinear) and down.kept and down.weight.is_meta, (i, c)
        written(w, reader, adapter, i, layer, kept_experts, merged)

    monkeypatch.setattr(StoredLinear, "keep", spy)
    monkeypatch.setattr(surgery, "write_from_layer", check_written)
    monkeypatch.setattr("moepress.compress.prune.stage.write_from_layer", check_written)
    # sequential: the next layer's statistics are gathered on the pruned layer as written (re-encoded experts)
    cfg = PruneConfig(method=method.removesuffix("-sequential"), ratio=0.5, sequential=method.endswith("sequential"))
    prune_checkpoint(src, tmp_path / "kept", cfg, batches=_ids(0))
    # the stored bytes with their scales, never a decoded float copy of the weight
    assert len(kept) >= 12 and all(dt not in FLOATS for d in kept for n, dt in d.items() if n.endswith(".weight"))
    monkeypatch.setattr(stream, "KEPT_QUANTIZED", ())  # decoded to float32 when the layer is built
    monkeypatch.setattr("moepress.compress.prune.stage.write_from_layer", written)
    kept.clear()
    prune_checkpoint(src, tmp_path / "float32", cfg, batches=_ids(0))
    assert not kept
    got, want = _result(tmp_path / "kept"), _result(tmp_path / "float32")
    assert got == want and got[0]
    if method.startswith("merge"):
        assert all(lr["merged"] for lr in got[1][0]), "merge folded nothing"


def test_auto_with_merge_on_block_fp8_scores_each_plan_as_written_and_writes_the_chosen_one(tmp_path, block_fp8):
    """The race folds each plan into the layer the plans share, re-encoded as it will be written, and gives the
    kept experts' stored bytes back after scoring it. The last plan raced scores what it scores alone (its
    method run with --merge on one fold, its checkpoint against the original on the other: a plan scored on
    a layer an earlier plan left folded would not), and auto --merge writes the chosen method with --merge."""
    batches = [torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))]
    prune_checkpoint(block_fp8, tmp_path / "auto", PruneConfig(ratio=0.5, merge=True), batches=batches)
    rep = json.loads((tmp_path / "auto" / "prune_report.json").read_text())
    assert rep["merge"]["rule"] == "always" and all(lr["merged"] for lr in rep["layers"])
    last = METHODS["auto"].plans[-1]
    kl, _ = heldout_scores(block_fp8, tmp_path, last, split_folds(batches), ratio=0.5)
    assert kl == pytest.approx(rep["plans"]["candidates"][last]["heldout_kl"], rel=1e-4)
    chosen = rep["plans"]["chosen"]
    prune_checkpoint(block_fp8, tmp_path / "alone", PruneConfig(method=chosen, ratio=0.5, merge=True),
                     batches=batches)
    assert _result(tmp_path / "auto")[0] == _result(tmp_path / "alone")[0]
