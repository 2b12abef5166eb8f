"""Quantization quality over the bench's full model set: ours vs Model-Optimizer (same forward, as
deployed), every model x calibration seed x format, with medians and the worst cell per format.

    python bench/quant_suite.py [--seeds 0,1] [--num-samples 16] [--jobs 2] [--cache FILE] [--set NAME=V,...]

The model set is the bundled models plus the derived variants of bench/variants.py (routing,
top-k, expert count, widths not multiple of 128, softmax and sigmoid routers), so that a default
cannot be tuned to three models. Each (side, model, seed) runs in one worker process of
bench/quant_quality.py for all formats (both sides use the same calibration tokens of that seed and
the runtime's treatment of expert input scales, quant_quality.EXPERT_INPUT_SCALES). ``--cache`` keeps
every worker's result in a JSON file, so a rerun that changes only our side (``--set``, the
constants of moepress.compress.quantize.config, or ``cfg.FIELD=VALUE``: a QuantConfig field) reuses
Model-Optimizer's and the baseline's.

A cell's figure is ``ours / modelopt - 1`` in perplexity (%; negative: ours better). Printed: every
cell, then per format the median and the worst cell over models x seeds, the median per seed
(the spread over calibration seeds), and how many cells are worse than Model-Optimizer by more than
0.3%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_quality as qq  # noqa: E402
import variants  # noqa: E402

LIMIT = 0.3  # % perplexity: the acceptance's per-cell bound (issue 20)


def _key(side: str, model: str, seed: int, fmt: str, a, sets: str) -> str:
    return json.dumps([side, Path(model).name, seed, fmt, a.num_samples, a.seq_len, a.group_size,
                       sets if side == "ours" else ""])


def collect(a, models: list[str], seeds: list[int], fmts: list[str]) -> dict:
    """Every (side, model, seed, format) result, from the cache or from worker processes."""
    cache_path = Path(a.cache) if a.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    refs = {}
    for r in filter(None, (a.ref_cache or "").split(",")):  # read-only: another run's results
        refs.update(json.loads(Path(r).read_text()))
    jobs = [("baseline", m, 0, ["none"], "") for m in models]
    for s in seeds:  # seed by seed: a run stopped early still covers every model
        for m in models:
            jobs.append(("ours", m, s, fmts, a.set))
            jobs.append(("modelopt", m, s, [f for f in fmts if f in qq.MODELOPT_CFG], ""))
    jobs = [j for j in jobs if j[0] in a.sides.split(",")]
    todo = []
    done = {**refs, **cache}
    for side, m, s, fs, sets in jobs:
        # a cached error (a killed worker, code being edited) is run again, not kept for good
        missing = [f for f in fs if (k := _key(side, m, s, f, a, sets)) not in done or "error" in done[k]]
        if missing:
            todo.append((side, m, s, missing, sets))

    def run(job):
        side, m, s, fs, sets = job
        res = qq.run_one(side, m, None if side == "baseline" else ",".join(fs), a, s, sets)
        print(f"  done {side} {Path(m).name} seed {s}: {', '.join(fs)}", file=sys.stderr, flush=True)
        return job, res

    with ThreadPoolExecutor(a.jobs) as ex:  # each result cached as soon as it is in
        for fut in as_completed([ex.submit(run, j) for j in todo]):
            (side, m, s, fs, sets), res = fut.result()
            for f in fs:
                cache[_key(side, m, s, f, a, sets)] = res.get(f, {"error": "no result"})
            if cache_path:
                cache_path.write_text(json.dumps(cache, indent=1))
    return {**refs, **cache}


def table(a, models, seeds, fmts, cache) -> list[dict]:
    """One row per (model, seed, format)."""
    rows = []
    for m in models:
        base = cache.get(_key("baseline", m, 0, "none", a, ""), {})
        for s in seeds:
            for f in fmts:
                ours = cache.get(_key("ours", m, s, f, a, a.set), {"error": "not run"})
                ref = cache.get(_key("modelopt", m, s, f, a, ""), {"error": "no modelopt config"})
                row = {"model": Path(m).name, "seed": s, "format": f, "base": base.get("ppl"),
                       "ours": ours.get("ppl"), "modelopt": ref.get("ppl_same_forward"),
                       "error": ours.get("error") or ref.get("error")}
                if row["ours"] is not None and row["modelopt"] is not None:
                    row["diff"] = (row["ours"] / row["modelopt"] - 1) * 100
                rows.append(row)
    return rows


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report(rows: list[dict], fmts: list[str], seeds: list[int]) -> str:
    out = ["| model | seed | format | unquantized | ours | modelopt (same forward, as deployed) | ours vs modelopt |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = f"{r['diff']:+.3f}%" if "diff" in r else (r.get("error") or "-")
        out.append(f"| {r['model']} | {r['seed']} | {r['format']} | {_fmt(r['base'])} | {_fmt(r['ours'])} | "
                   f"{_fmt(r['modelopt'])} | {d} |")
    out += ["", "| format | cells | median ours vs modelopt | worst cell | worse by > 0.3% | median per seed "
            "| ours <= modelopt |", "|---|---|---|---|---|---|---|"]
    for f in fmts:
        cells = [r for r in rows if r["format"] == f and "diff" in r]
        if not cells:
            continue
        diffs = [r["diff"] for r in cells]
        worst = max(cells, key=lambda r: r["diff"])
        per_seed = ", ".join(f"{s}: {statistics.median([r['diff'] for r in cells if r['seed'] == s]):+.3f}%"
                             for s in seeds if any(r["seed"] == s for r in cells))
        out.append(f"| {f} | {len(cells)} | {statistics.median(diffs):+.3f}% | {worst['diff']:+.3f}% "
                   f"({worst['model']}, seed {worst['seed']}) | {sum(d > LIMIT for d in diffs)} | {per_seed} | "
                   f"{sum(d <= 0 for d in diffs)}/{len(diffs)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated; default: bundled + bench/variants.py")
    ap.add_argument("--formats", default=",".join(qq.FORMATS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--ref-cache", default=None, help="comma-separated caches of other runs, read only")
    ap.add_argument("--sides", default="baseline,ours,modelopt", help="what to run (the rest: from the caches)")
    ap.add_argument("--set", default="", help="ours only: NAME=VALUE,... (moepress.compress.quantize.config)")
    a = ap.parse_args(argv)
    models = a.models.split(",") if a.models else variants.build()
    seeds = [int(s) for s in a.seeds.split(",")]
    fmts = a.formats.split(",")
    cache = collect(a, models, seeds, fmts)
    rows = table(a, models, seeds, fmts, cache)
    print(f"# quant suite: {len(models)} models x seeds {a.seeds}; {a.num_samples} calibration samples x "
          f"{a.seq_len} tokens; held-out perplexity on 32 windows x 256 tokens; ours --set '{a.set}'")
    print(report(rows, fmts, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
