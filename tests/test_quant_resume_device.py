"""A killed calibrated quantize run is resumed only on the kind of device it started on (stage.py
quantize_resume_key: GPU and CPU solves round differently, so layers from both would match neither
uninterrupted run); a calibration-free run's bytes are the same on both, so its key names no device."""

from __future__ import annotations

import json

import pytest
from test_resume import _die_on_abort

from moepress.compress.checkpoint import CheckpointWriter
from moepress.compress.checkpoint.writer import JOURNAL

CALIB = ("--num-samples", "2", "--seq-len", "24")


class Killed(BaseException):
    pass


def _kill_after_first_shard(mp) -> None:
    write, count = CheckpointWriter._write_shard, [0]

    def write_shard(self, *a):
        write(self, *a)
        count[0] += 1
        if count[0] == 2:  # the embedding's shard, then layer 0's
            raise Killed

    mp.setattr(CheckpointWriter, "_write_shard", write_shard)
    _die_on_abort(mp)  # as a kill leaves it: the partial on disk, the lock released


def _kill(cli_run, args):
    with pytest.MonkeyPatch.context() as mp:
        _kill_after_first_shard(mp)
        with pytest.raises(Killed):
            cli_run(*args)


def _killed_awq(cli_run, tmp_path):
    """A calibrated quantize killed after its first layer: (its arguments, its output, its journal, the journal)."""
    q = tmp_path / "q"
    args = ("quantize", "tiny-qwen3-moe", "--format", "int4-awq", "-q", *CALIB, "-o", q)
    _kill(cli_run, args)
    journal = q.with_name("q.partial") / JOURNAL
    return args, q, journal, json.loads(journal.read_text())


def test_calibrated_partial_started_on_a_gpu_is_not_resumed_on_the_cpu(cli_run, tmp_path):
    args, q, journal, j = _killed_awq(cli_run, tmp_path)
    assert j["key"]["config"]["device"] == "cpu"  # a calibrated run's key names its device kind
    j["key"]["config"]["device"] = "cuda"  # as a killed run on a GPU leaves it
    journal.write_text(json.dumps(j))
    r = cli_run(*args, "--resume")
    assert r.exit_code == 2 and "device" in r.output, r.output
    assert not q.exists()


def test_calibration_free_partial_key_names_no_device(cli_run, tmp_path):
    q = tmp_path / "q"
    args = ("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-q", "-o", q)
    _kill(cli_run, args)
    j = json.loads((q.with_name("q.partial") / JOURNAL).read_text())
    assert "device" not in j["key"]["config"]  # same bytes on every device: resumable anywhere
    r = cli_run(*args, "--resume")
    assert r.exit_code == 0, r.output


def test_calibrated_partial_is_resumed_only_under_the_thread_count_it_started_with(cli_run, tmp_path):
    # torch's CPU reductions split by thread: AWQ's scales differ in the last bit between 1 and 2 threads, so
    # layers from both would match neither uninterrupted run
    import torch

    args, q, journal, j = _killed_awq(cli_run, tmp_path)
    assert j["key"]["config"]["torch_threads"] == torch.get_num_threads()
    j["key"]["config"]["torch_threads"] = torch.get_num_threads() + 1  # as a run under more threads leaves it
    journal.write_text(json.dumps(j))
    r = cli_run(*args, "--resume")
    assert r.exit_code == 2 and "OMP_NUM_THREADS" in r.output, r.output
    assert not q.exists() and journal.is_file()  # refused, the partial kept


def test_calibration_free_partial_key_names_no_thread_count(cli_run, tmp_path):
    q = tmp_path / "q"
    _kill(cli_run, ("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-q", "-o", q))
    j = json.loads((q.with_name("q.partial") / JOURNAL).read_text())
    assert "torch_threads" not in j["key"]["config"]  # same bytes under any thread count (one worker per tensor)


@pytest.mark.parametrize("fmt", ["fp8-block", "int4-awq"])
def test_a_partial_started_by_other_code_of_the_same_version_is_not_resumed(cli_run, tmp_path, monkeypatch, fmt):
    """After an upgrade (or any edit) under the same version number, a --resume finished a partial the old code
    started: layers calibrated on the old code's samples beside the new code's (audit77 F2). The resume key names
    the code by its digest (moepress/codeid.py); the refusal names both and keeps the partial."""
    from moepress import codeid

    q = tmp_path / "q"
    args = ("quantize", "tiny-qwen3-moe", "--format", fmt, "-q", *(CALIB if fmt == "int4-awq" else ()), "-o", q)
    _kill(cli_run, args)
    journal = q.with_name("q.partial") / JOURNAL
    assert json.loads(journal.read_text())["key"]["moepress"] == codeid.code_id()
    monkeypatch.setattr(codeid, "package_digest", lambda *p: "0" * 16)  # the upgraded code
    r = cli_run(*args, "--resume")
    assert r.exit_code == 2 and "was started by moepress" in r.output and "0" * 16 in r.output, r.output
    assert not q.exists() and journal.is_file()


def test_a_partial_of_another_moepress_is_refused_for_that_alone(cli_run, tmp_path):
    """Other code keys other entries (an older one recorded no thread count): the refusal names the code, not an
    OMP_NUM_THREADS "none" no setting could match."""
    args, q, journal, j = _killed_awq(cli_run, tmp_path)
    j["key"]["moepress"] = "0.1.0"  # as the previous release left it
    del j["key"]["config"]["torch_threads"]
    journal.write_text(json.dumps(j))
    r = cli_run(*args, "--resume")
    assert r.exit_code == 2 and "was started by moepress 0.1.0, this is 0.1.0+" in r.output, r.output
    assert "threads" not in r.output, r.output
