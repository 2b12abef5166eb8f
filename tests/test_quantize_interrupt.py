"""An interrupt of `moepress quantize` keeps its partial, and says so, only where a layer finished: before layer 0
(the embedding's shard alone written) it said "the finished layers are kept in OUT.partial: rerun with --resume",
and the resume then said there was no finished layer to keep."""

from __future__ import annotations

import signal

import pytest

import moepress.compress.quantize.stage as stage
from moepress.errors import Interrupted


@pytest.mark.parametrize("at", [0, 1])
def test_an_interrupt_keeps_the_partial_only_after_a_finished_layer(cli_run, tmp_path, monkeypatch, at):
    real = stage.quantize_layer

    def interrupted(sm, i, *a, **k):
        if i == at:
            raise Interrupted(signal.SIGINT, "SIGINT")
        return real(sm, i, *a, **k)

    monkeypatch.setattr(stage, "quantize_layer", interrupted)
    out = tmp_path / "q"
    args = ("quantize", "tiny-mixtral", "--format", "fp8", "--num-samples", "2", "--seq-len", "32", "-o", out)
    r = cli_run(*args)
    assert r.exit_code == 128 + signal.SIGINT, r.output
    partial = tmp_path / "q.partial"
    assert (f"kept in {partial}: rerun with --resume" in r.stderr) == bool(at), r.stderr
    assert partial.is_dir() == bool(at) and not out.exists()
    if at:  # the kept layer is resumed, not redone
        monkeypatch.setattr(stage, "quantize_layer", real)
        r = cli_run(*args, "--resume")
        assert r.exit_code == 0 and "no finished layer" not in r.output, r.output


def test_an_interrupt_before_a_finished_layer_is_journaled_keeps_nothing(cli_run, tmp_path, monkeypatch):
    """The signal lands after layer 0's shard is written, before the journal lists it: a resume cannot keep that
    layer, so the partial is not said to keep one (the resume then said "no finished layer ... starting at
    layer 0")."""
    import moepress.compress.checkpoint.writer as writer

    real = writer.CheckpointWriter._write_journal

    def journal(self, committing=False):
        if len(self._shards) == 2 and not committing:  # the embedding's shard, then layer 0's
            raise Interrupted(signal.SIGTERM, "SIGTERM")
        return real(self, committing)

    monkeypatch.setattr(writer.CheckpointWriter, "_write_journal", journal)
    out = tmp_path / "q"
    r = cli_run("quantize", "tiny-mixtral", "--format", "fp8", "-o", out)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "kept in" not in r.stderr and not (tmp_path / "q.partial").exists() and not out.exists(), r.stderr
