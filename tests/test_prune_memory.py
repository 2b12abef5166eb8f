"""Pruning a checkpoint of N layers holds about one layer in memory, not the model (issue #4).

bench/prune_quality.py --memory prints the figures for 4 and 16 layers (the peak does not grow with N).
"""

import json
import subprocess
import sys
import textwrap

from moepress.compress.synthetic import write_synthetic

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
              intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)
TINY = {**CONFIG, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
        "moe_intermediate_size": 16, "num_hidden_layers": 2}

PROBE = textwrap.dedent("""
    import json, sys, torch
    from moepress.compress.prune import PruneConfig, prune_checkpoint

    torch.set_num_threads(1)  # small ops: one thread is faster on a shared 2-core machine

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    src, tiny, out = sys.argv[1:4]
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(ratio=0.5)  # the default method (lookahead: reroute and reap candidates)
    prune_checkpoint(tiny, out + "-warm", cfg, batches=[ids % 64])  # torch's first-use allocations
    with open("/proc/self/clear_refs", "w") as f:  # reset the kernel's high-water mark
        f.write("5")
    base = status("VmRSS")
    res = prune_checkpoint(src, out, cfg, batches=[ids])
    print(json.dumps({"base": base, "peak": status("VmHWM"), "kept": res["kept"]}))
""")


def test_prune_peak_rss_is_a_few_layers_not_the_model(tmp_path):
    src = write_synthetic(CONFIG, tmp_path / "src")
    tiny = write_synthetic(TINY, tmp_path / "tiny")
    layer_fp32 = (32 * 3 * 256 * 256 + 256 * 256 * 2 + 256 * 128 * 2 + 32 * 256) * 4
    p = subprocess.run([sys.executable, "-c", PROBE, str(src), str(tiny), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["kept"] == 16
    grew = r["peak"] - r["base"]
    # the layer being pruned (fp32), its stored copy on the way to disk, the shard's bytes: allow 4 layers
    assert grew < 4 * layer_fp32 + 64 * 2**20, f"peak grew {grew / 2**20:.0f} MB for {layer_fp32 / 2**20:.0f} MB layers"
    assert grew < 12 * layer_fp32 / 2
