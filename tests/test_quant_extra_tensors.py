"""What quantize writes of the stored tensors that are not its decoder layers' (a checkpoint as found in the
wild): top-level tensors no layer holds are copied as stored, as prune copies them, and layers stored past
num_hidden_layers are dropped with the config saying so only where it has the key or DeepSeek-V3's default
(transformers' DeepseekV3Config: num_mtp_layers, alias num_nextn_predict_layers, defaults to 1)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import copy_checkpoint, make_random_checkpoint
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

EXTRA = "extra.unrelated.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_random_checkpoint("qwen3_moe", tmp_path_factory.mktemp("good") / "ckpt")


def _add_to_last_shard(ck, tensors: dict) -> None:
    """``tensors`` added to the last shard (the safetensors library) and to the index's weight_map."""
    index = ck / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    save_file({**load_file(shard), **tensors}, shard, metadata={"format": "pt"})
    d["weight_map"].update({n: shard.name for n in tensors})
    index.write_text(json.dumps(d))


def _stored(ck, name: str) -> torch.Tensor:
    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(ck / index[name], "pt") as f:
        return f.get_tensor(name)


def test_a_top_level_tensor_no_layer_holds_is_copied_as_stored(good, tmp_path):
    """It was dropped without a word (prune copied it): an output missing a tensor its input had."""
    ck = copy_checkpoint(good, tmp_path / "c")
    extra = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    _add_to_last_shard(ck, {EXTRA: extra})
    quantize_checkpoint(ck, tmp_path / "q", QuantConfig(format="fp8-dynamic"))
    got = _stored(tmp_path / "q", EXTRA)
    assert got.dtype == torch.bfloat16 and torch.equal(got, extra)


def test_a_layer_past_num_hidden_layers_of_a_model_without_mtp_adds_no_nextn_key(good, tmp_path):
    """A Qwen3-MoE checkpoint with a stored layer 2 past num_hidden_layers=2: not written, and the output's
    config.json gains no DeepSeek key (it said num_nextn_predict_layers=0 and named DeepSeek's MTP layer)."""
    ck = copy_checkpoint(good, tmp_path / "c")
    layer1 = {}
    for shard in ck.glob("model-*.safetensors"):
        layer1.update({n.replace("layers.1.", "layers.2."): t for n, t in load_file(shard).items()
                       if n.startswith("model.layers.1.")})
    _add_to_last_shard(ck, layer1)
    quantize_checkpoint(ck, tmp_path / "q", QuantConfig(format="fp8-dynamic"))
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    rep = json.loads((tmp_path / "q" / "quant_report.json").read_text())["layers_not_written"]
    assert "num_nextn_predict_layers" not in conf
    assert rep["layers"] == [2] and "num_nextn_predict_layers" not in rep["why"]
