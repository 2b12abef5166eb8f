"""Token files (``calib/cache.py``) and prepared sources (``calib/data.py``) against safetensors' safe_open,
hashlib, os.stat and transformers' tokenizer: the file holds int32 tensors under its format's header, the
sidecar's sha256 and size are the file's, files get the umask's permissions, a sidecar of another version or
shape is refused; a prepared source gives its first samples (not copied into the cache), refuses another
tokenizer's file and a token id past the vocabulary."""

import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from helpers import assert_one_line_error
from moepress import models
from moepress.calib.cache import load_token_file, save_token_file
from moepress.calib.data import calibration_set
from moepress.calib.tokenizer import tokenizer_fingerprint
from moepress.errors import MoepressError

QWEN = models.path("tiny-qwen3-moe")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


def _save(tmp_path, ids, **meta):
    p = tmp_path / "t.safetensors"
    save_token_file(p, ids, torch.zeros(ids.shape[0], dtype=torch.long),
                    {"num_samples": ids.shape[0], "seq_len": ids.shape[1], **meta})
    return p


def test_a_token_file_is_what_its_sidecar_says(tmp_path):
    ids = torch.arange(12).view(3, 4)
    p = _save(tmp_path, ids)
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"format": "moepress-calib", "version": "1"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: v.dtype for k, v in got.items()} == {"input_ids": torch.int32, "source": torch.int32}
    assert torch.equal(got["input_ids"].long(), ids)
    side = json.loads((tmp_path / "t.safetensors.json").read_text())
    data = p.read_bytes()
    assert side["file"]["sha256"] == hashlib.sha256(data).hexdigest() and side["file"]["size"] == len(data)


def test_a_run_killed_between_its_two_writes_leaves_no_token_file(tmp_path, monkeypatch):
    """The token file was written before its sidecar: a kill between left it alone, and a rerun refused it as
    existing ("pass --force") although nothing could load it. Killed after the first write, no token file."""
    import moepress.calib.cache as cache

    real, writes = cache._atomic_write, []

    def killed_after_one(path, data):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(cache, "_atomic_write", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, torch.arange(12).view(3, 4))
    assert not (tmp_path / "t.safetensors").exists()


def test_a_token_file_is_the_same_bytes_each_time(tmp_path):
    """safetensors.torch.save wrote the header's __metadata__ in its hash map's order (another one in each
    process, or each call), so identical token files had other sha256s."""
    ids = torch.arange(12).view(3, 4)
    data = {_save(tmp_path, ids).read_bytes() for _ in range(20)}
    assert len(data) == 1
    (blob,) = data
    n = int.from_bytes(blob[:8], "little")
    assert blob[8:8 + n].decode().startswith('{"__metadata__":{"format":"moepress-calib","version":"1"}')


def test_a_failed_or_killed_write_leaves_no_sidecar_alone_nor_its_temporary_file(tmp_path, monkeypatch, cli_run):
    """A full disk at the token file left its sidecar, and `calib prepare` refused the rerun ('exists'); a kill
    mid-write left a hidden temporary file of a random name that no run removed."""
    import errno
    import subprocess

    import moepress.calib.cache as cache

    real = cache._atomic_write

    def full_at_the_token_file(path, data):
        if path.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(cache, "_atomic_write", full_at_the_token_file)
    with pytest.raises(OSError):
        _save(tmp_path, torch.arange(12).view(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []
    monkeypatch.setattr(cache, "_atomic_write", real)
    (tmp_path / "t.safetensors.json").write_text('{"format": "moepress-calib"}')  # a kill between the writes
    dead = subprocess.Popen(["true"])  # a pid no process has now
    dead.wait()
    (tmp_path / f".t.safetensors.{dead.pid}.tmp").write_bytes(b"x" * 100)
    r = cli_run("calib", "prepare", "tiny-qwen3-moe", "--num-samples", "2", "--seq-len", "16", "-o",
                tmp_path / "t.safetensors", "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["t.safetensors", "t.safetensors.json"]
    load_token_file(tmp_path / "t.safetensors")


def test_a_live_writers_temporary_file_is_left_alone(tmp_path, monkeypatch):
    """Only a dead writer's temporary file is removed: one of a live process (another `calib prepare` writing the
    same name) or of a process os.kill may not signal (another user's) is still being written."""
    real_kill = os.kill
    other_users = 4_000_000  # a pid os.kill is refused on, as another user's

    def kill(pid, sig):
        if pid == other_users:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    live = [tmp_path / f".t.safetensors.{pid}.tmp" for pid in (os.getppid(), other_users)]
    for p in live:
        p.write_bytes(b"x" * 100)
    load_token_file(_save(tmp_path, torch.arange(12).view(3, 4)))
    assert all(p.is_file() and p.read_bytes() == b"x" * 100 for p in live)


def test_token_files_get_the_umasks_permissions(tmp_path):
    """Written through mkstemp (mode 0600): a shared cache or a prepared file was unreadable by the group."""
    old = os.umask(0o027)
    try:
        p = _save(tmp_path, torch.arange(8).view(2, 4))
    finally:
        os.umask(old)
    assert [stat.S_IMODE(f.stat().st_mode) for f in (p, tmp_path / "t.safetensors.json")] == [0o640, 0o640]


@pytest.mark.parametrize("edit,needle", [
    ({"version": 2}, "expected format 'moepress-calib' version 1, got 'moepress-calib' version 2"),
    ({"seq_len": 6}, r"expected tensors input_ids \[3, 6\] and source \[3\]"),
])
def test_a_sidecar_of_another_version_or_shape_is_refused(tmp_path, edit, needle):
    p = _save(tmp_path, torch.arange(12).view(3, 4))
    side_p = tmp_path / "t.safetensors.json"
    side_p.write_text(json.dumps({**json.loads(side_p.read_text()), **edit}))
    with pytest.raises(MoepressError, match=needle):
        load_token_file(p)


def test_a_prepared_source_gives_its_first_samples(tmp_path):
    ids = torch.arange(40).view(5, 8)
    p = _save(tmp_path, ids, tokenizer={"sha256": tokenizer_fingerprint(QWEN)["sha256"]})
    cs = calibration_set(QWEN, (str(p),), num_samples=3, seq_len=8)
    assert torch.equal(cs.input_ids, ids[:3]) and cs.meta["sources"][0]["documents_used"] == 3
    assert list((tmp_path / "cache").rglob("*.safetensors")) == []  # the file is its own cache: not copied


def test_a_prepared_source_alone_records_the_seed_that_drew_it(tmp_path):
    """Its first rows whatever --seed: the samples of --seed 0 and --seed 7 were the same, and stats.json /
    the manifests said 0 and 7."""
    ids = torch.arange(40).view(5, 8)
    p = _save(tmp_path, ids, tokenizer={"sha256": tokenizer_fingerprint(QWEN)["sha256"]}, seed=3)
    got = [calibration_set(QWEN, (str(p),), num_samples=3, seq_len=8, seed=s) for s in (0, 7)]
    assert all(torch.equal(c.input_ids, ids[:3]) and c.meta["seed"] == 3 for c in got)


def test_a_prepared_source_of_another_tokenizer_is_refused(tmp_path):
    p = _save(tmp_path, torch.arange(16).view(2, 8), tokenizer={"sha256": "0" * 64, "model": "other-model"})
    with pytest.raises(MoepressError, match="prepared with another tokenizer.*made for other-model"):
        calibration_set(QWEN, (str(p),), num_samples=2, seq_len=8)


def test_a_token_id_past_the_vocabulary_is_refused(tmp_path):
    vocab = len(AutoTokenizer.from_pretrained(str(QWEN)))
    sha = tokenizer_fingerprint(QWEN)["sha256"]
    last = torch.full((1, 8), vocab - 1)
    assert torch.equal(calibration_set(QWEN, (str(_save(tmp_path, last, tokenizer={"sha256": sha})),),
                                       num_samples=1, seq_len=8).input_ids, last)
    for bad in (vocab, -3):  # a negative id was caught only by the forward, the file unnamed
        past = last.clone()
        past[0, 3] = bad
        f = _save(tmp_path, past, tokenizer={"sha256": sha})
        with pytest.raises(MoepressError, match=f"--calib {f}: token id {bad} is outside the tokenizer's vocabulary "
                                                f"\\(0..{vocab - 1}\\)"):
            calibration_set(QWEN, (str(f),), num_samples=1, seq_len=8)


def test_token_ids_past_the_models_embedding_are_refused_when_prepared(tmp_path, cli_run):
    """A tokenizer larger than the model's embedding (config.json vocab_size 256 under the bundled 4096-token
    tokenizer): `calib prepare` refuses, naming the source and the config, instead of writing a token file that
    every stage refuses later ("token id ... out of range")."""
    src = models.path("tiny-qwen3-moe")
    m = tmp_path / "m"
    m.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).write_bytes((src / f).read_bytes())
    (m / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "vocab_size": 256}))
    r = cli_run("calib", "prepare", m, "-o", tmp_path / "t.safetensors", "--num-samples", "2", "--seq-len", "16")
    line = assert_one_line_error(r, "past the model's embedding", "config.json vocab_size 256")
    assert "--calib" in line and not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_token_ids_are_refused_not_truncated(tmp_path, dtype):
    """A token file whose input_ids are floats (325.7), its sidecar's sha256 matching: read as ids 325, other
    tokens than the file's author meant."""
    from safetensors.torch import save_file

    p = _save(tmp_path, torch.arange(12).view(3, 4))
    save_file({"input_ids": (torch.arange(12).view(3, 4) + 0.7).to(dtype), "source": torch.zeros(3, dtype=torch.int32)},
              str(p), metadata={"format": "moepress-calib", "version": "1"})
    side_p = tmp_path / "t.safetensors.json"
    data = p.read_bytes()
    side = json.loads(side_p.read_text())
    side["file"].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    side_p.write_text(json.dumps(side))
    with pytest.raises(MoepressError, match=f"tensor 'input_ids' is {str(dtype).removeprefix('torch.')}; expected "
                                            "integer token ids"):
        load_token_file(p)
