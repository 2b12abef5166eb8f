"""`moepress run` refuses a recipe value any stage would refuse before the first stage runs and before its
output directory is made, naming the recipe key (the stages' own messages name CLI flags)."""

from __future__ import annotations

import pytest
import torch

from tests.test_run import one_line_error, write_recipe

FP8 = {"format": "fp8"}


@pytest.mark.parametrize("sections,needle", [
    # an export or check value ran prune and quantize (hours on Kimi K2) and then stopped, naming --format / --tp
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt", "bogusfmt"]}}, "export.formats bogusfmt: expected one of"),
    ({"quantize": FP8, "export": {"formats": ["trtllm-ckpt"], "tp": 0}}, "export.tp/ep: expected positive sizes"),
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt"], "tp": 2}}, "export.tp/ep: --format hf-modelopt writes"),
    ({"quantize": FP8, "export": {"formats": ["onnx"], "opset": 5}}, "export.opset 5: the ONNX export needs"),
    # a section that sets options but names no formats / targets ran nothing, exit 0 (they have no default)
    ({"quantize": FP8, "export": {"tp": 0}}, "export.formats: required: the section sets tp but names no formats"),
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt"]}, "build": {"gpus": 2, "dry-run": True}},
     "build.targets: required: the section sets dry_run, gpus but names no targets"),
    ({"quantize": FP8, "export": {"formats": ["onnx"], "options": {"bogus": 1}}}, "export.options bogus: not an"),
    ({"quantize": FP8, "check": {"data": "/nonexistent/eval.txt"}}, "check.data /nonexistent/eval.txt: file not found"),
    ({"quantize": FP8, "check": {"seq_len": 5000}}, "check.seq_len 5000: "),
    ({"quantize": FP8, "check": {"data": ""}}, "check.data: empty source"),  # named check.calib, no such key
    # the weight gate refused at the check, after the prune / quantize it cannot be measured on
    ({"prune": {"ratio": 0.25}, "check": {"max_weight_error_ratio": 3}},
     "check.max_weight_error_ratio 3.0 (check.max_weight_error_ratio in a recipe): it holds weights rounded to nearest "
     "by `moepress quantize` to that rounding's error, and this recipe's candidates are not quantized"),
    ({"quantize": {"format": "int4-gptq"}, "check": {"max_weight_error_ratio": 3}},
     "check.max_weight_error_ratio 3.0 (check.max_weight_error_ratio in a recipe): it holds weights rounded to nearest "
     "by `moepress quantize` to that rounding's error, and this recipe's quantize formats round none so"),
    # hf-modelopt refuses INT4 experts in other groups than 128 (no runtime loads them): after the quantize
    ({"quantize": {"format": "w4a8-awq", "group_size": 64}, "export": {"formats": ["hf-modelopt"]}},
     "export.formats hf-modelopt: quantize.format w4a8-awq with quantize.group_size 64 groups the routed experts "
     "by 64"),
    # written into quant_report.json and the manifest, and ignored (the CLI refuses --group-size with fp8)
    ({"quantize": {**FP8, "group_size": 64}}, "quantize.group_size 64: only the INT4 formats take a group size"),
    # a prune or calib value made OUT and wrote recipe.yaml there first, and named --method / --calib
    ({"prune": {"ratio": 0.25, "method": "bogus"}}, "prune.method bogus: expected one of"),
    ({"prune": {"keep": 0}}, "prune.keep 0: expected 1..7"),
    ({"prune": {"ratio": 0.25, "protect": "x["}}, "prune.protect 'x[': expected LAYER:EXPERT"),
    ({"quantize": FP8, "calib": {"sources": ["/nonexistent/c.jsonl"]}}, "calib.sources /nonexistent/c.jsonl: "),
    ({"quantize": FP8, "calib": {"seq_len": 100000}}, "calib.seq_len 100000: "),
    # a quantize rule the model's linears refuse ran prune first
    ({"prune": {"ratio": 0.25}, "quantize": {"format": "fp8", "rules": {"block_sparse_moe.*": "fp8",
                                                                          "block_sparse_moe.experts.*": "none"}}},
     "quantize.rules block_sparse_moe.experts.*=none: every linear it matches is decided by the earlier"),
    # a build target that cannot run the quantize format was refused by the build, after every other stage, and the
    # run exited 0; a build section no export has a builder for built nothing without a word
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["a100-80gb"]}},
     "build.targets a100-80gb: quantize.format fp8: FP8 needs sm89+; A100 80GB SXM is sm80: "),
    ({"quantize": FP8, "export": {"formats": ["compressed-tensors"]}, "build": {"targets": ["h100"]}},
     "build.targets: no export of export.formats (compressed-tensors) has a builder; expected one of "),
    # recipe values read with another meaning than written, or run into a traceback (audit, 2026-12-05)
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["h100-sxm"], "dry_run": None}},
     "build.dry_run: expected bool, got null (leave the key out for its default, true)"),
    ({"calib": None}, "calib: expected a mapping"),
    ({"prune": {"ratio": 0.25, "ep_size": 1, "ep-size": 3}}, "prune.ep_size: given twice"),
    ({"check": {"max_kl": 0.05, "max-kl": "none"}}, "check.max_kl: given twice"),
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt", "hf-modelopt"]}}, "export.formats: 'hf-modelopt' listed "
                                                                               "twice"),
    ({"quantize": FP8, "export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["h100-sxm", "h100"]}},
     "build.targets: 'h100' and 'h100-sxm' are one GPU"),
    ({"device": "tpu"}, "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"prune": {"ratio": "25e-2"}}, "prune.ratio: expected float/int, got '25e-2' (YAML 1.1 reads an exponent"),
    ({"prune": {"ratio": "0.25"}}, "prune.ratio: expected float/int, got '0.25' (a quoted number is text in YAML"),
    ({"prune": {"ratio": 0.25, "protect": 185}}, "prune.protect: expected str, got 185 (YAML read it as a number"),
    # DeepSeek's quantized MLA projections in hf-modelopt: the build refused them after every other stage
    ({"model": "tiny-deepseek-v3", "quantize": FP8, "export": {"formats": ["hf-modelopt"]},
      "build": {"targets": ["h100"]}},
     "build.targets: TensorRT-LLM's DeepSeek loader fails loading its quantized MLA kv_b_proj"),
])
def test_a_value_a_stage_refuses_is_refused_before_any_stage_by_its_recipe_key(cli_run, tmp_path, sections, needle):
    rec = write_recipe(tmp_path / "r.yaml", **{"prune": None, **sections})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"r.yaml: {needle}")
    assert "--" not in r.output.split(": ", 2)[2].split(":")[0]  # the key, not a CLI flag, comes first
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,exports,target", [("tiny-qwen3-moe", ["hf-modelopt"], "a100-80gb"),
                                                  ("tiny-deepseek-v3", ["hf-fp8-block"], "l40s"),
                                                  # hf-fp8-block writes block FP8 from bf16 too: not "no quantize"
                                                  ("tiny-deepseek-v3", ["hf-fp8-block"], "a100-80gb"),
                                                  ("tiny-mixtral", ["trtllm-ckpt"], "b200"),
                                                  ("tiny-qwen3-moe", ["onnx"], "a100-80gb"),
                                                  ("tiny-qwen3-moe", ["onnx", "compressed-tensors"], "a100-80gb")])
def test_the_format_a_build_target_refusal_names_passes_the_preflight(model, exports, target):
    """The format named instead of one the target cannot run is one every export of the recipe and that target's
    build take: the same recipe with it passes (A100 and hf-modelopt: not int4-awq, whose Qwen3-MoE experts
    hf-modelopt refuses; onnx builds int4-awq there, but beside compressed-tensors, which refuses AWQ's unfolded
    pre_quant_scale, it may not be named)."""
    import re

    from moepress import models
    from moepress.exporters.targets import TARGETS
    from moepress.pipeline.build_plans import refuse_unplannable
    from moepress.pipeline.preflight import refuse_unavailable_exports, refuse_unbuildable
    from moepress.pipeline.recipe import normalise

    def recipe(fmt):  # None: no quantize section
        return normalise({"model": model, **({"quantize": {"format": fmt}} if fmt else {}),
                          "export": {"formats": exports}, "build": {"targets": [target]}})

    refused = [f for f in ("fp8", "fp8-block", "int4-awq", "nvfp4")
               if _refusal(lambda f=f: refuse_unbuildable(recipe(f), models.path(model)))]
    assert refused, "no format refused on this target"
    for f in refused:
        line = _refusal(lambda f=f: refuse_unbuildable(recipe(f), models.path(model)))
        if "no other format that every export" in line:  # named a target instead: one that runs the format
            runs = re.search(r"a target that runs it \(([^)]*)\)", line).group(1).split(", ")
            assert all(TARGETS[n].supports(f) for n in runs), line
            continue
        alt = re.search(r": use (no quantize section|[\w-]+)", line).group(1)
        alt = None if alt == "no quantize section" else alt
        assert _refusal(lambda alt=alt: refuse_unbuildable(recipe(alt), models.path(model))) is None, (line, alt)
        assert _refusal(lambda alt=alt: refuse_unavailable_exports(recipe(alt), models.path(model))) is None, alt
        dry = {**recipe(alt), "build": {**recipe(alt)["build"], "dry_run": True}}  # the plan, no GPU asked for
        assert _refusal(lambda dry=dry: refuse_unplannable(dry, models.path(model), None)) is None, (line, alt)


def _refusal(fn) -> str | None:
    from moepress.errors import MoepressError

    try:
        fn()
    except MoepressError as e:
        return str(e)
    return None


def test_an_output_path_through_a_file_is_refused_naming_it(cli_run, tmp_path):
    """It said '.state: Not a directory (ENOTDIR)'."""
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        one_line_error(cli_run("run", write_recipe(tmp_path / "r.yaml"), "-o", out),
                       f"-o {out}: {tmp_path / 'f'} is a file; expected a directory path")


def test_the_runs_export_is_sharded_as_the_recipes_tp_and_ep_say(cli_run, tmp_path):
    """export.tp and export.ep reach the export each as itself (one ExportConfig serves the preflight and the
    export): the TensorRT-LLM checkpoint's own mapping says tp 2, ep 1."""
    import json

    rec = write_recipe(tmp_path / "r.yaml", prune=None, quantize=FP8, check=None,
                       export={"formats": ["trtllm-ckpt"], "tp": 2, "ep": 1})
    r = cli_run("run", rec, "-o", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    mapping = json.loads((tmp_path / "run" / "export" / "trtllm-ckpt" / "config.json").read_text())["mapping"]
    assert (mapping["world_size"], mapping["tp_size"], mapping["moe_tp_size"], mapping["moe_ep_size"]) == (2, 2, 2, 1)
    assert sorted(p.name for p in (tmp_path / "run" / "export" / "trtllm-ckpt").glob("rank*.safetensors")) == \
        ["rank0.safetensors", "rank1.safetensors"]



@pytest.mark.parametrize("quant,export,expected", [
    ("fp8-block", "onnx", "expected one of fp8, int4-awq"), ("nvfp4", "onnx", "expected one of fp8, int4-awq"),
    ("int4-awq", "trtllm-ckpt", "expected fp8, or no quantize section (the model as it is)"),
    ("fp8", "hf-fp8-block", "expected fp8-block, or no quantize section")])
def test_an_export_of_a_quantize_format_it_does_not_write_is_refused_before_any_stage(cli_run, tmp_path, quant,
                                                                                    export, expected):
    """onnx, trtllm-ckpt and hf-fp8-block refused these only after quantize had run (hours on Kimi K2), naming
    the CLI's --format; the exporters declare what they write (Exporter.writes_format), as the stages refuse."""
    rec = write_recipe(tmp_path / "r.yaml", prune=None, quantize={"format": quant}, export={"formats": [export]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: export.formats {export}: quantize.format {quant}", expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rule", ["block_sparse_moe.experts.7.*", "model.layers.1.block_sparse_moe.experts.[0-2].w2"])
def test_a_rule_picking_experts_by_index_is_refused_before_a_prune_that_renumbers_them(cli_run, tmp_path, rule):
    """The rules were checked against the source's names ('a prune keeps their names'), but the prune renumbers
    the kept experts 0..N-1: experts.7 (of 8, 6 kept) was refused only after the prune ran, naming --rule, and
    an index below 6 silently named another expert (layer 0's original expert 4 is written as expert 3)."""
    rec = write_recipe(tmp_path / "r.yaml", quantize={"format": "fp8", "rules": {rule: "none"}}, check=None)
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"r.yaml: quantize.rules {rule}=none: picks routed experts by index")
    assert not (tmp_path / "run").exists()


def test_a_rule_treating_every_expert_alike_still_runs_after_a_prune(cli_run, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", check=None, export=None,
                       quantize={"format": "fp8", "rules": {"model.layers.1.block_sparse_moe.experts.*": "none",
                                                            "*.w2": "fp8-dynamic"}})
    r = cli_run("run", rec, "-o", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output


def test_a_rule_pattern_given_twice_in_a_recipe_is_refused_not_overwritten(cli_run, tmp_path):
    """YAML kept the last of two quantize.rules with one pattern, silently (the effective recipe showed only
    'mlp.experts.*: none'), where --rule applies the first and refuses the later one as shadowed."""
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\nprune: null\nquantize:\n  format: fp8\n  rules:\n"
                   "    'mlp.experts.*': int4-gptq\n    'mlp.experts.*': none\n")
    one_line_error(cli_run("recipe", "show", rec), "r.yaml: line 7", "duplicate key 'mlp.experts.*'")


@pytest.mark.parametrize("export,change,needle", [
    ("onnx", {"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu', which the graph does not write"),
    ("onnx", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ("trtllm-ckpt", {"hidden_act": "gelu"}, "hidden_act 'gelu'; this exporter writes a SiLU-gated MLP")])
def test_an_export_refusing_the_models_config_is_refused_before_any_stage(cli_run, tmp_path, export, change, needle):
    """The exporters refuse what of config.json their graph or config cannot hold (Exporter.refuse_source); a
    run reached them only after prune and quantize had run, naming --format."""
    from tests.test_export_onnx import _with_config

    src = _with_config(tmp_path, "tiny-mixtral", **change)
    rec = write_recipe(tmp_path / "r.yaml", model=str(src), quantize=FP8, export={"formats": [export]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"r.yaml: export.formats {export}: {src}/config.json has {needle}")
    assert not (tmp_path / "run").exists()


def test_a_source_refusal_in_a_recipe_that_quantizes_names_the_recipes_way(cli_run, tmp_path):
    """trtllm-ckpt's refusal of a sliding window named the export that takes the bf16 model (hf-fp8-block), which
    refuses the recipe's fp8 quantize output: in a recipe that quantizes, it names the recipe key to change."""
    from tests.test_export_onnx import _with_config

    src = _with_config(tmp_path, "tiny-mixtral", sliding_window=64)
    rec = write_recipe(tmp_path / "r.yaml", model=str(src), quantize=FP8,
                       export={"formats": ["hf-modelopt", "trtllm-ckpt"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, "export.formats trtllm-ckpt", "sliding_window 64")
    assert r.stderr.strip().endswith("which this exporter does not write (TensorRT-LLM's PyTorch backend reads it "
                                     "from config.json): for this recipe, drop trtllm-ckpt from export.formats")
    assert "hf-fp8-block" in cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "e").stderr


@pytest.mark.parametrize("export,quant", [
    ("compressed-tensors", {"format": "fp8-block"}),
    ("compressed-tensors", {"format": "fp8-block", "rules": {"mlp.experts.*": "fp8-dynamic"}}),
    # hf-modelopt takes no block-FP8 experts of this family (refused before any stage already): per-tensor FP8
    # experts, block-FP8 attention
    ("hf-modelopt", {"format": "fp8", "rules": {"self_attn.*": "fp8-block"}}),
])
def test_block_fp8_fused_parts_an_export_refuses_are_refused_before_any_stage(cli_run, tmp_path, export, quant):
    """tiny-qwen3-moe's q/k/v have 128, 64, 64 rows: block FP8 leaves k not whole 128-row blocks, which the
    compressed-tensors export refuses (vLLM validate_fp8_block_shape) and hf-modelopt too (TensorRT-LLM's ceil(rows /
    128) scale grid), but only after prune and quantize had run. The preflight asks the export's own check of the
    linears the quantize section gives a block format."""
    rec = write_recipe(tmp_path / "r.yaml", model="tiny-qwen3-moe", prune={"ratio": 0.25}, quantize=quant,
                       export={"formats": [export]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"r.yaml: export.formats {export}:", "self_attn.k_proj", "not whole 128-row blocks",
                   "--rule 'self_attn.*=fp8-dynamic'")
    assert not (tmp_path / "run").exists()
    if export != "compressed-tensors":
        return
    # the way it names passes the preflight (the export takes the fused parts in another format)
    ok = write_recipe(tmp_path / "ok.yaml", model="tiny-qwen3-moe", prune=None,
                      quantize={"format": "fp8-block", "rules": {"self_attn.*": "fp8-dynamic"}},
                      export={"formats": ["compressed-tensors"]}, check=None, build=None)
    from moepress.pipeline.preflight import preflight
    from moepress.pipeline.recipe import load_recipe

    recipe, src = load_recipe(ok)
    from moepress import models

    preflight(recipe, models.path("tiny-qwen3-moe"), src)


def test_yaml_merge_keys_and_home_paths_read_as_written(tmp_path, monkeypatch):
    """``<<: *anchor`` was refused ("could not determine a constructor for the tag ...merge"); ``output: ~/x`` ran
    into a directory named ``~`` under the current one."""
    from moepress.pipeline.recipe import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = tmp_path / "r.yaml"
    p.write_text("model: tiny-qwen3-moe\noutput: ~/out\nprune:\n  <<: {ratio: 0.5, method: reap}\n  ratio: 0.25\n")
    r, _ = load_recipe(p)
    assert r["prune"]["ratio"] == 0.25 and r["prune"]["method"] == "reap"
    assert r["output"] == str(tmp_path / "home" / "out")


def test_an_anchor_defined_under_an_x_key_merges(tmp_path):
    """A top-level key holding the anchor (``x-base: &b {...}``, as Compose files do) was refused as unknown, so
    ``<<: *anchor`` worked only with the anchor inside a section; an x- key is not read, any other unknown key is
    refused."""
    from moepress.errors import MoepressError
    from moepress.pipeline.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("x-fp8: &q {format: fp8, kv_cache: fp8}\nmodel: tiny-qwen3-moe\nquantize:\n  <<: *q\n  format: "
                 "fp8-dynamic\n")
    r, _ = load_recipe(p)
    assert r["quantize"]["format"] == "fp8-dynamic" and r["quantize"]["kv_cache"] == "fp8" and "x-fp8" not in r
    p.write_text("base: &q {format: fp8}\nmodel: tiny-qwen3-moe\nquantize: *q\n")
    with pytest.raises(MoepressError, match="unknown key 'base'"):
        load_recipe(p)


def test_an_already_quantized_model_is_refused_before_the_prune(cli_run, tmp_path):
    """A recipe quantizing a moepress quantize output ran its prune, then quantize refused naming the prune's
    directory."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q, "--quiet").exit_code == 0
    rec = write_recipe(tmp_path / "r.yaml", model=str(q), quantize=FP8, check="skip")
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"r.yaml: model: {q} is already quantized by moepress")
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_no_stage_is_refused(cli_run, tmp_path):
    """A recipe of a model alone (its sections left out are null, not the default recipe's) ran nothing and exited
    0 with an empty run.json: refused, pointing at the default recipe."""
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\nquantize: null\n")
    one_line_error(cli_run("run", rec, "-o", tmp_path / "run"), "r.yaml: no stage to run", "moepress recipe show")
    assert not (tmp_path / "run").exists()


def test_a_check_refusal_names_check_data_only_for_the_data(tmp_path):
    """A missing data file is check.data's; a model without a tokenizer is not (the line named check.data for it)."""
    import shutil

    from moepress import models
    from moepress.errors import MoepressError
    from moepress.pipeline.preflight import preflight
    from moepress.pipeline.recipe import normalise

    bare = shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / "m",
                           ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    (tmp_path / "eval.txt").write_text("some held-out text\n" * 50)
    full = models.path("tiny-qwen3-moe")
    for model, check, where in ((full, {"data": str(tmp_path / "none.txt")}, "recipe: check.data "),
                                (bare, {"data": str(tmp_path / "eval.txt")}, "recipe: check: "),
                                (bare, {}, "recipe: check: ")):
        with pytest.raises(MoepressError) as e:
            preflight(normalise({"model": str(model), "prune": {"ratio": 0.25}, "check": check}), model)
        assert str(e.value).startswith(where), str(e.value)


def test_a_recipe_s_sequential_lookahead_is_refused_before_any_stage(cli_run, tmp_path):
    """prune.sequential with lookahead (which always gathers a layer's statistics on the pruned layers before it)
    changed nothing and was taken, as --sequential was."""
    rec = write_recipe(tmp_path / "r.yaml", prune={"ratio": 0.25, "method": "lookahead", "sequential": True},
                       check=None)
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: prune.sequential: --method lookahead always gathers", "expected no --sequential")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the recipe's cuda device exists here")
def test_a_recipe_device_this_machine_lacks_is_refused_by_its_key(cli_run, tmp_path):
    """It was refused as "--device cuda: ...", a flag never given."""
    rec = write_recipe(tmp_path / "r.yaml", prune=None, quantize=FP8, device="cuda")
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, "r.yaml: device cuda: this torch build has no CUDA")
    assert not (tmp_path / "run").exists()


def test_a_weight_gate_on_a_model_quantized_before_the_recipe_is_measured(tmp_path):
    """A recipe without a quantize section whose model is a `moepress quantize` output rounded to nearest: its weight
    gate is measured (the preflight read only the quantize section, and refused it)."""
    from moepress import models
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.errors import MoepressError
    from moepress.pipeline.check_gates import refuse_unmeasurable_gates
    from moepress.pipeline.recipe import normalise

    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8-dynamic"))
    recipe = normalise({"model": str(q), "export": {"formats": ["hf-modelopt"]},
                        "check": {"max_weight_error_ratio": 3}})
    refuse_unmeasurable_gates(recipe, "r.yaml", q)
    with pytest.raises(MoepressError, match="this recipe's candidates are not quantized"):
        refuse_unmeasurable_gates(recipe, "r.yaml", models.path("tiny-mixtral"))
