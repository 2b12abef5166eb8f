"""Standard output that cannot be written: a reader gone (`moepress formats | head -1`) ends the command quietly
with SIGPIPE's code, as `yes | head` does; a full device is one line naming standard output, exit 2, never a
traceback or a line blaming the output directory the stage completed. A real file descriptor: a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

MOEPRESS = [sys.executable, "-m", "moepress"]


def _run(args, stdout) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*MOEPRESS, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args", [["formats"], ["formats", "--json"], ["recipe", "show"], ["--help"], ["--version"],
                                  ["quantize", "--help"]])
def test_a_closed_pipe_ends_quietly_with_sigpipes_code(args):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = _run(args, w)
    finally:
        os.close(w)
    assert p.returncode == 128 + signal.SIGPIPE and p.stderr == "", (p.returncode, p.stderr)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_standard_output_is_named_and_the_output_directory_is_not_blamed(tmp_path):
    out = tmp_path / "q"
    with open("/dev/full", "w") as full:
        p = _run(["quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", out, "--json"], full)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert lines[-1] == ("moepress: error: standard output: No space left on device (ENOSPC); the result was not "
                         "written there"), lines[-1]
    assert (out / "moepress-manifest.json").exists()  # the stage itself completed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_refusal_under_json_with_a_full_standard_output_is_still_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        p = _run(["quantize", "tiny-qwen3-moe", "--format", "nope", "-o", tmp_path / "q", "--json"], full)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--format nope" in p.stderr, p.stderr


def test_listing_the_formats_imports_no_modeling_code():
    """`moepress formats` reads each exporter's declaration: importing the exporters (and, under them, the
    layer building blocks and the quantize package's configuration) must not import transformers' modeling
    code or the quantize stage, which took it from ~2 s to ~6 s."""
    code = ("import sys\nfrom moepress.cli import cli\n"
            "try:\n    cli.main(['formats', '--json'], prog_name='moepress')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('transformers.modeling_utils', 'transformers.activations',"
            " 'moepress.compress.quantize.stage', 'moepress.calib.observers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout[-300:]
