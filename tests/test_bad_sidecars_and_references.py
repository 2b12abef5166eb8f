"""Bad input a helper's hunt found printing tracebacks or writing NaN: each is one line, exit 2, naming the file,
module or tensor (the bad-input contract, helpers.assert_one_line_error)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from helpers import assert_one_line_error
from moepress import models

MODEL = "tiny-mixtral"
SMALL = ["--max-samples", "2", "--seq-len", "32", "--no-record", "--quiet"]
EXPERT = "model.layers.0.block_sparse_moe.experts.0.w1"


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    q = tmp_path_factory.mktemp("q") / "q8"
    quantize_checkpoint(models.path(MODEL), q, QuantConfig(format="fp8", num_samples=2, seq_len=32))
    return q


def _edited_layout(src, dst, edit):
    out = shutil.copytree(src, dst)
    p = out / "moepress_quant.json"
    lay = json.loads(p.read_text())
    edit(lay["modules"])
    p.write_text(json.dumps(lay))
    return out


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda m: m[EXPERT].update(format="int3"), [EXPERT, '"int3"', "fp8-block"]),
    (lambda m: m[EXPERT].pop("format"), [EXPERT, "null"]),
    (lambda m: m.update({"model.layers.0.self_attn.nonexistent": {"format": "fp8"}}),
     ["model.layers.0.self_attn.nonexistent", "not a linear"]),
])
def test_a_layout_entry_naming_no_format_or_no_linear_is_refused(cli_run, q8, tmp_path, edit, needles):
    """moepress_quant.json's module entries were read unchecked: KeyError tracebacks in check, prune and calib."""
    bad = _edited_layout(q8, tmp_path / "bad", edit)
    assert_one_line_error(cli_run("check", bad, "--reference", MODEL, *SMALL), "moepress_quant.json", *needles)
    assert_one_line_error(cli_run("prune", bad, "--keep", "6", "--method", "frequency", "--num-samples", "2",
                                  "--seq-len", "32", "-o", tmp_path / "p", "--quiet"), *needles)


@pytest.mark.parametrize("fmt", ["hf-modelopt", "compressed-tensors"])
def test_an_export_of_a_layout_naming_a_module_with_no_weight_is_refused(cli_run, q8, tmp_path, fmt):
    """A module moepress_quant.json lists but the checkpoint does not hold: the exports wrote it into their
    quantization config (modules quantized that do not exist) and exited 0."""
    ghost = "model.layers.0.self_attn.nonexistent"
    bad = _edited_layout(q8, tmp_path / "bad", lambda m: m.update({ghost: {"format": "fp8"}}))
    assert_one_line_error(cli_run("export", bad, "--format", fmt, "-o", tmp_path / "e", "--quiet"),
                          "moepress_quant.json", f"'{ghost}'", f"'{ghost}.weight'")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(("name", "text", "what"), [("quant_report.json", "{", "not readable JSON"),
                                                    ("hf_quant_config.json", "{", "not readable JSON"),
                                                    ("hf_quant_config.json", "[]", "a JSON list")])
def test_prune_of_a_quantize_output_with_a_broken_sidecar_names_it(cli_run, q8, tmp_path, name, text, what):
    bad = shutil.copytree(q8, tmp_path / "bad")
    (bad / name).write_text(text)
    assert_one_line_error(cli_run("prune", bad, "--keep", "6", "--method", "frequency", "--num-samples", "2",
                                  "--seq-len", "32", "-o", tmp_path / "p", "--quiet"), name, what)
    assert not (tmp_path / "p").exists()


def test_a_recipe_key_that_is_a_list_is_not_valid_yaml(cli_run, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {MODEL}\nquantize: {{? [a, b] : 1}}\n")
    assert_one_line_error(cli_run("run", r, "-o", tmp_path / "run", "--quiet"), "r.yaml", "line 2", "a list as a key")


def test_a_corrupt_onnx_candidate_and_a_list_config_are_refused(cli_run, tmp_path):
    x = tmp_path / "x.onnx"
    x.write_bytes(b"garbage\n")
    assert_one_line_error(cli_run("check", x, "--reference", MODEL, *SMALL), "x.onnx", "not a readable ONNX model")
    c = shutil.copytree(models.path(MODEL), tmp_path / "c")
    (c / "config.json").write_text("[1, 2]")
    assert_one_line_error(cli_run("check", c, "--reference", MODEL, *SMALL), "config.json", "expected a JSON object")


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """tiny-mixtral with one bf16 NaN in layer 1's expert 3 down projection (bytes patched in place)."""
    out = shutil.copytree(models.path(MODEL), tmp_path_factory.mktemp("nan") / "m")
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    f = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][key]
    b = bytearray(f.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    at = 8 + n + json.loads(b[8:8 + n])[key]["data_offsets"][0]
    b[at:at + 2] = struct.pack("<H", 0x7FC0)
    f.write_bytes(bytes(b))
    return out


def test_calib_stats_of_a_model_with_a_nan_weight_is_refused(cli_run, nan_model, tmp_path):
    """It wrote stats.json with bare NaN (not JSON) and exit 0; prune and quantize refused the same model."""
    r = cli_run("calib", "stats", nan_model, "--num-samples", "32", "--seq-len", "128", "-o", tmp_path / "st",
                "--quiet")
    assert_one_line_error(r, "experts.3.w2.weight", "not finite")
    assert not (tmp_path / "st").exists()


def test_a_nan_in_the_reference_is_the_references_not_the_candidates(cli_run, q8, nan_model):
    """The check failed the correct candidate (expert error NaN, exit 1); the reference is named instead."""
    assert_one_line_error(cli_run("check", q8, "--reference", nan_model, *SMALL), "reference",
                          "experts.3.w2.weight", "not finite")


@pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ('"str"', "str")])
def test_a_tokenizer_config_that_is_no_json_object_is_one_line(cli_run, tmp_path, text, kind):
    """tokenizer_config.json holding a list or a string: AttributeError tracebacks (exit 1) in quantize and prune."""
    bad = shutil.copytree(models.path(MODEL), tmp_path / "m")
    (bad / "tokenizer_config.json").write_text(text)
    for args in (("quantize", bad, "--format", "fp8", "-o", tmp_path / "q"),
                 ("prune", bad, "--keep", "6", "--method", "frequency", "-o", tmp_path / "p")):
        r = cli_run(*args, "--num-samples", "2", "--seq-len", "32", "--quiet")
        assert_one_line_error(r, "tokenizer_config.json: a JSON " + kind, "expected a JSON object")
