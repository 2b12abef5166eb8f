"""kill -9 at a random layer of prune, quantize and export (issue 19's acceptance): a killed quantize
resumes byte-identical to an uninterrupted run; prune and export, which do not resume, leave
nothing named OUT and the next run succeeds (it takes over the killed run's lock and partial)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

import forkserver
from moepress import models
from moepress.pipeline.runner import output_complete

MODEL = "tiny-mixtral"  # 4 layers, 8 experts: the quickest bundled model through every stage
KILL_SEED = 19


def _digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "moepress-manifest.json"}


def _kill_each_at_a_random_layer(runs: list[tuple[list, str]], rnd: random.Random) -> list[int]:
    """Run ``moepress ARGS --json`` for each (ARGS, stage) of ``runs``, in turn, each a process of its own (forked
    from tests/forkserver.py's server); SIGKILL each once its progress events on stderr say ``stage`` finished
    step k, k drawn from 1..total-2 when the stage starts. Returns the k of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ks = []
    for args, stage in runs:
        p = forkserver.Popen([sys.executable, "-m", "moepress", *map(str, args), "--json"], env=env, text=True)
        watchdog = threading.Timer(300, p.kill)
        watchdog.start()
        k, seen = None, []
        try:
            for line in p.follow("err"):
                seen.append(line)
                ev = json.loads(line) if line.startswith("{") else {}
                if ev.get("stage") != stage:
                    continue
                if ev.get("event") == "start":
                    k = rnd.randint(1, ev["total"] - 2)  # at least one step and the commit still to come
                elif ev.get("event") == "progress" and ev.get("done") == k:
                    p.kill()
                    break
            p.wait()
        finally:
            watchdog.cancel()
        assert p.returncode == -signal.SIGKILL, (p.returncode, "".join(seen)[-2000:])
        ks.append(k)
    return ks


@pytest.mark.slow
def test_kill_at_a_random_layer_of_prune_quantize_export(cli_run, tmp_path):
    rnd = random.Random(KILL_SEED)
    m = Path(shutil.copytree(models.path(MODEL), tmp_path / "M"))

    # quantize: killed, then --resume ends byte-identical to an uninterrupted run. Calibrated FP8 on 4 windows of 32
    # tokens (the default 64 x 256 cost ~3 s per run, three runs): every layer's scales still come from the hidden
    # states the layers before it produced, so a resume that rebuilt them otherwise would write other bytes.
    q, ref = tmp_path / "Q", tmp_path / "ref"
    quant = ["quantize", m, "--format", "fp8", "--num-samples", "4", "--seq-len", "32"]
    r = cli_run(*quant, "-o", ref, "--quiet")
    assert r.exit_code == 0, r.output
    # each killed at its random layer, in turn (the draws in this order: quantize, prune, export)
    others = [
        ("P", ["prune", m, "--ratio", "0.25", "--method", "frequency", "--num-samples", "4", "--seq-len", "32"],
         "prune"),
        ("E", ["export", m, "--format", "hf-fp8-block"], "export hf-fp8-block"),
    ]
    ks = _kill_each_at_a_random_layer([([*quant, "-o", q], "quantize"),
                                       *[([*args, "-o", tmp_path / name], stage) for name, args, stage in others]], rnd)
    k = ks[0]
    assert not q.exists() and (tmp_path / "Q.partial" / "writer-journal.json").is_file(), k
    r = cli_run(*quant, "--resume", "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    assert _digest(q) == _digest(ref), f"killed after layer {k}"
    assert not (tmp_path / "Q.partial").exists() and not (tmp_path / "Q.partial.lock").exists()

    # prune and export do not resume: nothing named OUT after the kill, and a rerun succeeds
    for (name, args, stage), k in zip(others, ks[1:], strict=True):
        out = tmp_path / name
        assert not out.exists(), (stage, k)
        r = cli_run(*args, "-o", out, "--quiet")
        assert r.exit_code == 0, (stage, k, r.output)
        assert output_complete(out), (stage, k)
        assert not out.with_name(name + ".partial").exists() and not out.with_name(name + ".partial.lock").exists()
