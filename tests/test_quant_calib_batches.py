"""Calibration over several batches. The static input scale is the max over every
calibration token (not the last batch's), checked against transformers' own layer-0 input; the report
counts the calibration tokens, not the sequences."""

from __future__ import annotations

import json

import pytest
import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 16, "seq_len": 32, "batch_size": 8}  # two batches


@pytest.fixture(scope="module")
def fp8_two_batches(tmp_path_factory):
    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, CALIB["batch_size"])
    assert len(batches) == 2  # the premise
    out = tmp_path_factory.mktemp("q") / "fp8"
    quantize_checkpoint(src, out, QuantConfig(format="fp8", **CALIB), batches=batches)
    return src, out, batches


def test_static_input_scale_is_the_max_over_every_batch(fp8_two_batches):
    from transformers import AutoModelForCausalLM

    src, out, batches = fp8_two_batches
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        per_batch = [float(model.model.layers[0].input_layernorm(model.model.embed_tokens(b)).abs().max())
                     for b in batches]
    assert per_batch[0] != per_batch[1]  # the premise: the batches' maxima differ
    got = float(CheckpointReader(out).get("model.layers.0.self_attn.q_proj.input_scale"))
    assert got == pytest.approx(max(per_batch) / 448, rel=1e-5)


def test_report_counts_calibration_tokens(fp8_two_batches):
    _, out, _ = fp8_two_batches
    report = json.loads((out / "quant_report.json").read_text())
    assert report["calibration_tokens"] == CALIB["num_samples"] * CALIB["seq_len"]
