"""Peak memory of a streamed forward is bounded by about one layer, not the model (issue #2)."""

import json
import subprocess
import sys
import textwrap

from moepress.compress.synthetic import write_synthetic

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
              intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=10, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)

PROBE = textwrap.dedent("""
    import json, sys, torch
    from moepress.compress.stream import StreamedModel
    from moepress.memwatch import PeakRSS, rss
    sm = StreamedModel(sys.argv[1])
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    sm.forward([ids])  # warm-up: first-use allocations of torch itself
    base = rss()
    with PeakRSS() as p:
        logits = sm.forward([ids])[0]
    print(json.dumps({"base": base, "peak": p.peak, "finite": bool(torch.isfinite(logits).all())}))
""")


def test_streamed_forward_peak_rss_is_about_one_layer(tmp_path):
    ckpt = write_synthetic(CONFIG, tmp_path / "synthetic", seed=0)
    layer_fp32 = 32 * 3 * 256 * 512 * 4 + 4 * (256 * 256 * 2 + 256 * 128 * 2) + 32 * 256 * 4
    model_fp32 = 10 * layer_fp32
    p = subprocess.run([sys.executable, "-c", PROBE, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    grew = r["peak"] - r["base"]
    assert r["finite"]
    # The stream holds the running layer, the prefetched next one and a read buffer: allow 4 layers + 64 MB.
    assert grew < 4 * layer_fp32 + 64 * 2**20, f"peak grew {grew / 2**20:.0f} MB for {layer_fp32 / 2**20:.0f} MB layers"
    assert grew < model_fp32 / 2
