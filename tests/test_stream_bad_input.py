"""A checkpoint the layer stream refuses, and why: one line naming the tensor or the config key (the CLI's
exit 2), never a traceback from deep inside torch, never a tensor silently left out."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, copy_checkpoint, edit_json, make_random_checkpoint
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_random_checkpoint("qwen3_moe", tmp_path_factory.mktemp("good") / "ckpt")


def _edit_tensors(ck, edit):
    """Rewrite every shard through ``edit(dict) -> dict`` (the safetensors library) and its index."""
    index = ck / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"] = {}
    for shard in sorted(ck.glob("model-*.safetensors")):
        ts = edit(load_file(shard))
        save_file(ts, shard, metadata={"format": "pt"})
        d["weight_map"].update({n: shard.name for n in ts})
    index.write_text(json.dumps(d))


def test_config_with_more_layers_than_stored_names_the_missing_layer(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", num_hidden_layers=3)
    assert_one_line_error(cli_run("inspect", ck), "num_hidden_layers=3", "lack layer(s) [2]")


def test_experts_numbered_from_one_are_refused(good, tmp_path, cli_run):
    """Layer 0's experts stored as 1..8 instead of 0..7: eight of them, but not the ones config.json implies."""
    ck = copy_checkpoint(good, tmp_path / "c")
    p = "model.layers.0.mlp.experts."

    def renumber(ts):
        return {(p + str(int(n[len(p):].split(".")[0]) + 1) + "." + n[len(p):].split(".", 1)[1]
                 if n.startswith(p) else n): t for n, t in ts.items()}

    _edit_tensors(ck, renumber)
    assert_one_line_error(cli_run("inspect", ck), "layer 0", "routed experts, numbered 1..8")


def test_a_tensor_no_layer_module_holds_is_refused_not_dropped(good, tmp_path):
    ck = copy_checkpoint(good, tmp_path / "c")
    _edit_tensors(ck, lambda ts: {**ts, "model.layers.0.self_attn.extra.weight": torch.ones(4)}
                  if "model.layers.0.self_attn.q_proj.weight" in ts else ts)
    with pytest.raises(MoepressError, match=r"'model\.layers\.0\.self_attn\.extra\.weight' does not belong"):
        StreamedModel(str(ck)).load_layer(0)


def test_stored_shared_experts_with_n_shared_experts_zero_are_refused_not_dropped(tmp_path):
    """Only the zero-width [0, H] shared_experts linears transformers saves for n_shared_experts 0 are let through;
    a checkpoint that stores real ones while config.json says 0 (transformers refuses it: size mismatch for
    shared_experts.*) is refused, not streamed without them."""
    from moepress import models

    ck = copy_checkpoint(models.path("tiny-deepseek-v3"), tmp_path / "c")
    edit_json(ck / "config.json", n_shared_experts=0)
    with pytest.raises(MoepressError, match=r"'model\.layers\.1\.mlp\.shared_experts\.\w+\.weight' does not belong"):
        StreamedModel(str(ck)).load_layer(1)


def test_token_ids_outside_the_vocabulary_are_refused(good):
    sm = StreamedModel(str(good))  # vocab_size 256, as transformers' nn.Embedding(256, ...) takes ids 0..255
    assert sm.embed([torch.tensor([[0, 255]])])[0].shape == (1, 2, 64)
    for bad in ([[0, 256]], [[-1, 3]]):
        with pytest.raises(MoepressError, match="out of range for vocab_size 256"):
            sm.embed([torch.tensor(bad)])


def test_a_negative_token_id_is_the_one_named(good):
    with pytest.raises(MoepressError, match="token id -1 out of range"):
        StreamedModel(str(good)).embed([torch.tensor([[-1, 3]])])


# ---- a packed weight whose stored shape disagrees with config.json --------------------------------------
# Kimi K2's INT4 layout (compressed-tensors pack-quantized): the shard header gives the packed words'
# shape, the module's own shape is its weight_shape tensor, so the header check cannot see it

@pytest.fixture(scope="module")
def short_expert(tmp_path_factory):
    """The bundled Kimi INT4 model with layer 2's expert 3 down_proj stored (consistently: packed rows,
    scale rows and weight_shape) for 96 output rows where config.json implies 128."""
    from moepress import models

    ck = copy_checkpoint(models.path("tiny-kimi-k2-int4"), tmp_path_factory.mktemp("kimi") / "short")
    b = "model.layers.2.mlp.experts.3.down_proj."
    ts = load_file(ck / "model.safetensors")
    assert ts[b + "weight_shape"].tolist() == [128, 64]
    for k in ("weight_packed", "weight_scale"):
        ts[b + k] = ts[b + k][:96].clone()
    ts[b + "weight_shape"] = torch.tensor([96, 64])
    save_file(ts, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


def test_calibration_free_quantize_refuses_a_packed_weight_of_another_shape(short_expert, tmp_path, cli_run):
    """It quantized the [96, 64] weight as it came and wrote it (exit 0): a checkpoint no runtime loads."""
    r = cli_run("quantize", short_expert, "-o", tmp_path / "q", "--format", "fp8-block", "--quiet")
    assert_one_line_error(r, "experts.3.down_proj.weight' has shape [96, 64]", "config.json implies [128, 64]")
    assert not (tmp_path / "q").exists()


def test_export_refuses_a_packed_weight_of_another_shape_before_writing(short_expert, tmp_path, cli_run):
    """The ONNX export stacked the experts and failed with torch's traceback (exit 1)."""
    r = cli_run("export", short_expert, "-o", tmp_path / "e", "--format", "onnx", "--quiet")
    assert_one_line_error(r, "experts.3.down_proj.weight_shape' is [96, 64]", "config.json implies [128, 64]")
    assert not (tmp_path / "e").exists()


def test_streamed_layer_refuses_a_packed_weight_of_another_shape(short_expert, tmp_path, cli_run):
    """The layer stream's check of the decoded weight (load_state_dict would raise torch's size mismatch)."""
    r = cli_run("prune", short_expert, "-o", tmp_path / "p", "--method", "frequency", "--ratio", "0.25",
                "--num-samples", "2", "--seq-len", "16", "--quiet")
    assert_one_line_error(r, "experts.3.down_proj.weight' has shape [96, 64]", "config.json implies [128, 64]")
    assert not (tmp_path / "p").exists()
