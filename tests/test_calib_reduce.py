"""Data-parallel calibration statistics (``calib/distributed.py``), two gloo processes over a file store, no
model: every ``LayerRouting`` field and the token count summed over ranks (a field left out, e.g.
``reap_count``, would mix every rank's REAP sum with rank 0's count), and the absmax union of the names
each rank saw. The oracle adds the ranks' statistics field by field."""

import os

import pytest
import torch

import forkserver

E, K = 5, 2


def _rank_stats(rank):
    from moepress.calib.observers import LayerRouting, RoutingStats

    g = torch.Generator().manual_seed(100 + rank)
    st = RoutingStats()
    for i in (1, 3):
        lr = LayerRouting(E, K)
        lr.tokens = 10 + rank + i
        for f in LayerRouting._FIELDS:
            t = getattr(lr, f)
            if t.dtype == torch.int64:
                setattr(lr, f, torch.randint(0, 50, t.shape, generator=g))
            else:
                setattr(lr, f, torch.rand(t.shape, generator=g, dtype=torch.float64))
        st.layers[i] = lr
    amax = {"shared": torch.rand(4, generator=g) * (rank + 1)}
    amax[f"only_rank{rank}"] = torch.rand(3, generator=g)  # an expert that got tokens on this rank alone
    return st, amax


def _worker(rank, world, init_file, out):
    import torch.distributed as tdist

    from moepress.calib import distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    st, amax = _rank_stats(rank)
    env = dist.current()
    dist.all_reduce_routing(st, env)
    amax = dist.all_reduce_absmax(amax, env)
    torch.save({"layers": {i: {f: getattr(lr, f) for f in (*lr._FIELDS, "tokens")} for i, lr in st.layers.items()},
                "amax": amax}, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_routing_sums_every_field_and_absmax_keeps_every_name(tmp_path):

    from moepress.calib.observers import LayerRouting

    forkserver.spawn(_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    (a, am), (b, bm) = _rank_stats(0), _rank_stats(1)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert sorted(got["layers"]) == [1, 3]
        for i in (1, 3):
            x, y = a.layers[i], b.layers[i]
            assert got["layers"][i]["tokens"] == x.tokens + y.tokens
            for f in LayerRouting._FIELDS:
                want = getattr(x, f) + getattr(y, f)
                have = got["layers"][i][f]
                assert have.dtype == want.dtype and have.shape == want.shape, f
                assert torch.equal(have, want), f"layer {i} {f}"  # two addends: exact in any order
        assert set(got["amax"]) == {"shared", "only_rank0", "only_rank1"}
        assert torch.equal(got["amax"]["shared"], torch.maximum(am["shared"], bm["shared"]))
        assert torch.equal(got["amax"]["only_rank0"], am["only_rank0"])
        assert torch.equal(got["amax"]["only_rank1"], bm["only_rank1"])
