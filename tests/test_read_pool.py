"""Recycled read buffers (compress/checkpoint/buffers.py) and the I/O paths that use them: a block is
reused only once every tensor viewing it is gone, pooled reads (O_DIRECT or through the page cache)
give the stored bytes, and a read-ahead stream recycles the blocks its consumer frees. The shard
writer's reused bounce buffer gives the same files as a buffered write."""

import gc
import hashlib

import pytest
import torch

from moepress.compress import stream
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, write_safetensors
from moepress.compress.checkpoint import safetensors_io as ckpt_io
from moepress.compress.checkpoint.buffers import GRAIN, POOL_MIN_BYTES, BufferPool
from moepress.compress.stream import read_ahead


def test_a_block_comes_back_only_when_its_last_view_is_gone():
    pool = BufferPool(keep_bytes=1 << 30)
    t = pool.lease(100_000)
    assert t.numel() >= 100_000 and t.data_ptr() % 4096 == 0  # page-aligned, as O_DIRECT needs
    ptr = t.data_ptr()
    t[:8] = 7
    view = t[4:1000].view(torch.int16)
    del t
    gc.collect()
    assert pool.idle_bytes == 0  # a view still uses the block
    arr = view.numpy()
    del view
    assert pool.idle_bytes == 0  # so does a numpy array over it
    del arr
    assert pool.idle_bytes == GRAIN * 2
    again = pool.lease(70_000)  # same rounded size: the same memory
    assert again.data_ptr() == ptr and (pool.reused, pool.mapped) == (1, 1) and pool.idle_bytes == 0
    other = pool.lease(100_000)  # the block is lent: a new one
    assert other.data_ptr() != ptr and pool.mapped == 2


def test_idle_blocks_are_bounded_and_the_least_recent_size_goes_first():
    pool = BufferPool(keep_bytes=3 * GRAIN)
    big = pool.lease(2 * GRAIN)  # a size that does not come back (like a first dense layer's MLP)
    small = [pool.lease(GRAIN) for _ in range(3)]
    del big
    assert pool.idle_bytes == 2 * GRAIN
    del small[0]
    assert pool.idle_bytes == 3 * GRAIN
    del small[0]  # over the bound: the big block (returned least recently) is dropped, not this one
    assert pool.idle_bytes == 2 * GRAIN
    assert [pool.lease(GRAIN) for _ in range(2)] and pool.reused == 2
    del small
    assert pool.idle_bytes <= 3 * GRAIN


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Sizes around the pool's threshold, none a multiple of 4 KiB, so they start and end off any page."""
    g = torch.Generator().manual_seed(3)
    ts = {"a.norm": torch.randn(77, generator=g)}
    for i, (rows, cols) in enumerate([(257, 513), (129, 1031), (600, 2049), (1, 4099), (1031, 77)]):
        ts[f"l{i}.weight"] = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    ts["m.packed"] = torch.randint(0, 255, (POOL_MIN_BYTES + 13,), dtype=torch.uint8, generator=g)
    return ts


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    ts = _odd_tensors()
    d = tmp_path_factory.mktemp("pool") / "c"
    with CheckpointWriter(d) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.write_json("config.json", {"model_type": "x"})
    return d, ts


@pytest.mark.parametrize("direct", [True, False])
def test_pooled_reads_give_the_stored_tensors(odd_checkpoint, monkeypatch, direct):
    d, ts = odd_checkpoint
    r = CheckpointReader(d)
    if not direct:  # a file system that refuses O_DIRECT: pooled reads through the page cache
        monkeypatch.setattr(CheckpointReader, "_direct_fd", lambda self, file: None)
    pool = BufferPool(keep_bytes=1 << 30)
    for _ in range(2):  # the second round reads into recycled blocks holding the first round's bytes
        for k, v in ts.items():
            got = r.get(k, pool)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
            del got
    pooled = sum(v.numel() * v.element_size() >= POOL_MIN_BYTES for v in ts.values())
    assert pool.mapped + pool.reused == 2 * pooled and pool.reused >= pooled
    r.close()


def test_read_ahead_recycles_the_blocks_its_consumer_frees(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(4)
    ts = {f"e{i:02d}.weight": torch.randn(97, 1031, generator=g).to(torch.bfloat16) for i in range(16)}  # 200 KB
    with CheckpointWriter(tmp_path / "c") as w:
        for k, v in ts.items():
            w.add(k, v)
        w.write_json("config.json", {"model_type": "x"})
    pools = []

    class Recorded(BufferPool):
        def __init__(self, keep_bytes):
            super().__init__(keep_bytes)
            pools.append(self)

    monkeypatch.setattr(stream, "BufferPool", Recorded)
    r = CheckpointReader(tmp_path / "c")
    names = list(ts) * 4
    kept = []
    for i, (n, t) in enumerate(read_ahead(r, iter(names), budget=3 * 200_000, threads=2)):
        assert torch.equal(t, ts[n]), n
        if i < 3:
            kept.append(t)  # held by the consumer to the end: its block is not lent again meanwhile
        del t
    assert all(torch.equal(t, ts[n]) for t, n in zip(kept, names, strict=False))
    (pool,) = pools
    # live at once: about 4 read ahead (the budget and one more), the one the consumer holds, the three
    # kept, and blocks unmapped when more than the budget came back at once (timing); measured 5-16
    # mapped of 64 reads, where fresh blocks for every read would be 64
    assert pool.mapped + pool.reused == len(names) and pool.mapped <= len(names) // 2, (pool.mapped, pool.reused)
    r.close()


def test_direct_writes_with_a_reused_bounce_buffer_give_the_buffered_files(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    shards = [{f"t{i}.{j}": torch.randn(300 + 7 * i, 211 + j, generator=g).to(torch.bfloat16) for j in range(3)}
              for i in range(3)]
    monkeypatch.setattr(ckpt_io._DirectWriter, "CHUNK", 64 << 10)  # shards span several bounce buffers
    monkeypatch.setattr(ckpt_io, "HASH_BESIDE_MIN", 4096)  # every tensor hashed by the hashing thread
    digests = {}
    for mode, threshold in (("direct", 0), ("buffered", 1 << 60)):
        monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", threshold)
        for i, ts in enumerate(shards):
            p = tmp_path / f"{mode}-{i}.safetensors"
            got = write_safetensors(p, ts, {"format": "pt"})
            data = p.read_bytes()
            assert got == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            digests[mode, i] = got
    assert all(digests["direct", i] == digests["buffered", i] for i in range(3))
