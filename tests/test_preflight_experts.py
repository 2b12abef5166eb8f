"""A recipe whose quantize section leaves a model's routed experts partly quantized, grouped unlike each other, or
at FP4 widths the fused-MoE kernels cannot run, before compressed-tensors or hf-modelopt, is refused before any stage
(moepress/pipeline/preflight.py ``refuse_expert_schemes``) in one line that names a quantize section the preflight
takes; the export itself refuses the quantized checkpoint, after prune and quantize (exporters/fused_moe.py), which
is what the preflight spares the run. Found on a model none of the bundled ones resembles: gate / up in_features
200, a multiple of neither the NVFP4 block (16) nor any INT4 group, down in_features 96.
(tests/test_export_odd_width.py checks that the preflight refuses exactly the pairs the exports refuse on the
width-192 fixture.)"""

from __future__ import annotations

import json
import shutil

import pytest
from test_run import write_recipe

from helpers import assert_one_line_error, make_random_checkpoint
from moepress import models
from moepress.compress.synthetic import write_synthetic
from moepress.errors import MoepressError
from moepress.exporters.fused_moe import FUSES_EXPERTS
from moepress.pipeline.preflight import refuse_unavailable_exports
from moepress.pipeline.recipe import normalise

CALIB = {"num_samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """tiny-qwen3-moe's config with hidden size 200 and expert width 96, 2 layers, random weights, its tokenizer."""
    src = models.path("tiny-qwen3-moe")
    cfg = {**json.loads((src / "config.json").read_text()), "hidden_size": 200, "moe_intermediate_size": 96,
           "intermediate_size": 176, "num_hidden_layers": 2, "num_local_experts": 6, "num_experts_per_tok": 2}
    out = write_synthetic(cfg, tmp_path_factory.mktemp("odd") / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def preflight(model, quantize: dict, export: str) -> None:
    rec = normalise({"model": str(model), "calib": CALIB, "prune": None, "quantize": quantize,
                     "export": {"formats": [export]}, "check": None, "build": None})
    refuse_unavailable_exports(rec, model)


@pytest.mark.parametrize("quantize,export,what,ways", [
    ({"format": "nvfp4"}, "hf-modelopt", "leaves the routed experts' gate_proj, up_proj unquantized (in_features 200 "
     "not a multiple of the NVFP4 block 16) beside their quantized down_proj", "expected quantize.format fp8"),
    ({"format": "w4a8-awq", "group_size": 32}, "hf-modelopt", "leaves the routed experts' gate_proj, up_proj "
     "unquantized (in_features 200 is over --group-size 32 and not a multiple of it)", "expected quantize.format fp8"),
    ({"format": "mxfp4"}, "compressed-tensors", "leaves the routed experts' gate_proj, up_proj unquantized "
     "(in_features 200 not a multiple of the MXFP4 block 32)", "expected quantize.format fp8 or quantize.format "
     "fp8-dynamic"),
    ({"format": "int4-gptq", "group_size": 64}, "compressed-tensors", "leaves every routed-expert projection "
     "unquantized (in_features 200 is over --group-size 64", "expected quantize.format fp8 or quantize.format "
     "fp8-dynamic"),
    ({"format": "nvfp4", "rules": {"self_attn.*": "fp8"}}, "hf-modelopt", "leaves the routed experts' gate_proj, "
     "up_proj unquantized", "expected quantize.format fp8"),  # rules that name no expert: the format gives theirs
])
def test_experts_left_unquantized_are_refused_before_any_stage(cli_run, odd, tmp_path, quantize, export, what, ways):
    rec = write_recipe(tmp_path / "r.yaml", model=str(odd), calib=CALIB, prune=None, quantize=quantize,
                       export={"formats": [export]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    assert_one_line_error(r, f"{rec}: export.formats {export}: quantize.format {quantize['format']} {what}", ways)
    assert not (tmp_path / "run").exists()
    preflight(odd, {"format": "fp8"}, export)  # the way it names is taken


def test_a_rule_giving_every_expert_one_format_is_judged_as_that_format(odd):
    """Rules that give every routed expert one format (README's "export as Kimi ships": --rule
    'mlp.experts.*=int4-gptq') are refused as that format would be, naming the rules; rules giving the experts
    several formats leave the decision to the export, which judges the quantized checkpoint."""
    with pytest.raises(MoepressError, match="quantize.rules' format nvfp4 leaves the routed experts' gate_proj, "
                       "up_proj unquantized .* expected quantize.rules' format fp8"):
        preflight(odd, {"format": "fp8", "rules": {"mlp.experts.*": "nvfp4"}}, "hf-modelopt")
    # bf16 experts beside FP8 linears: nothing packed, which compressed-tensors takes (quantize and export run)
    preflight(odd, {"format": "fp8", "rules": {"mlp.experts.*": "int4-gptq"}, "group_size": 64}, "compressed-tensors")
    with pytest.raises(MoepressError, match="quantize.rules' format int4-gptq leaves every routed-expert projection "
                       "unquantized"):  # beside packed INT4 linears (another rule's): refused by the export
        preflight(odd, {"format": "fp8", "rules": {"mlp.experts.*": "int4-gptq", "self_attn.*": "int4-awq"},
                        "group_size": 64}, "compressed-tensors")
    preflight(odd, {"format": "nvfp4", "rules": {"mlp.experts.0.*": "fp8"}}, "hf-modelopt")


def test_quantize_notes_the_exports_that_refuse_experts_a_rule_quantizes(cli_run, tmp_path):
    """The standalone quantize's note (exports_refusing), for rules as for --format: tiny-mixtral-w192's experts
    (expert width 192) in INT4 groups of 128 by a rule leave their down projections unquantized beside the others."""
    from moepress.cli.quantize import export_refusals
    from moepress.compress.quantize import QuantConfig

    cfg = QuantConfig(format=None, rules=(("block_sparse_moe.experts.*", "int4-gptq"),), group_size=128)
    refusing = export_refusals(models.path("tiny-mixtral-w192"), cfg)
    assert refusing["compressed-tensors"].startswith("the --rule giving the experts int4-gptq leaves the routed "
                                                     "experts' w2 unquantized"), refusing
    assert refusing["compressed-tensors"].endswith("expected --group-size 64, the --rule giving the experts fp8 or "
                                                   "the --rule giving the experts fp8-dynamic"), refusing


@pytest.mark.parametrize("rules", [
    (("*experts.*", "nvfp4"), ("*self_attn.*", "fp8")),  # one compressed-tensors format per checkpoint
    (("*experts.*", "int4-awq"), ("*self_attn.*", "fp8-block")),  # hf-modelopt: INT4 weight-only experts
])
def test_quantize_notes_of_rules_speak_in_flags(rules):
    """The standalone quantize's notes of rules (moepress/pipeline/rule_layouts.py words them for a recipe) name its
    flags: no recipe key (``quantize.rules``, ``quantize.format``, ``export.formats``) is left in them."""
    from moepress.cli.quantize import export_refusals
    from moepress.compress.quantize import QuantConfig

    refusing = export_refusals(models.path("tiny-qwen3-moe"), QuantConfig(format=None, rules=rules))
    assert refusing, rules
    for export, why in refusing.items():
        assert not any(k in why for k in ("quantize.", "export.formats", "recipe")), (export, why)
        assert "--rule" in why or "another export format" in why, (export, why)


@pytest.mark.parametrize("args,export,refusal", [
    (["--format", "nvfp4"], "hf-modelopt", "routed-expert linears stay unquantized beside quantized projections"),
    (["--format", "int4-gptq", "--group-size", "64"], "compressed-tensors",
     "routed-expert linears stay unquantized (model.layers.*.mlp.experts.*.down_proj"),
])
def test_the_export_refuses_what_the_preflight_refused(cli_run, odd, tmp_path, args, export, refusal):
    """The refusal stands for the export's, on the quantized checkpoint: NVFP4 quantizes down_proj and leaves gate / up
    in bf16, which no fused-MoE runtime holds; INT4 in groups of 64 leaves every expert projection in bf16 beside
    packed attention linears, which transformers does not read. A standalone quantize says beforehand which of the
    exports that fuse the experts will refuse its output (``exports_refusing``): exactly those that then do."""
    quantize = {"format": args[1], **({"group_size": int(args[3])} if len(args) > 2 else {})}
    with pytest.raises(MoepressError, match="unquantized"):
        preflight(odd, quantize, export)
    r = cli_run("quantize", odd, *args, "--num-samples", "2", "--seq-len", "32", "-o", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.output
    noted = json.loads(r.stdout)["exports_refusing"]
    assert export in noted and "unquantized" in noted[export], noted
    skipped = {d["module"].rsplit(".", 1)[-1] for d in
               json.loads((tmp_path / "q" / "moepress_quant.json").read_text())["skipped"]}
    assert {"gate_proj", "up_proj"} <= skipped
    for e in FUSES_EXPERTS:
        r = cli_run("export", tmp_path / "q", "--format", e, "-o", tmp_path / e)
        assert (r.exit_code == 2) == (e in noted), (e, noted, r.output)
        if e not in noted:  # run's preflight takes it too (it refused hf-modelopt for INT4 experts left bf16)
            preflight(odd, quantize, e)
    assert_one_line_error(cli_run("export", tmp_path / "q", "--format", export, "-o", tmp_path / "e"), refusal)


def test_quantize_says_before_it_runs_which_exports_will_refuse_its_output(cli_run, odd, tmp_path):
    """In the CLI's own flags, before the first layer (the line comes ahead of the layers' progress)."""
    r = cli_run("quantize", odd, "--format", "nvfp4", "--num-samples", "2", "--seq-len", "32", "-o", tmp_path / "q")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    note = next(k for k, line in enumerate(lines) if line.startswith(
        "note: `moepress export --format hf-modelopt` will refuse this output: --format nvfp4 leaves the routed "
        "experts' gate_proj, up_proj unquantized"))
    assert "expected --format fp8" in lines[note] and "quantize." not in lines[note]
    assert note < next(k for k, line in enumerate(lines) if "layer 1/2" in line)
    r = cli_run("quantize", odd, "--format", "fp8", "--num-samples", "2", "--seq-len", "32", "-o", tmp_path / "f",
                "--json")
    assert json.loads(r.stdout)["exports_refusing"] == {}  # and no export that does not write fp8 is named


def test_quiet_quantize_still_says_which_exports_will_refuse_its_output(cli_run, odd, tmp_path):
    """--quiet hid the start's notes, and its result line said nothing of them: an output that two exports refuse
    looked like any other until the export."""
    r = cli_run("quantize", odd, "--format", "nvfp4", "--num-samples", "2", "--seq-len", "32", "-o", tmp_path / "q",
                "--quiet")
    assert r.exit_code == 0 and not r.stderr.strip(), r.output
    assert "`moepress export` will refuse it as compressed-tensors, hf-modelopt (" in r.stdout, r.stdout


def test_quantize_names_the_exports_that_refuse_its_expert_form_and_they_do(cli_run, tmp_path):
    """int4-awq on tiny-qwen3-moe said no export would refuse it (only widths were asked); compressed-tensors then
    refused AWQ's unfolded pre_quant_scale and hf-modelopt the INT4 weight-only experts. And tiny-deepseek-v3's
    int4-gptq was told --group-size 64 for hf-modelopt, which refuses its INT4 experts at any group size."""
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "int4-awq", "--num-samples", "2", "--seq-len", "32",
                "-o", tmp_path / "q", "--json")
    noted = json.loads(r.stdout)["exports_refusing"]
    assert set(noted) == set(FUSES_EXPERTS) and "--awq-fold" in noted["compressed-tensors"], noted
    for e in FUSES_EXPERTS:
        assert cli_run("export", tmp_path / "q", "--format", e, "-o", tmp_path / e).exit_code == 2, e
    r = cli_run("quantize", "tiny-deepseek-v3", "--format", "int4-gptq", "--num-samples", "2", "--seq-len", "32",
                "-o", tmp_path / "d", "--json")
    why = json.loads(r.stdout)["exports_refusing"]["hf-modelopt"]
    assert "--group-size" not in why and "no runtime loads" in why, why


@pytest.mark.parametrize("model,takes", [("tiny-qwen3-moe", True), ("tiny-mixtral-w192", True), ("hidden192", False)])
def test_the_export_named_for_block_fp8_experts_takes_them(cli_run, tmp_path, model, takes):
    """fp8-block experts, which hf-modelopt refuses: its note named hf-fp8-block as taking them whatever the widths;
    with hidden 192 and experts 320 wide no linear runs in 128x128 blocks, and hf-fp8-block refuses the output (with
    hidden 128 it takes it, keeping 192-wide experts bf16). Named exactly where that export exits 0."""
    if model == "hidden192":
        model = make_random_checkpoint("mixtral", tmp_path / "m", hidden_size=192, intermediate_size=320,
                                       num_attention_heads=3, num_key_value_heads=1, head_dim=64)
    r = cli_run("quantize", model, "--format", "fp8-block", "-o", tmp_path / "q", "--json")
    refusing = json.loads(r.stdout)["exports_refusing"]
    why = refusing["hf-modelopt"]
    assert ("(hf-fp8-block takes them)" in why) == takes, why
    assert ("hf-fp8-block" not in refusing) == takes, refusing  # the quantize says so before it runs
    assert (cli_run("export", tmp_path / "q", "--format", "hf-fp8-block", "-o", tmp_path / "h").exit_code == 0) == takes


def hidden192(tmp_path):
    return make_random_checkpoint("mixtral", tmp_path / "m", hidden_size=192, intermediate_size=320,
                                  num_attention_heads=3, num_key_value_heads=1, head_dim=64)


@pytest.mark.parametrize("quantize,what", [({"format": "fp8-block"}, "this quantize gives block FP8"),
                                           (None, "of ")])
def test_hf_fp8_block_of_no_block_grid_is_refused_before_any_stage(cli_run, tmp_path, quantize, what):
    """hidden 192, experts 320 wide: no linear runs in 128x128 blocks, and hf-fp8-block refuses the output (test
    above) or the bf16 model itself; run refused it only after the quantize (or the export's pass over the model)."""
    model = hidden192(tmp_path)
    rec = write_recipe(tmp_path / "r.yaml", model=str(model), prune=None, quantize=quantize, check=None,
                       export={"formats": ["hf-fp8-block"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    assert_one_line_error(r, f"{rec}: export.formats hf-fp8-block: no linear {what}", "128x128 block grid",
                          "quantize with --format fp8")
    assert not (tmp_path / "run").exists()
    if quantize is None:  # the export's own refusal of the model, before its pass over the layers (no progress line)
        assert_one_line_error(cli_run("export", model, "--format", "hf-fp8-block", "-o", tmp_path / "h"),
                              "no linear of", "128x128 block grid")
    preflight(model, {"format": "fp8"}, "compressed-tensors")  # the way it names is taken


def test_hf_fp8_block_asks_the_linears_the_rules_give_block_fp8(cli_run, tmp_path):
    """tiny-mixtral-w192: its attention runs in 128x128 blocks, its 192-wide experts do not. With the attention left
    bf16 by a rule, no linear given block FP8 is written in blocks: refused up front, and the export does refuse it;
    with the attention quantized too, taken. The export refuses before its pass over the layers (no progress line)."""
    model = models.path("tiny-mixtral-w192")
    rules = {"self_attn.*": "none"}
    with pytest.raises(MoepressError, match=r"no linear this quantize gives block FP8 \(e\.g\. "
                                            r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\)"):
        preflight(model, {"format": "fp8-block", "rules": rules}, "hf-fp8-block")
    preflight(model, {"format": "fp8-block"}, "hf-fp8-block")
    rule = [a for k, v in rules.items() for a in ("--rule", f"{k}={v}")]
    r = cli_run("quantize", model, "--format", "fp8-block", *rule, "-o", tmp_path / "q", "--json")
    assert "hf-fp8-block" in json.loads(r.stdout)["exports_refusing"]
    assert_one_line_error(cli_run("export", tmp_path / "q", "--format", "hf-fp8-block", "-o", tmp_path / "h"),
                          "no linear of", "128x128 block grid")
