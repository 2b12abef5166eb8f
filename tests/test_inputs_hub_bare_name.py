"""MODEL as a Hub id is `org/name` (README, `moepress --help`: "a Hub id (org/name) already in the local Hub
cache"): a bare name is a (mistyped) local path or a bundled model, never resolved to a Hub cache entry of that
name (a legacy canonical repo such as `gpt2`), even when the cache holds one."""

from __future__ import annotations

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download
from test_inputs_hub_cache import _hub_cache

from moepress import models
from moepress.errors import MoepressError


def test_a_bare_name_is_not_resolved_from_the_hub_cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    snap = _hub_cache(root, "bare-model", models.path("tiny-mixtral"))
    assert [r.repo_id for r in scan_cache_dir(root).repos] == ["bare-model"]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert snapshot_download("bare-model", local_files_only=True, cache_dir=str(root)) == str(snap)  # it is cached
    with pytest.raises(MoepressError, match="bare-model: no such checkpoint directory"):
        models.resolve("bare-model")
