"""The fold's refit of one kept expert (``moepress prune --method merge``, ``--merge``, ``auto`` on float experts):
through its tokens' [n, n] kernel against through its width's [I, I] Gram matrix, at Kimi K2's widths.

An expert with fewer search tokens n than its width I is refit through the kernel
(compress/prune/merge.py ``_refit_kernel``); the Gram path (``_refit_gram``) is the reference, timed in the same
process on the same random rows, alternately, ``--repeat`` times each. Prints the median seconds of each, their
ratio and the relative difference of the two solutions (the same ridge solution by the push-through identity).
Kimi K2: 16,384 search tokens x top-8 / 384 experts ~ 341 tokens an expert, hidden 7168, expert width 2048.

    python bench/fold.py                                   # 128, 341 and 1024 tokens at Kimi K2's widths
    python bench/fold.py --hidden 2432 --width 640 --tokens 128,256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moepress.compress.prune.merge import _refit_gram, _refit_kernel


def one(hidden: int, width: int, n: int, repeat: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, width, dtype=torch.float64, generator=g)
    pw = torch.rand(n, dtype=torch.float64, generator=g)
    lost = torch.randn(n, hidden, generator=g)
    secs = {"gram": [], "kernel": []}
    for _ in range(repeat):
        t = time.perf_counter()
        a = _refit_gram(h, pw[:, None], lost)
        secs["gram"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = _refit_kernel(h * pw[:, None], lost.double() * pw[:, None])
        secs["kernel"].append(time.perf_counter() - t)
    return {"tokens": n, **{k: statistics.median(v) for k, v in secs.items()},
            "rel_diff": float((a - b).norm() / a.norm())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--width", type=int, default=2048, help="the expert's intermediate width I")
    ap.add_argument("--tokens", default="128,341,1024", help="tokens n of the expert (the kernel path: n < I)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"one expert's refit, hidden {args.hidden}, width {args.width}, float64, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}\n")
    print("| tokens | Gram path (s) | kernel path (s) | Gram / kernel | solutions' relative difference |")
    print("|---|---|---|---|---|")
    for n in [int(t) for t in args.tokens.split(",")]:
        r = one(args.hidden, args.width, n, args.repeat, args.seed)
        print(f"| {n} | {r['gram']:.3f} | {r['kernel']:.3f} | {r['gram'] / r['kernel']:.1f}x | {r['rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
