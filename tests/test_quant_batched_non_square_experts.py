"""Batched expert GPTQ (experts.py int4_batch) on experts that are not square: tiny-deepseek-v3's routed experts
are 32 x 64 (gate/up) and 64 x 32 (down), so a group taken from the wrong dimension shows. The INT4 scale is
[out, in / group] with group = min(--group-size, in) (formats/_int4.py, Model-Optimizer's int4 blocks along
the input), and the batched path writes the bytes of the one-by-one reference (experts.BATCHED = False)."""

import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, experts, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 4, "seq_len": 128}


def test_batched_gptq_of_non_square_experts_matches_one_by_one(tmp_path, monkeypatch):
    src = bundled_path("tiny-deepseek-v3")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    outs = {}
    for flag in (False, True):
        monkeypatch.setattr(experts, "BATCHED", flag)
        out = tmp_path / f"b{int(flag)}"
        quantize_checkpoint(src, out, QuantConfig(format="int4-gptq", **CALIB), batches=batches)
        outs[flag] = CheckpointReader(out)
    one, many = outs[False], outs[True]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            p = f"model.layers.1.mlp.experts.{e}.{proj}"
            w = CheckpointReader(src).get(p + ".weight")
            out_f, in_f = w.shape
            assert out_f != in_f  # the premise: not square
            assert tuple(many.get(p + ".weight_scale").shape) == (out_f, in_f // min(128, in_f)), p
            for t in (".weight", ".weight_scale"):
                assert torch.equal(one.get(p + t), many.get(p + t)), p + t
