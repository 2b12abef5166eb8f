"""--awq-fold: a fold is skipped when a reader of its input is not an AWQ linear (fold.py docstring; a --rule gave
it another format): with one routed expert in FP8, the MoE input's fold (post_attention_layernorm -> router +
every expert's gate/up) is not made, so the stored norm and router are the original's bytes, and the FP8 expert's
weight is quantized from its own, unscaled weight (per-channel FP8 of W: amax / 448 per row)."""

import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 2, "seq_len": 64}


def test_moe_fold_is_skipped_when_an_expert_is_not_awq(tmp_path):
    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    out = tmp_path / "q"
    cfg = QuantConfig(format="int4-awq", awq_fold=True, rules=(("mlp.experts.0.*", "fp8"),), **CALIB)
    quantize_checkpoint(src, out, cfg, batches=batches)
    q, orig = CheckpointReader(out), CheckpointReader(src)
    for n in ("model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate.weight"):
        assert torch.equal(q.get(n), orig.get(n)), n
    assert not torch.equal(q.get("model.layers.0.input_layernorm.weight"),
                           orig.get("model.layers.0.input_layernorm.weight"))  # other folds still made
