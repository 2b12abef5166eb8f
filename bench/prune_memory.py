"""Peak memory of ``moepress prune`` per method (issue #21: within 2 stored layers for every method).

Prunes synthetic Qwen3-MoE checkpoints of 4 and 16 identical layers with every method, stored in
bf16 and in block FP8 (DeepSeek's and Kimi K2's 128 x 128 ``weight_scale_inv`` layout, as those
models ship), each in a child process after a warm-up on a tiny checkpoint, and reads the kernel's
high-water mark (VmHWM, reset after the warm-up). The growth is printed against one layer as
stored (its bytes on disk) and against the whole model, beside a plain streamed forward of the same
checkpoint measured in the same run. Called by ``bench/prune_quality.py --memory``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

LIMIT_STORED_LAYERS = 2.0

PROBE = textwrap.dedent("""
    import json, sys, torch
    from moepress.compress.prune import PruneConfig, prune_checkpoint
    from moepress.compress.stream import StreamedModel

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    src, out, what, tiny = sys.argv[1:5]
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    # warm-up on a tiny checkpoint of the same family: torch's first-use allocations, without
    # leaving freed layer-sized blocks in the allocator that the measured run could reuse
    prune_checkpoint(tiny, out + "-warm", PruneConfig(method=what if what != "forward" else "reap", ratio=0.5),
                     batches=[ids[:4, :16] % 64], force=True)
    with open("/proc/self/clear_refs", "w") as f:  # reset the kernel's high-water mark (VmHWM)
        f.write("5")
    base = status("VmRSS")
    if what == "forward":
        StreamedModel(src).forward([ids])
    else:
        prune_checkpoint(src, out, PruneConfig(method=what, ratio=0.5), batches=[ids], force=True)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")

MEM_CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
                  intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)


def memory(methods: list[str], sizes=(4, 16), stores=("bf16", "block-fp8")) -> bool:
    """Print the table; True when every method stays within ``LIMIT_STORED_LAYERS`` stored layers."""
    print("\nPeak RSS growth over a warm process (kernel high-water mark VmHWM, reset after warm-up); "
          "synthetic Qwen3-MoE layers (hidden 256, experts of width 512, top-4: 32 in bf16, 64 in block FP8); "
          "512 calibration tokens:\n")
    print("| stored as | layers N | model (stored) | run | peak growth | stored layers | share of model |")
    print("|---|---|---|---|---|---|---|")
    return all([_memory(methods, sizes, store) for store in stores])


def _stored_layer_bytes(path: Path, i: int) -> int:
    """Layer i's bytes on disk (its tensors' sizes in the safetensors headers)."""
    from moepress.compress.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return sum(math.prod(r.info(n).shape) * r.get_dtype(n).itemsize for n in r.layer_names(i))


def _memory(methods: list[str], sizes, store: str) -> bool:
    from moepress.compress.synthetic import write_synthetic

    mb = 1e6  # MB, as the other benches print (not MiB)
    tiny_cfg = {**MEM_CONFIG, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
                "moe_intermediate_size": 16, "num_hidden_layers": 2}
    ok = True
    for n in sizes:
        # block FP8 with twice the experts: a layer of about the bf16 one's stored bytes, so that the methods'
        # working memory, set by the calibration tokens and the widths, not by the layer's bytes, weighs alike
        experts = MEM_CONFIG["num_experts"] * (2 if store == "block-fp8" else 1)
        cfg = {**MEM_CONFIG, "num_hidden_layers": n, "num_experts": experts}
        with tempfile.TemporaryDirectory(prefix="moepress-prune-mem-") as tmp:
            src = write_synthetic(cfg, Path(tmp) / "src", block_fp8=store == "block-fp8")
            tiny = write_synthetic(tiny_cfg, Path(tmp) / "tiny", block_fp8=store == "block-fp8")
            stored = _stored_layer_bytes(src, 1)
            for what in ("forward", *methods):
                p = subprocess.run([sys.executable, "-c", PROBE, str(src), str(Path(tmp) / "out"), what, str(tiny)],
                                   capture_output=True, text=True, check=True)
                r = json.loads(p.stdout.strip().splitlines()[-1])
                grew = r["peak"] - r["base"]
                label = "streamed forward (reference)" if what == "forward" else f"prune 50% --method {what}"
                within = grew / stored <= LIMIT_STORED_LAYERS
                ok &= within or what == "forward"
                print(f"| {store} | {n} | {n * stored / mb:.0f} MB | {label} | {grew / mb:.0f} MB | {grew / stored:.2f}"
                      f"{'' if within or what == 'forward' else ' (over 2)'} | {grew / (n * stored):.2f} |")
    print(f"\n{store}: every method within {LIMIT_STORED_LAYERS:g} stored layers: {'yes' if ok else 'NO'}")
    return ok
