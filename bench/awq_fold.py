"""Folded vs unfolded AWQ (issue 17): held-out perplexity of ``int4-awq`` as Model-Optimizer's form
(pre_quant_scale, moepress's forward) and folded (``--awq-fold``) exported to compressed-tensors and
run by transformers in a process that never imports moepress, on the same held-out windows.

    python bench/awq_fold.py [--models tiny-qwen3-moe,DIR,...] [--seeds 0,1,2] [--num-samples 16] [--seq-len 128]
                             [--format int4-awq|w4a8-awq] [--ablate SITE,...] [--float32-norms]

Per model and calibration seed: quantize both ways (same calibration), export the folded one, load
it with transformers (``CompressedTensorsConfig(dequantize=True)``), perplexity of its logits
(calib/metrics.py) vs our forward of the unfolded checkpoint; also our forward of the folded
checkpoint (what transformers should reproduce) and the bf16 baseline. Then per model the median
and range over the seeds of the change. DeepSeek-V3 uses group 32 (transformers' CT loader resolves
one scheme for all dense modules: tests/test_export_ct.py). ``w4a8-awq`` has no compressed-tensors
form (exporters refuse it), so only our forward of both is compared.

``--ablate``: per fold site (SITES), an extra folded run with that site's folds dropped (its
readers quantized without smoothing), our forward only: which site costs what.

``--float32-norms``: also the folded run with the folded norms and router kept in float32 (our forward):
the same folds, only without rounding g * p to the checkpoint's bf16 (the vector the readers divide
by then moves by up to 2^-9 per channel). The model before rounding is the same function either way,
so the difference between the two folded columns is the spread that an exact reparametrisation
alone puts on one cell's perplexity (GPTQ's rounding decisions flip), the noise floor of a per-cell
comparison. Models: bundled names or checkpoint directories (bench/variants.py writes variants).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
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


def site(f) -> str:
    """The fold site of a ``fold.Fold`` (for --ablate)."""
    src = f.source.rpartition(".")[2]
    if f.router is not None:
        return "moe"  # post-attention norm -> router + every expert's gate/up
    if src == "input_layernorm":
        return "qkv"
    if src in ("q_a_layernorm", "kv_a_layernorm"):
        return "mla-norms"
    if f.source.startswith("self_attn."):
        return "v-o"  # v_proj (or MLA's kv_b_proj value rows) -> o_proj
    if src == "post_attention_layernorm":
        return "dense-mlp"
    if ".experts." in f.source:
        return "expert-up-down"
    return "shared-up-down" if "shared_experts" in f.source else "dense-up-down"


SITES = ("qkv", "mla-norms", "v-o", "moe", "dense-mlp", "expert-up-down", "shared-up-down", "dense-up-down")


@contextmanager
def float32_norms(on: bool):
    """Folded norms and router stored in float32 instead of their checkpoint dtype (--float32-norms)."""
    from moepress.compress.quantize import fold

    orig = fold.LayerFolder._stored_dtype
    if on:
        fold.LayerFolder._stored_dtype = lambda self, rel: torch.float32
    try:
        yield
    finally:
        fold.LayerFolder._stored_dtype = orig


@contextmanager
def dropping(sites: set[str]):
    """Folds of ``sites`` dropped after planning (their readers quantized without smoothing)."""
    from moepress.compress.quantize import fold

    orig = fold.LayerFolder.plan

    def plan(self):
        orig(self)
        self.folds = [f for f in self.folds if site(f) not in sites]

    fold.LayerFolder.plan = plan
    try:
        yield
    finally:
        fold.LayerFolder.plan = orig


def transformers_ppl(e: Path, ev, tmp: Path) -> float:
    from moepress.calib.metrics import perplexity

    torch.save(ev, tmp / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", LOADER, str(e), str(tmp / "ids.pt"), str(tmp / "lg.pt")],
                       env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return perplexity(torch.load(tmp / "lg.pt"), ev)


def one(name: str, seed: int, a, tmp: Path) -> dict:
    from moepress import models
    from moepress.calib.config import CalibConfig
    from moepress.calib.data import eval_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.compress.stream import StreamedModel
    from moepress.exporters import ExportConfig, export

    src = models.resolve(name)
    name = src.name
    ev = eval_batches(src, seq_len=256, max_windows=a.windows)
    group = 32 if "deepseek" in name else 128
    cal = CalibConfig((), a.num_samples, a.seq_len, seed, 8, False)
    row = {"model": name, "seed": seed, "group": group, "bf16": perplexity(StreamedModel(src).forward(ev), ev)}

    def quant(fold: bool, drop: set[str], tag: str, f32: bool = False) -> Path:
        q = tmp / f"{name}-{seed}-{tag}"
        cfg = QuantConfig(format=a.format, group_size=group, num_samples=a.num_samples, seq_len=a.seq_len,
                          seed=seed, awq_fold=fold)
        with dropping(drop), float32_norms(f32):
            quantize_checkpoint(src, q, cfg, batches=cal.loader(src))
        return q

    row["unfolded_ours"] = perplexity(StreamedModel(quant(False, set(), "u")).forward(ev), ev)
    qf = quant(True, set(), "f")
    row["folded_ours"] = perplexity(StreamedModel(qf).forward(ev), ev)
    if a.float32_norms:
        row["folded_f32_norms_ours"] = perplexity(StreamedModel(quant(True, set(), "f32", True)).forward(ev), ev)
    row["ablate"] = {}
    for s in a.ablate:
        row["ablate"][s] = perplexity(StreamedModel(quant(True, {s}, "a-" + s)).forward(ev), ev)
    if a.format == "int4-awq":
        e = tmp / f"{name}-{seed}-ct"
        export(qf, e, ExportConfig(format="compressed-tensors"))
        row["folded_transformers"] = transformers_ppl(e, ev, tmp)
    folded = row.get("folded_transformers", row["folded_ours"])
    row["rel_change_pct"] = 100 * (folded / row["unfolded_ours"] - 1)
    return row


def table(rows: list[dict], a) -> None:
    ct, f32 = a.format == "int4-awq", a.float32_norms
    print(f"| model | seed | group | bf16 | {a.format} (ours) | folded (ours) | "
          + ("folded -> CT (transformers) | " if ct else "") + "change |"
          + (" folded, norms float32 (ours) | change |" if f32 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if ct else "") + "---|" + ("---|---|" if f32 else ""))
    for r in rows:
        extra = ""
        if f32:
            v = r["folded_f32_norms_ours"]
            extra = f" {v:.3f} | {100 * (v / r['unfolded_ours'] - 1):+.2f}% |"
        print(f"| {r['model']} | {r['seed']} | {r['group']} | {r['bf16']:.3f} | {r['unfolded_ours']:.3f} "
              f"| {r['folded_ours']:.3f} | " + (f"{r['folded_transformers']:.3f} | " if ct else "")
              + f"{r['rel_change_pct']:+.2f}% |" + extra)
    print("\n| model | median change | range | worst |\n|---|---|---|---|")
    for m in dict.fromkeys(r["model"] for r in rows):
        ch = [r["rel_change_pct"] for r in rows if r["model"] == m]
        print(f"| {m} | {statistics.median(ch):+.2f}% | {min(ch):+.2f}% .. {max(ch):+.2f}% | "
              f"{max(ch, key=abs):+.2f}% |")
    if a.ablate:
        print("\nAblation (our forward; % vs unfolded): folded with one site's folds dropped\n")
        print("| model | seed | all folds | " + " | ".join(f"- {s}" for s in a.ablate) + " |")
        print("|---|---|---|" + "---|" * len(a.ablate))
        for r in rows:
            u = r["unfolded_ours"]
            cells = " | ".join(f"{100 * (r['ablate'][s] / u - 1):+.2f}%" for s in a.ablate)
            print(f"| {r['model']} | {r['seed']} | {100 * (r['folded_ours'] / u - 1):+.2f}% | {cells} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-qwen3-moe,tiny-mixtral,tiny-deepseek-v3")
    ap.add_argument("--format", default="int4-awq", choices=("int4-awq", "w4a8-awq"))
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--seed", type=int, default=None, help="one calibration seed (overrides --seeds)")
    ap.add_argument("--ablate", default="", help=f"fold sites to drop one at a time ({', '.join(SITES)})")
    ap.add_argument("--float32-norms", action="store_true",
                    help="also fold with the norms and router kept in float32 (the rounding noise floor)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    seeds = [a.seed] if a.seed is not None else [int(s) for s in a.seeds.split(",")]
    a.ablate = [s for s in a.ablate.split(",") if s]
    if bad := [s for s in a.ablate if s not in SITES]:
        raise SystemExit(f"--ablate {','.join(bad)}: expected {', '.join(SITES)}")
    print(f"# {a.format} folded vs unfolded: {a.num_samples} calibration samples x {a.seq_len} tokens, seeds "
          f"{seeds}; held-out perplexity on {a.windows} windows x 256 tokens of calib/data/eval.txt", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as t:
        for m in a.models.split(","):
            for s in seeds:
                rows.append(one(m, s, a, Path(t)))
                print(json.dumps(rows[-1]), flush=True)
    table(rows, a)
    if a.json:
        Path(a.json).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
