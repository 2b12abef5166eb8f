"""What an existing -o may be for a stage to replace it (moepress/outputs.py refuse_existing), refused before the
work in one line: --force never deletes a folder no moepress stage wrote, nor one holding the current directory;
a folder the finished output cannot be renamed over (a mount point, EPERM) is refused up front, not after the
work. Also: a link loop as -o, a FIFO in place of an input file, a signal during the interpreter's exit."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error
from moepress import models, outputs

QUANTIZE = ("quantize", "tiny-mixtral", "--format", "fp8-block", "--quiet")


def _earlier_output(cli_run, out: Path) -> Path:
    r = cli_run(*QUANTIZE, "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_force_refuses_a_folder_no_moepress_stage_wrote(tmp_path, cli_run):
    out = tmp_path / "thesis"
    (out / "src").mkdir(parents=True)
    (out / "t.tex").write_text("chapter one")
    assert_one_line_error(cli_run(*QUANTIZE, "-o", out, "--force"), str(out), "moepress-manifest.json",
                          "expected a new or empty folder")
    assert (out / "t.tex").read_text() == "chapter one" and (out / "src").is_dir()


def test_force_still_replaces_an_earlier_output(tmp_path, cli_run):
    out = _earlier_output(cli_run, tmp_path / "q")
    (out / "stale.txt").write_text("from before")
    r = cli_run(*QUANTIZE, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_force_refuses_an_output_that_holds_the_current_directory(tmp_path, cli_run, monkeypatch):
    out = _earlier_output(cli_run, tmp_path / "q")
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")
    assert_one_line_error(cli_run(*QUANTIZE, "-o", out, "--force"), "holds the current directory")
    assert (out / "config.json").is_file() and (out / "sub").is_dir()


@pytest.mark.parametrize("how", ["mount point", "rename refused"])
def test_an_output_that_cannot_be_renamed_over_is_refused_before_the_work(tmp_path, cli_run, monkeypatch, how):
    """An existing empty -o that is a mount point (EBUSY), immutable or another user's in a sticky parent (EPERM)
    failed at the final rename, after the whole stage, its work discarded."""
    out = tmp_path / "mnt"
    out.mkdir()
    if how == "mount point":
        monkeypatch.setattr(outputs.os.path, "ismount", lambda p: Path(p) == out)
        needle = "a mount point"
    else:
        real = os.rename

        def rename(a, b):
            if Path(a) == out:
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(a))
            return real(a, b)

        monkeypatch.setattr(outputs.os, "rename", rename)
        needle = "cannot be replaced (Operation not permitted)"
    calibrated = ("quantize", "tiny-mixtral", "--format", "int4-awq", "--num-samples", "2", "--seq-len", "32",
                  "--quiet")
    assert_one_line_error(cli_run(*calibrated, "-o", out), str(out), needle)
    assert out.is_dir() and not any(out.iterdir())
    assert not (tmp_path / "mnt.partial").exists() and not (tmp_path / "mnt.partial.probe").exists()


def test_a_symlink_loop_as_output_is_one_line(tmp_path, cli_run):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_one_line_error(cli_run(*QUANTIZE, "-o", tmp_path / "a"), "a loop of symbolic links")


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "config.json",
                                  "model.safetensors.index.json"])
def test_a_fifo_in_place_of_an_input_file_is_refused_not_waited_on(tmp_path, name):
    src = tmp_path / "m"
    shutil.copytree(models.path("tiny-mixtral"), src)
    (src / name).unlink()
    os.mkfifo(src / name)
    p = subprocess.run([sys.executable, "-m", "moepress", "inspect", str(src), "--no-targets"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "not a regular file" in lines[0], p.stderr


def test_a_signal_during_the_interpreters_exit_keeps_a_finished_runs_code(tmp_path):
    """SIGTERM after the command returned (torch's teardown takes about a second): exit 0, nothing on stderr,
    not 143 or an "Exception ignored in atexit callback" traceback."""
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.3)))\n"
              "sys.argv = ['moepress', 'formats']\n"
              "from moepress.cli import main\n"
              "main()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == "", (p.returncode, p.stderr[-2000:])
