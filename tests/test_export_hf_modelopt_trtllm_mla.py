"""hf-modelopt exports of DeepSeek-V3 / Kimi K2 MLA projections as TensorRT-LLM's PyTorch backend loads them
(read from its sources, not run: no GPU here). Its DeepseekV3WeightLoader (_torch/models/modeling_deepseekv3.py,
main 2026-09) reads the scales of the projections it splits (kv_b_proj) or fuses (q_a_proj + kv_a_proj_with_mqa =
fused_a) under DeepSeek's name ``weight_scale_inv`` only: a quantized kv_b_proj fails to load (KeyError), an FP8
fused_a runs unscaled; its NVFP4 fused_a branch reads Model-Optimizer's names. vLLM 0.33 loads all of them
(names by its stacked-parameter mapping, kv_b_proj dequantized by its quant method: mla_attention.split_kv_b_proj).
Only TensorRT-LLM failing, the export says so (misloaded_by); block-FP8 ones, which SGLang does not read either,
are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from tests.helpers import make_random_checkpoint

BF16_FUSED_A = (("self_attn.q_a_proj", "none"), ("self_attn.kv_a_proj_with_mqa", "none"))


def _export(tmp_path, src, **kw) -> dict:
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(src, q, QuantConfig(num_samples=2, seq_len=32, **kw))
    export(q, e, ExportConfig(format="hf-modelopt"))
    return json.loads((e / "export.json").read_text())


@pytest.mark.parametrize("rules,kv_b,fused_a", [((), True, True), ((("self_attn.kv_b_proj", "none"),), False, True),
                                                 (BF16_FUSED_A, True, False),
                                                 ((("self_attn.kv_b_proj", "none"), *BF16_FUSED_A), False, False)])
def test_fp8_mla_projections_tensorrt_llm_misreads_are_declared(tmp_path, rules, kv_b, fused_a):
    info = _export(tmp_path, models.path("tiny-deepseek-v3"), format="fp8", rules=rules)
    why = info["misloaded_why"].get("tensorrt_llm", "")
    assert ("tensorrt_llm" in info["misloaded_by"]) == (kv_b or fused_a)
    assert ("kv_b_proj" in why) == kv_b and ("fused_a" in why) == fused_a, why
    assert any(n.startswith("TensorRT-LLM ") and "vLLM loads them" in n for n in info["consumer_notes"]) == bool(why)


def test_nvfp4_fused_a_is_read_and_its_kv_b_proj_is_declared(tmp_path):
    """NVFP4 everywhere: TensorRT-LLM's nvfp4_fused_a branch reads weight_scale / weight_scale_2 / input_scale, so
    only kv_b_proj is said (and SGLang's own failure on it stays)."""
    info = _export(tmp_path, models.path("tiny-deepseek-v3"), format="nvfp4")
    why = info["misloaded_why"]["tensorrt_llm"]
    assert "kv_b_proj" in why and "fused_a" not in why
    assert set(info["misloaded_by"]) == {"tensorrt_llm", "sglang"}


def test_non_mla_models_say_nothing_of_tensorrt_llm(tmp_path):
    info = _export(tmp_path, models.path("tiny-qwen3-moe"), format="fp8")
    assert "tensorrt_llm" not in info["misloaded_by"]


def test_block_fp8_mla_projections_are_refused_naming_tensorrt_llm_and_alternatives(tmp_path):
    """A DeepSeek whose kv_b_proj takes whole 128-wide blocks (kv_lora_rank 128): block FP8 there passes the width
    refusals and reaches this one."""
    src = make_random_checkpoint("deepseek_v3", tmp_path / "ds", kv_lora_rank=128, vocab_size=4096)
    for f in models.path("tiny-deepseek-v3").glob("tokenizer*"):
        shutil.copy(f, src)
    with pytest.raises(MoepressError) as e:
        _export(tmp_path, src, format="fp8", rules=(("self_attn.kv_b_proj", "fp8-block"),))
    msg = str(e.value)
    assert "\n" not in msg and "kv_b_proj" in msg and "TensorRT-LLM" in msg
    assert "--rule 'self_attn.kv_b_proj=none'" in msg and "hf-fp8-block" in msg


def test_trtllm_pytorch_build_refuses_an_export_that_says_tensorrt_llm_misloads_it(cli_run, tmp_path):
    """The default fp8 DeepSeek export (quantized kv_b_proj / fused_a): the bundle's smoke generation would fail
    (KeyError) or generate from unscaled fused_a weights; refused in one line. With the MLA projections kept bf16
    the export says nothing of TensorRT-LLM and builds (dry run)."""
    for name, rules in (("q8", ()), ("ok", (("self_attn.kv_b_proj", "none"), *BF16_FUSED_A))):
        _export(tmp_path / name, models.path("tiny-deepseek-v3"), format="fp8", rules=rules)
        e = tmp_path / name / "e"
        r = cli_run("build", e, "--target", "h100", "-o", tmp_path / name / "b", "--dry-run")
        if rules:  # and its plan asks for no --rule it already has
            assert r.exit_code == 0 and "MLA projections" not in r.output, r.output
            continue
        line = (f"{e / 'export.json'}: the export says tensorrt_llm <= main 2026-09 fails loading its quantized MLA "
                "kv_b_proj")
        assert r.exit_code == 2 and line in r.output and "Traceback" not in r.output, r.output
        assert "quantize again as its consumer_notes say (the --rule flags or formats they name)" in r.output
        assert not (tmp_path / name / "b").exists()


def test_fp8_per_channel_fused_a_is_declared_unscaled_too(tmp_path):
    """fp8-dynamic (FP8 per channel, Model-Optimizer's FP8_PER_CHANNEL_PER_TOKEN) q_a / kv_a with a bf16 kv_b_proj:
    the export names them weight_scale, and DeepseekV3WeightLoader copies fused_a's scales only from
    kv_a_proj_with_mqa.weight_scale_inv (FP8) or its NVFP4 branch (module docstring), so per channel runs unscaled
    exactly as per tensor does: declared, kv_b_proj not."""
    rules = tuple((p, "fp8-dynamic") for p, _ in BF16_FUSED_A) + (("self_attn.kv_b_proj", "none"),)
    info = _export(tmp_path, models.path("tiny-deepseek-v3"), format="fp8", rules=rules)
    why = info["misloaded_why"].get("tensorrt_llm", "")
    assert "fused_a" in why and "q_a_proj" in why and "kv_a_proj_with_mqa" in why and "kv_b_proj" not in why, why
    assert info["misloaded_by"].get("tensorrt_llm") == "main 2026-09"


def test_block_fp8_fused_a_alone_is_refused_naming_both_parts(tmp_path):
    """Block-FP8 q_a_proj / kv_a_proj_with_mqa (whole 128 blocks: hidden 128, q_lora_rank 128, kv_a 128 + 128 rows)
    with a bf16 kv_b_proj: DeepseekV3WeightLoader's FP8 fused_a reads no Model-Optimizer weight_scale (silently
    unscaled) and SGLang reads no Model-Optimizer block-FP8 scale, so the fused_a alone is refused, naming both."""
    src = make_random_checkpoint("deepseek_v3", tmp_path / "ds", kv_lora_rank=128, qk_rope_head_dim=128,
                                 q_lora_rank=128, hidden_size=128, vocab_size=4096)
    for f in models.path("tiny-deepseek-v3").glob("tokenizer*"):
        shutil.copy(f, src)
    rules = (("self_attn.q_a_proj", "fp8-block"), ("self_attn.kv_a_proj_with_mqa", "fp8-block"),
             ("self_attn.kv_b_proj", "none"))
    with pytest.raises(MoepressError) as e:
        _export(tmp_path, src, format="fp8", rules=rules)
    msg = str(e.value)
    assert "block-FP8 MLA projections" in msg and "TensorRT-LLM" in msg, msg
    assert "self_attn.q_a_proj" in msg and "self_attn.kv_a_proj_with_mqa" in msg, msg


@pytest.mark.parametrize("fmt,rules,refused", [
    ("fp8", (), True), ("nvfp4", (), True), ("fp8-block", (), False),
    ("fp8", ("self_attn.kv_b_proj=none", "self_attn.q_a_proj=none", "self_attn.kv_a_proj_with_mqa=none"), False),
    ("nvfp4", ("self_attn.kv_b_proj=none",), False),
    # hf-modelopt refuses its INT4 routed experts outright: the kv_b_proj rule would lead to a refused export
    ("int4-awq", (), False)])
def test_quantize_says_up_front_what_a_tensorrt_llm_build_will_refuse(cli_run, tmp_path, fmt, rules, refused):
    """The build's refusal (an export whose MLA projections TensorRT-LLM's DeepSeek loader misreads) came after the
    quantize (hours on Kimi K2): quantize now says it before its first layer, with the --rule flags that avoid it,
    and in its result (builds_refusing); the same misloads as the export then declares. Block FP8 goes the
    hf-fp8-block route (hf-modelopt refuses it), NVFP4 fused_a loads (its branch reads Model-Optimizer's names)."""
    args = [a for r in rules for a in ("--rule", r)]
    calib = ["--num-samples", "4", "--seq-len", "32"] if fmt != "fp8-block" else []  # calibration-free: refused
    r = cli_run("quantize", "tiny-deepseek-v3", "--format", fmt, *args, *calib, "-o", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.output
    said = json.loads(r.stdout.strip().splitlines()[-1])["builds_refusing"]
    assert bool(said) == refused, said
    if refused:
        assert "kv_b_proj" in said["trtllm-pytorch"] and "--rule 'self_attn.kv_b_proj=none'" in r.stderr
        assert ("fused_a" in said["trtllm-pytorch"]) == (fmt == "fp8")
        e = tmp_path / "e"
        assert cli_run("export", tmp_path / "q", "--format", "hf-modelopt", "-o", e, "--quiet").exit_code == 0
        assert json.loads((e / "export.json").read_text())["misloaded_why"]["tensorrt_llm"] == \
            said["trtllm-pytorch"]


@pytest.mark.parametrize("model,fmt,target,flags", [
    ("tiny-deepseek-v3", "fp8", "h100", ["kv_b_proj", "q_a_proj", "kv_a_proj_with_mqa"]),
    ("tiny-deepseek-v3", "nvfp4", "b200", ["kv_b_proj"]),
    ("tiny-deepseek-v3", "fp8-block", "h100", []), ("tiny-qwen3-moe", "fp8", "h100", [])])
def test_plan_says_which_mla_projections_a_tensorrt_llm_build_needs_bf16(model, fmt, target, flags):
    """`moepress plan --format fp8` said "fits yes" and nothing of the MLA projections the build then refuses."""
    from moepress.exporters.plan import plan

    notes = [n for n in plan(models.path(model), target, fmt).notes if "MLA projections" in n]
    assert bool(notes) == bool(flags), notes
    for f in flags:
        assert f"--rule 'self_attn.{f}=none'" in notes[0], notes
