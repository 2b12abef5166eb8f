"""Pruning a checkpoint of N layers holds about two float32 layers in memory, not the model.

README ("Pruning memory"): `auto`, the default, peaks at 1.9 float32 layers and does not grow with
the layer count (bench/prune_quality.py --memory prints the figures for 4 and 16 layers). Peak: the
kernel's high-water mark of a child process (tests/memprobe.py).
"""

from memprobe import MB, run_probe
from moepress.compress.synthetic import write_synthetic

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
              intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)
TINY = {**CONFIG, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
        "moe_intermediate_size": 16, "num_hidden_layers": 2}

PROBE = """
    import json, sys, torch
    from moepress.compress.prune import PruneConfig, prune_checkpoint

    torch.set_num_threads(1)  # small ops: one thread is faster on a shared 2-core machine
    src, tiny, out = sys.argv[1:4]
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(ratio=0.5)  # the default method (auto: lookahead, reroute and reap plans)
    prune_checkpoint(tiny, out + "-warm", cfg, batches=[ids % 64])  # torch's first-use allocations
    base = reset_peak()
    res = prune_checkpoint(src, out, cfg, batches=[ids])
    print(json.dumps({"grew": peak() - base, "kept": res["kept"]}))
"""


def test_prune_peak_rss_is_about_two_layers_not_the_model(tmp_path):
    src = write_synthetic(CONFIG, tmp_path / "src")
    tiny = write_synthetic(TINY, tmp_path / "tiny")
    layer_fp32 = (32 * 3 * 256 * 256 + 256 * 256 * 2 + 256 * 128 * 2 + 32 * 256) * 4
    r = run_probe(PROBE, src, tiny, tmp_path / "out")
    assert r["kept"] == 16
    grew = r["grew"]
    # measured 48.0 MB = 1.94 float32 layers of 24.8 MB (45.1 MB = 1.82 with 4 layers); the model is 12
    msg = f"peak grew {grew / MB:.1f} MB = {grew / layer_fp32:.2f} float32 layers of {layer_fp32 / MB:.1f} MB"
    assert grew < 2.25 * layer_fp32, msg
