"""compressed-tensors pack-quantized INT4 stores 8 values per int32 word (compressed_tensors pack_to_int32,
num_bits 4: 32 // 4), so a weight_packed of 48 int32 columns has in_features 384 = 3 x 128: block FP8 fits it and
the hint for such a checkpoint (stored packed, no moepress_quant.json) names the fp8-block route, not the per-tensor
fp8 one."""
import torch


def test_packed_int4_of_128_multiple_widths_is_sent_to_block_fp8(tmp_path):
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.hints import packed_routes

    p = "model.layers.0.mlp.experts.0."
    save_file({p + "down_proj.weight_packed": torch.zeros(16, 384 // 8, dtype=torch.int32),
               p + "down_proj.weight_scale": torch.ones(16, 3, dtype=torch.bfloat16),
               p + "up_proj.weight_packed": torch.zeros(384, 128 // 8, dtype=torch.int32),
               p + "up_proj.weight_scale": torch.ones(384, 1, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
    hint = packed_routes(CheckpointReader(tmp_path))
    assert "--format fp8-block, then export hf-fp8-block" in hint, hint
    assert "export onnx" in hint  # INT4 (I32 words), not FP4: onnx decodes it
    assert "export onnx (decoded to bf16: onnxruntime or a TensorRT engine)" in hint, hint


def test_kimis_packed_int4_in_blocks_of_32_is_sent_to_an_onnx_export_tensorrt_builds(tmp_path, cli_run):
    """Kimi K2's INT4 experts are grouped by 32 (its config.json group_size), a block TensorRT's INT4 takes not:
    the hint sent them to onnxruntime only, while the onnx export writes packed INT4 decoded (bf16 initializers,
    no Q/DQ), which a TensorRT engine builds. Followed as written: exported, and the TensorRT build planned."""
    from moepress import models
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.hints import packed_routes

    kimi = models.path("tiny-kimi-k2-int4")
    hint = packed_routes(CheckpointReader(kimi))
    assert "export onnx (decoded to bf16: onnxruntime or a TensorRT engine)" in hint, hint
    e = tmp_path / "e"
    assert cli_run("export", kimi, "-o", e, "--format", "onnx", "--quiet").exit_code == 0
    r = cli_run("build", e, "--target", "h100", "-o", tmp_path / "b", "--dry-run", "--quiet")
    assert r.exit_code == 0 and (tmp_path / "b" / "build.sh").exists(), r.output


def test_kimis_packed_int4_hint_to_hf_modelopt_carries_the_mla_rules_the_build_asks(tmp_path, cli_run):
    """Kimi K2's INT4 (tiny: widths not whole 128-blocks) was sent to per-tensor fp8 through hf-modelopt with no
    --rule, which `moepress build` refuses for TensorRT-LLM's MLA loader; followed as written, the hint builds."""
    import re
    import shlex

    from moepress import models
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.hints import packed_routes

    kimi = models.path("tiny-kimi-k2-int4")
    hint = packed_routes(CheckpointReader(kimi))
    flags = re.search(r"quantize with (--format fp8 [^,]*), then export hf-modelopt", hint)
    assert flags and "--rule 'self_attn.kv_b_proj=none'" in flags.group(1), hint
    q, e = tmp_path / "q", tmp_path / "e"
    assert cli_run("quantize", kimi, "-o", q, *shlex.split(flags.group(1)), "--num-samples", "2", "--seq-len", "32",
                   "--quiet").exit_code == 0
    assert cli_run("export", q, "-o", e, "--format", "hf-modelopt", "--quiet").exit_code == 0
    r = cli_run("build", e, "--target", "h100", "-o", tmp_path / "b", "--dry-run", "--quiet")
    assert r.exit_code == 0, r.output
