"""Sequential calibration calibrates layer i on the outputs of the layers 0..i-1 AS
WRITTEN: the activations handed to layer 1 equal the forward of the output checkpoint's layer 0
(StreamedModel over the quantized checkpoint: its own decoders and activation fake-quant, stored
pre_quant_scale and input_scale included), for AWQ (pre_quant_scale) and W4A8 (plus static FP8 input)."""

from __future__ import annotations

import pytest
import torch

from moepress.calib.data import calibration_batches
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.quantize import stage as stage_mod
from moepress.compress.stream import StreamedModel
from moepress.models import path as bundled_path


@pytest.mark.parametrize("fmt", ["int4-awq", "w4a8-awq"])
def test_layer_one_is_calibrated_on_the_written_layer_zero(tmp_path, monkeypatch, fmt):
    src, out = bundled_path("tiny-qwen3-moe"), tmp_path / fmt
    batches = calibration_batches(src, (), 4, 32, 0, 4)
    seen = {}
    real = stage_mod.quantize_layer

    def spy(sm, i, layer, hs, cfg, env=None):
        seen[i] = [h.clone() for h in hs]
        return real(sm, i, layer, hs, cfg, env)

    monkeypatch.setattr(stage_mod, "quantize_layer", spy)
    quantize_checkpoint(src, out, QuantConfig(format=fmt, num_samples=4, seq_len=32), batches=batches)
    q = StreamedModel(str(out))
    hs = q.embed(batches)
    (i, layer0), *_ = q.layers(0, 1)
    want = q.run_layer(layer0, hs)
    ref = StreamedModel(str(src))
    (_, orig0), *_ = ref.layers(0, 1)
    unquantized = ref.run_layer(orig0, ref.embed(batches))
    for got, w, u in zip(seen[1], want, unquantized, strict=True):
        assert (w - u).norm() > 1e-3 * u.norm()  # the premise: quantization moved layer 0's output
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)  # measured 0.0
