"""The ONNX candidate against hand-built graphs: what it feeds a graph's optional contract inputs
(attention_mask ones, position_ids 0..S-1, input_ids in the graph's own integer type), which file it
picks in a folder, and the logits shapes it refuses. Each graph echoes an input as its logits, so the
expected values are the contract's (base.ONNX_CONTRACT), computed by hand."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from moepress.checks.candidates.onnx_runtime import OnnxCandidate, _onnx_file
from moepress.checks.config import CheckConfig
from moepress.errors import MoepressError

B, S = 2, 3


def _echo(path, src: str, dtypes: dict[str, int], transpose: bool = False):
    """A graph whose logits [B, S, 1] are Cast(src, float) unsqueezed (transposed to [S, B, 1] if asked)."""
    ins = [helper.make_tensor_value_info(n, t, ["b", "s"]) for n, t in dtypes.items()]
    nodes = [helper.make_node("Cast", [src], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [2])),
             helper.make_node("Unsqueeze", ["f", "ax"], ["u" if transpose else "logits"])]
    if transpose:
        nodes.append(helper.make_node("Transpose", ["u"], ["logits"], perm=[1, 0, 2]))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", ins, [out])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])


def test_position_ids_are_fed_as_zero_to_s_minus_one(tmp_path):
    f = _echo(tmp_path / "m.onnx", "position_ids", {"input_ids": TensorProto.INT64, "position_ids": TensorProto.INT64})
    lg = OnnxCandidate(f, CheckConfig()).logits(IDS)
    assert lg[..., 0].tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]


def test_attention_mask_is_fed_as_ones(tmp_path):
    f = _echo(tmp_path / "m.onnx", "attention_mask",
              {"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64})
    lg = OnnxCandidate(f, CheckConfig()).run(IDS).logits
    assert lg[..., 0].tolist() == [[1.0] * S] * B


def test_int32_input_ids_are_fed_as_int32(tmp_path):
    f = _echo(tmp_path / "m.onnx", "input_ids", {"input_ids": TensorProto.INT32})
    lg = OnnxCandidate(f, CheckConfig()).logits(IDS)
    assert lg[..., 0].tolist() == IDS.float().tolist()


def test_logits_in_another_layout_are_refused(tmp_path):
    """[S, B, V] logits (B != S) are not the contract's [B, S, V]: refused, not compared position by position."""
    f = _echo(tmp_path / "m.onnx", "input_ids", {"input_ids": TensorProto.INT64}, transpose=True)
    with pytest.raises(MoepressError, match=r"expected \[B, S, V\]"):
        OnnxCandidate(f, CheckConfig()).logits(IDS)


def test_a_folder_of_two_onnx_files_without_model_onnx_is_refused(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    _echo(d / "a.onnx", "input_ids", {"input_ids": TensorProto.INT64})
    _echo(d / "b.onnx", "input_ids", {"input_ids": TensorProto.INT64})
    with pytest.raises(MoepressError, match="exactly one .onnx file"):
        _onnx_file(d)
    _echo(d / "model.onnx", "input_ids", {"input_ids": TensorProto.INT64})
    assert _onnx_file(d) == d / "model.onnx"


def test_an_input_outside_the_contract_is_refused_when_opened(tmp_path):
    """token_type_ids is no contract input (the check could not feed it): one MoepressError naming it, at open."""
    f = _echo(tmp_path / "m.onnx", "input_ids", {"input_ids": TensorProto.INT64, "token_type_ids": TensorProto.INT64})
    with pytest.raises(MoepressError, match="input 'token_type_ids' is not part of the contract"):
        OnnxCandidate(f, CheckConfig())
