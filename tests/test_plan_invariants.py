"""Planner figures against hand calculations that no other test pinned (a mutation audit planted each
bug and the suite passed)."""

import json

from moepress import models
from moepress.exporters.plan import plan


def _cfg(**kw):
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    cfg.update(kw)
    return cfg


def test_gqa_kv_cache_with_fewer_kv_heads_than_ranks():
    """2 KV heads at TP 8: one head per rank (replicated), not a quarter of one."""
    cfg = _cfg(num_key_value_heads=2, num_attention_heads=16, head_dim=128)
    p = plan(cfg, "h100", "bf16", gpus=8, max_batch=2, max_seq_len=1024)
    assert p.bytes_per_gpu["kv_cache"] == 2 * 1024 * cfg["num_hidden_layers"] * (2 * 1 * 128) * 2


def test_trtllm_engine_holds_the_whole_vocab_embedding_on_every_rank():
    cfg = _cfg(num_attention_heads=16)
    a = plan(cfg, "h100", "bf16", gpus=2, runtime="trtllm")
    b = plan(cfg, "h100", "bf16", gpus=2, runtime="trtllm-engine")
    assert b.bytes_per_gpu["weights"] - a.bytes_per_gpu["weights"] == cfg["vocab_size"] * cfg["hidden_size"]


def test_twelve_gpus_of_eight_per_node_are_two_nodes():
    cfg = _cfg(num_attention_heads=12, num_key_value_heads=12, head_dim=32, moe_intermediate_size=96)
    p = plan(cfg, "h100", "bf16", gpus=12)
    assert p.gpus == 12 and p.nodes == 2
