"""--awq-fold on a model whose experts' down_proj width (192) no INT4 group of 128 divides: the quantizer leaves
down_proj as stored, so no up -> down fold may scale up_proj's rows (down would need W / p, and is written
unchanged): the fold is skipped for a reader that is not an AWQ linear (fold.py module docstring)."""

import json

import torch

import moepress.compress.quantize.config as qconfig
from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

IDS = torch.randint(1, 4096, (4, 64), generator=torch.Generator().manual_seed(0))


def test_no_fold_into_a_down_proj_the_group_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)  # every expert with tokens calibrated: folds tried
    src, q = models.path("tiny-mixtral-w192"), tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format="int4-awq", awq_fold=True), batches=[IDS])
    rep = json.loads((q / "quant_report.json").read_text())
    assert any(s["module"].endswith("experts.0.w2") for s in rep["left_unquantized"])
    a, b = CheckpointReader(src), CheckpointReader(q)
    for i in range(a.config["num_hidden_layers"]):
        for e in range(a.config["num_local_experts"]):
            p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            assert torch.equal(b.get(p + "w2.weight"), a.get(p + "w2.weight"))  # as stored
            w3, w3q = a.weight(p + "w3.weight", torch.float32), b.weight(p + "w3.weight", torch.float32)
            ratio = w3q.norm(dim=1) / w3.norm(dim=1)  # INT4 rounding moves a row's norm by a few %, a fold by p
            assert ((ratio - 1).abs() < 0.1).all(), (p, ratio.min().item(), ratio.max().item())
