"""Resuming a killed quantize run, and what a killed run leaves (review of the resume path):

- the quantize totals (moepress-quant-progress.json) stay in OUT.partial until the writer's commit, so a
  kill after the last shard resumes to the same report and configs; a partial without them is refused;
- a layer bigger than the writer's shard limit spans several shards: a kill between two of them resumes
  from the layer's start, byte-identical, and an error in a resumed run keeps the earlier run's work;
- ``moepress run`` removes the previous run.json when it starts and writes the new one atomically at the end.

A kill is simulated in-process (no new Python process per case): the writer stops at a chosen point and
its abort leaves the partial as SIGKILL would, only releasing the lock the kernel would release.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from moepress.compress.checkpoint import CheckpointWriter
from moepress.compress.checkpoint.writer import JOURNAL
from moepress.compress.quantize.config import PROGRESS

MODEL = "tiny-qwen3-moe"
ARGS = ("quantize", MODEL, "--format", "fp8-block", "--quiet")  # calibration-free: a background writer
SMALL = 300_000  # bytes: every decoder layer of the tiny model spans several shards


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in moepress catches it."""


def _digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "moepress-manifest.json"}


def _die_on_abort(monkeypatch) -> None:
    """abort() as a kill leaves things: the partial as it is on disk, the lock released."""
    def abort(self):
        if self._pool is not None:
            try:
                self.wait()
            except BaseException:
                pass
            self._pool.shutdown()
        self._lock.release()
    monkeypatch.setattr(CheckpointWriter, "abort", abort)


def _kill_before_commit(monkeypatch) -> None:
    """Killed after every shard is written and journaled, before commit() does anything else."""
    def commit(self):
        self.end_shard()
        self.wait()
        raise Killed
    _die_on_abort(monkeypatch)
    monkeypatch.setattr(CheckpointWriter, "commit", commit)


def _kill_after_shard(monkeypatch, n: int) -> None:
    """Killed right after the n-th shard of the run is journaled."""
    write, count = CheckpointWriter._write_shard, [0]

    def write_shard(self, *a):
        write(self, *a)
        count[0] += 1
        if count[0] == n:
            raise Killed
    _die_on_abort(monkeypatch)
    monkeypatch.setattr(CheckpointWriter, "_write_shard", write_shard)


def test_kill_after_the_last_shard_resumes_with_the_totals(cli_run, tmp_path):
    """The progress file was deleted before the commit: a kill there resumed to a report of 0 linears."""
    ref, q = tmp_path / "ref", tmp_path / "q"
    assert cli_run(*ARGS, "-o", ref).exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        _kill_before_commit(mp)
        with pytest.raises(Killed):
            cli_run(*ARGS, "-o", q)
    partial = tmp_path / "q.partial"
    assert not q.exists() and (partial / JOURNAL).is_file() and (partial / PROGRESS).is_file()
    r = cli_run(*ARGS, "--resume", "-o", q)
    assert r.exit_code == 0, r.output
    assert _digest(q) == _digest(ref)
    assert not (q / PROGRESS).exists() and not (q / JOURNAL).exists() and not partial.exists()


def test_a_rerun_without_resume_says_it_discards_the_killed_runs_layers(cli_run, tmp_path):
    """A killed quantize's finished layers went without a word when the command was rerun without --resume."""
    q = tmp_path / "q"
    with pytest.MonkeyPatch.context() as mp:
        _kill_after_shard(mp, 2)
        with pytest.raises(Killed):
            cli_run(*ARGS, "-o", q)
    assert (tmp_path / "q.partial" / PROGRESS).is_file()
    r = cli_run(*(a for a in ARGS if a != "--quiet"), "-o", q)  # a note, as the others: not under --quiet
    assert r.exit_code == 0, r.output
    assert f"note: {tmp_path / 'q.partial'} holds the finished layers of an earlier run, discarded now; " \
        "--resume keeps them" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["_name_shards", "install"])
def test_a_kill_inside_commit_restarts_on_resume(cli_run, tmp_path, where):
    """Killed while the commit renamed the shards (the journal was gone already) or just before the partial was
    renamed to OUT: `--resume` (and `moepress run`'s rerun) refused the partial as "an older moepress"'s,
    with a hint ("rerun with the same options") that failed again. Nothing in it is resumable: it starts afresh."""
    import moepress.compress.checkpoint.writer as writer

    ref, q = tmp_path / "ref", tmp_path / "q"
    assert cli_run(*ARGS, "-o", ref).exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        _die_on_abort(mp)
        target = CheckpointWriter if where == "_name_shards" else writer
        real = getattr(target, where)

        def killed(*a):
            real(*a) if where == "_name_shards" else None
            raise Killed
        mp.setattr(target, where, killed)
        with pytest.raises(Killed):
            cli_run(*ARGS, "-o", q)
    partial = tmp_path / "q.partial"
    assert not q.exists() and any(partial.glob("model-*.safetensors"))
    r = cli_run(*ARGS, "--resume", "-o", q)
    assert r.exit_code == 0, r.output
    assert _digest(q) == _digest(ref) and not partial.exists()


@pytest.mark.parametrize("left", [(), (JOURNAL + ".tmp",)])
def test_a_kill_before_the_first_journal_restarts_on_resume(cli_run, tmp_path, left):
    """Killed after the writer made OUT.partial, before its first journal (the partial empty, or holding the
    journal's temporary file): `--resume` and `moepress run`'s rerun refused it as "an older moepress"'s. Nothing
    in it is lost: it starts afresh."""
    ref, q, partial = tmp_path / "ref", tmp_path / "q", tmp_path / "q.partial"
    assert cli_run(*ARGS, "-o", ref).exit_code == 0
    partial.mkdir()
    for name in left:
        (partial / name).write_text('{"shards": [')
    r = cli_run(*ARGS, "--resume", "-o", q)
    assert r.exit_code == 0, r.output
    assert _digest(q) == _digest(ref) and not partial.exists()


def test_a_partial_with_a_shard_and_no_journal_is_still_refused(cli_run, tmp_path):
    q, partial = tmp_path / "q", tmp_path / "q.partial"
    partial.mkdir()
    (partial / "model-00001.safetensors").write_bytes(b"\0" * 16)
    r = cli_run(*ARGS, "--resume", "-o", q)
    assert r.exit_code == 2 and "has no record of the run" in r.stderr, r.output
    assert (partial / "model-00001.safetensors").is_file()


def test_resume_of_a_partial_without_its_totals_is_refused(cli_run, tmp_path):
    """What the old order left (every layer journaled, no progress file): refused in one line, the partial kept."""
    q, partial = tmp_path / "q", tmp_path / "q.partial"
    with pytest.MonkeyPatch.context() as mp:
        _kill_before_commit(mp)
        with pytest.raises(Killed):
            cli_run(*ARGS, "-o", q)
    (partial / PROGRESS).unlink()
    before = _digest(partial)
    r = cli_run(*ARGS, "--resume", "-o", q)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("moepress: error:"), r.output
    assert "q.partial" in lines[0] and PROGRESS in lines[0] and "without --resume" in lines[0], lines[0]
    assert not q.exists() and _digest(partial) == before


def test_kill_inside_a_layer_bigger_than_a_shard_resumes_byte_identical(cli_run, tmp_path, monkeypatch):
    """A kill between two shards of one layer: the resume wrote the layer's tensors again into a writer
    that had them ("written twice", a traceback) and its abort removed every finished layer."""
    monkeypatch.setitem(CheckpointWriter.__init__.__kwdefaults__, "max_shard_bytes", SMALL)
    ref = tmp_path / "ref"
    assert cli_run(*ARGS, "-o", ref).exit_code == 0
    index = json.loads((ref / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {f for n, f in index.items() if n.startswith("model.layers.0.")}
    layers = [{n for n in index if n.startswith(f"model.layers.{i}.")} for i in (0, 1)]
    assert len(layer0) > 2  # the kills below land inside layer 0 and inside layer 1
    for n in (2, len(layer0) + 2):
        q = tmp_path / f"q{n}"
        with pytest.MonkeyPatch.context() as mp:
            _kill_after_shard(mp, n)
            with pytest.raises(Killed):
                cli_run(*ARGS, "-o", q)
        journal = json.loads((tmp_path / f"q{n}.partial" / JOURNAL).read_text())
        kept = {name for _, names, _ in journal["shards"] for name in names}
        assert any(0 < len(kept & lay) < len(lay) for lay in layers), n  # a layer cut off between its shards
        r = cli_run(*ARGS, "--resume", "-o", q)
        assert r.exit_code == 0, (n, r.output)
        assert _digest(q) == _digest(ref), n


def test_writer_resume_drops_the_shards_of_an_unfinished_layer(tmp_path):
    out = tmp_path / "out"
    w = CheckpointWriter(out, max_shard_bytes=16)
    w.add("l0.a", torch.ones(4))  # 16 bytes: a shard by itself, not a layer boundary
    w.add("l0.b", torch.ones(2))
    w.end_shard()  # layer 0 complete
    w.add("l1.a", torch.ones(4))  # written, journaled; l1.b never comes (killed)
    assert [s[0] for s in w._shards] == [f"shard-0000{i}.safetensors" for i in range(3)]
    w._lock.release()
    del w
    w = CheckpointWriter(out, resume=True, max_shard_bytes=16)
    assert w.written_names == {"l0.a", "l0.b"}
    assert not (tmp_path / "out.partial" / "shard-00002.safetensors").exists()
    w.add("l1.a", torch.ones(4))  # the layer again, from its start
    w.add("l1.b", torch.ones(2))
    w.commit()
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 4


def test_an_error_in_a_resumed_run_keeps_the_earlier_runs_shards(tmp_path):
    out = tmp_path / "out"
    w = CheckpointWriter(out)
    w.add("l0", torch.ones(3))
    w.end_shard()
    w._lock.release()
    del w
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, resume=True) as w:
            w.add("l1", torch.ones(3))
            w.end_shard()
            raise RuntimeError("a failure in the resumed run")
    partial = tmp_path / "out.partial"
    assert not out.exists() and (partial / "shard-00000.safetensors").is_file()
    w = CheckpointWriter(out, resume=True)  # the next resume takes it (and the lock is free)
    assert {"l0", "l1"} <= w.written_names
    w.commit()
    assert out.is_dir() and not partial.exists()


def test_a_killed_run_leaves_no_run_json_and_the_next_run_finishes(cli_run, tmp_path, monkeypatch):
    """run.json of the previous run stayed while a --from run replaced the outputs it describes."""
    import moepress.compress.quantize as quantize

    rec, out = tmp_path / "r.yaml", tmp_path / "run"
    rec.write_text(yaml.safe_dump({"model": MODEL, "calib": {"num_samples": 4, "seq_len": 32}, "prune": None,
                                   "quantize": {"format": "fp8-block"}, "export": None, "check": None,
                                   "build": None}))
    assert cli_run("run", rec, "-o", out, "--quiet").exit_code == 0
    assert json.loads((out / "run.json").read_text())["stages"]["quantize"]["status"] == "ran"

    def killed(*a, **k):
        raise Killed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "quantize_checkpoint", killed)
        with pytest.raises(Killed):
            cli_run("run", rec, "-o", out, "--from", "quantize", "--quiet")
    assert not (out / "run.json").exists() and (out / "recipe.yaml").is_file()
    assert not list(out.glob("*.tmp"))

    r = cli_run("run", rec, "-o", out, "--quiet")  # not finished last time: runs again, then run.json
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["stages"]["quantize"]["status"] == "ran"
    r = cli_run("run", rec, "-o", out, "--quiet")
    assert json.loads((out / "run.json").read_text())["stages"]["quantize"]["status"] == "skipped"


def test_a_boundary_journaled_before_its_shard_is_not_a_boundary(tmp_path):
    """The background writer journals layer ends that can name a shard still queued at a kill: a resume keeps
    only boundaries whose shards are journaled (keeping the later one wrote a tensor twice)."""
    out = tmp_path / "out"
    w = CheckpointWriter(out, max_shard_bytes=16)
    w.add("l0.a", torch.ones(4))
    w.add("l0.b", torch.ones(2))
    w.end_shard()
    w.add("l1.a", torch.ones(4))  # shard 2, cut by size
    w._lock.release()
    del w
    j = tmp_path / "out.partial" / JOURNAL
    state = json.loads(j.read_text())
    assert state["ends"][-1] == 2 and len(state["shards"]) == 3
    state["ends"] = [*state["ends"], 4]  # shard 3 still in flight at the kill
    j.write_text(json.dumps(state))
    w = CheckpointWriter(out, resume=True, max_shard_bytes=16)
    assert w.written_names == {"l0.a", "l0.b"}
    w.add("l1.a", torch.ones(4))
    w.add("l1.b", torch.ones(2))
    w.commit()
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 4


@pytest.mark.parametrize("change", ["truncated", "one byte", "deleted", "another run's"])
def test_a_kept_shard_changed_since_the_killed_run_is_written_again(cli_run, tmp_path, change):
    """The resume kept every journaled shard as it found it: a truncated one went into a finished output under the
    manifest's sha256 of the bytes first written (exit 0, unreadable), another run's went in unnoticed, a deleted
    one failed at the commit after all the work (and the partial could no longer resume). Each is checked against
    the journal's size and sha256; from the first that differs on, the layers are written again."""
    ref, q = tmp_path / "ref", tmp_path / "q"
    assert cli_run(*ARGS, "-o", ref).exit_code == 0
    other = tmp_path / "other"  # the same layers of another run (another format)
    for out, args in ((q, ARGS), (other, ("quantize", MODEL, "--format", "fp8-dynamic", "--quiet"))):
        with pytest.MonkeyPatch.context() as mp:
            _kill_before_commit(mp)
            with pytest.raises(Killed):
                cli_run(*args, "-o", out)
    partial = tmp_path / "q.partial"
    shard = partial / json.loads((partial / JOURNAL).read_text())["shards"][1][0]  # layer 0's
    if change == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif change == "one byte":
        b = bytearray(shard.read_bytes())
        b[-10] ^= 1
        shard.write_bytes(bytes(b))
    elif change == "deleted":
        shard.unlink()
    else:
        shard.write_bytes((tmp_path / "other.partial" / shard.name).read_bytes())
    r = cli_run(*ARGS, "--resume", "-o", q)
    assert r.exit_code == 0, r.output
    assert _digest(q) == _digest(ref)
    assert json.loads((q / "moepress-manifest.json").read_text())["files"] == \
        json.loads((ref / "moepress-manifest.json").read_text())["files"]


def test_an_input_changed_behind_its_unchanged_manifest_is_another_input(cli_run, tmp_path):
    """A moepress output as input: its identity was its moepress-manifest.json's digests, so a shard edited beside
    an unchanged manifest resumed a partial of the old bytes (layers of both inputs in one output, exit 0)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    assert cli_run("prune", MODEL, "--method", "frequency", "--ratio", "0.25", "-o", src, "--quiet").exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        _kill_before_commit(mp)
        with pytest.raises(Killed):
            cli_run("quantize", src, "--format", "fp8-dynamic", "--quiet", "-o", tmp_path / "q")
    f = next(p for p in sorted(src.glob("model-*.safetensors"))
             if any(k.startswith("model.layers.0.") for k in load_file(p)))
    t = load_file(f)
    t = {k: v * 3 if k.endswith("q_proj.weight") else v for k, v in t.items()}
    manifest = (src / "moepress-manifest.json").read_bytes()
    save_file(t, str(f), metadata={"format": "pt"})
    assert (src / "moepress-manifest.json").read_bytes() == manifest
    r = cli_run("quantize", src, "--format", "fp8-dynamic", "--quiet", "--resume", "-o", tmp_path / "q")
    assert r.exit_code == 2 and f.name in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    shutil.rmtree(tmp_path / "q.partial")


def test_commit_says_committing_before_it_renames_a_shard_and_a_resume_takes_nothing_of_such_a_partial(
        tmp_path, monkeypatch):
    """commit journals "committing" before its first shard rename; a partial killed after that (shards partly
    renamed, a stray file of the killed run beside them) is cleared by the next run, even under --resume: the
    output holds only what the new run wrote."""
    out, seen = tmp_path / "out", []
    real = CheckpointWriter._name_shards

    def spy(self):
        seen.append(json.loads((self.partial / JOURNAL).read_text()).get("committing"))
        return real(self)
    monkeypatch.setattr(CheckpointWriter, "_name_shards", spy)
    w = CheckpointWriter(out, max_shard_bytes=16)
    w.add("a", torch.ones(4))
    w.end_shard()
    w.commit()
    assert seen == [True]
    w = CheckpointWriter(tmp_path / "killed", max_shard_bytes=16)
    w.add("a", torch.ones(4))
    w.end_shard()
    w._write_journal(committing=True)  # killed here, one shard renamed already
    (w.partial / "model-00001-of-00002.safetensors").write_bytes(b"from the killed run")
    w._lock.release()
    del w
    w = CheckpointWriter(tmp_path / "killed", resume=True, max_shard_bytes=16)
    assert w.written_names == set() and not any((tmp_path / "killed.partial").glob("model-*"))
    w.add("b", torch.ones(2))
    w.end_shard()
    w.commit()
    files = sorted(p.name for p in (tmp_path / "killed").glob("*.safetensors"))
    assert files == ["model-00001-of-00001.safetensors"], files  # no stray shard of the killed run
