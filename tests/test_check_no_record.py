"""`check --no-record` is the gate alone (README / check --help: "record nothing in the candidate's
moepress-manifest.json (a read-only artifact)"): a candidate folder moepress cannot write into is checked, not
refused for the record it will not write. The read-only folder is simulated in-process: the write probe in it fails
with EACCES as on a read-only mount, which the same command without --no-record refuses (the control)."""

from __future__ import annotations

import errno
import json
import tempfile

from moepress.checks import report


def test_no_record_checks_a_candidate_folder_it_cannot_write(cli_run, tmp_path, monkeypatch):
    q = tmp_path / "q"
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    manifest = (q / "moepress-manifest.json").read_bytes()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(q)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(report.tempfile, "mkstemp", mkstemp)
    args = ["check", q, "-r", "tiny-qwen3-moe", "--max-samples", "2", "--seq-len", "32", "--max-ppl-increase",
            "0.1", "--quiet", "--json"]
    r = cli_run(*args)
    assert r.exit_code == 2 and "cannot record the check" in r.stderr, r.output  # the control: refused
    r = cli_run(*args, "--no-record")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["manifest_updated"] is False
    assert (q / "moepress-manifest.json").read_bytes() == manifest
