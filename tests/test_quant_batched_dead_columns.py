"""An expert whose gate_proj has an all-zero input column that its up_proj has not (a pruned or edited
checkpoint): the batched GPTQ (experts.py _gptq_batch) may share one factorisation only between weights
with the same dead columns; this one must be solved on its own, giving the one-by-one reference's bytes,
and its up_proj keeps that column (GPTQ zeroes a column only where the weight is zero there)."""

import torch

from helpers import copy_checkpoint
from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.compress.quantize import QuantConfig, experts, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 8, "seq_len": 128}
P = "model.layers.0.mlp.experts.{}.{}"
COL = 5


def _gate_column_zeroed(tmp_path, e):
    src = copy_checkpoint(bundled_path("tiny-qwen3-moe"), tmp_path / "src")
    reader, out = CheckpointReader(src), tmp_path / "dead"
    with CheckpointWriter(out) as w:
        for n in reader.names():
            t = reader.get(n)
            if n == P.format(e, "gate_proj") + ".weight":
                t = t.clone()
                t[:, COL] = 0
            w.add(n, t)
        w.write_json("config.json", reader.config)
        w.copy_aux_files(src)
    return out


def test_weights_with_other_dead_columns_are_not_batched_together(tmp_path, monkeypatch):
    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    probe = tmp_path / "probe"
    quantize_checkpoint(src, probe, QuantConfig(format="int4-gptq", **CALIB), batches=batches)
    import json
    tokens = json.loads((probe / "quant_report.json").read_text())["expert_calibration_tokens"]["0"]
    e = max(range(len(tokens)), key=tokens.__getitem__)  # well routed: GPTQ-rounded, so batched
    assert tokens[e] >= 128  # the premise: at least its width, so GPTQ (not round to nearest) rounds it
    dead = _gate_column_zeroed(tmp_path, e)
    outs = {}
    for flag in (False, True):
        monkeypatch.setattr(experts, "BATCHED", flag)
        out = tmp_path / f"b{int(flag)}"
        quantize_checkpoint(dead, out, QuantConfig(format="int4-gptq", **CALIB), batches=batches)
        outs[flag] = CheckpointReader(out)
    up = P.format(e, "up_proj")
    assert outs[True].weight(up + ".weight").float()[:, COL].abs().max() > 0
    for proj in ("gate_proj", "up_proj"):
        for t in (".weight", ".weight_scale"):
            n = P.format(e, proj) + t
            assert torch.equal(outs[False].get(n), outs[True].get(n)), n
