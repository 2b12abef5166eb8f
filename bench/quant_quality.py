"""Quantization quality, time and memory: moepress vs Model-Optimizer, every bundled model x format.

    python bench/quant_quality.py [--models tiny-qwen3-moe,...] [--formats fp8,...] [--num-samples 32]

For each bundled model and format, in one run, each in its own process (peak RSS from wait4):
  * ours: `moepress quantize` (streamed), then held-out perplexity of its fake-quant forward;
  * modelopt: `mtq.quantize` on the transformers model (fp32) with the matching config and the
    same calibration tokens, then its fake-quant perplexity on the same held-out windows;
  * the unquantized baseline.
Prints a Markdown table. Formats modelopt has no config for are marked n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELOPT_CFG = {"fp8": "FP8_DEFAULT_CFG", "fp8-block": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
                "fp8-dynamic": "FP8_PER_CHANNEL_PER_TOKEN_CFG", "int4-awq": "INT4_AWQ_CFG",
                "int4-gptq": None, "w4a8-awq": "W4A8_AWQ_BETA_CFG"}
FORMATS = list(MODELOPT_CFG)


def _eval(model_name, seq_len=256, windows=32):
    from moepress.calib.data import eval_batches
    from moepress.models import path

    return eval_batches(path(model_name), seq_len=seq_len, max_windows=windows)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from moepress.calib.data import calibration_batches
    from moepress.calib.metrics import perplexity
    from moepress.models import path

    src = path(args.model)
    ev = _eval(args.model)
    t0 = time.monotonic()
    if args.side == "baseline":
        from moepress.compress.stream import StreamedModel

        return {"ppl": perplexity(StreamedModel(str(src)).forward(ev), ev), "seconds": 0.0}
    if args.side == "ours":
        from moepress.compress.quantize import QuantConfig, quantize_checkpoint
        from moepress.compress.stream import StreamedModel

        out = Path(args.tmp) / "q"
        quantize_checkpoint(src, out, QuantConfig(format=args.format, num_samples=args.num_samples,
                                                  seq_len=args.seq_len), force=True)
        secs = time.monotonic() - t0
        return {"ppl": perplexity(StreamedModel(str(out)).forward(ev), ev), "seconds": secs}
    # modelopt
    import copy
    import warnings

    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    batches = calibration_batches(src, (), args.num_samples, args.seq_len, 0, 8)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_CFG[args.format]))

    def loop(m):
        for b in batches:
            m(input_ids=b, use_cache=False)

    with torch.no_grad():
        mtq.quantize(model, cfg, loop)
    secs = time.monotonic() - t0
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    n_q, n_exp = len(enabled), sum(1 for n in enabled if ".experts." in n)
    with torch.no_grad():
        logits = [model(input_ids=b, use_cache=False).logits.float() for b in ev]
    return {"ppl": perplexity(logits, ev), "seconds": secs, "quantized_modules": n_q, "expert_quantizers": n_exp}


def run_one(side, model, fmt, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--format", fmt or "none",
               "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--tmp", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])  # rss_mb: the worker's own peak (ru_maxrss)
        except (ValueError, IndexError):
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-qwen3-moe,tiny-mixtral,tiny-deepseek-v3")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--format", default=None)
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        a.side = a.worker
        res = worker(a)
        import resource

        res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return 0
    print(f"# quant quality: {a.num_samples} calibration samples x {a.seq_len} tokens (bundled calib text); "
          f"held-out perplexity on 32 windows x 256 tokens of calib/data/eval.txt; {os.cpu_count()} CPUs, "
          f"1 thread per run")
    print("| model | format | ppl ours | ppl modelopt | Δ ours | Δ modelopt | s ours | s modelopt | "
          "peak RSS MB ours | peak RSS MB modelopt | modelopt quantizers enabled / on experts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        base = run_one("baseline", model, None, a)
        print(f"| {model} | bf16 (baseline) | {base.get('ppl', float('nan')):.3f} | | | | | | "
              f"{base.get('rss_mb', 0):.0f} | | |", flush=True)
        for fmt in a.formats.split(","):
            ours = run_one("ours", model, fmt, a)
            ref = run_one("modelopt", model, fmt, a) if MODELOPT_CFG.get(fmt) else {"error": "no modelopt config"}

            def f(d, k, spec):
                return format(d[k], spec) if k in d else d.get("error", "-")

            def rel(d, base=base):
                return f"{(d['ppl'] / base['ppl'] - 1) * 100:+.2f}%" if "ppl" in d and "ppl" in base else "-"

            print(f"| {model} | {fmt} | {f(ours, 'ppl', '.3f')} | {f(ref, 'ppl', '.3f')} | {rel(ours)} | {rel(ref)} | "
                  f"{f(ours, 'seconds', '.1f')} | {f(ref, 'seconds', '.1f')} | {f(ours, 'rss_mb', '.0f')} | "
                  f"{f(ref, 'rss_mb', '.0f')} | {ref.get('quantized_modules', '-')} / "
                  f"{ref.get('expert_quantizers', '-')} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
