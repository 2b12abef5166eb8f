"""Checkpoint layer: lazy reads, sharded atomic writes (issue #2)."""

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch

from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.errors import MoepressError


def test_roundtrip_dtypes_and_shards(tmp_path):
    tensors = {
        "a.weight": torch.randn(64, 32).to(torch.bfloat16),
        "b.weight": torch.randn(16, 16).to(torch.float8_e4m3fn),
        "c.bias": torch.randn(7, dtype=torch.float16),
        "d.scale": torch.tensor(3.5),
        "e.packed": torch.randint(0, 255, (5, 3), dtype=torch.uint8),
        "f.ids": torch.arange(10, dtype=torch.int32),
    }
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=2048) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.end_shard()
        w.write_json("config.json", {"model_type": "x"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    r = CheckpointReader(out)
    assert set(r.names()) == set(tensors)
    for k, v in tensors.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert r.bytes_by_dtype()["BF16"] == 64 * 32 * 2


def test_interrupted_write_leaves_nothing_that_looks_finished(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, max_shard_bytes=10) as w:
            w.add("a", torch.zeros(100))
            assert (tmp_path / "out.partial").is_dir() and not out.exists()
            raise RuntimeError("killed")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_output_not_empty_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(MoepressError, match="not empty.*--force"):
        CheckpointWriter(out)
    with pytest.raises(MoepressError, match="--force replaces only an output a moepress stage wrote"):
        CheckpointWriter(out, force=True)  # old.txt alone: no stage wrote it
    (out / "moepress-manifest.json").write_text("{}")  # an earlier output
    with CheckpointWriter(out, force=True) as w:
        w.add("a", torch.ones(3))
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_a_kill_after_the_old_output_moved_aside_leaves_it_for_the_next_writer(tmp_path, monkeypatch):
    """--force moved the old OUT to OUT.old-<pid> and removed it after installing the new one: a kill in
    between left a full copy of the old model there for ever. It waits at OUT.partial.old now, which the
    next writer of OUT removes before it writes."""
    import moepress.outputs as outputs

    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.add("old", torch.ones(3))
    calls = []

    def clear(o):  # install clears twice: before moving the old OUT aside, and after; the kill is between
        calls.append(o)
        if len(calls) == 2:
            raise RuntimeError("killed")
        shutil.rmtree(outputs.retired(o), ignore_errors=True)
    with monkeypatch.context() as mp:
        mp.setattr(outputs, "clear_retired", clear)
        with pytest.raises(RuntimeError, match="killed"):
            with CheckpointWriter(out, force=True) as w:
                w.add("new", torch.ones(3))
    left = tmp_path / "out.partial.old"
    index = out / "model.safetensors.index.json"
    assert index.is_file() and "new" in index.read_text()
    assert left.is_dir() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.old")) == []
    w = CheckpointWriter(out, force=True)
    assert not left.exists()
    w.add("newer", torch.ones(3))
    w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_given_as_a_symlink_is_written_where_it_points(tmp_path):
    """`-o LINK`: the link itself was renamed aside and replaced by a directory, its target left as it was
    and `LINK.old-<pid>` left behind."""
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    with CheckpointWriter(link) as w:
        w.add("a", torch.ones(3))
    assert link.is_symlink() and (target / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_resume_keeps_finished_shards(tmp_path):
    out = tmp_path / "out"
    w = CheckpointWriter(out)
    w.add("layer0", torch.ones(3))
    w.end_shard()
    w.add("layer1-unfinished", torch.ones(3))  # buffered, never flushed: lost on a kill
    del w
    w = CheckpointWriter(out, resume=True)
    assert w.written_names == {"layer0"}
    w.add("layer1", torch.zeros(3))
    w.commit()
    assert set(CheckpointReader_names(out)) == {"layer0", "layer1"}


def CheckpointReader_names(path):
    (path / "config.json").write_text("{}")
    return CheckpointReader(path).names()


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    from moepress.manifest import MANIFEST_NAME, read_manifest, sha256_file

    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=100) as w:
        w.manifest["stage"] = "test"
        for i in range(3):
            w.add(f"t{i}", torch.full((40,), float(i)))
        w.write_json("config.json", {"a": 1})
    m = read_manifest(out)
    assert m["stage"] == "test" and m["versions"]["torch"] == metadata.version("torch")
    assert m["versions"]["python"] == platform.python_version()
    files = {p.name for p in out.iterdir() if p.name != MANIFEST_NAME}
    assert set(m["files"]) == files
    for name, d in m["files"].items():
        assert d["sha256"] == sha256_file(out / name) and d["size"] == (out / name).stat().st_size


def test_index_total_size_is_the_tensors_bytes(tmp_path):
    out = tmp_path / "ck"
    with CheckpointWriter(out, max_shard_bytes=16) as w:
        w.add("a", torch.ones(4))
        w.add("b", torch.ones(3, dtype=torch.bfloat16))
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == 22


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused_at_open(tmp_path):
    import struct

    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MoepressError, match="holds 16 bytes"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("nbytes,pooled", [(1 << 20, False), (8 << 20, False), (8 << 20, True)])
def test_a_shard_truncated_after_open_is_an_error_not_garbage(tmp_path, nbytes, pooled):
    """A short read (the file shrank under the reader) is refused; the buffer would hold uninitialised bytes."""
    import os

    from moepress.compress.checkpoint.buffers import BufferPool

    out = tmp_path / "ck"
    with CheckpointWriter(out) as w:
        w.add("a", torch.arange(nbytes // 4, dtype=torch.float32))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = CheckpointReader(out)
    shard = r.info("a").file
    os.truncate(shard, os.path.getsize(shard) - 3 * 4096)
    with pytest.raises(MoepressError, match="truncated"):
        r.get("a", BufferPool(1 << 30) if pooled else None)


def test_an_install_that_fails_puts_the_old_output_back(tmp_path, monkeypatch):
    """The finished partial cannot be renamed in (EXDEV here): the old OUT, already moved aside to
    OUT.partial.old, is renamed back, not left there for the next writer to delete."""
    import errno
    import os

    import moepress.outputs as outputs

    out, work = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    work.mkdir()
    (work / "new.txt").write_text("new")
    real = os.replace

    def replace(a, b):
        if os.fspath(a) == os.fspath(work):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)
    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        outputs.install(work, out)
    assert (out / "old.txt").read_text() == "old" and (work / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]


def test_output_dot_gets_its_manifest_last(tmp_path, monkeypatch):
    """-o .: the new entries move into the current directory one by one; a kill after the first must not leave
    a manifest vouching for a directory whose other files never arrived."""
    import os

    import moepress.outputs as outputs
    from moepress.manifest import MANIFEST_NAME

    here, work = tmp_path / "here", tmp_path / "here.partial"
    here.mkdir()
    work.mkdir()
    for name in ("a.json", MANIFEST_NAME, "z.json"):
        (work / name).write_text("{}")
    monkeypatch.chdir(here)
    real, arrived = os.replace, []

    def replace_then_die(a, b):
        real(a, b)
        if os.path.dirname(os.fspath(b)) == os.fspath(here):
            arrived.append(os.path.basename(os.fspath(b)))
            raise KeyboardInterrupt  # the kill, right after the first entry arrived
    monkeypatch.setattr(outputs.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        outputs.install(work, here)
    assert len(arrived) == 1 and arrived[0] != MANIFEST_NAME and not (here / MANIFEST_NAME).exists()


def test_output_dot_gets_its_config_next_to_last(tmp_path, monkeypatch):
    """-o .: a kill mid-way left config.json and some shards without the manifest, which transformers loads as
    a finished checkpoint; config.json (and model.onnx) now arrive after every other entry, the manifest last."""
    import os

    import moepress.outputs as outputs
    from moepress.manifest import MANIFEST_NAME

    here, work = tmp_path / "here", tmp_path / "here.partial"
    here.mkdir()
    work.mkdir()
    for name in ("a.json", "config.json", MANIFEST_NAME, "model-00001.safetensors", "model.onnx", "z.json"):
        (work / name).write_text("{}")
    monkeypatch.chdir(here)
    real, arrived = os.replace, []

    def replace(a, b):
        real(a, b)
        arrived.append(os.path.basename(os.fspath(b)))
    monkeypatch.setattr(outputs.os, "replace", replace)
    outputs.install(work, here)
    assert arrived[-1] == MANIFEST_NAME and sorted(arrived[-3:-1]) == ["config.json", "model.onnx"]


def test_file_digests_cover_nested_files_by_their_relative_path(tmp_path):
    """Every file under the directory, subfolders included, by its relative path (hashlib and the byte count
    as the oracle); the manifest itself is left out."""
    import hashlib

    from moepress.manifest import MANIFEST_NAME, file_digests

    (tmp_path / "sub" / "deep").mkdir(parents=True)
    files = {"a.bin": b"a", "sub/a.bin": b"bb", "sub/deep/c.txt": b"ccc"}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    (tmp_path / MANIFEST_NAME).write_text("{}")
    assert file_digests(tmp_path) == {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                      for rel, d in files.items()}


def test_every_tokenizer_file_travels_with_the_outputs(tmp_path):
    """Each file calib.tokenizer reads a vocabulary from is one that every stage copies (aux_files): Kimi K2's
    vocabulary is tiktoken.model (beside tokenization_kimi.py, no tokenizer.json), which outputs lacked, so a
    pruned / quantized / exported Kimi K2 had a tokenizer that loads nowhere."""
    from moepress.calib.tokenizer import TOKENIZER_FILES
    from moepress.compress.checkpoint.auxiliary import aux_files

    for n in TOKENIZER_FILES:
        (tmp_path / n).write_text("x")
    assert {p.name for p in aux_files(tmp_path)} >= set(TOKENIZER_FILES)


def test_an_index_spelling_one_shard_two_ways_is_one_shard(tmp_path):
    """weight_map entries naming the same shard as "./model-00001-of-00002.safetensors" and
    "model-00001-of-00002.safetensors" (one file, as os.path.join and transformers read them): every tensor of that
    shard is listed, so nothing is a stray; the reader serves each tensor as safetensors reads it from the file."""
    from safetensors.torch import load_file

    from moepress import models

    ck = Path(shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / "c"))
    idx = ck / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    wm = data["weight_map"]
    shard = sorted(set(wm.values()))[0]
    mine = sorted(n for n in wm if wm[n] == shard)
    for n in mine[::2]:
        wm[n] = "./" + shard
    idx.write_text(json.dumps(data))
    r = CheckpointReader(ck)
    assert set(r.names()) == set(wm)
    want = load_file(ck / shard)
    assert set(want) == set(mine)
    for n in mine[:4]:
        assert torch.equal(r.get(n), want[n]), n


def test_the_manifest_records_torch_s_cpu_thread_count(tmp_path):
    """Calibrated bytes depend on it in their last bits (OMP_NUM_THREADS 1 vs 2): what reproducing them needs."""
    import torch

    from moepress.manifest import versions

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert versions()["torch_threads"] == "3"
    finally:
        torch.set_num_threads(before)
