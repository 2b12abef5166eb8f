"""--kv-cache fp8 with a calibration-free weight format (fp8-dynamic, or none): no linear needs input
statistics, but the k/v scales (also with --sequential, where the layer is run only when something is
observed) still need the layer run on the calibration tokens. Layer 0's k_scale / v_scale must be
amax / 448 of what transformers' own cache holds for layer 0 (its input is the embedding, so no
quantized layer changes it)."""

import pytest
import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

CALIB = {"num_samples": 2, "seq_len": 32}


@pytest.mark.parametrize("sequential", [None, True])
@torch.no_grad()
def test_kv_scales_of_a_calibration_free_format_are_the_cached_amax(tmp_path, sequential):
    from transformers import AutoModelForCausalLM

    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    out = tmp_path / "q"
    cfg = QuantConfig(format="fp8-dynamic", kv_cache="fp8", sequential=sequential, **CALIB)
    quantize_checkpoint(src, out, cfg, batches=batches)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    k = v = torch.zeros(())
    for b in batches:
        c = model(input_ids=b, use_cache=True).past_key_values.layers[0]
        k, v = torch.maximum(k, c.keys.abs().amax()), torch.maximum(v, c.values.abs().amax())
    q = CheckpointReader(out)
    assert float(q.get("model.layers.0.self_attn.k_scale")) == pytest.approx(float(k) / 448, rel=1e-4)
    assert float(q.get("model.layers.0.self_attn.v_scale")) == pytest.approx(float(v) / 448, rel=1e-4)
