"""A calibrated quantize of a checkpoint stored quantized keeps each layer's quantized linears as stored with their
scales and decodes them at each call (compress/moe.py ``StoredLinear.keep``): DeepSeek-V3 / Kimi K2 block FP8,
Kimi K2 Thinking's compressed-tensors pack-quantized INT4 experts, MXFP4 experts. The layer costs its stored bytes,
not four (FP8) to eight (INT4) times them in float32 (a Kimi K2 MoE layer: ~17 GB stored in FP8, ~68 GB in
float32), and the output is the one a float32 copy of the layer gives, byte for byte."""

from __future__ import annotations

import hashlib

import pytest
import torch

from helpers import to_block_fp8
from moepress import models
from moepress.compress import stream
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _shards(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


@pytest.mark.parametrize("source", ["block-fp8", "tiny-kimi-k2-int4", "tiny-qwen3-moe-mxfp4"])
def test_quantized_linears_stay_as_stored_and_the_output_is_the_float32_layers(tmp_path, monkeypatch, source):
    src = tmp_path / "src"
    if source == "block-fp8":
        to_block_fp8(models.path("tiny-deepseek-v3"), src)
    else:
        src = models.path(source)
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
    # the stored bytes with their scales, never a decoded float copy of the weight (the reader's ".weight" alias
    # of a packed tensor decodes it)
    assert len(kept) >= 24 and all(any(dt not in FLOATS for dt in d.values()) for d in kept), kept[:3]
    assert all(dt not in FLOATS for d in kept for n, dt in d.items() if n.endswith(".weight")), kept[:3]
    monkeypatch.setattr(stream, "KEPT_QUANTIZED", ())  # decoded to float32 when the layer is built
    kept.clear()
    quantize_checkpoint(src, tmp_path / "float32", cfg)
    assert not kept
    assert _shards(tmp_path / "kept") == _shards(tmp_path / "float32") and _shards(tmp_path / "kept")
