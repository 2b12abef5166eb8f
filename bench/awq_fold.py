"""Folded vs unfolded AWQ (issue 17): held-out perplexity of ``int4-awq`` as Model-Optimizer's form
(pre_quant_scale, moepress's forward) and folded (``--awq-fold``) exported to compressed-tensors and
run by transformers in a process that never imports moepress, on the same held-out windows.

    python bench/awq_fold.py [--models tiny-qwen3-moe,...] [--num-samples 16] [--seq-len 128]

Per model: quantize both ways (same calibration), export the folded one, load it with transformers
(``CompressedTensorsConfig(dequantize=True)``), perplexity of its logits (calib/metrics.py) vs our
forward of the unfolded checkpoint; also our forward of the folded checkpoint (what transformers
should reproduce) and the bf16 baseline. DeepSeek-V3 uses group 32 (transformers' CT loader resolves
one scheme for all dense modules: tests/test_export_ct.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

LOADER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    d, ids_path, out_path = sys.argv[1:4]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        out = [m(input_ids=b, use_cache=False).logits for b in torch.load(ids_path)]
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
    torch.save(out, out_path)
""")


def one(name: str, a, tmp: Path) -> dict:
    from moepress import models
    from moepress.calib.config import CalibConfig
    from moepress.calib.data import eval_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.compress.stream import StreamedModel
    from moepress.exporters import ExportConfig, export

    src = models.path(name)
    ev = eval_batches(src, seq_len=256, max_windows=a.windows)
    group = 32 if "deepseek" in name else 128
    cal = CalibConfig((), a.num_samples, a.seq_len, a.seed, 8, False)
    row = {"model": name, "group": group, "bf16": perplexity(StreamedModel(src).forward(ev), ev)}
    for fold in (False, True):
        q = tmp / f"{name}-{fold}"
        cfg = QuantConfig(format="int4-awq", group_size=group, num_samples=a.num_samples, seq_len=a.seq_len,
                          seed=a.seed, awq_fold=fold)
        quantize_checkpoint(src, q, cfg, batches=cal.loader(src))
        row["folded_ours" if fold else "unfolded_ours"] = perplexity(StreamedModel(q).forward(ev), ev)
    e = tmp / f"{name}-ct"
    export(tmp / f"{name}-True", e, ExportConfig(format="compressed-tensors"))
    torch.save(ev, tmp / f"{name}-ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", LOADER, str(e), str(tmp / f"{name}-ids.pt"), str(tmp / f"{name}-lg.pt")],
                       env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    row["folded_transformers"] = perplexity(torch.load(tmp / f"{name}-lg.pt"), ev)
    row["rel_change_pct"] = 100 * (row["folded_transformers"] / row["unfolded_ours"] - 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-qwen3-moe,tiny-mixtral,tiny-deepseek-v3")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        rows = [one(m, a, Path(t)) for m in a.models.split(",")]
    print("| model | group | bf16 | int4-awq (ours) | folded (ours) | folded -> CT (transformers) | change |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['group']} | {r['bf16']:.3f} | {r['unfolded_ours']:.3f} | {r['folded_ours']:.3f} "
              f"| {r['folded_transformers']:.3f} | {r['rel_change_pct']:+.2f}% |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
