"""Plan notes and refusals of what a runtime runs otherwise than asked. An FP8 KV cache for an MLA model
(DeepSeek-V3, Kimi K2: one latent cached per token) needs an FP8 MLA kernel, which TensorRT-LLM has on Hopper and
Blackwell sm100 only (examples/models/core/deepseek_v3/README.md, "FP8 KV Cache and MLA"); a GQA model's FP8 cache
runs from Ampere on (docs/source/features/quantization.md). A declared KV cache is budgeted; an INT4 group that
leaves linears bf16 is said."""

import pytest

from moepress import models
from moepress.errors import MoepressError
from moepress.exporters.plan import plan


@pytest.mark.parametrize("target", ["a100", "l40s", "rtx-pro-6000"])
def test_an_fp8_mla_cache_off_hopper_and_sm100_is_refused_naming_the_latent(target):
    with pytest.raises(MoepressError) as e:
        plan(models.path("tiny-deepseek-v3"), target, kv_cache_dtype="fp8")
    msg = str(e.value)
    assert msg.startswith("--kv-cache-dtype fp8:") and "MLA latent" in msg and msg.endswith("use bf16"), msg
    # the refusal's alternative plans
    assert plan(models.path("tiny-deepseek-v3"), target, kv_cache_dtype="bf16").kv_cache_dtype == "bf16"


@pytest.mark.parametrize("target", ["h100", "h200", "b200"])
def test_an_fp8_mla_cache_on_hopper_and_sm100_is_planned(target):
    assert plan(models.path("tiny-deepseek-v3"), target, kv_cache_dtype="fp8").kv_cache_dtype == "fp8"


@pytest.mark.parametrize("target", ["a100", "l40s", "rtx-pro-6000"])
def test_a_gqa_models_fp8_cache_is_planned_where_the_mla_one_is_not(target):
    assert plan(models.path("tiny-mixtral"), target, kv_cache_dtype="fp8").kv_cache_dtype == "fp8"


def test_plan_budgets_the_kv_cache_a_checkpoint_declares_as_build_does(tmp_path, cli_run):
    """`quantize --kv-cache fp8` and its hf-modelopt export declare an FP8 KV cache (kv_cache_quant_algo), which
    TensorRT-LLM uses: `moepress build` budgeted it, `moepress plan` of the same export a bf16 cache."""
    import json

    q, e = tmp_path / "q", tmp_path / "e"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8", "--kv-cache", "fp8", "--num-samples", "2",
                   "--seq-len", "32", "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "hf-modelopt", "-o", e, "--quiet").exit_code == 0
    for d in (q, e):
        r = cli_run("plan", d, "--target", "h100", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["kv_cache_dtype"] == "fp8", r.output
    r = cli_run("build", e, "--target", "h100", "-o", tmp_path / "b", "--dry-run", "--quiet")
    assert r.exit_code == 0 and json.loads((tmp_path / "b" / "plan.json").read_text())["kv_cache_dtype"] == "fp8"
    r = cli_run("plan", "tiny-qwen3-moe", "--target", "h100", "--json")  # none declared: the model's own dtype
    assert json.loads(r.stdout)["kv_cache_dtype"] == "bf16"


def test_an_int4_plan_names_the_linears_its_group_leaves_bf16_and_the_group_that_quantizes_them():
    """tiny-mixtral-w192's experts take 192 inputs, which groups of 128 do not divide: quantize leaves them bf16 and
    the plan counts them bf16 (an INT4 plan sized almost as bf16 said nothing of it)."""
    notes = [n for n in plan(models.path("tiny-mixtral-w192"), "h100", "int4-awq").notes if "groups of" in n]
    assert notes == ["int4-awq in groups of 128 leaves bf16 the linears whose inputs it does not divide, counted "
                     "bf16: routed (192 inputs); --group-size 64 quantizes them"], notes
    assert not [n for n in plan(models.path("tiny-mixtral"), "h100", "int4-awq").notes if "groups of" in n]


MLA_RULES = ("--rule", "self_attn.kv_b_proj=none", "--rule", "self_attn.q_a_proj=none", "--rule",
             "self_attn.kv_a_proj_with_mqa=none")


def test_an_mla_export_declaring_an_fp8_cache_is_refused_naming_the_quantize_not_a_flag(tmp_path, cli_run):
    """An export quantized with --kv-cache fp8 carries its cache (its runtime uses it): on an RTX PRO 6000 the
    refusal said "--kv-cache-dtype fp8 ...; use bf16", an option never given, and --kv-cache-dtype bf16 was refused
    alike. It names the quantize to redo; the recipe's, quantize.kv_cache."""
    from helpers import assert_one_line_error
    from moepress.pipeline.preflight import preflight
    from moepress.pipeline.recipe import normalise

    q, e = tmp_path / "q", tmp_path / "e"
    assert cli_run("quantize", "tiny-deepseek-v3", "--format", "nvfp4", "--kv-cache", "fp8", *MLA_RULES,
                   "--num-samples", "2", "--seq-len", "32", "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "hf-modelopt", "-o", e, "--quiet").exit_code == 0
    for args in (["build", e, "-o", tmp_path / "b", "--dry-run"], ["plan", e]):
        for kv in ([], ["--kv-cache-dtype", "bf16"]):
            r = cli_run(*args, "--target", "rtx-pro-6000", *kv)
            assert_one_line_error(r, f"{e}: it declares a fp8 KV cache", "MLA latent",
                                  "expected a quantize without --kv-cache fp8")
    rec = {"model": "tiny-deepseek-v3", "check": None, "export": {"formats": ["hf-modelopt"]},
           "quantize": {"format": "nvfp4", "kv_cache": "fp8",
                        "rules": {r.split("=")[0]: "none" for r in MLA_RULES[1::2]}},
           "build": {"targets": ["rtx-pro-6000"]}}
    with pytest.raises(MoepressError, match=r"quantize.kv_cache fp8: .* MLA latent.*expected no quantize.kv_cache"):
        preflight(normalise(rec), models.path("tiny-deepseek-v3"))
