"""--search-tokens is taken where --merge (or the method's own merge) folds the dropped experts,
which samples routed tokens; refused with --no-merge where nothing else samples."""
from __future__ import annotations

import pytest
import torch

from moepress.compress.prune import METHODS
from moepress.compress.prune.methods import reads_search_tokens


@pytest.fixture
def handed(monkeypatch):
    import moepress.compress.prune as prune
    import moepress.device as device

    seen = {}

    def stage(src, out, cfg, *, device, **kwargs):
        seen.update(cfg=cfg)
        return {"output": str(out)}

    monkeypatch.setattr(prune, "prune_checkpoint", stage)
    monkeypatch.setattr(device, "resolve", lambda spec: torch.device("cpu"))
    return seen


def test_reads_search_tokens_follows_merge_flag():
    assert reads_search_tokens(METHODS["reap"], True) and reads_search_tokens(METHODS["frequency"], True)
    assert not reads_search_tokens(METHODS["reap"], None) and not reads_search_tokens(METHODS["reap"], False)
    assert reads_search_tokens(METHODS["merge"], None)  # the method's own merge ("always")
    assert reads_search_tokens(METHODS["reroute"], False)  # reroute's search samples tokens, merge or not


def test_search_tokens_with_merge_is_taken(cli_run, tmp_path, handed):
    r = cli_run("prune", "tiny-qwen3-moe", "--ratio", "0.25", "--method", "reap", "--merge", "--search-tokens",
                "100", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert handed["cfg"].search_tokens == 100


def test_search_tokens_with_reroute_is_taken(cli_run, tmp_path, handed):
    r = cli_run("prune", "tiny-qwen3-moe", "--ratio", "0.25", "--method", "reroute", "--no-merge",
                "--search-tokens", "100", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
