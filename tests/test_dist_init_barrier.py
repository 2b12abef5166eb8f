"""calib/distributed.py init() joins the group and then waits at a barrier over the group's own
connections before returning, on gloo without device_ids and on NCCL with this rank's GPU. In-process (the torchrun
tests run in forkserver children, which import the installed moepress, and the missing barrier is a race)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from moepress.calib import distributed


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_init_waits_at_a_barrier_after_joining(monkeypatch, backend):
    calls = []
    state = {"init": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "_rendezvous_env", lambda env: None)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: state["init"])

    def init_pg(backend, timeout):
        calls.append(("init", backend))
        state["init"] = True

    monkeypatch.setattr(dist, "init_process_group", init_pg)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    env = distributed.init(backend=backend)
    assert env.rank == 1 and env.world_size == 2 and env.backend == backend
    done = [c for c in calls if c[0] != "set_device"]
    want = {"device_ids": [1]} if backend == "nccl" else {}
    assert done == [("init", backend), ("barrier", want)], calls
    calls.clear()
    distributed.init(backend=backend)  # idempotent: joined already, no second barrier
    assert calls == []
