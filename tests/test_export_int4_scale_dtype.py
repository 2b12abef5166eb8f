"""A packed (U8) weight whose weight_scale is neither float32 (INT4), float8_e4m3fn (NVFP4) nor uint8 (MXFP4's
E8M0) is no layout the quantized-checkpoint contract defines: refused in one line, not decoded as INT4 with its
scale bytes cast to float (int32 scale words read as numbers)."""
import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16])
def test_packed_weight_with_an_unknown_scale_dtype_is_refused(tmp_path, dtype):
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quant import int4
    from moepress.errors import MoepressError
    from moepress.exporters.linears import read_linear

    w = torch.randint(-8, 8, (4, 128), dtype=torch.int8)
    save_file({"x.weight": int4.pack_int4(w), "x.weight_scale": torch.ones(4, 2).to(dtype)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MoepressError, match="expected float32"):
        read_linear(CheckpointReader(tmp_path), "x")
