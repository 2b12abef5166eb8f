"""Peak memory and time of `moepress check` against one streamed forward (issue #8).

Writes a synthetic Qwen3-MoE-shaped checkpoint (compress/synthetic.py; the bundled
tokenizer copied in), then in child processes measures the resident-set growth of
(a) one streamed forward of the checkpoint over the evaluation batches, and
(b) `run_check` of the checkpoint against itself (two streams in lockstep),
and prints both against the size of one layer and of the whole model in float32.

    python bench/check_memory.py                      # 8 layers x 32 experts, hidden 256
    python bench/check_memory.py --layers 16 --experts 64 --samples 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from moepress import models
from moepress.compress.synthetic import write_synthetic

PROBE = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    from moepress.checks import CheckConfig, run_check
    from moepress.checks.runner import eval_data
    from moepress.compress.stream import StreamedModel
    from moepress.memwatch import HostPeak, rss
    what, path, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
    cfg = CheckConfig(seq_len=seq_len, max_samples=samples)  # check's default batch size
    if what == "forward":
        batches, _ = eval_data(__import__("pathlib").Path(path), cfg)
        run = lambda: StreamedModel(path).forward(batches)
    else:
        run = lambda: run_check(sys.argv[4], path, cfg)  # the same files in another directory
    run()  # warm-up
    base = rss()
    t0 = time.monotonic()
    with HostPeak() as p:  # the kernel's high-water mark, reset here (brief peaks count)
        run()
    dt = time.monotonic() - t0
    print(json.dumps({"grew": p.peak - base, "seconds": dt}))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8, help="evaluation samples of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sample (check's default)")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary of the synthetic (the tokenizer's ids "
                    "stay below 4096): the head's logits are [tokens, vocab]")
    args = ap.parse_args()
    cfg = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=args.vocab,
               hidden_size=args.hidden, intermediate_size=args.inter, moe_intermediate_size=args.inter,
               num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               num_experts=args.experts, num_experts_per_tok=4, norm_topk_prob=True)
    h = args.hidden
    layer = args.experts * 3 * h * args.inter * 4 + 4 * (h * 256 * 2 + h * 128 * 2) + args.experts * h * 4
    model = args.layers * layer + 2 * args.vocab * h * 4
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_synthetic(cfg, Path(tmp) / "synthetic", seed=0)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(models.path("tiny-qwen3-moe") / f, ckpt / f)
        same = Path(tmp) / "same"  # the candidate: hard links to the same files (not the reference directory)
        same.mkdir()
        for f in ckpt.iterdir():
            os.link(f, same / f.name)
        res = {}
        for what in ("forward", "check"):
            argv = [what, str(ckpt), str(args.samples), str(same), str(args.seq_len)]
            p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return 1
            res[what] = json.loads(p.stdout)
    mb = 1e6  # MB, as the other benches print (not MiB)
    print(f"synthetic qwen3_moe: {args.layers} layers x {args.experts} experts, hidden {h}; "
          f"vocabulary {args.vocab}; one layer {layer / mb:.0f} MB, model {model / mb:.0f} MB (float32); "
          f"{args.samples} x {args.seq_len} tokens")
    for what, label in (("forward", "one streamed forward"), ("check", "check (two streams in lockstep)")):
        g = res[what]["grew"]
        print(f"  {label:34s} peak RSS growth {g / mb:6.0f} MB = {g / layer:4.1f} layers = "
              f"{100 * g / model:5.1f}% of one model   ({res[what]['seconds']:.1f} s)")
    print(f"  check / forward: {res['check']['grew'] / max(res['forward']['grew'], 1):.2f}x memory, "
          f"{res['check']['seconds'] / res['forward']['seconds']:.2f}x time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
