"""An option no format of the run uses is bad input (exit 2, one line naming it), as ``--group-size`` with a format
that takes none is: a script's ``--gptq-act-order`` with fp8 or ``--num-samples`` with a calibration-free format would
otherwise run as if it had not been said, and the manifest would record the calibration as used."""

from __future__ import annotations

import pytest

SMALL = ["--num-samples", "4", "--seq-len", "32"]


@pytest.mark.parametrize("args, flag", [
    (["--format", "fp8", "--gptq-act-order", *SMALL], "--gptq-act-order/--no-gptq-act-order"),
    (["--format", "fp8", "--no-awq-gptq", *SMALL], "--awq-gptq/--no-awq-gptq"),
    (["--format", "fp8", "--no-awq-clip", *SMALL], "--awq-clip/--no-awq-clip"),
    # the clip search runs with --no-awq-gptq only
    (["--format", "int4-awq", "--no-awq-clip", *SMALL], "--awq-clip/--no-awq-clip"),
    (["--format", "mxfp4", "--num-samples", "4"], "--num-samples"),
    (["--format", "fp8-block", "--sequential"], "--sequential/--no-sequential"),
    (["--format", "fp8-dynamic", "--calib", "bundled"], "--calib"),
    (["--format", "fp8-block", "--seed", "3"], "--seed"),
], ids=["act-order-fp8", "no-awq-gptq-fp8", "no-awq-clip-fp8", "no-awq-clip-awq-gptq", "num-samples-mxfp4",
        "sequential-fp8-block", "calib-fp8-dynamic", "seed-fp8-block"])
def test_an_option_no_format_of_the_run_uses_is_refused(cli_run, tmp_path, args, flag):
    r = cli_run("quantize", "tiny-qwen3-moe", *args, "-o", tmp_path / "out", "--quiet")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moepress: error: {flag}:"), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--format", "fp8-block", "--rule", "mlp.experts.*=int4-gptq", "--gptq-act-order", *SMALL],  # a rule's GPTQ
    ["--format", "fp8-block", "--kv-cache", "fp8", *SMALL],  # KV-cache scales are calibrated
    ["--format", "int4-awq", "--no-awq-gptq", "--no-awq-clip", *SMALL],
])
def test_an_option_a_rule_or_the_kv_cache_uses_is_taken(cli_run, tmp_path, args):
    r = cli_run("quantize", "tiny-qwen3-moe", *args, "-o", tmp_path / "out", "--quiet")
    assert r.exit_code == 0, r.output


def test_a_calibration_free_output_records_no_calibration(cli_run, tmp_path):
    """Its manifest and report recorded num_samples / seq_len / seed as if it had been calibrated on them."""
    import json

    for fmt, calibrated in (("fp8-block", False), ("fp8", True)):
        out = tmp_path / fmt
        args = SMALL if calibrated else []
        assert cli_run("quantize", "tiny-qwen3-moe", "--format", fmt, *args, "-o", out, "--quiet").exit_code == 0
        for f in ("moepress-manifest.json", "quant_report.json"):
            cfg = json.loads((out / f).read_text())["config"]
            assert ({"num_samples", "seq_len", "seed", "calib"} <= set(cfg)) == calibrated, (fmt, f, cfg)


def test_a_recipe_quantize_key_no_format_uses_is_refused_by_its_key(cli_run, tmp_path):
    """The recipe's own quantize keys are judged as the CLI's flags are (its calib section, shared with prune, is
    not): an fp8-block section with awq_gptq: false ran as if it had not been said."""
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\nquantize:\n  format: fp8-block\n  awq_gptq: false\n")
    r = cli_run("run", rec, "-o", tmp_path / "run")
    assert r.exit_code == 2 and r.stderr.strip() == (f"moepress: error: {rec}: quantize.awq_gptq: only the AWQ "
                                                     "formats take it; fp8-block here"), r.output
    rec.write_text("model: tiny-qwen3-moe\nquantize:\n  format: int4-awq\n  awq_gptq: false\n  awq_clip: false\n")
    assert cli_run("recipe", "show", rec).exit_code == 0


def test_the_effective_recipe_a_run_writes_runs_again(cli_run, tmp_path):
    """OUT/recipe.yaml (and `recipe show`) write every key with its default (awq_gptq: true, gptq_act_order: null):
    those are not asked, so the recipe a run wrote runs again."""
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\ncalib: {num_samples: 2, seq_len: 32}\nquantize: {format: fp8-block}\n"
                   "check: null\n")
    assert cli_run("run", rec, "-o", tmp_path / "a", "--quiet").exit_code == 0
    r = cli_run("run", tmp_path / "a" / "recipe.yaml", "-o", tmp_path / "b", "--quiet")
    assert r.exit_code == 0, r.output
