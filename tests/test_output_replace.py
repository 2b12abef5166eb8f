"""What an existing -o may be for a stage to replace it (moepress/outputs.py refuse_existing), refused before the
work in one line: --force never deletes a folder no moepress stage wrote, nor one holding the current directory;
a folder the finished output cannot be renamed over (a mount point, EPERM) is refused up front, not after the
work. Also: a link loop as -o, a FIFO in place of an input file, a signal during the interpreter's exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import forkserver
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


@pytest.mark.parametrize("how", ["mount point", "sticky parent"])
def test_an_output_that_cannot_be_renamed_over_is_refused_before_the_work(tmp_path, cli_run, monkeypatch, how):
    """An existing empty -o that is a mount point (EBUSY) or another user's in a sticky parent (EPERM) failed at
    the final rename, after the whole stage, its work discarded."""
    parent = tmp_path / "shared"
    parent.mkdir()
    out = parent / "mnt"
    out.mkdir()
    if how == "mount point":
        monkeypatch.setattr(outputs, "mount_point", lambda p: Path(p) == out)
        needle = "a mount point"
    else:  # /tmp's mode; this user is neither the folder's owner nor the parent's
        parent.chmod(0o1777)
        monkeypatch.setattr(outputs.os, "geteuid", lambda: os.stat(out).st_uid + 4242)
        needle = "another user's folder"
    calibrated = ("quantize", "tiny-mixtral", "--format", "int4-awq", "--num-samples", "2", "--seq-len", "32",
                  "--quiet")
    assert_one_line_error(cli_run(*calibrated, "-o", out), str(out), needle)
    assert out.is_dir() and not any(out.iterdir()) and not (parent / "mnt.partial").exists()


def test_mount_points_are_read_from_the_mount_table():
    """/proc/self/mountinfo, not a device number that differs (a btrfs subvolume can be renamed)."""
    assert outputs.mount_point(Path("/")) and not outputs.mount_point(Path(__file__).parent)
    if Path("/proc/self/mountinfo").is_file():
        assert outputs.mount_point(Path("/proc"))


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
    p = forkserver.run([sys.executable, "-m", "moepress", "inspect", str(src), "--no-targets"], text=True,
                       timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "not a regular file" in lines[0], p.stderr


@pytest.mark.parametrize("args, code", [(["formats"], 0), (["inspect", "/no/such/model"], 2)])
def test_a_signal_during_the_interpreters_exit_keeps_the_runs_code(tmp_path, args, code):
    """SIGTERM after the command returned (torch's teardown takes about a second): the code already decided (0,
    or 2 after a refusal) and what was printed, not 143 or an "Exception ignored in atexit callback" traceback;
    nor is the signal ignored (the process leaves at once, not after the 30 s sleep)."""
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
              f"sys.argv = ['moepress', *{args!r}]\n"
              "from moepress.cli import main\n"
              "main()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=25, cwd=tmp_path)
    assert p.returncode == code and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, \
        (p.returncode, p.stderr[-2000:])
    assert (p.stdout if code == 0 else p.stderr).strip(), "what was printed before the signal was lost"


def test_a_fifo_manifest_is_refused_not_waited_on(tmp_path):
    from moepress.errors import MoepressError
    from moepress.manifest import read_manifest

    os.mkfifo(tmp_path / "moepress-manifest.json")
    with pytest.raises(MoepressError, match="moepress-manifest.json: not a regular file"):
        read_manifest(tmp_path)


def test_a_signal_the_parent_ignored_stays_ignored_through_the_exit(tmp_path):
    """`moepress ... &` from a script ignores SIGINT (as nohup does): one during the exit must not cut the atexit
    work after it short."""
    script = ("import atexit, os, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              f"atexit.register(lambda: open({str(tmp_path / 'done')!r}, 'w').close())\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
              "sys.argv = ['moepress', 'formats']\n"
              "from moepress.cli import main\n"
              "main()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and (tmp_path / "done").exists(), (p.returncode, p.stderr[-2000:])


def test_a_manifest_that_is_a_folder_is_refused(tmp_path):
    from moepress.errors import MoepressError
    from moepress.manifest import read_manifest

    (tmp_path / "moepress-manifest.json").mkdir()
    with pytest.raises(MoepressError, match="moepress-manifest.json: not a regular file"):
        read_manifest(tmp_path)
