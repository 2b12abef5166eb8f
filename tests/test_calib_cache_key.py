"""The calibration token cache (``calib/cache.py``): another ``num_samples`` is a miss, an edited or
damaged entry is a miss (its sidecar's sha256), an entry under another key's name is a miss, an entry of
another shape under the asked key is a miss, and ``MOEPRESS_CACHE=off`` writes nothing (what a process
built or hashed it reuses); ``~`` in
``MOEPRESS_CACHE`` is the home directory, each size keeps an entry of its own, and a cache that cannot be
written is skipped."""

import os
import shutil

import pytest
import torch

from moepress import models
from moepress.calib import cache as cache_mod
from moepress.calib.data import calibration_set

QWEN = models.path("tiny-qwen3-moe")


def test_another_num_samples_is_not_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    b = calibration_set(QWEN, num_samples=8, seq_len=32, seed=0)
    assert not b.cached and b.input_ids.shape == (8, 32)
    assert torch.equal(b.input_ids, calibration_set(QWEN, num_samples=8, seq_len=32, seed=0, cache=False).input_ids)


@pytest.mark.parametrize("attr, value", [("SAMPLING", cache_mod.SAMPLING - 1),
                                         ("package_digest", lambda *p: "0" * 16),
                                         ("reader_versions", lambda: {"datasets": "0.1", "pyarrow": "0.1"})])
def test_an_entry_drawn_by_other_sampling_code_is_a_miss(tmp_path, monkeypatch, attr, value):
    """The key names the sampling code: its version (cache.SAMPLING; samples drawn by an older moepress, e.g. with
    an EOS after each empty document, were served for the same key) and the calibration package's source digest
    (two sample-changing commits left SAMPLING as it was; audit77 F3)."""
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_mod, attr, value)  # the code before an edit
    calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    monkeypatch.undo()
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    assert not calibration_set(QWEN, num_samples=4, seq_len=32, seed=0).cached
    assert calibration_set(QWEN, num_samples=4, seq_len=32, seed=0).cached


def test_the_calibration_code_digest_follows_its_files(tmp_path, monkeypatch):
    """The digest is of the calibration package's files as they are: one more byte in one of them changes it."""
    import importlib.util

    from moepress import codeid

    root = tmp_path / "calib"
    shutil.copytree(importlib.util.find_spec("moepress.calib").submodule_search_locations[0], root,
                    ignore=shutil.ignore_patterns("__pycache__", "data"))

    class Spec:
        submodule_search_locations = [str(root)]

    monkeypatch.setattr(codeid.importlib.util, "find_spec", lambda name: Spec)
    before = codeid.package_digest.__wrapped__("moepress.calib")
    (root / "sampling.py").write_text((root / "sampling.py").read_text() + "\n")
    assert codeid.package_digest.__wrapped__("moepress.calib") != before


def test_an_edited_cache_entry_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    a = calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    p = tmp_path / "cache" / "calib" / f"{a.meta['key']}.safetensors"
    from safetensors.torch import save_file

    # same shape, same header, other ids: only the sidecar's sha256 tells
    save_file({"input_ids": (a.input_ids.flip(0)).to(torch.int32), "source": torch.zeros(4, dtype=torch.int32)},
              str(p), metadata={"format": "moepress-calib", "version": "1"})
    b = calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    assert not b.cached and torch.equal(b.input_ids, a.input_ids)


def test_a_cache_entry_under_another_keys_name_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    a = calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    b = calibration_set(QWEN, num_samples=4, seq_len=32, seed=1)
    d = tmp_path / "cache" / "calib"
    for suffix in (".safetensors", ".safetensors.json"):  # seed 1's name now holds seed 0's set
        shutil.copy(d / f"{a.meta['key']}{suffix}", d / f"{b.meta['key']}{suffix}")
    again = calibration_set(QWEN, num_samples=4, seq_len=32, seed=1)
    assert not again.cached and torch.equal(again.input_ids, b.input_ids)


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for v in ("off", "0", "none", "false", " OFF "):
        monkeypatch.setenv("MOEPRESS_CACHE", v)
        assert cache_mod.cache_root() is None
    a = calibration_set(QWEN, num_samples=2, seq_len=16, seed=0)  # the last spelling: the calls read the root
    assert not a.cached
    assert list(tmp_path.iterdir()) == []


def test_cache_off_hashes_a_source_and_builds_a_set_once_per_process(tmp_path, monkeypatch):
    """With nothing written, a `run` still hashes its source once and builds one set for its up-front key and
    its stages (a 3.2 GB JSONL: hashed 6 times and indexed 3 times per run)."""
    from moepress.calib import data as data_mod
    from moepress.calib.data import source_hashes
    from moepress.calib.sources import hashing

    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    monkeypatch.setattr(cache_mod, "_PROCESS_SETS", {})
    monkeypatch.setattr(cache_mod, "_PROCESS_HASHES", {})
    src = tmp_path / "corpus.txt"
    src.write_text("a few words of text to calibrate on, again and again.\n" * 200)
    opened, built = [], []
    real_sha = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: opened.append(str(p)) or real_sha(p))
    real = data_mod._sample_source
    monkeypatch.setattr(data_mod, "_sample_source", lambda *a, **k: built.append(1) or real(*a, **k))
    sets = [calibration_set(QWEN, (str(src),), num_samples=2, seq_len=16, seed=0) for _ in range(3)]
    source_hashes([str(src)])
    assert opened.count(str(src)) == 1 and len(built) == 1, (opened, built)
    assert [s.cached for s in sets] == [False, True, True]
    assert all(torch.equal(s.input_ids, sets[0].input_ids) for s in sets)
    sets[1].input_ids.fill_(0)  # a caller's changes do not reach the next one
    assert torch.equal(calibration_set(QWEN, (str(src),), num_samples=2, seq_len=16, seed=0).input_ids,
                       sets[0].input_ids)
    src.write_text("other text, hashed again: its stamp changed.\n" * 200)
    calibration_set(QWEN, (str(src),), num_samples=2, seq_len=16, seed=0)
    assert opened.count(str(src)) == 2 and len(built) == 2
    assert list(tmp_path.iterdir()) == [src]


def test_a_cache_entry_of_another_shape_under_the_asked_key_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    a = calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    b = calibration_set(QWEN, num_samples=8, seq_len=32, seed=0)
    # a well-formed entry, sealed under b's key, holding a's 4 samples (what a key bug would serve)
    cache_mod.cache_put(b.meta["key"], a.input_ids, a.source, {**a.meta, "key": b.meta["key"]})
    again = calibration_set(QWEN, num_samples=8, seq_len=32, seed=0)
    assert not again.cached and torch.equal(again.input_ids, b.input_ids)


def test_a_cache_path_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOEPRESS_CACHE", "~/mc")
    assert cache_mod.cache_root() == tmp_path / "mc" == type(tmp_path)(os.path.expanduser("~/mc"))


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    """MOEPRESS_CACHE names a file: no directory can be made under it, and calibration runs without a cache."""
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "f"))
    (tmp_path / "d.txt").write_text((QWEN.parent.parent / "calib" / "data" / "eval.txt").read_text()[:4000])
    a = calibration_set(QWEN, (str(tmp_path / "d.txt"),), num_samples=2, seq_len=16, seed=0)
    assert not a.cached and a.input_ids.shape == (2, 16) and (tmp_path / "f").read_text() == ""


def test_each_num_samples_and_seq_len_keeps_its_own_entry(tmp_path, monkeypatch):
    """Sizes left out of the key would share one entry, which the shape guard refuses: two sizes would then
    rebuild and overwrite each other on every call instead of both being served from the cache."""
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.txt").write_text((QWEN.parent.parent / "calib" / "data" / "eval.txt").read_text()[:4000])
    sizes = [(4, 16), (8, 16), (4, 24)]
    first = [calibration_set(QWEN, (str(tmp_path / "d.txt"),), num_samples=n, seq_len=s) for n, s in sizes]
    again = [calibration_set(QWEN, (str(tmp_path / "d.txt"),), num_samples=n, seq_len=s) for n, s in sizes]
    assert [c.cached for c in first + again] == [False] * 3 + [True] * 3
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again, strict=True))
    assert len(list((tmp_path / "cache" / "calib").glob("*.safetensors"))) == 3


def test_the_key_follows_the_config_loading_code_the_tokenizer_goes_through(tmp_path, monkeypatch):
    """compress/arch's config loading decides which tokenizer Kimi's tiktoken path builds: an edit there is other
    sampling code (audit80 S10)."""
    import importlib.util

    from moepress import codeid

    root = tmp_path / "arch"
    shutil.copytree(importlib.util.find_spec("moepress.compress.arch").submodule_search_locations[0], root,
                    ignore=shutil.ignore_patterns("__pycache__"))

    class Spec:
        submodule_search_locations = [str(root)]

    real = importlib.util.find_spec
    monkeypatch.setattr(codeid.importlib.util, "find_spec",
                        lambda n: Spec if n == "moepress.compress.arch" else real(n))
    codeid.package_digest.cache_clear()
    try:
        before = cache_mod.cache_key({"tokenizer": "t"})
        (root / "base.py").write_text((root / "base.py").read_text() + "\n")
        codeid.package_digest.cache_clear()
        assert cache_mod.cache_key({"tokenizer": "t"}) != before
    finally:
        codeid.package_digest.cache_clear()
