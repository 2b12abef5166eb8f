"""The fast I/O paths of the stream: O_DIRECT reads and writes, read-ahead, the
background shard writer, bf16 weights kept as stored. Each must give the same bytes or the same
numbers as the plain path it replaces."""

import hashlib
import threading

import pytest
import torch
from safetensors.torch import load_file

from moepress.calib.data import eval_batches
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, write_safetensors
from moepress.compress.checkpoint import reader as ckpt_reader
from moepress.compress.checkpoint import safetensors_io as ckpt_io
from moepress.compress.checkpoint import writer as ckpt_writer
from moepress.compress.stream import StoredLinear, StreamedModel, read_ahead
from moepress.models import path as bundled_path


def _tensors():
    g = torch.Generator().manual_seed(0)
    # odd sizes so the big tensors start and end off any 4 KiB boundary
    return {"a.weight": torch.randn(1031, 2053, generator=g).to(torch.bfloat16),
            "b.scale": torch.randn(3, 5, generator=g),
            "c.packed": torch.randint(0, 255, (4_200_001,), dtype=torch.uint8, generator=g),
            "d.weight": torch.randn(1500, 1100, generator=g)}


@pytest.mark.parametrize("direct", [True, False])
def test_write_safetensors_direct_and_buffered_give_the_same_file(tmp_path, monkeypatch, direct):
    ts = _tensors()
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 0 if direct else 1 << 60)
    got = write_safetensors(tmp_path / "x.safetensors", ts, {"format": "pt"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert got == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    back = load_file(tmp_path / "x.safetensors")  # the safetensors library reads it
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 1 << 60 if direct else 0)
    other = write_safetensors(tmp_path / "y.safetensors", ts, {"format": "pt"})
    assert other == got  # byte-identical either way


def _write_in_child(path, queue):
    queue.put(write_safetensors(path, _tensors(), {"format": "pt"}))


def test_a_forked_child_writes_after_the_parent_started_its_hashing_thread(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(ckpt_io, "HASH_BESIDE_MIN", 1024)  # the parent's write starts the hashing thread
    parent = write_safetensors(tmp_path / "parent.safetensors", _tensors(), {"format": "pt"})
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_write_in_child, args=(tmp_path / "child.safetensors", queue))
    child.start()
    child.join(timeout=30)
    if child.is_alive():  # waiting on the parent's thread, which the fork did not copy
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == parent


def test_a_deferred_read_that_fails_names_the_input_tensor(tmp_path, monkeypatch):
    from moepress.compress.checkpoint import read_later
    from moepress.errors import MoepressError

    write_safetensors(tmp_path / "model.safetensors", {"embed.weight": torch.ones(4, 8)})
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    later = read_later(reader, "embed.weight")

    def eio(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt_reader.os, "preadv", eio)
    with pytest.raises(MoepressError, match=r"cannot read tensor 'embed.weight' \(Input/output error\)") as e:
        later.contiguous()
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("direct", [True, False])
def test_reader_direct_and_buffered_reads_agree(tmp_path, monkeypatch, direct):
    ts = _tensors()
    with CheckpointWriter(tmp_path / "c") as w:
        for k, v in ts.items():
            w.add(k, v)
        w.write_json("config.json", {"model_type": "x"})
    monkeypatch.setattr(ckpt_reader, "DIRECT_MIN_BYTES", 1 if direct else 1 << 60)
    r = CheckpointReader(tmp_path / "c")
    for k, v in ts.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    r.close()


def test_read_ahead_yields_every_tensor_in_order_within_its_budget(tmp_path):
    with CheckpointWriter(tmp_path / "c") as w:
        for i in range(20):
            w.add(f"t{i:02d}", torch.full((1024,), float(i)))  # 4 KiB each
        w.write_json("config.json", {"model_type": "x"})
    r = CheckpointReader(tmp_path / "c")
    names = [f"t{i:02d}" for i in range(20)]
    taken = []  # names the read-ahead has taken from its lazy iterable: what it has read or is reading

    def lazy():
        for n in names:
            taken.append(n)
            yield n

    got, ahead = [], []
    for n, t in read_ahead(r, lazy(), budget=3 * 4096):
        got.append((n, t))
        ahead.append(len(taken) - len(got))  # tensors read beyond the one the caller holds
    assert [n for n, _ in got] == names
    assert all(torch.equal(t, torch.full((1024,), float(i))) for i, (_, t) in enumerate(got))
    # never more than the budget ahead, and the budget kept full while names remain (the disk kept busy)
    assert ahead == [min(3, 20 - k) for k in range(1, 21)], ahead
    # a budget below one tensor still reads one at a time
    assert [n for n, _ in read_ahead(r, iter(names), budget=0)] == names


def _stream_threads() -> list[str]:
    """Names of the live threads that read a checkpoint ahead of its consumer (compress/stream.py)."""
    return [t.name for t in threading.enumerate()
            if t.is_alive() and t.name.startswith(("moepress-readahead", "moepress-prefetch"))]


def test_read_ahead_leaves_no_reader_thread_behind(tmp_path):
    with CheckpointWriter(tmp_path / "c") as w:
        for i in range(20):
            w.add(f"t{i:02d}", torch.full((1024,), float(i)))
        w.write_json("config.json", {"model_type": "x"})
    r = CheckpointReader(tmp_path / "c")
    names = [f"t{i:02d}" for i in range(20)]
    assert _stream_threads() == [], "left by an earlier test"
    # exhausted
    it = read_ahead(r, iter(names), budget=4096)
    next(it)
    assert _stream_threads() and all(n.startswith("moepress-readahead_") for n in _stream_threads())  # the check
    # sees the readers while there are some
    assert len(list(it)) == 19
    assert _stream_threads() == []
    # stopped early: closed, or dropped without being closed
    it = read_ahead(r, iter(names), budget=4096)
    next(it)
    assert _stream_threads()
    it.close()
    assert _stream_threads() == []
    it = read_ahead(r, iter(names), budget=4096)
    next(it)
    del it
    assert _stream_threads() == []
    r.close()


@pytest.mark.parametrize("read_ahead_bytes", [None, 1 << 16])  # whole next layer / a bounded distance
def test_layer_stream_leaves_no_reader_thread_behind(read_ahead_bytes):
    sm = StreamedModel(str(bundled_path("tiny-mixtral")), read_ahead_bytes=read_ahead_bytes)
    prefix = "moepress-prefetch" if read_ahead_bytes is None else "moepress-readahead"
    assert _stream_threads() == [], "left by an earlier test"
    layers = sm.layers()
    next(layers)
    assert {n.rsplit("_", 1)[0] for n in _stream_threads()} == {prefix}
    assert len(list(layers)) == sm.num_layers - 1
    assert _stream_threads() == []
    layers = sm.layers()
    next(layers)
    assert _stream_threads()
    layers.close()
    assert _stream_threads() == []


def test_background_writer_gives_the_same_checkpoint(tmp_path):
    ts = _tensors()
    digests = []
    for bg in (False, True):
        out = tmp_path / f"bg-{bg}"
        with CheckpointWriter(out, background=bg, max_shard_bytes=1 << 20) as w:
            for k, v in ts.items():
                w.add(k, v)
                w.end_shard()
            w.write_json("config.json", {"model_type": "x"})
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.glob("*.safetensors"))} | {
            "index": (out / "model.safetensors.index.json").read_text()})
    assert digests[0] == digests[1]


def test_background_writer_error_reaches_the_caller_and_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_writer, "write_safetensors", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        with CheckpointWriter(out, background=True) as w:
            w.add("a", torch.ones(3))
            w.end_shard()
            w.add("b", torch.ones(3))
            w.end_shard()  # waits for the first shard: its error surfaces here or at commit
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_bf16_weights_kept_as_stored_give_identical_logits():
    model = bundled_path("tiny-qwen3-moe")
    ids = torch.cat(eval_batches(model, seq_len=64, max_windows=2))
    plain = StreamedModel(str(model)).forward([ids])[0]
    stored = StreamedModel(str(model), keep_stored=True, read_ahead_bytes=1 << 16)
    layer = next(stored.layers())[1]
    assert any(isinstance(m, StoredLinear) and m.weight.dtype == torch.bfloat16 for m in layer.modules())
    assert torch.equal(stored.forward([ids])[0], plain)


def test_calibration_free_quantize_is_the_same_with_a_worker_pool(tmp_path):
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    model = bundled_path("tiny-mixtral")
    digests = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # 2: groups quantized by a pool of 2 single-threaded workers
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            quantize_checkpoint(model, out, QuantConfig(format="fp8-block"))
            assert torch.get_num_threads() == threads  # restored after the pool
            digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(out.iterdir()) if p.name != "moepress-manifest.json"})
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]


def test_bf16_weights_kept_as_stored_keep_their_biases_as_transformers(tmp_path):
    """Qwen3-MoE with attention_bias: true stored in bf16: the kept-as-stored q/k/v/o linears add their
    biases, as transformers' forward of the same checkpoint does."""
    import transformers as tf

    from helpers import TINY

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**TINY["qwen3_moe"], attention_bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.3)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()(ids).logits
    sm = StreamedModel(str(tmp_path / "m"), keep_stored=True)
    layer = next(sm.layers())[1]
    assert isinstance(layer.self_attn.q_proj, StoredLinear) and layer.self_attn.q_proj.bias is not None
    assert (sm.forward([ids])[0] - want).abs().max().item() <= 1e-6  # measured 0.0


def test_a_bf16_stream_keeps_the_deepseek_router_in_float32_as_transformers():
    """transformers keeps DeepSeek-V3's router weight and correction bias in float32 under dtype=bfloat16
    (_keep_in_fp32_modules_strict); the stream's layers hold the same dtypes."""
    from transformers import AutoModelForCausalLM

    src = bundled_path("tiny-deepseek-v3")
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    want = {k: v.dtype for k, v in hf.model.layers[1].state_dict().items() if ".experts." not in k}
    layer = StreamedModel(str(src), dtype=torch.bfloat16).load_layer(1)
    got = {k: v.dtype for k, v in layer.state_dict().items() if k in want}
    assert got["mlp.gate.weight"] == got["mlp.gate.e_score_correction_bias"] == torch.float32
    assert got == want


def test_safetensors_bytes_are_safetensors_own_bytes_whatever_the_dict_order():
    """The token files' writer (calib/cache.py) lays the tensors out as safetensors does (largest alignment
    first, then by name), whatever order the dict gives them in: the bytes are safetensors.torch.save's
    (no metadata), and with metadata they load back through safetensors as the same tensors."""
    from safetensors.torch import load, save

    t = {"z": torch.arange(6, dtype=torch.int32).view(2, 3), "a": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
         "m": torch.tensor([0.1, 7.0], dtype=torch.float64), "b": torch.tensor([1, 255], dtype=torch.uint8)}
    assert ckpt_io.safetensors_bytes(t) == save(t)
    back = load(ckpt_io.safetensors_bytes(t, {"format": "x", "version": "1"}))
    assert set(back) == set(t) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in t.items())


@pytest.mark.parametrize("layers", [0, 1])
def test_an_interrupt_keeps_the_partial_only_where_a_layer_finished(tmp_path, layers):
    """Ctrl-C before any layer finished said "the finished layers are kept in OUT.partial: rerun with --resume",
    and the --resume then said there was no finished layer to keep: the partial is removed and nothing is said."""
    from moepress.compress.checkpoint.writer import CheckpointWriter

    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt) as e:
        with CheckpointWriter(out, resume_key={"k": 1}) as w:
            for i in range(layers):
                w.add(f"model.layers.{i}.w", torch.ones(4))
                w.end_shard()
            w.add(f"model.layers.{layers}.w", torch.ones(4))  # the layer the interrupt cuts
            raise KeyboardInterrupt
    partial = tmp_path / "o.partial"
    assert getattr(e.value, "kept", None) == (partial if layers else None)
    assert partial.is_dir() == bool(layers) and not out.exists()
