"""w4a8-awq --awq-fold: the static FP8 input scale of a linear reading a folded norm is that of the folded
input x * p (what the runtime quantizes), i.e. amax of the original layer-0 norm output times the vector the
stored, folded norm carries (g' / g), over 448. Checked with transformers' own layer 0."""

import pytest
import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 2, "seq_len": 64}
NORM = "model.layers.0.input_layernorm.weight"


@torch.no_grad()
def test_folded_linears_input_scale_is_of_the_folded_input(tmp_path):
    from transformers import AutoModelForCausalLM

    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    out = tmp_path / "q"
    quantize_checkpoint(src, out, QuantConfig(format="w4a8-awq", awq_fold=True, **CALIB), batches=batches)
    q, orig = CheckpointReader(out), CheckpointReader(src)
    g, g2 = orig.get(NORM).float(), q.get(NORM).float()
    assert not torch.equal(g, g2)  # the premise: the norm was folded
    p = torch.where(g != 0, g2 / torch.where(g != 0, g, 1.0), 1.0)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    layer0 = model.model.layers[0]
    amax = max(float((layer0.input_layernorm(model.model.embed_tokens(b)) * p).abs().max()) for b in batches)
    got = float(q.get("model.layers.0.self_attn.q_proj.input_scale"))
    assert got == pytest.approx(amax / 448, rel=1e-3)
