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


@pytest.mark.parametrize("fmt,group,fails", [("int4-awq", 32, True), ("int4-awq", 64, False),
                                             ("int4-awq", 128, False), ("w4a8-awq", 64, True),
                                             ("w4a8-awq", 128, False)])
def test_int4_groups_tensorrt_llm_cannot_run_are_declared(tmp_path, cli_run, fmt, group, fails):
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8", rules=(("self_attn.*", fmt),),
                                                                    group_size=group, num_samples=2, seq_len=32))
    export(q, e, ExportConfig(format="hf-modelopt"))
    why = json.loads((e / "export.json").read_text())["misloaded_why"].get("tensorrt_llm", "")
    assert ("fails at its first INT4 GEMM" in why) == fails, why
    if fails:
        assert f"{fmt} in groups of {group}" in why and "self_attn.q_proj" in why
        r = cli_run("build", e, "--target", "h100", "--dry-run", "-o", tmp_path / "b")
        assert r.exit_code == 2 and "fails at its first INT4 GEMM" in r.output, r.output
