"""Recipes a later stage refused after prune or quantize had run, for reasons the recipe and the model's config
already held (a helper's audit of run's preflight): each is refused by the preflight, naming the recipe key, before
any stage writes."""

from __future__ import annotations

import pytest
from test_run import write_recipe

from helpers import assert_one_line_error
from moepress import models
from moepress.errors import MoepressError
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import normalise


def _preflight(**sections) -> None:
    raw = {"model": "tiny-mixtral", "check": None, **sections}
    preflight(normalise(raw), models.path(raw["model"]))


@pytest.mark.parametrize("sections,needles", [
    ({"quantize": {"format": "fp8"}, "export": {"formats": ["trtllm-ckpt"], "tp": 3, "ep": 3}},
     ["recipe: export.ep 3: must divide the 8 experts"]),
    # the prune keeps 6 of 8: ep 4 divides the model's experts, not the pruned model's
    ({"prune": {"keep": 6}, "quantize": {"format": "fp8"}, "export": {"formats": ["trtllm-ckpt"], "tp": 4, "ep": 4}},
     ["recipe: export.ep 4: must divide the 6 experts"]),
    ({"export": {"formats": ["trtllm-ckpt"], "tp": 3, "ep": 1}}, ["recipe: export.tp 3: must divide"]),
    ({"quantize": {"format": "fp8"}, "export": {"formats": ["onnx"], "options": {"external_min_bytes": "abc"}}},
     ["recipe: export.options external_min_bytes=abc: expected an integer byte count"]),
])
def test_export_options_an_export_refuses_are_refused_before_any_stage(sections, needles):
    with pytest.raises(MoepressError) as e:
        _preflight(**sections)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_a_mapping_the_export_takes_passes(tmp_path):
    """TP 4 over tiny-mixtral's 4 heads and 2 KV heads (replicated), EP 2 over the 6 experts a prune keeps."""
    _preflight(prune={"keep": 6}, quantize={"format": "fp8"}, export={"formats": ["trtllm-ckpt"], "tp": 4, "ep": 2})


def test_run_refuses_an_ep_the_pruned_model_cannot_split_before_the_prune(cli_run, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", model="tiny-mixtral", prune={"keep": 6}, quantize={"format": "fp8"},
                       export={"formats": ["trtllm-ckpt"], "tp": 4, "ep": 4}, check=None)
    assert_one_line_error(cli_run("run", rec, "-o", tmp_path / "run"), "export.ep 4: must divide the 6 experts")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,fmt,export,needle", [
    ("tiny-mixtral", "fp8-dynamic", "trtllm-ckpt", "quantize.format fp8-dynamic is not a format it writes"),
    ("tiny-mixtral", "fp8", "hf-fp8-block", "quantize.format fp8 is not a format it writes"),
    ("tiny-qwen3-moe", "int4-awq", "compressed-tensors", "keeps AWQ's pre_quant_scale"),
])
def test_rules_giving_every_linear_one_format_are_asked_as_that_format(model, fmt, export, needle):
    """{"*": F} quantizes as quantize.format F does, which the preflight refuses for these exports; with rules it
    asked nothing and the export refused after the quantize. The refusal says the rules gave the format."""
    with pytest.raises(MoepressError) as e:
        _preflight(model=model, quantize={"rules": {"*": fmt}}, export={"formats": [export]})
    assert needle in str(e.value) and f"(quantize.rules give every linear {fmt}: replace them" in str(e.value)
    with pytest.raises(MoepressError, match=needle):  # as the format itself
        _preflight(model=model, quantize={"format": fmt}, export={"formats": [export]})


def test_rules_giving_the_linears_several_formats_are_not_read_as_one():
    from moepress.pipeline.one_format import as_one_format

    rec = normalise({"model": "tiny-mixtral", "quantize": {"format": "fp8", "rules": {"self_attn.*": "none"}}})
    assert as_one_format(rec, models.path("tiny-mixtral")) is rec
    rec = normalise({"model": "tiny-mixtral", "quantize": {"format": "fp8", "rules": {"*": "fp8-block"}}})
    assert as_one_format(rec, models.path("tiny-mixtral"))["quantize"]["format"] == "fp8-block"


@pytest.mark.parametrize("sections,needles", [
    ({"prune": {"keep": 6}, "check": {"min_routing_overlap": 0.9}},
     ["check.min_routing_overlap 0.9", "the prune changes the experts per layer"]),
    ({"quantize": {"format": "fp8"}, "export": {"formats": ["onnx"]}, "check": {"max_expert_error": 0.4}},
     ["check.max_expert_error 0.4", "the onnx export is checked in onnx, not streamed"]),
    ({"quantize": {"format": "fp8"}, "export": {"formats": ["onnx"]}, "check": {"max_weight_error_ratio": 3}},
     ["check.max_weight_error_ratio 3", "the onnx export is checked in onnx, not streamed"]),
])
def test_check_gates_no_candidate_of_the_recipe_gives_are_refused_before_any_stage(sections, needles):
    """The check stage refused them after the prune (or quantize and export, with the quantize output's own check
    passed)."""
    with pytest.raises(MoepressError) as e:
        _preflight(**sections)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_check_gates_the_streamed_candidates_give_pass():
    """A compressed-tensors export is left to the check stage: one transformers misloads (NVFP4 experts) goes
    unchecked, and the gate is measured on the streamed quantize output."""
    _preflight(quantize={"format": "fp8"}, export={"formats": ["hf-modelopt"]},
               check={"min_routing_overlap": 0.9, "max_weight_error_ratio": 3})
    _preflight(model="tiny-qwen3-moe", quantize={"format": "nvfp4"}, export={"formats": ["compressed-tensors"]},
               check={"min_routing_overlap": 0.5})


def test_a_build_target_that_cannot_run_a_format_the_rules_give_is_refused_before_any_stage():
    """quantize.format is asked of the targets; a rule's format was not, and the build refused its export after the
    quantize and the export."""
    rec = {"quantize": {"format": "fp8", "rules": {"block_sparse_moe.experts.*": "nvfp4"}},
           "export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["h100"]}}
    with pytest.raises(MoepressError, match="build.targets h100: quantize.rules give nvfp4, which H100 SXM .sm90. "
                                            "does not run; expected a target that runs every format of the quantize "
                                            ".b200"):
        _preflight(**rec)
    _preflight(**{**rec, "build": {"targets": ["b200"]}})
    # no target runs both int4-awq and nvfp4: only other rules are named
    deepseek = {**rec, "model": "tiny-deepseek-v3", "export": {"formats": ["onnx"]},
                "quantize": {"format": "int4-awq", "rules": {"self_attn.kv_b_proj": "none", "mlp.experts.*": "nvfp4"}}}
    with pytest.raises(MoepressError, match="does not run; expected rules of formats it runs$"):
        _preflight(**deepseek)


@pytest.mark.parametrize("model,quantize,needle,way", [
    ("tiny-deepseek-v3", {"format": "int4-gptq"}, "groups self_attn.kv_b_proj (32 inputs) by 32",
     {"rules": {"self_attn.kv_b_proj": "none"}}),
    ("tiny-mixtral", {"format": "int4-gptq", "group_size": 32}, "groups self_attn.q_proj (128 inputs) by 32",
     {"group_size": 128}),
])
def test_int4_groups_tensorrt_cannot_build_from_onnx_are_refused_before_any_stage(model, quantize, needle, way):
    """TensorRT takes INT4 blocks of 64 or 128 (onnx_graph.TENSORRT_INT4_BLOCKS): DeepSeek's 32-wide kv_b_proj
    input at the default group, or --group-size 32, were refused by the build after quantize and export (and run
    exited 0). The way the refusal names is taken."""
    rec = {"model": model, "quantize": quantize, "export": {"formats": ["onnx"]}, "build": {"targets": ["h100"]}}
    with pytest.raises(MoepressError) as e:
        _preflight(**rec)
    assert "build.targets h100: the onnx export's TensorRT engine takes INT4 blocks of 128 or 64" in str(e.value)
    assert needle in str(e.value), str(e.value)
    _preflight(**{**rec, "quantize": {**quantize, **way}})
    _preflight(**{**rec, "build": None})  # no TensorRT build: onnxruntime runs any group


def test_the_int4_group_named_for_tensorrt_is_one_whose_rules_leave_linears_quantized(tmp_path):
    """Kimi-K2-shaped widths (hidden 320, experts 96, kv_lora 40) at group 32: the refusal named rules keeping every
    linear bf16, which quantize then refused (nothing left to quantize). It names the group under which most linears
    fall in TensorRT's blocks (64: the 96-wide inputs stay bf16, as quantize leaves them) and the rule for the
    narrower kv_b_proj, which that group would group by its 40 inputs; that way is taken."""
    import json

    from moepress.compress.synthetic import write_synthetic

    conf = {**json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text()), "hidden_size": 320,
            "intermediate_size": 448, "moe_intermediate_size": 96, "q_lora_rank": 96, "kv_lora_rank": 40,
            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_hidden_layers": 2}
    m = write_synthetic(conf, tmp_path / "k2", seed=0)
    rec = {"model": str(m), "quantize": {"format": "int4-gptq", "group_size": 32}, "export": {"formats": ["onnx"]},
           "build": {"targets": ["h100"]}}
    with pytest.raises(MoepressError) as e:
        _preflight(**rec)
    assert str(e.value).endswith("expected quantize.group_size 64 and quantize.rules {self_attn.kv_b_proj: none}, "
                                 "or onnx built for no target"), str(e.value)
    _preflight(**{**rec, "quantize": {"format": "int4-gptq", "group_size": 64,
                                      "rules": {"self_attn.kv_b_proj": "none"}}})
