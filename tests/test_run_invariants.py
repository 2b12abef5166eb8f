"""`moepress run`'s rerun keys, recipe defaults and card figures, against what the CLI and the files say:
properties no other test pinned (a mutation audit planted each bug and the suite passed)."""

import json
from pathlib import Path

import click
import pytest
import yaml

from moepress.cli import cli
from moepress.errors import MoepressError
from moepress.pipeline.recipe import load_recipe

CALIB = Path(__file__).resolve().parent.parent / "calib" / "data" / "calib.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


def _cli_default(command, name):
    return next(p.default for p in cli.commands[command].params if p.name == name)


def _statuses(out):
    return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def _recipe(tmp_path, **sections):
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "quantize": {"format": "fp8"}, "check": None,
                                   **sections}))
    return rec


def test_recipe_defaults_are_the_cli_defaults(tmp_path):
    r, _ = load_recipe(_recipe(tmp_path, build={"targets": ["h100"]}))
    for key in ("num_samples", "seq_len", "seed"):
        assert r["calib"][key] == _cli_default("quantize", key) == _cli_default("prune", key), key
    assert r["build"]["max_batch"] == _cli_default("build", "max_batch")
    assert r["build"]["max_seq_len"] == _cli_default("build", "max_seq_len")


def test_an_export_reruns_when_the_checkpoint_it_exports_changes(cli_run, tmp_path):
    out = tmp_path / "run"
    for seed in (0, 1):
        rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64, "seed": seed},
                      export={"formats": ["hf-modelopt"]})
        assert cli_run("run", rec, "-o", out).exit_code == 0
        if seed == 0:
            first = (out / "export" / "hf-modelopt" / "moepress-manifest.json").read_text()
    assert _statuses(out) == {"quantize": "ran", "export:hf-modelopt": "ran"}
    assert (out / "export" / "hf-modelopt" / "moepress-manifest.json").read_text() != first


def test_a_build_reruns_when_its_build_settings_change(cli_run, tmp_path):
    out = tmp_path / "run"
    for max_batch in (8, 16):
        rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64}, export={"formats": ["hf-modelopt"]},
                      build={"targets": ["h100"], "max_batch": max_batch})
        assert cli_run("run", rec, "-o", out).exit_code == 0
    assert _statuses(out) == {"quantize": "skipped", "export:hf-modelopt": "skipped",
                              "build:h100:trtllm-pytorch": "ran"}


def test_quantize_reruns_when_its_calibration_file_is_edited(cli_run, tmp_path):
    text = CALIB.read_text()
    src = tmp_path / "c.txt"
    src.write_text(text[:30000])
    rec = _recipe(tmp_path, calib={"sources": [str(src)], "num_samples": 8, "seq_len": 64})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    src.write_text(text[30000:60000])  # same path, other contents
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert _statuses(out) == {"quantize": "ran"}


def test_card_states_calibration_and_size_and_is_stable_on_rerun(cli_run, tmp_path):
    rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64, "seed": 3}, export={"formats": ["hf-modelopt"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    d = out / "export" / "hf-modelopt"
    card = (d / "README.md").read_text()
    assert "| calibration | 8 samples x 64 tokens, seed 3, bundled text |" in card
    files = json.loads((d / "moepress-manifest.json").read_text())["files"]
    size = sum((d / f).stat().st_size for f in files if f != "README.md")
    assert f"| size on disk | {size / 1e6:.2f} MB |" in card
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert (d / "README.md").read_text() == card


def test_every_recipe_default_is_its_stage_commands_default(tmp_path):
    """A key the recipe shares with a stage command's option has the option's default (a flag's: off), so
    `moepress run` does what the stage commands do: awq_clip, awq_gptq, search_tokens, tp, ep and opset were
    free to drift."""
    r = load_recipe(_recipe(tmp_path, prune={"ratio": 0.25}, export={"formats": ["onnx"]},
                            build={"targets": ["h100"]}))[0]
    shared = {("prune", "prune"): ("ep_size", "protect", "sequential", "search_tokens", "merge", "method"),
              ("quantize", "quantize"): ("group_size", "kv_cache", "sequential", "gptq_act_order", "awq_clip",
                                         "awq_gptq", "awq_fold"),
              ("export", "export"): ("tp", "ep", "opset"),
              ("build", "build"): ("gpus", "max_seq_len", "max_batch", "trust_remote_code")}
    for (section, command), keys in shared.items():
        cmd = cli.commands[command]
        params = {p.name: p for p in cmd.params}
        for key in keys:
            default = params[key].get_default(click.Context(cmd))  # click's: a flag without one is off
            assert r[section][key] == default, (section, key, r[section][key], default)
    # where the recipe differs on purpose: a recipe's build only plans unless it says dry_run: false
    assert r["build"]["dry_run"] is True


def test_recipe_keys_spelled_with_dashes_empty_stages_and_the_default_check(cli_run, tmp_path):
    """`recipe show` prints what `run` will do: num-samples is num_samples; export and build with nothing to
    make are skipped (null); a recipe without a check section checks with check's defaults, `check: null` skips."""
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "calib": {"num-samples": 8, "seq-len": 64},
                                   "export": {"formats": []}, "build": {"targets": []}}))
    r = cli_run("recipe", "show", rec)
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert (shown["calib"]["num_samples"], shown["calib"]["seq_len"]) == (8, 64)
    assert shown["export"] is None and shown["build"] is None and shown["check"] == {}
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "check": None}))
    assert yaml.safe_load(cli_run("recipe", "show", rec).output)["check"] is None


def test_recipe_show_names_the_check_defaults_a_recipe_does_not_write(cli_run, tmp_path):
    """The check section is shown as written (a gate written is applied even where unmeasured); the gates it
    leaves to `moepress check`'s defaults were not shown at all (max_layer_error, min_routing_overlap, ...)."""
    from moepress.checks.config import CheckConfig

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "check": {"max-layer-error": 2.0}}))
    r = cli_run("recipe", "show", rec)
    assert r.exit_code == 0 and yaml.safe_load(r.output)["check"] == {"max-layer-error": 2.0}, r.output
    note = [ln for ln in r.output.splitlines() if ln.startswith("# check")]
    d = CheckConfig()
    assert len(note) == 1 and f"min_routing_overlap: {d.min_routing_overlap}" in note[0], r.output
    assert "max_layer_error" not in note[0] and "kind" not in note[0] and "trust_remote_code: false" in note[0]


def test_recipe_seed_range_and_yaml_error_line(cli_run, tmp_path):
    """calib.seed takes torch's 64-bit signed range (torch.Generator.manual_seed accepts -2**63 .. 2**64-1,
    moepress keeps the signed half); a YAML error names the 1-based line an editor shows."""
    import torch

    rec = tmp_path / "r.yaml"
    for seed in (-(2**63), 2**63 - 1):
        torch.Generator().manual_seed(seed)
        rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "calib": {"seed": seed}}))
        r = cli_run("recipe", "show", rec)
        assert r.exit_code == 0 and yaml.safe_load(r.output)["calib"]["seed"] == seed, r.output
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "calib": {"seed": 2**63}}))
    r = cli_run("recipe", "show", rec)
    assert r.exit_code == 2 and "calib.seed: expected a 64-bit integer, got 9223372036854775808" in r.stderr
    rec.write_text("model: tiny-qwen3-moe\n\tprune: {ratio: 0.25}\n")
    r = cli_run("recipe", "show", rec)
    assert r.exit_code == 2 and f"{rec}: line 2 column 1 not valid YAML" in r.stderr, r.output


def test_a_recipe_without_a_model_with_model_given_runs_on_that_model(cli_run, tmp_path):
    """`moepress run r.yaml --model M`: the flag fills the file's missing model (run.yaml records it)."""
    rec = tmp_path / "r.yaml"
    rec.write_text("quantize:\n  format: fp8-block\ncheck: null\n")
    out = tmp_path / "run"
    r = cli_run("run", rec, "--model", "tiny-qwen3-moe", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"] == "tiny-qwen3-moe"


def _run_onnx(cli_run, rec, out, *extra, opset=21) -> dict:
    """`moepress run` of a prune + ONNX export recipe (no check); each stage's status in run.json."""
    rec.write_text(yaml.safe_dump({"model": "tiny-mixtral", "calib": {"num_samples": 2, "seq_len": 32},
                                   "prune": {"ratio": 0.25, "method": "reap"},
                                   "export": {"formats": ["onnx"], "opset": opset}, "check": None}))
    r = cli_run("run", rec, "-o", out, "--quiet", *extra)
    assert r.exit_code == 0, r.output
    return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def test_a_changed_export_option_reruns_the_export_only(cli_run, tmp_path):
    """The export's key holds its options: opset 21 -> 22 reruns it (the graph is opset 22), not the prune."""
    import onnx

    rec, out = tmp_path / "r.yaml", tmp_path / "run"
    assert _run_onnx(cli_run, rec, out) == {"prune": "ran", "export:onnx": "ran"}
    assert _run_onnx(cli_run, rec, out) == {"prune": "skipped", "export:onnx": "skipped"}
    assert _run_onnx(cli_run, rec, out, opset=22) == {"prune": "skipped", "export:onnx": "ran"}
    model = onnx.load(next((out / "export" / "onnx").glob("*.onnx")), load_external_data=False)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {22}


def test_from_a_stage_reruns_it_and_every_stage_after_it(cli_run, tmp_path):
    """`run --from prune` forces prune and the export after it (the export's inputs would look unchanged to a
    rerun that compared only its own key's options)."""
    rec, out = tmp_path / "r.yaml", tmp_path / "run"
    assert _run_onnx(cli_run, rec, out) == {"prune": "ran", "export:onnx": "ran"}
    assert _run_onnx(cli_run, rec, out, "--from", "prune") == {"prune": "ran", "export:onnx": "ran"}
    # a stage the recipe does not have: "nothing to do", exit 0, the --from ignored without a word
    r = cli_run("run", rec, "-o", out, "--quiet", "--from", "check")
    assert r.exit_code == 2 and r.stderr.strip().endswith("has no check section; expected one of its stages "
                                                          "(prune, export)"), r.output


def test_a_rerun_removes_the_verdicts_on_the_outputs_it_replaces(cli_run, tmp_path, monkeypatch):
    """A rerun whose stages rewrite a checked candidate (here: another calibration seed) was killed before checking
    it again: the earlier run's report ("passed") stood beside bytes it never read. The checks of what a stage
    replaces go when that stage starts; here the run stops at its first check, as a kill there would."""
    from moepress.pipeline import runner

    out = tmp_path / "run"
    check = {"max_samples": 2, "seq_len": 32, "max_ppl_increase": None, "min_top1": None, "max_kl": None}
    rec = _recipe(tmp_path, calib={"num_samples": 4, "seq_len": 32, "seed": 0}, export={"formats": ["onnx"]},
                  check=check)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert {p.name for p in (out / "check").iterdir()} == {"quantized", "onnx"}
    monkeypatch.setattr(runner.Runner, "_check", lambda *a: (_ for _ in ()).throw(MoepressError("killed")))
    rec = _recipe(tmp_path, calib={"num_samples": 4, "seq_len": 32, "seed": 1}, export={"formats": ["onnx"]},
                  check=check)
    assert cli_run("run", rec, "-o", out).exit_code != 0
    assert not (out / "check").exists() or not any((out / "check").iterdir())
    assert not [p for p in (out / ".state").iterdir() if p.name.startswith("check")]
