"""Pruning holds at most two stored layers in memory, whatever the method and the layer count.

The pieces that keep it there, each checked on its own: a layer the stream has moved past drops its
tensors before the next one is read (``release_layers``); a pruned layer copied from the checkpoint
is read tensor by tensor as its shard is written (``Deferred``); the reroute search's cache of
expert outputs grows in blocks, never by a copy of itself. Then the whole stage: the kernel's
high-water mark of a child process (tests/memprobe.py) pruning a checkpoint of 6 layers with
``lookahead`` (the reroute search, and each layer written from the checkpoint one layer later);
bench/prune_quality.py --memory prints every method at 4 and 16 layers.
"""

import pytest
import torch
from safetensors.torch import load_file

from memprobe import MB, run_probe
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointWriter
from moepress.compress.checkpoint.writer import Deferred
from moepress.compress.prune.search import ExpertOutputs
from moepress.compress.stream import StreamedModel
from moepress.compress.synthetic import write_synthetic

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
              intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)
TINY = {**CONFIG, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
        "moe_intermediate_size": 16, "num_hidden_layers": 2}


def test_deferred_tensors_are_read_when_their_shard_is_written_and_give_the_same_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"a.weight": torch.randn(37, 53, generator=g).to(torch.bfloat16), "b.bias": torch.randn(11, generator=g),
          "c.idx": torch.arange(7, dtype=torch.int32)}
    reads = []

    def later(name):
        def load():
            reads.append(name)
            return ts[name]
        return Deferred(ts[name].dtype, ts[name].shape, load)

    with CheckpointWriter(tmp_path / "eager") as w:
        for k, v in ts.items():
            w.add(k, v)
    with CheckpointWriter(tmp_path / "deferred") as w:
        for k in ts:
            w.add(k, later(k))
        assert reads == []  # buffered as dtype and shape only
        w.end_shard()
        assert sorted(reads) == sorted(ts)  # each read once, by the shard write
    a, b = (sorted((tmp_path / d).glob("*.safetensors")) for d in ("eager", "deferred"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    back = load_file(b[0])
    assert all(torch.equal(back[k], v) for k, v in ts.items())


def test_deferred_tensor_that_reads_another_shape_is_refused(tmp_path):
    import pytest

    from moepress.errors import MoepressError

    with pytest.raises(MoepressError, match="expected torch.float32 \\[3\\]"):
        with CheckpointWriter(tmp_path / "o") as w:
            w.add("x", Deferred(torch.float32, (3,), lambda: torch.zeros(4)))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prefetch", [True, False])
def test_released_layer_drops_its_tensors_before_the_next_is_read(tmp_path, prefetch):
    src = write_synthetic({**TINY, "num_hidden_layers": 3}, tmp_path / "m")
    sm = StreamedModel(str(src), keep_stored=True, read_ahead_bytes=1 << 16, release_layers=True, prefetch=prefetch)
    seen, taken = [], None
    for i, layer in sm.layers():
        if seen:  # the previous layer, still named by the caller, holds nothing any more
            assert all(p.is_meta for p in seen[-1].parameters())
        assert not any(p.is_meta for p in layer.parameters())
        if i == 0:  # a tensor taken out of the layer (what a writer holds) stays valid
            taken = layer.state_dict()["post_attention_layernorm.weight"]
            value = taken.clone()
        seen.append(layer)
    assert torch.equal(taken, value)
    kept = StreamedModel(str(src), keep_stored=True, read_ahead_bytes=1 << 16)  # the default keeps them
    layers = [layer for _, layer in kept.layers()]
    assert not any(p.is_meta for p in layers[0].parameters())


def test_expert_output_cache_across_blocks_equals_the_experts(tmp_path):
    with torch.device("meta"):
        moe = get_adapter(TINY).build_layer(0).moe
    moe.to_empty(device="cpu")
    g = torch.Generator().manual_seed(1)
    for p in moe.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    x = torch.randn(100, TINY["hidden_size"], generator=g)
    out = ExpertOutputs(x, moe)  # blocks of 1024 rows: 100 tokens x 32 experts fill four
    t = torch.arange(100)[:, None].expand(100, 32).reshape(-1)
    e = torch.arange(32).repeat(100)
    perm = torch.randperm(t.numel(), generator=g)
    for part in perm.split(700):  # filled in pieces that cross block ends
        out.fill(t[part], e[part])
    assert len(out.blocks) == 4 and out.n == 3200
    idx = torch.randint(0, 32, (100, 4), generator=g)
    w = torch.rand(100, 4, generator=g)
    got = out.combine(torch.arange(100), idx, w)
    with torch.no_grad():
        want = torch.stack([sum(w[r, j] * moe.experts[int(idx[r, j])](x[r:r + 1])[0] for j in range(4))
                            for r in range(100)])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-7)  # measured: 0.077 of rtol=1e-5, atol=1e-6


PROBE = """
    import json, sys, torch
    from moepress.compress.prune import PruneConfig, prune_checkpoint

    torch.set_num_threads(1)  # small ops: one thread is faster on a shared 2-core machine
    src, tiny, out = sys.argv[1:4]
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(ratio=0.5, method="lookahead")  # the search, and layers written one layer later
    prune_checkpoint(tiny, out + "-warm", cfg, batches=[ids % 64])  # torch's first-use allocations
    base = reset_peak()
    res = prune_checkpoint(src, out, cfg, batches=[ids])
    print(json.dumps({"grew": peak() - base, "kept": res["kept"]}))
"""


def test_prune_peak_rss_is_within_two_stored_layers_not_the_model(tmp_path):
    src = write_synthetic(CONFIG, tmp_path / "src")
    tiny = write_synthetic(TINY, tmp_path / "tiny")
    with torch.device("meta"):
        layer = get_adapter(CONFIG).build_layer(0)
    stored = sum(p.numel() for p in layer.state_dict().values()) * 2  # bf16 on disk
    r = run_probe(PROBE, src, tiny, tmp_path / "out")
    assert r["kept"] == 16
    grew = r["grew"]
    msg = f"peak grew {grew / MB:.1f} MB = {grew / stored:.2f} stored layers of {stored / MB:.1f} MB (6 in the model)"
    assert grew <= 2.0 * stored, msg


WIDE = {**CONFIG, "moe_intermediate_size": 512}  # experts 2/3 of the layer: the stored bytes set the peak


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """WIDE in bf16 and in block FP8, each with a tiny checkpoint stored alike for the warm-up."""
    d = tmp_path_factory.mktemp("wide")
    return {store: (write_synthetic(WIDE, d / store, block_fp8=store == "block-fp8"),
                    write_synthetic(TINY, d / f"tiny-{store}", block_fp8=store == "block-fp8"))
            for store in ("bf16", "block-fp8")}


@pytest.mark.parametrize("method", ["lookahead", "merge"])
def test_prune_of_block_fp8_layers_peaks_below_the_same_layers_in_bf16(tmp_path, wide, method):
    """Block FP8 (DeepSeek-V3 and Kimi K2 as they ship) stores a layer in about half the bytes of bf16. The
    stage keeps its quantized linears as stored, decoded at each call, and re-encodes a merged expert as soon as
    it is refit, so its peak stays below that of the same model in bf16. Decoded to float32 when read, such a
    layer costs four times its stored bytes, twice the bf16 layer."""
    probe = PROBE.replace('"lookahead"', f'"{method}"')
    grew = {store: run_probe(probe, src, tiny, tmp_path / store)["grew"] for store, (src, tiny) in wide.items()}
    assert grew["block-fp8"] < grew["bf16"], {k: f"{v / MB:.1f} MB" for k, v in grew.items()}
