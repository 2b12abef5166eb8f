"""FP4 linears outside the routed experts run in vLLM on Marlin (compressed-tensors W4A16 MXFP4 / NVFP4 always, NVFP4
before Blackwell), whose GEMM tiles in_features x out_features by 128x128, 64x128, 128x64 or 64x256 only
(csrc/quantization/marlin/marlin.cu, "Invalid thread config" at the first forward otherwise). Both FP4 exports wrote
such linears with exit 0 and no word (a helper's sweep); their consumer notes now name them.

Expected by hand from tiny-deepseek-v3's shapes ([out, in]): q_a_proj [64, 128] fused with kv_a_proj_with_mqa
[48, 128] (vLLM's fused_qkv_a_proj_with_mqa: N 112), q_b_proj [192, 64], kv_b_proj [256, 32] fit no tile; o_proj
[128, 128], the dense gate/up [2 x 256, 128] / down [128, 256] and the shared expert's gate/up [2 x 64, 128] /
down [128, 64] fit. tiny-qwen3-moe's attention (q/k/v N 256 + 128, K 128; o_proj 128 x 256) fits."""

import json

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export

NOTE = "vLLM runs FP4 linears outside the routed experts with Marlin"


@pytest.mark.parametrize("model,fmt,export_fmt,untiled", [
    ("tiny-deepseek-v3", "mxfp4", "compressed-tensors", 16),
    ("tiny-deepseek-v3", "nvfp4", "hf-modelopt", 16),
    ("tiny-qwen3-moe", "mxfp4", "compressed-tensors", 0),
])
def test_fp4_linears_marlin_cannot_tile_are_named(tmp_path, model, fmt, export_fmt, untiled):
    q = tmp_path / "q"
    quantize_checkpoint(models.path(model), q, QuantConfig(format=fmt, num_samples=2, seq_len=32))
    export(q, tmp_path / "e", ExportConfig(format=export_fmt))
    notes = [n for n in json.loads((tmp_path / "e" / "export.json").read_text())["consumer_notes"] if NOTE in n]
    if not untiled:
        assert notes == []
        return
    assert len(notes) == 1 and f"{untiled} linears here fit none" in notes[0], notes
    for part in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"):
        assert f"self_attn.{part}" in notes[0]
    assert "o_proj" not in notes[0] and "mlp" not in notes[0]
