"""q/k/v read one input and share one statistics object; --rule can give them two formats that both need its
Hessian (int4-gptq, int4-awq + GPTQ). Each quantizer must see the observed Hessian: layer 0's k/v_proj come
out as when q_proj is left unquantized, and q_proj as when k/v_proj are (layer 0's input is the embedding,
the same in every run)."""

import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 2, "seq_len": 32}
P = "model.layers.0.self_attn."


def _run(src, batches, out, q, kv):
    rules = (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv))
    quantize_checkpoint(src, out, QuantConfig(format=None, rules=rules, **CALIB), batches=batches)
    return CheckpointReader(out)


def test_two_hessian_formats_in_one_input_group_each_see_the_observed_hessian(tmp_path):
    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    both = _run(src, batches, tmp_path / "both", "int4-gptq", "int4-awq")
    kv_only = _run(src, batches, tmp_path / "kv", "none", "int4-awq")
    q_only = _run(src, batches, tmp_path / "q", "int4-gptq", "none")
    for n in ("k_proj", "v_proj"):
        for t in (".weight", ".weight_scale", ".pre_quant_scale"):
            assert torch.equal(both.get(P + n + t), kv_only.get(P + n + t)), n + t
    for t in (".weight", ".weight_scale"):
        assert torch.equal(both.get(P + "q_proj" + t), q_only.get(P + "q_proj" + t)), t
