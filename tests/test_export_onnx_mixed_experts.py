"""An onnx export of a quantize output whose experts of one layer are stored in different formats is refused in one
line naming two real tensors of the checkpoint and how each is stored (it named a stacked 'experts.w1.weight' that
no checkpoint holds)."""

from __future__ import annotations

import json

from helpers import assert_one_line_error, cli_quantized


def test_experts_of_one_layer_in_two_formats_are_refused_naming_the_tensors(cli_run, tmp_path):
    q = cli_quantized(tmp_path / "q", "tiny-mixtral", "--format", "fp8", "--rule",
                      "block_sparse_moe.experts.0.*=none", "--num-samples", "2", "--seq-len", "32")
    line = assert_one_line_error(cli_run("export", q, "--format", "onnx", "-o", tmp_path / "onnx"),
                                 "the onnx export stacks a layer's experts")
    fp8 = "model.layers.0.block_sparse_moe.experts.1.w1.weight is stored fp8"
    plain = "model.layers.0.block_sparse_moe.experts.0.w1.weight unquantized"
    assert fp8 in line and plain in line, line
    stored = json.loads((q / "model.safetensors.index.json").read_text())["weight_map"]
    assert {fp8.split()[0], plain.split()[0]} <= set(stored)
    assert not (tmp_path / "onnx").exists()
