"""`torchrun --nproc_per_node 2 -m moepress calib stats` equals the single-process run (issue #3 acceptance)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moepress import models
from moepress.calib.observers import InputAbsMax, RoutingStats

NAME = "tiny-deepseek-v3"  # sigmoid + correction bias + group limit: the routing most worth checking


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, cli_run, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEPRESS_CACHE", str(cache))
    args = ["calib", "stats", str(models.path(NAME)), "--num-samples", "12", "--seq-len", "64", "--batch-size", "4",
            "--absmax", "--quiet"]
    # torchrun gives each worker OMP_NUM_THREADS=1; the reference uses one thread too, so every
    # per-token number is computed the same way and only the order of the float64 sums differs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = cli_run(*args, "-o", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "MOEPRESS_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "moepress", *args, "-o", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote") == 1  # rank 0 alone reports and writes

    one, two = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["calibration"]["key"] == two["calibration"]["key"]
    # the set described alike, whether it was drawn (one) or read back from the cache (two)
    assert {k: v for k, v in one["calibration"].items() if k != "created"} == \
        {k: v for k, v in two["calibration"].items() if k != "created"}
    a, b = (RoutingStats.load(tmp_path / d / "routing.safetensors") for d in ("one", "two"))
    assert sorted(a.layers) == sorted(b.layers) == one["moe_layers"]
    for i in a.layers:
        x, y = a.layers[i], b.layers[i]
        assert x.tokens == y.tokens == 12 * 64
        assert torch.equal(x.counts, y.counts) and torch.equal(x.coselect, y.coselect)
        for f in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(getattr(y, f), getattr(x, f), rtol=1e-6, atol=1e-6)
    assert one["summary"] == two["summary"]  # derived from the counts alone
    ma, mb = (InputAbsMax.load(tmp_path / d / "input_absmax.safetensors").amax for d in ("one", "two"))
    assert set(ma) == set(mb) and ma
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], rtol=1e-6, atol=1e-6)
