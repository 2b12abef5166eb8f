"""A DeepSeek-V3 checkpoint with a layer stored past num_hidden_layers (its MTP layer): quantize streams the
decoder layers only, so the output's config must declare no MTP layer, read by transformers' own
DeepseekV3Config (5.x: num_nextn_predict_layers, alias num_mtp_layers, defaults to 1 when absent)."""

import json

import pytest
import transformers as tf
from safetensors.torch import load_file
from test_quant_extra_tensors import _add_to_last_shard

from helpers import copy_checkpoint, make_random_checkpoint
from moepress.compress.quantize import QuantConfig, quantize_checkpoint


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    return make_random_checkpoint("deepseek_v3", tmp_path_factory.mktemp("dsv3") / "ckpt")


def _with_stored_mtp_layer(src, dst, nextn):
    ck = copy_checkpoint(src, dst)
    n = json.loads((ck / "config.json").read_text())["num_hidden_layers"]
    last = {}
    for shard in ck.glob("model-*.safetensors"):
        last.update({k.replace(f"layers.{n - 1}.", f"layers.{n}."): t for k, t in load_file(shard).items()
                     if k.startswith(f"model.layers.{n - 1}.")})
    _add_to_last_shard(ck, last)
    conf = json.loads((ck / "config.json").read_text())
    conf.pop("num_nextn_predict_layers", None)
    if nextn is not None:
        conf["num_nextn_predict_layers"] = nextn
    (ck / "config.json").write_text(json.dumps(conf))
    return ck, n


@pytest.mark.parametrize("nextn", [None, 1], ids=["key-absent", "key-1"])
def test_deepseek_output_declares_no_mtp_layer_to_transformers(dsv3, tmp_path, nextn):
    ck, n = _with_stored_mtp_layer(dsv3, tmp_path / "c", nextn)
    assert tf.AutoConfig.from_pretrained(ck).num_nextn_predict_layers == 1  # what the input declares
    quantize_checkpoint(ck, tmp_path / "q", QuantConfig(format="fp8-dynamic"))
    assert tf.AutoConfig.from_pretrained(tmp_path / "q").num_nextn_predict_layers == 0
    rep = json.loads((tmp_path / "q" / "quant_report.json").read_text())["layers_not_written"]
    assert rep["layers"] == [n]
