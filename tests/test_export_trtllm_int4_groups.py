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
    said to fail at an INT4 GEMM; the fused MoE (WInt4AFP8FusedMoEMethod.create_weights, main 2026-12) allocates
    128-wide groups of scales only, so experts in groups of 64 are said to fail loading, and build refuses them."""
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8", rules=((where, fmt),),
                                                                    group_size=group, num_samples=2, seq_len=32))
    export(q, e, ExportConfig(format="hf-modelopt"))
    why = json.loads((e / "export.json").read_text())["misloaded_why"].get("tensorrt_llm", "")
    assert ("fails at its first INT4 GEMM" in why) == fails, why
    experts = "experts" in where and group != 128
    assert ("fails loading its INT4 routed experts" in why) == experts, why
    if experts:
        assert f"{fmt} in groups of {group}" in why and "block_sparse_moe.experts.*.w1" in why
        r = cli_run("build", e, "--target", "h100", "--dry-run", "-o", tmp_path / "b")
        assert r.exit_code == 2 and "fails loading its INT4 routed experts" in r.output, r.output
    if fails:
        assert f"{fmt} in groups of {group}" in why and "self_attn.q_proj" in why
        r = cli_run("build", e, "--target", "h100", "--dry-run", "-o", tmp_path / "b")
        assert r.exit_code == 2 and "fails at its first INT4 GEMM" in r.output, r.output
