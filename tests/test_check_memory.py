"""Peak memory of `check` is about two layers plus activations, not two models (issue #8).

A synthetic checkpoint (compress/synthetic.py) checked against itself in a child process:
the reference and the candidate are two separate streams over the files, advanced layer
by layer in lockstep; the resident-set growth is measured as tests/test_memory.py does.
"""

import json
import shutil
import subprocess
import sys
import textwrap

from moepress import models
from moepress.compress.synthetic import write_synthetic

LAYERS, EXPERTS, HIDDEN, INTER = 8, 32, 256, 512
CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=4096, hidden_size=HIDDEN,
              intermediate_size=INTER, moe_intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=EXPERTS, num_experts_per_tok=4, norm_topk_prob=True)

PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from moepress.checks import CheckConfig, run_check
    from moepress.memwatch import PeakRSS, rss
    cfg = CheckConfig(seq_len=32, max_samples=4, batch_size=2)
    run_check(sys.argv[1], sys.argv[1], cfg)  # warm-up: first-use allocations of torch, tokenizer
    base = rss()
    with PeakRSS() as p:
        res = run_check(sys.argv[1], sys.argv[1], cfg)
    print(json.dumps({"base": base, "peak": p.peak, "kl": res["metrics"]["kl_mean"],
                      "layers": len(res["layers"])}))
""")


def test_check_peak_rss_is_about_two_layers(tmp_path):
    ckpt = write_synthetic(CONFIG, tmp_path / "synthetic", seed=0)
    tok = models.path("tiny-qwen3-moe")  # the bundled tokenizer (vocab 4096) for the evaluation text
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, ckpt / f)
    layer_fp32 = EXPERTS * 3 * HIDDEN * INTER * 4 + 4 * (HIDDEN * HIDDEN * 2 + HIDDEN * 128 * 2) + EXPERTS * HIDDEN * 4
    model_fp32 = LAYERS * layer_fp32
    p = subprocess.run([sys.executable, "-c", PROBE, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["kl"] == 0.0 and r["layers"] == LAYERS
    grew = r["peak"] - r["base"]
    # a running layer, the next one being read (float32 plus its bf16 read buffer), activations, heads:
    # allow 4 layers + 64 MB; two models would be 16 layers
    msg = f"peak grew {grew / 2**20:.0f} MB for {layer_fp32 / 2**20:.0f} MB layers"
    assert grew < 4 * layer_fp32 + 64 * 2**20, msg
    assert grew < model_fp32 / 2, msg
