"""--awq-fold with --awq-gptq: the routed experts' GPTQ runs batched (compress/quantize/experts.py int4_batch), and
must not search AWQ again on weights the fold already divided by p: a folded checkpoint holds no pre_quant_scale
(fold.py; compressed-tensors pack-quantized has no such tensor), and the batched result is the one-by-one
quantizer's (formats/_int4.py with awq_folded) bit for bit."""

import torch

import moepress.compress.quantize.config as qconfig
import moepress.compress.quantize.experts as experts_mod
from helpers import checkpoint_tensors
from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

IDS = torch.randint(1, 4096, (4, 64), generator=torch.Generator().manual_seed(0))


def _all(d):
    return checkpoint_tensors(d, "model-*.safetensors")


def test_folded_awq_gptq_experts_store_no_pre_quant_scale_and_equal_one_by_one(tmp_path, monkeypatch):
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)  # every expert with tokens calibrated: GPTQ, batched
    cfg = QuantConfig(format="int4-awq", awq_fold=True, awq_gptq=True)
    quantize_checkpoint(models.path("tiny-qwen3-moe"), tmp_path / "b", cfg, batches=[IDS])
    batched = _all(tmp_path / "b")
    assert not [k for k in batched if k.endswith("pre_quant_scale")]
    monkeypatch.setattr(experts_mod, "BATCHED", False)
    quantize_checkpoint(models.path("tiny-qwen3-moe"), tmp_path / "o", cfg, batches=[IDS])
    one = _all(tmp_path / "o")
    assert batched.keys() == one.keys()
    for k in one:
        assert torch.equal(batched[k], one[k]), k
