"""check --json with a refused record prints ONE document whose "error" is the refusal on one
line (whitespace runs joined, as _refuse's stderr line), and the stderr line matches it."""
from __future__ import annotations

import json

from moepress.errors import MoepressError


def test_a_multi_line_refusal_is_one_line_in_the_json_result(cli_run, tmp_path, monkeypatch):
    import moepress.checks as checks

    def refuse(cand, result, before=None):
        raise MoepressError("first part\n    second part")

    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q, "--quiet").exit_code == 0
    monkeypatch.setattr(checks, "record_in_manifest", refuse)
    r = cli_run("check", q, "--reference", "tiny-qwen3-moe", "--max-samples", "2", "--seq-len", "32",
                "--json")
    assert r.exit_code == 2, r.output
    res = json.loads(r.stdout)  # one document
    assert res["error"] == "first part second part" and res["exit"] == 2, res
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("moepress:")]  # (--json's progress events aside)
    assert len(errs) == 1 and errs[0].startswith("moepress: error: first part"), r.stderr
