"""Peak memory of `check` is about two layers, not two models (README: "Both models
advance layer by layer (memory about two layers)").

A synthetic checkpoint (compress/synthetic.py) checked against its own files in a child process:
the reference and the candidate are two separate streams over the files, advanced layer
by layer in lockstep. Peak: the kernel's high-water mark of the child (tests/memprobe.py).
"""

import os
import shutil

from memprobe import MB, run_probe
from moepress import models
from moepress.compress.synthetic import write_synthetic

LAYERS, EXPERTS, HIDDEN, INTER = 8, 32, 256, 512
CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=4096, hidden_size=HIDDEN,
              intermediate_size=INTER, moe_intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=EXPERTS, num_experts_per_tok=4, norm_topk_prob=True)

PROBE = """
    import json, sys, torch
    torch.set_num_threads(1)
    from moepress.checks import CheckConfig, run_check
    cfg = CheckConfig(seq_len=32, max_samples=4, batch_size=2)
    # warm-up on one layer of the same shapes: first-use allocations of torch, tokenizer
    run_check(sys.argv[4], sys.argv[3], cfg)
    base = reset_peak()
    res = run_check(sys.argv[2], sys.argv[1], cfg)
    print(json.dumps({"grew": peak() - base, "kl": res["metrics"]["kl_mean"], "layers": len(res["layers"])}))
"""


def _pair(config: dict, path):
    """A synthetic checkpoint with the bundled tokenizer (vocab 4096) for the evaluation text, and the
    candidate: the same files (hard links) in another directory."""
    ckpt = write_synthetic(config, path, seed=0)
    tok = models.path("tiny-qwen3-moe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, ckpt / f)
    same = path.with_name(path.name + "-same")
    same.mkdir()
    for f in ckpt.iterdir():
        os.link(f, same / f.name)
    return ckpt, same


def test_check_peak_rss_is_about_two_layers(tmp_path):
    ckpt, same = _pair(CONFIG, tmp_path / "synthetic")
    warm = _pair({**CONFIG, "num_hidden_layers": 1}, tmp_path / "warm")  # the warm-up's, a checkpoint cheaper
    layer_fp32 = EXPERTS * 3 * HIDDEN * INTER * 4 + 4 * (HIDDEN * HIDDEN * 2 + HIDDEN * 128 * 2) + EXPERTS * HIDDEN * 4
    r = run_probe(PROBE, ckpt, same, *warm)
    assert r["kl"] == 0.0 and r["layers"] == LAYERS
    grew = r["grew"]
    # measured 100.7 MB = 2.06 float32 layers of 48.9 MB (2.05 with 2 layers: it does not grow with
    # the layer count); two models would be 16 layers. Warmed up on the 8 layers themselves: 2.07-2.08;
    # on one layer of the same shapes (a check of 8 layers' CPU less): 2.09-2.10
    msg = f"peak grew {grew / MB:.1f} MB = {grew / layer_fp32:.2f} float32 layers of {layer_fp32 / MB:.1f} MB"
    assert grew < 2.25 * layer_fp32, msg
