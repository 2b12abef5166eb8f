"""The sparse-expert rule's boundary (config.py / calibrated.py docstring): an expert routed FEWER than
max(MIN_EXPERT_TOKENS, SPARSE_EXPERT_RATIO x width) tokens is rounded to nearest; one routed exactly
that many keeps its own statistics (GPTQ). The threshold is set to a token count an expert really got."""

import json

import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quant import int4
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.quantize import config as qconfig
from moepress.models import path as bundled_path

LAYER = "1"  # the first MoE layer: its input (dense layer 0) does not depend on the threshold
CALIB = {"num_samples": 2, "seq_len": 128}


def _run(src, out):
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    quantize_checkpoint(src, out, QuantConfig(format="int4-gptq", **CALIB), batches=batches)
    return json.loads((out / "quant_report.json").read_text())["experts"][LAYER]


def test_an_expert_with_exactly_the_threshold_tokens_keeps_its_statistics(tmp_path, monkeypatch):
    src = bundled_path("tiny-deepseek-v3")
    first = _run(src, tmp_path / "a")
    counts = sorted({x["tokens"] for x in first if x["tokens"] >= 2})
    t = counts[len(counts) // 2]  # a mid-sized count
    at = [x["expert"] for x in first if x["tokens"] == t]
    below = [x["expert"] for x in first if 0 < x["tokens"] < t]
    assert at and below
    monkeypatch.setattr(qconfig, "MIN_EXPERT_TOKENS", t)
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)
    out = tmp_path / "b"
    experts = _run(src, out)
    assert [x["tokens"] for x in experts] == [x["tokens"] for x in first]  # same routing
    orig, q = CheckpointReader(src), CheckpointReader(out)

    def is_rtn(e):
        p = f"model.layers.{LAYER}.mlp.experts.{e}.gate_proj"
        w = orig.get(p + ".weight").float()
        qv, s = int4.quantize(w, int4.effective_group(w.shape[1], 128))
        return torch.equal(q.get(p + ".weight"), int4.pack_int4(qv))

    for e in at:
        assert experts[e]["statistics"] == "its routed tokens", experts[e]
        assert not is_rtn(e), e
    for e in below:
        assert experts[e]["statistics"] != "its routed tokens" and is_rtn(e), experts[e]
