"""MODEL as a Hugging Face Hub id (``org/name``, ``org/name@revision``) found in the local Hub cache, as
``hf download`` leaves a checkpoint: ``models--org--name/snapshots/<commit>/`` whose files are relative
symbolic links into ``blobs/``, ``refs/main`` naming the commit (huggingface_hub's cache layout:
huggingface_hub/file_download.py, ``_create_symlink`` and ``_cache_commit_hash_for_specific_revision``).
The fixture's layout is checked with huggingface_hub's own ``scan_cache_dir`` before it is used."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file

from moepress import models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo: str, model: Path) -> Path:
    """``model``'s files in a Hub cache at ``root`` under ``repo`` at revision ``COMMIT`` (main)."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    for f in sorted(model.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob), snap / f.name)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub cache holding tiny-mixtral as ``org/tiny-mixtral`` (HF_HUB_CACHE points at it)."""
    root = tmp_path / "hub"
    snap = _hub_cache(root, "org/tiny-mixtral", models.path("tiny-mixtral"))
    info = scan_cache_dir(root)
    assert not info.warnings and [r.repo_id for r in info.repos] == ["org/tiny-mixtral"]
    assert [r.commit_hash for r in next(iter(info.repos)).revisions] == [COMMIT]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


@pytest.mark.parametrize("given", ["org/tiny-mixtral", f"org/tiny-mixtral@{COMMIT}"])
def test_hub_id_resolves_to_its_cached_snapshot(hub, given):
    assert models.resolve(given) == hub


def test_quantize_of_a_hub_id_equals_quantize_of_the_checkpoint_folder(hub, cli_run, tmp_path):
    a, b = tmp_path / "by-id", tmp_path / "by-path"
    for src, out in (("org/tiny-mixtral", a), (models.path("tiny-mixtral"), b)):
        r = cli_run("quantize", src, "--format", "fp8", "-o", out, "--quiet")
        assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in b.glob("*.safetensors"))
    assert shards and sorted(p.name for p in a.glob("*.safetensors")) == shards
    for name in shards:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
    # the tokenizer is copied as a file, not as a link into the cache's blobs
    assert (a / "tokenizer.json").is_file() and not (a / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("given, hint", [
    ("org/not-cached", "hf download org/not-cached)"),
    ("org/tiny-mixtral@v2", "hf download org/tiny-mixtral --revision v2)"),
])
def test_a_hub_id_not_in_the_cache_is_refused_with_the_download_command(hub, cli_run, tmp_path, given, hint):
    r = cli_run("inspect", given)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and given in lines[0] and "local cache" in lines[0] and hint in lines[0], r.output


@pytest.mark.parametrize("given", ["no-such-model", "out/pruned"])  # out/ exists: a mistyped local path
def test_a_name_that_is_no_hub_id_gets_no_hub_hint(hub, cli_run, tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    r = cli_run("inspect", given)
    assert r.exit_code == 2 and "no such checkpoint directory" in r.output and "hf download" not in r.output
