"""A calibrated quantize of a checkpoint stored in block FP8 (DeepSeek-V3 / Kimi K2 as they ship) keeps each
layer's FP8 linears as stored with their scales and decodes them at each call (compress/stream.py
``StoredLinear.keep``): the layer costs its stored bytes, not four times them in float32 (a Kimi K2 MoE layer:
~17 GB stored, ~68 GB in float32), and the output is the one a float32 copy of the layer gives, byte for byte."""

from __future__ import annotations

import hashlib

import torch

from helpers import to_block_fp8
from moepress import models
from moepress.compress import stream
from moepress.compress.quantize import QuantConfig, quantize_checkpoint


def _shards(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


def test_fp8_linears_stay_fp8_in_the_layer_and_the_output_is_the_float32_layers(tmp_path, monkeypatch):
    src = tmp_path / "fp8"
    to_block_fp8(models.path("tiny-deepseek-v3"), src)
    kept: list[dict] = []
    keep = stream.StoredLinear.keep

    def spy(self, reader, name, stored):
        kept.append({n: t.dtype for n, t in stored.items()})
        keep(self, reader, name, stored)
        assert self.weight.is_meta  # nothing holds the layer's weight in float32

    monkeypatch.setattr(stream.StoredLinear, "keep", spy)
    # int4-awq: the AWQ search and GPTQ read the weights, sequential calibration runs the quantized layers; the FP8
    # rule: an expert quantized when added (its stored weight let go, calibrated.py _let_go)
    cfg = QuantConfig(format="int4-awq", num_samples=2, seq_len=32, sequential=True,
                      rules=(("model.layers.1.mlp.experts.3.*", "fp8"),))
    quantize_checkpoint(src, tmp_path / "kept", cfg)
    assert len(kept) > 50 and all(torch.float8_e4m3fn in d.values() and len(d) == 2 for d in kept)
    monkeypatch.setattr(stream, "KEPT_QUANTIZED", ())  # decoded to float32 when the layer is built
    kept.clear()
    quantize_checkpoint(src, tmp_path / "float32", cfg)
    assert not kept
    assert _shards(tmp_path / "kept") == _shards(tmp_path / "float32") and _shards(tmp_path / "kept")
