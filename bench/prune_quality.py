"""Expert pruning quality and memory (issue #4).

Held-out perplexity (calib/data/eval.txt) of every bundled model after pruning 25% and 50%
of its routed experts with every registered method, side by side with the unpruned model,
in one run; then whether the default method beats `frequency` at 50% and is no worse
than `reap` at both ratios. With --memory it also prunes synthetic checkpoints of 4 and 16
layers with every method, each in a child process, and prints the peak RSS growth against one
layer and the whole model (and against a plain streamed forward of the same checkpoint, measured
in the same run).

    python bench/prune_quality.py                      # the README table (about 20 minutes on 2 shared cores)
    python bench/prune_quality.py --memory             # + the memory figures
    python bench/prune_quality.py --models /path/a,/path/b --ratios 0.5 --methods reap,reroute
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from moepress import models
from moepress.calib.data import calibration_batches, eval_batches
from moepress.calib.metrics import perplexity
from moepress.compress.prune import DEFAULT_METHOD, METHODS, PruneConfig, prune_checkpoint
from moepress.compress.stream import StreamedModel


def held_out_ppl(model_dir: Path, batches: list[torch.Tensor]) -> float:
    return perplexity(StreamedModel(str(model_dir)).forward(batches), batches)


def quality(args) -> int:
    paths = [Path(p) for p in args.models.split(",")] if args.models else models.all_paths()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",") if args.methods else list(METHODS)
    rows, verdicts, ok = [], [], True
    with tempfile.TemporaryDirectory(prefix="moepress-prune-bench-") as tmp:
        for path in paths:
            calib = calibration_batches(path, (), args.num_samples, args.seq_len, args.seed)
            ev = eval_batches(path, seq_len=args.seq_len, max_windows=args.eval_windows)
            base = held_out_ppl(path, ev)
            n_eval = sum(b[:, 1:].numel() for b in ev)
            print(f"{path.name}: unpruned perplexity {base:.3f} on {n_eval} held-out tokens", file=sys.stderr)
            ppl: dict[tuple[str, float], float] = {}
            for ratio in ratios:
                for m in methods:
                    for seq in ([False, True] if args.sequential else [False]):
                        name = m + (" --sequential" if seq else "")
                        out = Path(tmp) / f"{path.name}-{m}-{ratio}-{seq}"
                        t0 = time.monotonic()
                        res = prune_checkpoint(path, out, PruneConfig(method=m, ratio=ratio, sequential=seq,
                                                                      num_samples=args.num_samples,
                                                                      seq_len=args.seq_len, seed=args.seed),
                                               batches=calib)
                        dt = time.monotonic() - t0
                        ppl[(name, ratio)] = held_out_ppl(out, ev)
                        print(f"  {name:>22} drop {ratio:.0%} (keep {res['kept']}/{res['num_experts']}): "
                              f"ppl {ppl[(name, ratio)]:.3f}  prune {dt:.1f} s", file=sys.stderr)
            names = sorted({n for n, _ in ppl}, key=lambda n: (n.split()[0] not in methods,
                                                             methods.index(n.split()[0]), n))
            rows.append((path.name, base, names, ppl))
            d = DEFAULT_METHOD
            if (d, 0.5) in ppl and ("frequency", 0.5) in ppl:
                good = ppl[(d, 0.5)] < ppl[("frequency", 0.5)]
                ok &= good
                verdicts.append(f"{path.name}: {d} {'beats' if good else 'does NOT beat'} frequency at 50% "
                                f"({ppl[(d, 0.5)]:.3f} vs {ppl[('frequency', 0.5)]:.3f})")
            for r in ratios:
                if (d, r) in ppl and ("reap", r) in ppl:
                    good = ppl[(d, r)] <= ppl[("reap", r)]
                    ok &= good
                    verdicts.append(f"{path.name}: {d} {'is no worse than' if good else 'is WORSE than'} reap at "
                                    f"{r:.0%} ({ppl[(d, r)]:.3f} vs {ppl[('reap', r)]:.3f})")
    print(f"\nHeld-out perplexity after pruning (calib: {args.num_samples} x {args.seq_len} tokens of "
          f"calib.txt, seed {args.seed}; eval: calib/data/eval.txt, seq_len {args.seq_len}); lower is better\n")
    head = "| model | unpruned | method | " + " | ".join(f"drop {r:.0%}" for r in ratios) + " |"
    print(head)
    print("|" + "---|" * (3 + len(ratios)))
    for name, base, names, ppl in rows:
        for j, m in enumerate(names):
            best = {r: min(v for (n, rr), v in ppl.items() if rr == r) for r in ratios}
            cells = [(f"**{ppl[(m, r)]:.3f}**" if ppl[(m, r)] == best[r] else f"{ppl[(m, r)]:.3f}")
                     if (m, r) in ppl else "" for r in ratios]
            label = m + (" (default)" if m == DEFAULT_METHOD else "")
            print(f"| {name if j == 0 else ''} | {f'{base:.3f}' if j == 0 else ''} | {label} | "
                  + " | ".join(cells) + " |")
    print()
    for v in verdicts:
        print(v)
    return 0 if ok else 1


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
                     batches=[ids[:1, :16] % 64], force=True)
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


def memory() -> None:
    """Peak RSS of pruning synthetic checkpoints of 4 and 16 identical layers: it should not grow with N."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.synthetic import write_synthetic

    mb = 2**20
    with torch.device("meta"):
        layer = get_adapter(MEM_CONFIG).build_layer(0)
    layer_fp32 = sum(p.numel() for p in layer.state_dict().values()) * 4
    print(f"\nPeak RSS growth over a warm process (kernel high-water mark VmHWM, reset after warm-up); "
          f"synthetic Qwen3-MoE layers of {layer_fp32 / mb:.0f} MB in fp32 (bf16 on disk); "
          f"512 calibration tokens:\n")
    print("| layers N | model (fp32) | run | peak growth | in layers | share of model |")
    print("|---|---|---|---|---|---|")
    tiny_cfg = {**MEM_CONFIG, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
                "moe_intermediate_size": 16, "num_hidden_layers": 2}
    for n in (4, 16):
        cfg = {**MEM_CONFIG, "num_hidden_layers": n}
        with tempfile.TemporaryDirectory(prefix="moepress-prune-mem-") as tmp:
            src = write_synthetic(cfg, Path(tmp) / "src")
            tiny = write_synthetic(tiny_cfg, Path(tmp) / "tiny")
            for what in ("forward", *METHODS):
                p = subprocess.run([sys.executable, "-c", PROBE, str(src), str(Path(tmp) / "out"), what, str(tiny)],
                                   capture_output=True, text=True, check=True)
                r = json.loads(p.stdout)
                grew = r["peak"] - r["base"]
                label = "streamed forward (reference)" if what == "forward" else f"prune 50% --method {what}"
                print(f"| {n} | {n * layer_fp32 / mb:.0f} MB | {label} | {grew / mb:.0f} MB | "
                      f"{grew / layer_fp32:.2f} | {grew / (n * layer_fp32):.2f} |")


def main() -> int:
    torch.set_num_threads(1)  # small ops on a shared machine: one thread is faster
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="", help="comma-separated checkpoint directories (default: bundled)")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=None, help="cap on held-out windows (default: all)")
    ap.add_argument("--sequential", action="store_true", help="also run every method with --sequential")
    ap.add_argument("--memory", action="store_true", help="also print the peak-memory figures")
    ap.add_argument("--memory-only", action="store_true")
    args = ap.parse_args()
    rc = 0
    if not args.memory_only:
        rc = quality(args)
    if args.memory or args.memory_only:
        memory()
    return rc


if __name__ == "__main__":
    sys.exit(main())
