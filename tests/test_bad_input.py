"""Bad input: one line naming the file/tensor and what was expected, exit code 2, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli_quantized, copy_checkpoint, edit_json, make_random_checkpoint
from moepress import models


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_random_checkpoint("qwen3_moe", tmp_path_factory.mktemp("good") / "ckpt")


def shards(ckpt):
    return sorted(ckpt.glob("model-*.safetensors"))


def test_missing_shard(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    gone = shards(ck)[1]
    gone.unlink()
    assert_one_line_error(cli_run("inspect", ck), gone.name, "missing")


def test_truncated_shard(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    s = shards(ck)[0]
    s.write_bytes(s.read_bytes()[:-100])
    assert_one_line_error(cli_run("inspect", ck), s.name, "truncated")


def test_a_shard_with_bytes_past_its_data_is_refused(good, tmp_path, cli_run):
    """The safetensors library refuses such a file ("file not fully covered"); moepress read it and exited 0."""
    from safetensors import SafetensorError, safe_open

    ck = copy_checkpoint(good, tmp_path / "c")
    s = shards(ck)[-1]
    s.write_bytes(s.read_bytes() + bytes(4096))
    with pytest.raises(SafetensorError):
        safe_open(str(s), "pt")
    assert_one_line_error(cli_run("inspect", ck), s.name, "4096 bytes past the data its header lists")


def test_index_names_missing_tensor(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    idx = ck / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["model.layers.0.mlp.experts.99.up_proj.weight"] = shards(ck)[0].name
    idx.write_text(json.dumps(d))
    assert_one_line_error(cli_run("inspect", ck), "model.layers.0.mlp.experts.99.up_proj.weight", shards(ck)[0].name)


def test_a_tensor_the_layer_needs_removed_cleanly_is_named_before_any_work(good, tmp_path, cli_run):
    """One expert projection gone from its shard and the index alike: inspect reported it as a model (exit 0);
    prune and quantize refused it only when reading its layer."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    idx = ck / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    shard = ck / d["weight_map"].pop(name)
    idx.write_text(json.dumps(d))
    save_file({k: v for k, v in load_file(shard).items() if k != name}, shard, metadata={"format": "pt"})
    assert_one_line_error(cli_run("inspect", ck), f"tensor '{name}' is missing from the checkpoint")


def test_unsupported_architecture(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    assert_one_line_error(cli_run("inspect", ck), "config.json", "llama", "unsupported")


def test_config_and_weights_disagree_expert_count(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", num_local_experts=16)
    assert_one_line_error(cli_run("inspect", ck), "16", "8 routed experts")


def test_experts_in_a_layer_the_config_makes_dense(tmp_path, cli_run):
    """transformers writes experts in every DeepSeek-V3 layer past first_k_dense_replace, whatever
    moe_layer_freq says; vLLM and moepress read layer 1 of freq 2 as dense: refused naming the keys
    (the inspect table said "dense" without looking; prune and quantize named a missing dense tensor)."""
    ck = make_random_checkpoint("deepseek_v3", tmp_path / "c", first_k_dense_replace=0)
    edit_json(ck / "config.json", moe_layer_freq=2)
    for args in (("inspect", ck), ("quantize", ck, "--format", "fp8-block", "-o", tmp_path / "q")):
        assert_one_line_error(cli_run(*args), "layer 1 dense", "first_k_dense_replace=0, moe_layer_freq=2",
                              "stores 8 routed experts")


def test_config_and_weights_disagree_shape(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", vocab_size=300)
    assert_one_line_error(cli_run("inspect", ck), "model.embed_tokens.weight", "[300, 64]")


def test_config_and_weights_disagree_inside_layer(good, tmp_path):
    from moepress.compress.stream import StreamedModel
    from moepress.errors import MoepressError

    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", moe_intermediate_size=48)
    with pytest.raises(MoepressError, match=r"experts\.0\.(gate|up|down)_proj\.weight' has shape"):
        StreamedModel(str(ck)).load_layer(0)


def test_not_a_directory_and_missing_config(tmp_path, cli_run):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(cli_run("inspect", f), str(f), "directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli_run("inspect", tmp_path / "empty"), "config.json", "not found")


def test_unreadable_directory(good, tmp_path, cli_run, monkeypatch):
    ck = copy_checkpoint(good, tmp_path / "c")
    os.chmod(ck, 0)
    if os.geteuid() == 0:
        # root reads through any mode bits: make the access check answer as it would for a user
        import moepress.compress.checkpoint.reader as cp

        real = os.access
        monkeypatch.setattr(cp.os, "access", lambda p, m: False if Path(p) == ck else real(p, m))
    try:
        assert_one_line_error(cli_run("inspect", ck), str(ck), "not readable")
    finally:
        os.chmod(ck, 0o755)


def test_real_process_exit_code_and_no_traceback(good, tmp_path):
    """Through the installed console entry point, not click's test runner."""
    ck = copy_checkpoint(good, tmp_path / "c")
    s = shards(ck)[-1]
    s.write_bytes(s.read_bytes()[:20])
    p = subprocess.run([sys.executable, "-m", "moepress", "inspect", str(ck)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and s.name in lines[0] and "truncated" in lines[0]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf-modelopt"])
def test_export_of_a_checkpoint_with_nothing_quantized_is_one_line(tmp_path, cli_run, fmt):
    """A checkpoint with no quantized linear (a KV-cache-only quantize: quantize refuses one with nothing at
    all); the weight-quantization exporters say so instead of a StopIteration traceback (compressed-tensors)
    or an all-bf16 checkpoint labelled MIXED_PRECISION (hf-modelopt)."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "-o", q, "--format", "none", "--kv-cache", "fp8", "--num-samples", "4",
                   "--seq-len", "32", "--quiet").exit_code == 0
    assert_one_line_error(cli_run("export", q, "-o", tmp_path / "e", "--format", fmt), str(q), "no quantized linear",
                          "quantized with --format none", "KV-cache scales alone are not exported")  # not "--rule"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("fmt", ["trtllm-ckpt", "onnx"])
def test_block_fp8_input_with_other_blocks_is_refused(tmp_path, cli_run, fmt):
    """These exporters dequantize block-FP8 inputs in 128 x 128 blocks: a checkpoint whose config says
    other blocks is refused in one line, not dequantized with the wrong blocks."""
    from helpers import QWEN_SMALL
    from moepress.compress.synthetic import write_synthetic

    src = write_synthetic(QWEN_SMALL, tmp_path / "src", block_fp8=True)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    edit_json(src / "config.json", quantization_config={**qc, "weight_block_size": [64, 64]})
    assert_one_line_error(cli_run("export", src, "-o", tmp_path / "e", "--format", fmt), "weight_block_size",
                          "[64, 64]")


@pytest.fixture(scope="module")
def int4_unlike(tmp_path_factory):
    """tiny-deepseek-v3 at the default --group-size 128: its down projections (64 in_features) get
    group 64, its gate / up projections group 128."""
    from moepress import models
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    q = tmp_path_factory.mktemp("unlike") / "q"
    quantize_checkpoint(models.path("tiny-deepseek-v3"), q, QuantConfig(format="int4-gptq", num_samples=2, seq_len=32))
    return q


def test_export_of_experts_quantized_unlike_is_refused(int4_unlike, tmp_path, cli_run):
    """A layer's routed experts with two INT4 group sizes cannot be one fused MoE: vLLM raises at load,
    transformers fails to convert them. Refused in one line with the group size that fits."""
    assert_one_line_error(cli_run("export", int4_unlike, "-o", tmp_path / "e", "--format", "compressed-tensors"),
                          "layer 1's routed experts are quantized 2 ways",
                          "group 64: model.layers.*.mlp.experts.*.down_proj", "--group-size 64")
    assert not (tmp_path / "e").exists()


def test_hf_modelopt_refuses_int4_experts_before_their_group_sizes(int4_unlike, tmp_path, cli_run):
    """hf-modelopt loads INT4 weight-only experts at no group size: it says so first, and sends the group
    size to the export that takes it (--group-size 64 alone was a loop: then refused as unloadable)."""
    assert_one_line_error(cli_run("export", int4_unlike, "-o", tmp_path / "e", "--format", "hf-modelopt"),
                          "routed experts are int4-gptq", "no runtime would load them at any group size",
                          "quantize with --group-size 64, then export compressed-tensors")
    assert not (tmp_path / "e").exists()


def test_int4_with_half_precision_scales_is_named_as_such(int4_unlike, tmp_path, cli_run):
    """A packed INT4 weight whose weight_scale is bf16 (not what moepress writes) is refused by its
    dtype, not misnamed FP4 (whose scales are E4M3 / E8M0 bytes)."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(int4_unlike, tmp_path / "c")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    shard = ck / json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    save_file({**tensors, name: tensors[name].bfloat16()}, shard, metadata={"format": "pt"})
    assert_one_line_error(cli_run("export", ck, "-o", tmp_path / "e", "--format", "onnx", "--quiet"),
                          "model.layers.1.mlp.experts.0.gate_proj.weight", "bfloat16 weight_scale", "expected float32")
    assert not (tmp_path / "e").exists()


def _rewrite_header(shard: Path, edit) -> None:
    """Apply ``edit`` to a safetensors shard's header dict; the data section stays as it is."""
    import struct

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    shard.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_overlapping_tensor_offsets_are_refused(good, tmp_path, cli_run):
    """Two tensors over the same bytes (safetensors refuses it: "invalid offset"); read, one tensor
    silently was another's copy."""
    ck = copy_checkpoint(good, tmp_path / "c")
    shard = next(s for s in shards(ck) if len(json.loads(s.read_bytes()[8:8 + int.from_bytes(
        s.read_bytes()[:8], "little")])) > 3)

    def alias(h):
        a, b = [k for k in sorted(h) if k != "__metadata__"][:2]
        h[b]["data_offsets"] = h[a]["data_offsets"]
        h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
    _rewrite_header(shard, alias)
    assert_one_line_error(cli_run("inspect", ck), shard.name, "overlap")


def test_deeply_nested_header_is_one_line(good, tmp_path, cli_run):
    ck = copy_checkpoint(good, tmp_path / "c")
    shard = shards(ck)[0]
    hb = b"[" * 200_000 + b"]" * 200_000
    shard.write_bytes(len(hb).to_bytes(8, "little") + hb)
    assert_one_line_error(cli_run("inspect", ck), shard.name, "not a safetensors file")


@pytest.mark.parametrize("changes,needles", [
    ({"quantization_config": "fp8"}, ["quantization_config is str", "expected a JSON object"]),
    ({"decoder_sparse_step": 0}, ["decoder_sparse_step=0", "expected a whole number >= 1"]),
    # tracebacks from transformers (KeyError, AttributeError, ZeroDivisionError, TypeError) before
    ({"hidden_act": "bogus"}, ["hidden_act='bogus'", "transformers' activations"]),
    ({"dtype": "bogus"}, ["dtype='bogus'", "expected a torch dtype name"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads=0", "expected a whole number >= 1"]),
    # a config alone was planned (its KV cache sized for 3 heads); a checkpoint was refused by a tensor's shape
    ({"num_key_value_heads": 3}, ["num_key_value_heads=3", "expected a divisor of num_attention_heads=4"]),
    ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e6}}, ["rope_type 'bogus'", "expected one of"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, ["rope_theta='1e6'", "positive number"]),
    # a model of no layers was "quantized" (exit 0, a finished-looking output)
    ({"num_hidden_layers": -1}, ["num_hidden_layers=-1", "expected a whole number >= 1"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers=0", "expected a whole number >= 1"]),
    # KeyError / RuntimeError / TypeError tracebacks from transformers' rope validation and layers
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, ["rope_parameters", "'factor'"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}}, ["low_freq_factor"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": "4"}},
     ["rope parameter factor='4'", "positive number"]),
    # accepted, and every rotary frequency scaled by a negative number
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": -4.0}},
     ["rope parameter factor=-4.0", "positive number"]),
    ({"head_dim": -32}, ["head_dim=-32", "expected a whole number >= 1"]),
    ({"moe_intermediate_size": 0}, ["moe_intermediate_size=0", "expected a whole number >= 1"]),
    # prune and calib stats ran on NaN norms; quantize blamed "activations overflow"
    ({"rms_norm_eps": -1e-6}, ["rms_norm_eps=-1e-06", "small positive number"]),
    # NaN / Infinity: no JSON numbers (TensorRT-LLM's reader refuses them); a routed_scaling_factor NaN was copied
    ({"rms_norm_eps": float("nan")}, ["NaN is not a JSON number"]),
    ({"router_aux_loss_coef": float("-inf")}, ["-Infinity is not a JSON number"]),
    # calibrated through a window of no tokens (exit 0, other scales)
    ({"sliding_window": 0}, ["sliding_window=0", "whole number of positions"]),
    # 0 read as unset (plan of 4096 positions, export exit 0); -5 refused naming --max-seq-len, never given
    ({"max_position_embeddings": 0}, ["max_position_embeddings=0", "expected a positive whole number"]),
    ({"max_position_embeddings": -5}, ["max_position_embeddings=-5", "expected a positive whole number"]),
    # copied into the outputs (transformers logged a warning, exit 0): no token stops generation
    ({"eos_token_id": 99999}, ["eos_token_id=99999", "below vocab_size"]),
    ({"eos_token_id": [1, -2]}, ["eos_token_id=[1, -2]", "below vocab_size"]),
    ({"bos_token_id": "<s>"}, ["bos_token_id='<s>'", "expected a token id"]),
])
def test_config_values_no_layer_can_use(good, tmp_path, cli_run, changes, needles):
    ck = copy_checkpoint(good, tmp_path / "c")
    edit_json(ck / "config.json", **changes)
    assert_one_line_error(cli_run("inspect", ck), "config.json", *needles)


@pytest.mark.parametrize("changes,needles", [
    ({"n_group": 3}, ["n_group=3", "equal groups"]),
    ({"topk_group": 5}, ["topk_group=5", "expected 1..4 groups"]),
    ({"moe_layer_freq": "a"}, ["moe_layer_freq='a'", "expected a whole number"]),
    # read as 1, written as 0: vLLM's deepseek_v2.py divides the layer index by it
    ({"moe_layer_freq": 0}, ["moe_layer_freq=0", "expected 1 or more"]),
    # a traceback from the layer-kind test (int(None)); transformers cannot build it either
    ({"first_k_dense_replace": None}, ["first_k_dense_replace=None", "expected a whole number"]),
    # transformers' alias of n_routed_experts: it reads whichever the file sets last
    ({"num_local_experts": 16}, ["n_routed_experts=32 and num_local_experts=16 disagree"]),
    # routed as sigmoid / noaux_tc (transformers), served by vLLM as the config says
    ({"scoring_func": "softmax"}, ["scoring_func='softmax'", "expected 'sigmoid'"]),
    ({"topk_method": "greedy"}, ["topk_method='greedy'", "expected 'noaux_tc'"]),
])
def test_deepseek_routing_config_no_router_can_use(tmp_path, cli_run, changes, needles):
    """Group-limited routing with groups that do not divide the experts (or more competing groups than
    there are) failed inside the router's reshape, after the run had started."""
    from moepress import models

    ck = tmp_path / "c"
    ck.mkdir()
    config = json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, **changes}))
    assert_one_line_error(cli_run("inspect", ck), "config.json", *needles)


def test_block_fp8_scale_of_another_grid_is_refused(tmp_path):
    """A weight_scale_inv of 64 x 64 blocks under weight_block_size [128, 128]: dequantized before,
    12 of its 16 scales silently unused."""
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.errors import MoepressError

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    save_file({"m.weight": torch.ones(256, 256).to(torch.float8_e4m3fn),
               "m.weight_scale_inv": torch.arange(1.0, 17.0).reshape(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MoepressError, match=r"'m.weight_scale_inv' has shape \[4, 4\]; expected \[2, 2\]"):
        CheckpointReader(tmp_path).weight("m.weight")
    edit_json(tmp_path / "config.json", quantization_config={"quant_method": "fp8", "weight_block_size": [128]})
    with pytest.raises(MoepressError, match=r"weight_block_size is \[128\]; expected two positive integers"):
        CheckpointReader(tmp_path).weight("m.weight")


def test_export_option_the_exporter_does_not_read_is_refused(good, tmp_path, cli_run):
    """--option K=V (recipe export.options) that no exporter reads was ignored without a word."""
    assert_one_line_error(cli_run("export", good, "-o", tmp_path / "e", "--format", "onnx", "--option", "bogus=1"),
                          "--option bogus", "expected external_min_bytes")
    assert_one_line_error(cli_run("export", good, "-o", tmp_path / "e", "--format", "hf-fp8-block", "--option",
                                  "external_min_bytes=1"), "--option external_min_bytes", "expected none")
    # a key given twice: the last won without a word, and export.json recorded both
    assert_one_line_error(cli_run("export", good, "-o", tmp_path / "e", "--format", "onnx", "--option",
                                  "external_min_bytes=1", "--option", "external_min_bytes = 2"),
                          "--option external_min_bytes: given twice")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,needles", [
    (["run", "--from", "bogus"], ["moepress run: Invalid value for '--from'", "'bogus'"]),
    (["quantize", "tiny-mixtral", "--format", "fp8", "--seq-len", "1", "-o", "x"], ["'--seq-len'", "x>=2"]),
    (["bogus"], ["No such command 'bogus'"]),
    # a seed past 64 bits: torch's "Overflow when unpacking long long" traceback
    (["quantize", "tiny-mixtral", "--format", "fp8", "--seed", "99999999999999999999", "-o", "x"], ["'--seed'"]),
    (["calib", "prepare", "tiny-mixtral", "--seed", "99999999999999999999", "-o", "x.safetensors"], ["'--seed'"]),
    # the recipe's range too (-2**63 <= seed < 2**63); 2**64 gave torch's overflow traceback (the -o name
    # would be refused next: nothing is written if the option passes)
    (["calib", "prepare", "tiny-mixtral", "--seed", str(2**63), "-o", "x.bin"], ["'--seed'", str(2**63)]),
    (["calib", "prepare", "tiny-mixtral", "--seed", str(-(2**63) - 1), "-o", "x.bin"], ["'--seed'"]),
    (["calib", "prepare", "tiny-mixtral", "--num-samples", "0", "-o", "x.bin"], ["'--num-samples'", "x>=1"]),
    # an unknown method is named before the model is looked for
    (["prune", "no-such-model", "--ratio", "0.5", "--method", "magic", "-o", "x"], ["--method magic", "reap"]),
    # a weight whose split overflowed (inf, or NaN for two): a traceback; '@1' read the current directory as text
    (["calib", "prepare", "tiny-mixtral", "--calib", "bundled@1e308", "-o", "x.pt"], ["bundled@1e308", "up to"]),
    (["calib", "prepare", "tiny-mixtral", "--calib", "@1", "-o", "x.pt"], ["--calib @1", "no location"]),
    # the plan walked every number up to --gpus for its EP size: no end at 2**63
    (["plan", "tiny-mixtral", "--target", "h100", "--gpus", str(2**63)], ["--gpus", "does not divide"]),
    # the hint was "write inf%", itself refused
    (["check", "tiny-mixtral", "-r", "tiny-qwen3-moe", "--max-ppl-increase", "1e308"], ["'none' turns it off"]),
    (["prune", "tiny-mixtral", "--ratio", "0.5", "--protect", ",", "-o", "x"], ["--protect ','", "no LAYER:EXPERT"]),
])
def test_option_and_command_errors_are_one_line(cli_run, args, needles, tmp_path, monkeypatch):
    """Click's own usage errors (a bad choice, a value out of range, an unknown command) printed a
    usage block and "Error: ..." over several lines."""
    monkeypatch.chdir(tmp_path)  # -o x: a command that failed to refuse would write there
    assert_one_line_error(cli_run(*args), *needles)
    assert not any(tmp_path.iterdir())


def test_a_batch_size_past_a_c_long_is_all_the_samples(cli_run, tmp_path):
    """torch.split takes a C long: --batch-size 2**63 gave an overflow traceback (exit 1, read as a failed gate)."""
    r = cli_run("calib", "stats", "tiny-mixtral", "--num-samples", 2, "--seq-len", 16, "--batch-size", 2**63,
                "-o", tmp_path / "s", "--quiet")
    assert r.exit_code == 0, r.output


def test_an_option_given_twice_in_two_spellings_of_one_value_is_taken(cli_run, tmp_path):
    """--num-samples 4 --num-samples 04 is one value (as the README says of an option repeated with its value);
    two values are refused."""
    args = ("calib", "prepare", "tiny-mixtral", "--seq-len", 16, "-o")
    assert cli_run(*args, tmp_path / "a.safetensors", "--num-samples", "4", "--num-samples", "04").exit_code == 0
    assert_one_line_error(cli_run(*args, tmp_path / "b.safetensors", "--num-samples", "4", "--num-samples", "5"),
                          "--num-samples given twice (4, 5)")


@pytest.mark.parametrize("value,reads", [("010", "8"), ("1:30", "90"), ("-07", "-7")])
def test_a_recipe_number_yaml_reads_as_octal_or_base_60_is_refused(cli_run, tmp_path, value, reads):
    """YAML 1.1 (PyYAML) reads 010 as 8 and 1:30 as 90: a recipe's num_samples or seed ran with another value."""
    (tmp_path / "r.yaml").write_text(f"model: tiny-mixtral\ncalib: {{seed: {value}}}\n")
    assert_one_line_error(cli_run("recipe", "show", tmp_path / "r.yaml"), f"{value!r} reads as {reads}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_naming_it(good, tmp_path, cli_run, value):
    """A scale computed from NaN / Inf was written (exit 0): every output of that linear NaN."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for shard in shards(ck):
        t = load_file(shard)
        if name in t:
            t[name][0, 0] = value
            save_file(t, shard, metadata={"format": "pt"})
    for fmt in ("fp8-block", "mxfp4"):
        r = cli_run("quantize", ck, "--format", fmt, "-o", tmp_path / fmt, "--quiet")
        assert_one_line_error(r, name, "not finite", "NaN or Inf")
        assert not (tmp_path / fmt).exists()


def test_non_finite_weight_is_named_before_the_activations_it_spoils(tmp_path, cli_run):
    """Calibrated fp8: a NaN in an expert's up_proj makes the activations into the layer's down_proj NaN too (their
    input scale is shared by the layer's experts); the refusal named expert 0's down_proj and "the calibration
    activations", not the weight that holds the NaN."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(models.resolve("tiny-qwen3-moe"), tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for shard in ck.glob("*.safetensors"):
        t = load_file(shard)
        if name in t:
            t[name][:, 0] = float("nan")
            save_file(t, shard, metadata={"format": "pt"})
    r = cli_run("quantize", ck, "--format", "fp8", "-o", tmp_path / "q", "--quiet", "--num-samples", "4",
                "--seq-len", "32")
    assert_one_line_error(r, name, "values are not finite (NaN or Inf); expected finite weights")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value,fmt,needles", [
    (float("inf"), "fp8", ["model.layers.1.post_attention_layernorm.weight: 1 values are not finite"]),
    (float("inf"), "int4-gptq", ["model.layers.1.post_attention_layernorm.weight: 1 values are not finite"]),
    (3e38, "int4-gptq", ["model.layers.1: its output on the calibration samples holds NaN or Inf with finite weights"]),
])
def test_non_finite_activations_are_refused_before_their_statistics(tmp_path, cli_run, value, fmt, needles):
    """A norm weight of Inf (or one that overflows the activations) gave a traceback from the sparse-expert evidence's
    eigvalsh (any calibrated format) or GPTQ's factorisation: refused in one line, naming a weight that holds it."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(models.resolve("tiny-qwen3-moe"), tmp_path / "c")
    name = "model.layers.1.post_attention_layernorm.weight"
    for shard in ck.glob("*.safetensors"):
        t = load_file(shard)
        if name in t:
            t[name][0] = value
            save_file(t, shard, metadata={"format": "pt"})
    r = cli_run("quantize", ck, "--format", fmt, "-o", tmp_path / "q", "--quiet", "--num-samples", "4",
                "--seq-len", "32")
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "q").exists()


def test_integer_weight_without_scales_is_refused(good, tmp_path, cli_run):
    """int8 bytes with no quantization_config were read as weight values (exit 0)."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for shard in shards(ck):
        t = load_file(shard)
        if name in t:
            t[name] = t[name].to(torch.int8)
            save_file(t, shard, metadata={"format": "pt"})
    r = cli_run("quantize", ck, "--format", "fp8-block", "-o", tmp_path / "q", "--quiet")
    assert_one_line_error(r, name, "stored as int8 with no quantization scales")


def gridded(tmp_path):
    return make_random_checkpoint("qwen3_moe", tmp_path / "grid", hidden_size=128, moe_intermediate_size=128)


@pytest.mark.parametrize("change,needle", [("shape", "has shape"), ("dtype", "stored as int32")])
@pytest.mark.parametrize("fmt", ["hf-fp8-block", "onnx", "trtllm-ckpt"])
def test_export_refuses_a_tensor_unlike_its_config(good, tmp_path, cli_run, change, needle, fmt):
    """The exporters read tensors as stored: a weight of the wrong shape was written as it was (hf-fp8-block,
    exit 0) or failed mid-export with a traceback; an int32 weight was cast to bf16 (exit 0)."""
    from safetensors.torch import load_file, save_file

    # hf-fp8-block refuses a model with no 128x128 block grid before reading a tensor: one with experts 128 wide
    ck = copy_checkpoint(gridded(tmp_path) if fmt == "hf-fp8-block" else good, tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for shard in shards(ck):
        t = load_file(shard)
        if name in t:
            t[name] = t[name][:, : t[name].shape[1] // 2].contiguous() if change == "shape" else t[name].to(torch.int32)
            save_file(t, shard, metadata={"format": "pt"})
    r = cli_run("export", ck, "--format", fmt, "-o", tmp_path / "x", "--quiet")
    if change == "dtype" and fmt == "hf-fp8-block":
        needle = "int32"
    assert_one_line_error(r, name, needle)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [["prune", "tiny-mixtral", "--ratio", "0.25", "-o", "x"],
                                  ["calib", "prepare", "tiny-mixtral", "-o", "x.safetensors"],
                                  ["export", "tiny-mixtral", "--format", "onnx", "-o", "x"]])
def test_a_single_process_command_under_torchrun_is_refused(cli_run, monkeypatch, args, tmp_path):
    """Every rank ran the whole job into the same output: one won, the others failed on its lock (exit 1
    from torchrun over a finished output)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.chdir(tmp_path)  # -o x: a command that failed to refuse would write there
    assert_one_line_error(cli_run(*args), f"moepress {' '.join(args[:2]) if args[0] == 'calib' else args[0]}: "
                          "runs in one process", "moepress quantize, moepress calib stats")


def test_a_malformed_world_size_is_left_to_the_torchrun_commands(cli_run, monkeypatch, tmp_path):
    """Only quantize and calib stats read WORLD_SIZE (they say what is wrong with it): a single-process command
    runs, not refused as one under torchrun."""
    monkeypatch.setenv("WORLD_SIZE", "two")
    r = cli_run("inspect", "tiny-mixtral", "--no-targets")
    assert r.exit_code == 0 and "tiny-mixtral" in r.stdout, r.output
    assert_one_line_error(cli_run("quantize", "tiny-mixtral", "--format", "fp8", "-o", tmp_path / "q"),
                          "WORLD_SIZE='two'", "expected an integer")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("env,named", [
    ({}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT='x': expected an integer"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "LOCAL_WORLD_SIZE": "x"},
     "LOCAL_WORLD_SIZE='x': expected an integer"),
    # RANK was taken as 0 (torch's rendezvous then raised a ValueError); LOCAL_RANK as RANK for the NCCL group
    # and as 0 for the compute device
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "RANK": ""}, "RANK not set"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "LOCAL_RANK": ""}, "LOCAL_RANK not set"),
])
@pytest.mark.parametrize("args", [["quantize", "tiny-mixtral", "--format", "fp8-block"],
                                  ["calib", "stats", "tiny-mixtral"]])
def test_a_partial_torchrun_environment_is_refused_naming_the_variable(cli_run, monkeypatch, tmp_path, env, named,
                                                                       args):
    """WORLD_SIZE set by hand (or srun) without the rendezvous variables: torch's env:// rendezvous raised a
    ValueError (a traceback, exit 1); a malformed LOCAL_WORLD_SIZE too."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v) if v else monkeypatch.delenv(k)
    assert_one_line_error(cli_run(*args, "-o", tmp_path / "o"), named)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args", [
    ["calib", "prepare", "tiny-mixtral", "--seq-len", "1025", "-o", "{tmp}/c.safetensors"],
    ["calib", "stats", "tiny-mixtral", "--seq-len", "1025", "-o", "{tmp}/s"],
    ["quantize", "tiny-mixtral", "--format", "fp8", "--seq-len", "1025", "-o", "{tmp}/q"],
    ["prune", "tiny-mixtral", "--ratio", "0.25", "--seq-len", "1025", "-o", "{tmp}/p"],
    ["check", "tiny-kimi-k2-int4", "-r", "tiny-deepseek-v3", "--seq-len", "1025"],
])
def test_calibration_past_the_models_positions_is_refused(tmp_path, cli_run, args):
    """Samples longer than max_position_embeddings (1024 in every bundled model) ran at positions
    the model never trained on, and the stage reported statistics / perplexities from them."""
    r = cli_run(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(r, "--seq-len 1025", "max_position_embeddings 1024")
    assert not any(tmp_path.iterdir())


def test_generations_past_the_models_positions_are_refused(tmp_path, cli_run):
    """check --generate ran its 16-token prompts on for --gen-tokens new ones past max_position_embeddings (115
    positions of a 64-position model, exit 0; a recipe's gen_tokens 100000 ran for hours after the other stages):
    refused before any work, by the check and by run's preflight."""
    import yaml

    from moepress import models

    ref = copy_checkpoint(models.path("tiny-mixtral"), tmp_path / "ref")
    edit_json(ref / "config.json", max_position_embeddings=64)
    r = cli_run("check", "tiny-mixtral", "-r", ref, "--seq-len", "64", "--generate", "1", "--gen-tokens", "50",
                "--no-record")
    assert_one_line_error(r, "--gen-tokens 50", "max_position_embeddings 64", "at most 49")
    recipe = {"model": str(ref), "quantize": {"format": "fp8-dynamic"}, "export": None, "build": None,
              "check": {"seq_len": 32, "max_samples": 1, "generate": 1, "gen_tokens": 50}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert_one_line_error(cli_run("run", tmp_path / "r.yaml", "-o", tmp_path / "out"), "check.gen_tokens 50")
    # the last forward of 49 new tokens runs the 16-token prompt and 48 of them: 64 positions
    r = cli_run("check", "tiny-mixtral", "-r", ref, "--seq-len", "64", "--generate", "1", "--gen-tokens", "49",
                "--max-samples", "1", "--no-record", "--quiet")
    assert r.exit_code in (0, 1), r.output
    assert not (tmp_path / "out").exists()


def test_single_file_beside_an_index_is_refused(good, tmp_path, cli_run):
    """A directory holding both model.safetensors and model.safetensors.index.json (a leftover of a
    re-save): transformers 5.24 loads model.safetensors (modeling_utils checks SAFE_WEIGHTS_NAME before
    SAFE_WEIGHTS_INDEX_NAME), vLLM the index's shards; moepress read the shards and wrote, exit 0, an
    artifact of weights transformers never loads for that directory. Refused in one line naming the two."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path / "c")
    state = {}
    for s in shards(ck):
        state.update(load_file(s))
    state["model.norm.weight"] = state["model.norm.weight"] * 0.25  # the single file differs from the shards
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    r = cli_run("quantize", ck, "--format", "fp8-dynamic", "-o", tmp_path / "q", "--quiet")
    assert_one_line_error(r, "holds both model.safetensors and model.safetensors.index.json")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args", [["quantize", "no-such-model", "--format", "fp8", "-o", "x"],
                                  ["export", "tiny-qwen3-moe", "--format", "bogus", "-o", "x", "--quiet"],
                                  ["check", "no-such-model", "--reference", "tiny-qwen3-moe"]])
def test_a_refusal_under_json_is_a_json_result_too(cli_run, args, tmp_path, monkeypatch):
    """With --json a refused command printed nothing on stdout: a CI job reading the result found no JSON
    document. stdout now holds {"error": <the stderr line>, "exit": 2}; stderr keeps its one line."""
    monkeypatch.chdir(tmp_path)
    r = cli_run(*args, "--json")
    line = assert_one_line_error(r)
    assert json.loads(r.stdout) == {"error": line.removeprefix("moepress: error: "), "exit": 2}


def test_a_bad_option_of_moepress_itself_is_one_line_and_a_bare_group_prints_its_help(cli_run):
    """`moepress --bogus` printed click's four-line usage error (and no JSON under --json); a bare `moepress
    calib` gave its whole help flattened into one error line."""
    assert_one_line_error(cli_run("--bogus"), "No such option '--bogus'", "moepress --help")
    r = cli_run("calib")
    assert "moepress: error" not in r.output and "Commands:" in r.output and "prepare" in r.output, r.output


def test_a_bare_moepress_prints_its_help_not_an_error_line(cli_run):
    """`moepress` alone is click's NoArgsIsHelpError, a UsageError: caught as a bad option of moepress itself, the
    whole help came out flattened into one "moepress: error:" line (exit 2)."""
    r = cli_run()
    assert "moepress: error" not in r.output, r.output
    assert r.output.startswith("Usage: ") and " [OPTIONS] COMMAND [ARGS]" in r.output.splitlines()[0], r.output
    assert "\nCommands:\n" in r.output and "  quantize " in r.output, r.output


@pytest.fixture(scope="module")
def fp8_block_deepseek(tmp_path_factory):
    """tiny-deepseek-v3 quantized to fp8-block (each test edits a copy)."""
    return cli_quantized(tmp_path_factory.mktemp("fp8-block") / "q", "tiny-deepseek-v3", "--format", "fp8-block")


def _edited_copy(q, dst, name, edit):
    """A copy of checkpoint ``q`` with tensor ``name`` replaced by ``edit(tensor)`` (the safetensors library)."""
    from safetensors.torch import load_file, save_file

    q = copy_checkpoint(q, dst)
    f = q / json.loads((q / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = load_file(f)
    t[name] = edit(t[name])
    save_file(t, f, metadata={"format": "pt"})
    return q


@pytest.mark.parametrize("method", ["frequency", "auto"])
def test_prune_refuses_a_quantized_input_whose_scale_is_not_finite(cli_run, tmp_path, method, fp8_block_deepseek):
    """A NaN weight_scale of a block-FP8 input: prune exited 0, kept the expert and decided every later layer on
    NaN hidden states (quantize refuses such an input); now one line naming the tensor, nothing written."""
    n = "model.layers.2.mlp.experts.5.down_proj.weight_scale"
    q = _edited_copy(fp8_block_deepseek, tmp_path / "q", n, lambda t: torch.full_like(t, float("nan")))
    r = cli_run("prune", q, "--ratio", "0.5", "--method", method, "--num-samples", "4", "--seq-len", "32",
                "-o", tmp_path / "p", "--quiet")
    assert_one_line_error(r, "model.layers.2.mlp.experts.5.down_proj.weight", "not finite")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_prune_auto_refuses_one_non_finite_weight_in_its_plan_race(cli_run, tmp_path, fp8_block_deepseek):
    """One NaN among a layer's decoded weights (a corrupt FP8 byte) is refused as a whole NaN tensor is, and by the
    plan race of --method auto: the race ran every layer on NaN hidden states before the chosen method's run
    (its own 'prune' task) refused it."""
    n = "model.layers.2.mlp.experts.5.down_proj.weight"

    def one_nan(t):
        t = t.clone()
        t.view(torch.uint8).view(-1)[7] = 0x7F  # E4M3's NaN
        return t

    q = _edited_copy(fp8_block_deepseek, tmp_path / "q", n, one_nan)
    r = cli_run("prune", q, "--ratio", "0.5", "--method", "auto", "--num-samples", "4", "--seq-len", "32",
                "-o", tmp_path / "p", "--json")
    assert r.exit_code == 2, r.output
    assert f"{n}: 1 values are not finite" in json.loads(r.stdout)["error"], r.stdout
    events = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]  # and the error's line
    tasks = [(e["event"], e.get("stage")) for e in events]
    assert ("start", "plans") in tasks and ("start", "prune") not in tasks, tasks
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


@pytest.mark.parametrize("stray", ["duplicate", "unlisted"])
def test_shard_holding_a_tensor_the_index_does_not_list(good, tmp_path, cli_run, stray):
    """A shard holding a tensor its index entry does not give it (a second copy of a tensor the index places
    in another shard, or one the index lists nowhere): transformers 5.24 loads every tensor of each shard
    (modeling_utils.py `for k in file_pointer.keys()`, the later shard's copy winning), so it ran the stray
    copy while moepress read the index's and wrote, exit 0, an artifact of other weights than the input's.
    Refused in one line naming the shard and the tensor."""
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path / "c")
    wm = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    other = next(s for s in shards(ck) if s.name != wm[name])
    state = load_file(other)
    key = name if stray == "duplicate" else "model.layers.0.mlp.experts.0.extra.weight"
    state[key] = torch.zeros_like(load_file(ck / wm[name])[name])
    save_file(state, other, metadata={"format": "pt"})
    r = cli_run("quantize", ck, "--format", "fp8-dynamic", "-o", tmp_path / "q", "--quiet")
    # and where the index puts it: the duplicate's listed shard (the one consumers may not load), or nowhere
    where = f"lists it in '{wm[name]}'" if stray == "duplicate" else "does not list it"
    assert_one_line_error(r, other.name, key, where)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("json_out", [False, True])
def test_an_error_whose_text_spans_lines_is_one_line(monkeypatch, json_out):
    """A MoepressError with a newline in its text: one stderr line, exit 2; under --json the one document's
    error field joined the same way."""
    from click.testing import CliRunner

    import moepress.cli.inspect as inspect_mod
    from moepress.cli import cli
    from moepress.errors import MoepressError

    def refuse(_):
        raise MoepressError("first part\n  second part")
    monkeypatch.setattr(inspect_mod, "resolve_model", refuse)
    r = CliRunner().invoke(cli, ["inspect", "whatever", *(["--json"] if json_out else [])], catch_exceptions=False)
    assert r.exit_code == 2
    if json_out:
        assert json.loads(r.stdout) == {"error": "first part second part", "exit": 2}
    else:
        assert [ln for ln in r.stderr.splitlines() if ln.strip()] == ["moepress: error: first part second part"]


@pytest.mark.parametrize("args", [
    ["quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", "-q"],
    ["prune", "tiny-qwen3-moe", "--ratio", "0.25", "-o", "--force"],
    ["calib", "prepare", "tiny-qwen3-moe", "-o", "--json"],
    ["prune", "tiny-qwen3-moe", "--ratio", "0.25", "-o", "--help"],
])
def test_an_option_of_the_command_given_as_the_output_is_refused(cli_run, tmp_path, monkeypatch, args):
    """`-o -q`: click takes `-q` as the path: a folder named `-q` was written, and --quiet not applied."""
    monkeypatch.chdir(tmp_path)
    r = cli_run(*args)
    assert_one_line_error(r, f"{args[-1]} is an option of this command, not a path", f"-o ./{args[-1]}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_type", ["llama4_moe_x", None])
@pytest.mark.parametrize("command", [["inspect"], ["quantize", "--format", "fp8-dynamic"]])
def test_a_model_type_transformers_cannot_build_is_refused_though_architectures_name_a_family(
        good, tmp_path, cli_run, model_type, command):
    """A config.json whose model_type is another (or missing) while ``architectures`` names Qwen3-MoE: taken as
    Qwen3-MoE, its export loaded in `moepress check` (which hands transformers the family's config) and passed,
    while transformers and vLLM, which build the config by model_type, refuse it."""
    ck = copy_checkpoint(good, tmp_path / "c")
    conf = json.loads((ck / "config.json").read_text())
    conf.update(model_type=model_type) if model_type else conf.pop("model_type")
    (ck / "config.json").write_text(json.dumps(conf))
    out = tmp_path / "q"
    r = cli_run(command[0], ck, *command[1:], *(["-o", out] if command[0] == "quantize" else []))
    assert_one_line_error(r, "config.json", f"model_type {model_type!r}", "expected model_type 'qwen3_moe'")
    assert not out.exists()
