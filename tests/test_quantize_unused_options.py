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
