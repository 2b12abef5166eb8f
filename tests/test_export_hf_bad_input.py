"""Bad input to the Hugging Face exporters (hf-modelopt, hf-fp8-block, compressed-tensors):
a quantized checkpoint of the wrong scheme is refused in one line (exit 2) that names the format
found and what to run instead, and nothing is written. (bf16 into the quantized-only formats,
a non-empty output without --force and the family check: test_export_hf_modelopt.py /
test_export_ct.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint


@pytest.fixture(scope="module")
def fp8_dynamic(tmp_path_factory):
    """A real, calibration-free quantize output (per-channel FP8, tiny-mixtral)."""
    q = tmp_path_factory.mktemp("bad") / "q-fp8-dynamic"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8-dynamic"))
    return q


def _one_line_refusal(r, out):
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_hf_fp8_block_refuses_other_fp8_schemes(fp8_dynamic, tmp_path, cli_run):
    r = cli_run("export", fp8_dynamic, "--format", "hf-fp8-block", "-o", tmp_path / "x")
    _one_line_refusal(r, tmp_path / "x")
    assert "fp8-dynamic" in r.output and "quantize with --format fp8-block, then export hf-fp8-block" in r.output


def test_compressed_tensors_refuses_awq(fp8_dynamic, tmp_path, cli_run):
    """AWQ's pre_quant_scale has no compressed-tensors form. The refusal reads only the sidecar,
    so a copy of a real quantize output whose moepress_quant.json says int4-awq exercises it."""
    q = tmp_path / "q"
    shutil.copytree(fp8_dynamic, q)
    lay = json.loads((q / "moepress_quant.json").read_text())
    lay["format"] = "int4-awq"
    lay["modules"] = {k: {**v, "format": "int4-awq", "group": 128} for k, v in lay["modules"].items()}
    (q / "moepress_quant.json").write_text(json.dumps(lay))
    r = cli_run("export", q, "--format", "compressed-tensors", "-o", tmp_path / "x")
    _one_line_refusal(r, tmp_path / "x")
    # folding is the way to compressed-tensors; hf-modelopt refuses INT4 weight-only experts (no loop back to it)
    assert "int4-awq" in r.output and "quantize with --awq-fold, then export compressed-tensors" in r.output
    assert "hf-modelopt" not in r.output


def test_unknown_format_lists_choices(fp8_dynamic, tmp_path, cli_run):
    r = cli_run("export", fp8_dynamic, "--format", "hf-nope", "-o", tmp_path / "x")
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    assert "hf-modelopt" in r.output and "compressed-tensors" in r.output


@pytest.mark.parametrize("groups,width", [(2, 160), (3, 129)])
def test_int4_scales_that_are_not_whole_groups_are_refused(tmp_path, groups, width):
    """Packed INT4 with a partial last group (in_features 160 in groups of 128: 2 scale columns) was read as
    groups of in_features / columns (80): other numbers than the checkpoint's, written into every export. Only
    whole groups of 32, 64 or 128 (or one group over the whole input, as moepress writes below 128) are read."""
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quant import int4
    from moepress.errors import MoepressError
    from moepress.exporters.linears import read_linear

    w = torch.randint(-8, 8, (4, width), dtype=torch.int8)
    ok = torch.randint(-8, 8, (4, 192), dtype=torch.int8)
    save_file({"x.weight": int4.pack_int4(w), "x.weight_scale": torch.ones(4, groups),
               "y.weight": int4.pack_int4(ok), "y.weight_scale": torch.ones(4, 3)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    r = CheckpointReader(tmp_path)
    with pytest.raises(MoepressError, match=f"'x.weight' has {groups} scale groups over in_features {width}"):
        read_linear(r, "x")
    assert read_linear(r, "y").weight.shape == (4, 192)  # 3 groups of 64


def test_block_fp8_of_other_blocks_and_integer_weights_without_scales_are_refused(tmp_path):
    """The exporters read DeepSeek's 128 x 128 block FP8 only (config.json weight_block_size; a [64, 64] grid
    read as 128 x 128 puts each scale on four blocks), and an integer tensor with no scales beside it is no
    weight (read as floats it would be its codes); each a one-line refusal naming what was expected."""
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.errors import MoepressError
    from moepress.exporters.linears import read_linear

    save_file({"x.weight": torch.zeros(128, 128).to(torch.float8_e4m3fn), "x.weight_scale_inv": torch.ones(2, 2),
               "y.weight": torch.zeros(4, 8, dtype=torch.int8)}, tmp_path / "model.safetensors")
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = CheckpointReader(tmp_path)
    with pytest.raises(MoepressError, match=r"weight_block_size is \[64, 64\]; expected \[128, 128\]"):
        read_linear(r, "x")
    with pytest.raises(MoepressError, match="'y.weight' is stored as int8 with no quantization scales"):
        read_linear(r, "y")


@pytest.mark.parametrize("model,rule,fused", [
    ("tiny-qwen3-moe", "self_attn.q_proj", "qkv_proj"),
    ("tiny-deepseek-v3", "self_attn.kv_a_proj_with_mqa", "fused_a"),
    ("tiny-deepseek-v3", "mlp.shared_experts.up_proj", "gate_up_proj"),
])
def test_linears_the_runtimes_fuse_must_be_quantized_alike(tmp_path, cli_run, model, rule, fused):
    """One part of q/k/v (gate/up, DeepSeek's q_a / kv_a) left bf16 beside FP8 parts: vLLM refuses the checkpoint
    at load (compressed_tensors/utils.py should_ignore_layer) and TensorRT-LLM builds the fused linear quantized;
    both exports refuse it in one line. The same rule on every part is written."""
    q = tmp_path / "q"
    assert cli_run("quantize", model, "--format", "fp8", "--rule", f"{rule}=none", "--num-samples", "2",
                   "--seq-len", "32", "-o", q, "--quiet").exit_code == 0
    for fmt in ("hf-modelopt", "compressed-tensors"):
        r = cli_run("export", q, "--format", fmt, "-o", tmp_path / fmt)
        _one_line_refusal(r, tmp_path / fmt)
        assert f"a fused {fused} has one quantization" in r.output and f"{rule.split('.')[-1]}: unquantized" in r.output
    whole = "self_attn.*_proj" if fused == "qkv_proj" else rule.rsplit(".", 1)[0] + ".*"
    assert cli_run("quantize", model, "--format", "fp8", "--rule", f"{whole}=none", "--num-samples", "2",
                   "--seq-len", "32", "-o", tmp_path / "q2", "--quiet").exit_code == 0
    for fmt in ("hf-modelopt", "compressed-tensors"):
        assert cli_run("export", tmp_path / "q2", "--format", fmt, "-o", tmp_path / f"{fmt}2").exit_code == 0
