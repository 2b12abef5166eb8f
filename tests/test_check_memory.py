"""Peak memory of `check` is a few stored layers, not two models (README: "A streamed candidate and the
reference advance layer by layer, each layer's weights kept as stored").

A synthetic checkpoint (compress/synthetic.py) checked against its own files in a child process:
the reference and the candidate are two separate streams over the files, advanced layer
by layer in lockstep. Peak: the kernel's high-water mark of the child (tests/memprobe.py).
"""

import math
import os
import shutil

import pytest

from memprobe import MB, run_probe
from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.synthetic import write_synthetic

LAYERS, EXPERTS, HIDDEN, INTER = 4, 32, 256, 512
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


def _pair(config: dict, path, block_fp8: bool = False, quantized: bool = False):
    """A synthetic checkpoint with the bundled tokenizer (vocab 4096) for the evaluation text, and the
    candidate: the same files (hard links) in another directory, or (``quantized``) its `moepress quantize` to
    fp8-block, whose every linear's weights the check compares (checks/weights.py)."""
    ckpt = write_synthetic(config, path, seed=0, block_fp8=block_fp8)
    tok = models.path("tiny-qwen3-moe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, ckpt / f)
    same = path.with_name(path.name + "-same")
    if quantized:
        quantize_checkpoint(ckpt, same, QuantConfig(format="fp8-block"))
        return ckpt, same
    same.mkdir()
    for f in ckpt.iterdir():
        os.link(f, same / f.name)
    return ckpt, same


def _stored_layer(path) -> int:
    """Decoder layer 1's bytes as stored (the safetensors headers' shapes and dtypes)."""
    r = CheckpointReader(path)
    return sum(math.prod(r.info(n).shape) * r.get_dtype(n).itemsize for n in r.layer_names(1))


@pytest.mark.parametrize("store", ["bf16", "block-fp8", "bf16 -> fp8-block"])
def test_check_peak_rss_is_a_few_stored_layers_not_two_models(tmp_path, store):
    """Both streams keep a layer's weights as stored (bf16; block FP8 as DeepSeek-V3 and Kimi K2 ship) and
    decode them at each call (compress/moe.py ``StoredLinear``), one layer of each model at a time; a quantized
    candidate's weights are sketched one linear (one group of linears) at a time."""
    fp8, quantized = store == "block-fp8", "->" in store
    ckpt, same = _pair(CONFIG, tmp_path / "synthetic", block_fp8=fp8, quantized=quantized)
    # a cheaper checkpoint
    warm = _pair({**CONFIG, "num_hidden_layers": 1}, tmp_path / "warm", block_fp8=fp8, quantized=quantized)
    stored = _stored_layer(ckpt)
    r = run_probe(PROBE, ckpt, same, *warm)
    assert (r["kl"] == 0.0 or quantized) and r["layers"] == LAYERS
    grew = r["grew"]
    # measured (2026-12-04, 8 layers; the two models hold 16): bf16 2.24, block FP8 2.48 stored layers (a layer
    # of each model, the reference's read-ahead, the hidden states). Layers decoded to float32 when read: 4.2, 6.9.
    # A bf16 reference and its fp8-block quantization, whose weights are compared (2026-12-06): 1.79. With 4
    # layers (2026-12-07; the two models hold 8, over the bound): 2.20, 2.39, 1.79, the same per layer.
    msg = f"peak grew {grew / MB:.1f} MB = {grew / stored:.2f} stored layers of {stored / MB:.1f} MB"
    assert grew < 3.0 * stored, msg


LOGITS_PROBE = """
    import json, sys, torch
    torch.set_num_threads(1)
    from moepress.checks import CheckConfig, run_check
    cfg = CheckConfig(seq_len=256, max_samples=8, batch_size=8)  # check's defaults: one batch of 8 x 256
    run_check(sys.argv[4], sys.argv[3], cfg)
    base = reset_peak()
    res = run_check(sys.argv[2], sys.argv[1], cfg)
    print(json.dumps({"grew": peak() - base, "kl": res["metrics"]["kl_mean"], "tokens": res["metrics"]["tokens"]}))
"""


def test_check_takes_the_logits_a_sequence_at_a_time(tmp_path):
    """The head's logits and their float64 metrics are taken one sequence at a time: a vocabulary of 32768 at
    check's default batch of 8 x 256 tokens peaks below one batch-wide float64 [B, S, V] tensor (512 MiB; the
    whole-batch NLL made two). Measured 247 MiB. That the NLL is also taken a few positions at a time is
    test_metrics_extremes.py's."""
    small = {**CONFIG, "num_hidden_layers": 2, "num_experts": 4, "vocab_size": 32768}
    ckpt, same = _pair(small, tmp_path / "synthetic")
    warm = _pair({**small, "num_hidden_layers": 1}, tmp_path / "warm")
    r = run_probe(LOGITS_PROBE, ckpt, same, *warm)
    assert r["kl"] == 0.0 and r["tokens"] == 8 * 256
    batch_f64 = 8 * 256 * 32768 * 8
    assert r["grew"] < batch_f64, f"peak grew {r['grew'] / MB:.0f} MB against {batch_f64 / MB:.0f} MB"
