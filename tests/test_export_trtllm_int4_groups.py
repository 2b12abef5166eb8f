"""TensorRT-LLM's INT4 GEMMs for linears run fine-grained scales in groups of 64 or 128 only, 128 only with FP8
activations (cpp/tensorrt_llm/kernels/cutlass_kernels/fpA_intB_gemm/fpA_intB_gemm_template.h,
generic_mixed_gemm_kernelLauncher: "Only group size 64 and 128 supported for fine grained kernels"). An
hf-modelopt export of other groups (--group-size 32, a group shrunk to a narrower input) was declared loadable
and built; now export.json says TensorRT-LLM fails on it, and `moepress build` refuses it."""

import json

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export


@pytest.mark.parametrize("fmt,group,fails,where", [("int4-awq", 32, True, "self_attn.*"),
                                                   ("int4-awq", 64, False, "self_attn.*"),
                                                   ("int4-awq", 128, False, "self_attn.*"),
                                                   ("w4a8-awq", 64, True, "self_attn.*"),
                                                   ("w4a8-awq", 128, False, "self_attn.*"),
                                                   ("w4a8-awq", 64, False, "block_sparse_moe.experts.*"),
                                                   ("w4a8-awq", 128, False, "block_sparse_moe.experts.*")])
def test_int4_groups_tensorrt_llm_cannot_run_are_declared(tmp_path, cli_run, fmt, group, fails, where):
    """Routed experts in such groups are not these GEMMs' (the fused MoE's kernels run them): their export is not
    said to fail at an INT4 GEMM. The fused MoE (WInt4AFP8FusedMoEMethod.create_weights, main 2026-12) allocates
    128-wide groups of scales only, and vLLM / SGLang load no INT4 experts from a Model-Optimizer checkpoint: experts
    in groups of 64 were written, said to fail loading there, and loaded nowhere; now the export is refused in one
    line naming --group-size 128 (which divides tiny-mixtral's expert widths)."""
    from helpers import assert_one_line_error

    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8", rules=((where, fmt),),
                                                                    group_size=group, num_samples=2, seq_len=32))
    if "experts" in where and group != 128:
        assert_one_line_error(cli_run("export", q, "--format", "hf-modelopt", "-o", e), f"{fmt} in groups of {group}",
                              "no runtime would load them", "quantize with --group-size 128")
        assert not e.exists()
        return
    export(q, e, ExportConfig(format="hf-modelopt"))
    why = json.loads((e / "export.json").read_text())["misloaded_why"].get("tensorrt_llm", "")
    assert ("fails at its first INT4 GEMM" in why) == fails, why
    assert "fails loading its INT4 routed experts" not in why, why
    if fails:
        assert f"{fmt} in groups of {group}" in why and "self_attn.q_proj" in why
        r = cli_run("build", e, "--target", "h100", "--dry-run", "-o", tmp_path / "b")
        assert r.exit_code == 2 and "fails at its first INT4 GEMM" in r.output, r.output


def test_no_refusal_sends_w4a8_experts_to_a_group_tensorrt_llm_cannot_load(tmp_path, cli_run):
    """Experts 96 wide in w4a8-awq (down_proj grouped by 96, gate/up by 128): hf-modelopt's refusal named
    --group-size 32, and trtllm-ckpt's "quantize with --group-size 32, then export hf-modelopt"; that export is
    written and TensorRT-LLM, the only runtime loading W4A8 experts from it, fails loading them (groups of 128 only).
    Now neither names a group for hf-modelopt, and what each names is taken."""
    from helpers import assert_one_line_error, make_random_checkpoint

    vocab = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())["vocab_size"]
    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", hidden_size=256, moe_intermediate_size=96,
                                 vocab_size=vocab, intermediate_size=256, decoder_sparse_step=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((models.path("tiny-qwen3-moe") / f).read_bytes())
    q = tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format="w4a8-awq", num_samples=2, seq_len=32))
    line = assert_one_line_error(cli_run("export", q, "--format", "hf-modelopt", "-o", tmp_path / "h"),
                                 "quantized 2 ways", "quantize with --format fp8")
    assert "--group-size" not in line, line
    line = assert_one_line_error(cli_run("export", q, "--format", "trtllm-ckpt", "-o", tmp_path / "t"), "dense")
    assert "export hf-modelopt" not in line and "--group-size 32, then export compressed-tensors" in line, line
    g32 = tmp_path / "g32"  # the compressed-tensors route it names is taken
    quantize_checkpoint(src, g32, QuantConfig(format="int4-gptq", group_size=32, num_samples=2, seq_len=32))
    assert cli_run("export", g32, "--format", "compressed-tensors", "-o", tmp_path / "c").exit_code == 0
