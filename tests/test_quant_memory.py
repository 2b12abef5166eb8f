"""Peak memory of a streamed quantize is set by the largest layer, not by the layer count (issue #10).

The same synthetic layer shape is quantized with 2 and with 8 layers, each run in its own
process; the peak RSS growth over the process's baseline must (a) stay under 2x the stored
(bf16) layer plus a fixed allowance for activations and buffers and (b) not grow with the
number of layers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moepress.compress.synthetic import write_synthetic

HIDDEN, INTER, EXPERTS = 1024, 512, 24
CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=HIDDEN,
              intermediate_size=INTER, moe_intermediate_size=INTER, num_attention_heads=4,
              num_key_value_heads=2, head_dim=128, num_experts=EXPERTS, num_experts_per_tok=4,
              norm_topk_prob=True)
# bf16 bytes of one decoder layer as stored: experts + attention (q, k, v, o) + router
LAYER = 2 * (EXPERTS * 3 * HIDDEN * INTER + HIDDEN * 512 + 2 * HIDDEN * 256 + 512 * HIDDEN + EXPERTS * HIDDEN)
WARM = dict(CONFIG, hidden_size=128, intermediate_size=64, moe_intermediate_size=64, head_dim=32, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=1)
ALLOWANCE = 48 * 2**20  # activations, calibration statistics, read-ahead of small tensors, allocator slack

PROBE = textwrap.dedent("""
    import json, sys, torch
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.memwatch import PeakRSS, rss
    model, warm, out, fmt = sys.argv[1:5]
    cfg = QuantConfig(format=fmt)
    batches = [torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    # warm-up on a tiny model: first-use allocations of torch itself are not the stream's
    quantize_checkpoint(warm, out + "-warm", cfg, batches=batches if cfg.needs_calibration else None)
    base = rss()
    with PeakRSS() as p:
        quantize_checkpoint(model, out, cfg, batches=batches if cfg.needs_calibration else None)
    print(json.dumps({"base": base, "peak": p.peak}))
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-memory")


def _grew(tmp_path, layers: int, fmt: str) -> int:
    ckpt, warm = tmp_path / f"synthetic-{layers}", tmp_path / "warm"
    if not ckpt.exists():
        write_synthetic({**CONFIG, "num_hidden_layers": layers}, ckpt, seed=0)
    if not warm.exists():
        write_synthetic(WARM, warm, seed=0)
    p = subprocess.run([sys.executable, "-c", PROBE, str(ckpt), str(warm), str(tmp_path / f"out-{fmt}-{layers}"), fmt],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["peak"] - r["base"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8"])  # calibration-free and calibrated (int4-awq: same
def test_quantize_peak_rss_is_bounded_by_the_layer_not_the_layer_count(models, fmt):  # stream, bench/throughput.py)
    few, many = _grew(models, 2, fmt), _grew(models, 8, fmt)
    mb = 2**20
    msg = f"{fmt}: peak grew {few / mb:.0f} MB (2 layers), {many / mb:.0f} MB (8 layers); layer {LAYER / mb:.0f} MB"
    assert many < 2 * LAYER + ALLOWANCE, msg
    assert many - few < LAYER / 4, msg  # 4x the layers: no more than a quarter layer more
