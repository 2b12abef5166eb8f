"""The stage commands' options reach the stage configs as documented (no stage runs: each test swaps the
stage function for one that records what the command handed it)."""

import json

import pytest
import torch

from moepress.calib.config import CalibConfig
from moepress.compress.prune import PruneConfig
from moepress.compress.quantize import QuantConfig
from moepress.pipeline.recipe import normalise


@pytest.fixture
def handed(monkeypatch):
    """Replace prune_checkpoint / quantize_checkpoint and moepress.device.resolve; returns what they saw."""
    import moepress.compress.prune as prune
    import moepress.compress.quantize as quantize
    import moepress.device as device

    seen = {}

    def stage(src, out, cfg, *, device, **kwargs):
        seen.update(cfg=cfg, device=device, **kwargs)
        return {"output": str(out), **seen.get("result", {})}

    def resolve(spec):
        seen["device_spec"] = spec
        return torch.device("cpu")

    monkeypatch.setattr(prune, "prune_checkpoint", stage)
    monkeypatch.setattr(quantize, "quantize_checkpoint", stage)
    monkeypatch.setattr(device, "resolve", resolve)
    return seen


@pytest.mark.parametrize("stage,args,section", [
    ("prune", ["--ratio", "0.25"], {"ratio": 0.25}),
    ("quantize", ["--format", "int4-awq"], {"format": "int4-awq"}),
])
def test_a_command_without_options_gets_the_documented_defaults(cli_run, tmp_path, handed, stage, args, section):
    """What `moepress STAGE` runs with its defaults is what `moepress run` runs for a recipe section
    holding only the same choice (`moepress recipe show` fills the defaults), and the README's figures:
    the default calibration is 64 x 256 tokens of the bundled text, seed 0, on device auto."""
    r = cli_run(stage, "tiny-mixtral", *args, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"] == str(tmp_path / "o") and "memory" in json.loads(r.stdout)
    recipe = normalise({"model": "tiny-mixtral", stage: section})
    cal = CalibConfig.from_recipe(recipe["calib"])
    cls = {"prune": PruneConfig, "quantize": QuantConfig}[stage]
    assert handed["cfg"] == cls.from_recipe(recipe[stage], cal)
    cfg = handed["cfg"]
    assert (cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed) == ((), 64, 256, 0)
    assert handed["device_spec"] == "auto" and handed["force"] is False
    if stage == "prune":
        assert (cfg.method, cfg.ep_size, cfg.protect, cfg.sequential, cfg.search_tokens, cfg.merge, cfg.race) == \
            ("auto", 1, (), False, 16384, None, ())
    else:
        assert (cfg.group_size, cfg.sequential, cfg.gptq_act_order, cfg.awq_gptq, cfg.awq_clip, cfg.awq_fold) == \
            (128, None, None, True, True, False)
        assert handed["resume"] is False


@pytest.mark.parametrize("stage,args", [
    ("prune", ["--ratio", "0.25", "--method", "auto", "--ep-size", "2", "--protect", "3:5,1:2", "--sequential",
               "--search-tokens", "100", "--no-merge", "--race", "reroute, frequency"]),
    # every option one that takes effect: --gptq-act-order for the rule's GPTQ, --no-awq-clip with --no-awq-gptq
    ("quantize", ["--format", "int4-awq", "--rule", "self_attn.*=int4-gptq", "--group-size", "64", "--kv-cache", "fp8",
                  "--no-sequential", "--gptq-act-order", "--no-awq-gptq", "--no-awq-clip", "--awq-fold",
                  "--resume"]),
])
@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1])
def test_every_option_reaches_the_config(cli_run, tmp_path, handed, stage, args, seed):
    """Each option given lands in its config field; a seed may be any signed 64-bit integer (as in a recipe),
    which torch's generators take."""
    r = cli_run(stage, "tiny-mixtral", *args, "--calib", "a.txt@2", "--calib", "b.jsonl", "--num-samples", "3",
                "--seq-len", "17", "--seed", seed, "--device", "cpu", "--force", "-o", tmp_path / "o", "--quiet",
                "--json")
    assert r.exit_code == 0, r.output
    cfg = handed["cfg"]
    assert (cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed) == (("a.txt@2", "b.jsonl"), 3, 17, seed)
    torch.Generator().manual_seed(cfg.seed)  # torch takes it
    assert handed["device_spec"] == "cpu" and handed["force"] is True
    if stage == "prune":
        assert (cfg.method, cfg.ratio, cfg.ep_size, cfg.protect, cfg.sequential, cfg.search_tokens, cfg.merge,
                cfg.race) == ("auto", 0.25, 2, ((1, 2), (3, 5)), True, 100, False, ("reroute", "frequency"))
    else:
        assert (cfg.format, cfg.rules, cfg.group_size, cfg.kv_cache, cfg.sequential, cfg.gptq_act_order) == \
            ("int4-awq", (("self_attn.*", "int4-gptq"),), 64, "fp8", False, True)
        assert (cfg.awq_gptq, cfg.awq_clip, cfg.awq_fold, handed["resume"]) == (False, False, True, True)


@pytest.mark.parametrize("fragile", [0, 1])
def test_prune_text_summary_says_the_method_share_notes_and_fragile_layers(cli_run, tmp_path, handed, fragile):
    handed["result"] = {"kept": 6, "num_experts": 8, "moe_layers": 4, "dropped_token_share_mean": 0.125,
                        "constraints": ["layer 2: a note"], "fragile_layers": fragile, "seconds": 1.5}
    r = cli_run("prune", "tiny-mixtral", "--ratio", "0.25", "-o", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == ("tiny-mixtral: kept 6 of 8 routed experts in 4 MoE layers (auto); dropped experts took "
                        "12.5% of routing assignments on calibration data")  # the default method, by name
    assert lines[1] == "  layer 2: a note" and lines[-1] == f"wrote {tmp_path / 'o'} (1.5 s)"
    assert len(lines) == 3 + fragile and ("1 of 4 layers' decisions are fragile" in r.stdout) == bool(fragile)


@pytest.mark.parametrize("borrowed", [0, 3])
def test_quantize_text_summary_says_sparse_experts(cli_run, tmp_path, handed, borrowed):
    handed["result"] = {"quant_algo": "W4A16_AWQ", "quantized_linears": 10, "borrowed": borrowed, "seconds": 2.0}
    r = cli_run("quantize", "tiny-mixtral", "--format", "int4-awq", "-o", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    sparse = ", 3 sparse experts (too few calibration tokens; quant_report.json: sparse_expert_rule)"
    assert r.stdout.strip().endswith(f"(W4A16_AWQ, 10 linears{sparse if borrowed else ''}) -> {tmp_path / 'o'} "
                                     "in 2.0s"), r.stdout


@pytest.mark.parametrize("args,option", [
    (["prune", "tiny-qwen3-moe", "--ratio", "0.25", "-o", "", "--force"], "'-o' / '--output'"),
    (["export", "tiny-qwen3-moe", "--format", "onnx", "-o", "", "--force"], "'-o' / '--output'"),
    (["calib", "prepare", "tiny-qwen3-moe", "-o", ""], "'-o' / '--output'"),
    (["prune", "", "-o", "x"], "'MODEL'"),
    (["check", "x", "-r", "", "--report", "r"], "'--reference' / '-r'"),
    (["check", "x", "-r", "tiny-qwen3-moe", "--report", ""], "'--report'"),
    (["build", "", "--target", "h100-sxm", "-o", "x"], "'ARTIFACT'"),
    (["run", "-o", ""], "'-o' / '--output'"),
    (["publish", "x", "--to", ""], "'--to'"),
])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(cli_run, tmp_path, monkeypatch, args, option):
    """`-o "$OUT" --force` with OUT unset: os.path.abspath("") is the current directory, which --force
    emptied and wrote into. Every path or name argument refuses the empty string in one line naming it;
    the current directory keeps its files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canary.txt").write_text("kept")
    r = cli_run(*args, "--json")
    assert r.exit_code == 2, r.output
    assert option in json.loads(r.stdout)["error"] and "empty string" in json.loads(r.stdout)["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


@pytest.mark.parametrize("option", ["--protect", "--race"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_list_option_is_refused_not_taken_for_its_default(cli_run, tmp_path, option, value):
    """`--protect "$KEEP"` with KEEP unset protected nothing and `--race ""` raced all four methods, exit 0."""
    r = cli_run("prune", "tiny-qwen3-moe", "--keep", "8", option, value, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 2, r.output
    assert f"'{option}'" in json.loads(r.stdout)["error"] and "empty string" in json.loads(r.stdout)["error"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0, -3])
def test_recipe_search_tokens_must_be_positive(value):
    """`moepress prune --search-tokens 0` is refused (exit 2); a recipe's prune.search_tokens 0 reached the
    search and crashed with a ValueError traceback (exit 1), and -3 silently searched all tokens but 3."""
    from moepress.errors import MoepressError

    with pytest.raises(MoepressError, match="search_tokens"):
        normalise({"model": "tiny-mixtral", "prune": {"keep": 4, "search_tokens": value}})


@pytest.mark.parametrize("args,says", [
    (["--race", "reap"], "for one method, use --method reap"),
    (["--race", "reap,merge"], "'merge' is not one of them"),
    (["--race", "reap,lookahead"], "'lookahead' is not one of them"),
    (["--method", "reap", "--race", "reap,ean"], "only --method auto races methods"),
])
def test_a_race_of_anything_but_two_of_autos_methods_is_refused(cli_run, tmp_path, args, says):
    """`--race` picks two or more of auto's own methods; anything else is one line naming it, exit 2, nothing
    written."""
    r = cli_run("prune", "tiny-qwen3-moe", "--keep", "8", *args, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 2, r.output
    err = json.loads(r.stdout)["error"]
    assert err.startswith("--race ") and says in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_recipe_race_reaches_the_config():
    """A recipe's prune.race is --race: the same names, in the order given (the stage puts them in auto's)."""
    recipe = normalise({"model": "tiny-mixtral", "prune": {"keep": 4, "race": "reap, ean"}})
    cfg = PruneConfig.from_recipe(recipe["prune"], CalibConfig.from_recipe(recipe["calib"]))
    assert cfg.race == ("reap", "ean")


def test_method_merge_with_no_merge_is_refused(cli_run, tmp_path):
    """`--method merge --no-merge` wrote `--method reap`'s checkpoint byte for byte while printing "(merge)" and
    recording method merge: a contradictory pair that silently does something else."""
    r = cli_run("prune", "tiny-qwen3-moe", "--keep", "8", "--method", "merge", "--no-merge",
                "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "--no-merge" in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, line", [
    (["prune", "tiny-qwen3-moe", "--ratio", "0.25", "--method", "frequency", "--search-tokens", "100"],
     "--search-tokens: --method frequency samples no tokens"),
    (["prune", "tiny-qwen3-moe", "--ratio", "0.25", "--method", "reap", "--search-tokens", "100"],
     "--search-tokens: --method reap samples no tokens"),
    (["prune", "tiny-qwen3-moe", "--ratio", "0.25", "--race", "ean,frequency", "--no-merge", "--search-tokens", "9"],
     "--search-tokens: --method auto racing ean, frequency samples no tokens"),
    (["prune", "tiny-qwen3-moe", "--ratio", "0.25", "--method", "lookahead", "--sequential"],
     "--sequential: --method lookahead always gathers a layer's statistics on the pruned layers before it"),
    (["check", "tiny-qwen3-moe", "-r", "tiny-qwen3-moe", "--gen-tokens", "5"],
     "--gen-tokens 5: only with --generate N"),
    (["check", "tiny-qwen3-moe", "-r", "tiny-qwen3-moe", "--generate", "9", "--max-samples", "4"],
     "--generate 9: at most --max-samples (4)"),
    (["check", "tiny-qwen3-moe", "-r", "tiny-qwen3-moe", "--seed", "5"],
     "--seed 5: the bundled held-out text is read as consecutive windows, which no seed draws"),
])
def test_an_option_that_would_have_no_effect_is_refused(cli_run, tmp_path, args, line):
    """Accepted and ignored before: --search-tokens with a method that samples no tokens (as --race with a method
    that races nothing), --sequential with lookahead (sequential always), --gen-tokens without --generate, --seed
    with text data (read as consecutive windows), --generate above --max-samples (its prompts are the samples'
    starts: cut to their count)."""
    r = cli_run(*args, "-o" if args[0] == "prune" else "--report", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.startswith(f"moepress: error: {line}"), r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_check_kind_help_lists_every_registered_kind(cli_run):
    """`moepress check --help` names the candidate kinds without importing their registry: the list it shows is
    the registry's, all of it."""
    from moepress.checks import CANDIDATE_KINDS

    r = cli_run("check", "--help")
    assert r.exit_code == 0 and f"--kind [{'|'.join(['auto', *CANDIDATE_KINDS])}]" in r.output, r.output
