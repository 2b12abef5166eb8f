"""Batched per-expert quantization vs one by one, and GPTQ's memory on an 18432-wide input (issue 22).

    python bench/experts.py speed [--experts 384 --tokens 4096 --formats int4-gptq,int4-awq]
    python bench/experts.py memory [--width 18432 --out 7168 --tokens 512]

``speed``: one MoE layer of Kimi K2's topology with its widths scaled by 1/16 (hidden 512, expert
width 128, bench/make_synthetic.py's scaling), every routed expert's gate/up and down groups with
statistics from its own routed tokens (top-8 of 384 random routing), quantized through
compress/quantize/experts.py's ExpertBatch: batched, then one by one (the reference) in the same
process. Prints seconds (process CPU time and wall) and the ratio, and checks the two layer results
are bit-identical.

``memory``: the INT4-GPTQ quantizer (formats/_int4.py, the stage's own path) on one linear that reads
an 18432-wide input (Kimi K2's dense down_proj: [7168, 18432]) from its accumulated statistics, in a
child process; prints the child's peak RSS (kernel high-water mark) above its RSS before the
statistics, next to the stored Kimi K2 layer 0 that holds the linear (bf16, and block-FP8 as shipped).
The base is the child's RSS with the stored bf16 weight and the calibration inputs made; the peak
covers the statistics (their float32 sum becomes the Hessian in its own memory), the factor and the
rounding. ``--weights stored,float32`` also hands the quantizer a float32 copy (both must print the
same sha256); ``--code DIR`` measures another tree (e.g. a ``git archive`` of HEAD laid out as the
``moepress`` package) for an A/B of memory and bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _groups(n_exp: int, tokens: int, fmt: str, hidden: int, inter: int, top_k: int, seed: int):
    import torch

    from moepress.compress.quantize.config import QuantConfig
    from moepress.compress.quantize.stats import LinearStats

    g = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(format=fmt)
    X = torch.randn(tokens, hidden, generator=g)
    idx = torch.rand(tokens, n_exp, generator=g).topk(top_k, dim=-1).indices
    groups = []
    for e in range(n_exp):
        x = X[(idx == e).any(-1)]
        wg, wu, wd = (torch.randn(*s, generator=g) * 0.02 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        st = LinearStats(hessian=cfg.needs_hessian(fmt))
        st.add(x)
        std = LinearStats(hessian=cfg.needs_hessian(fmt))
        std.add(torch.nn.functional.silu(x @ wg.T) * (x @ wu.T))
        groups += [(fmt, [f"{e}.gate_proj", f"{e}.up_proj"], [wg, wu], st), (fmt, [f"{e}.down_proj"], [wd], std)]
    return cfg, groups


def speed(a) -> None:
    import torch

    from moepress.compress.quantize import experts
    from moepress.compress.quantize.group import LayerResult

    torch.set_num_threads(a.threads)
    print("| format | experts | tokens | one by one (CPU s / wall s) | batched (CPU s / wall s) | speed-up (CPU) "
          "| identical |")
    print("|---|---|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        cfg, groups = _groups(a.experts, a.tokens, fmt, a.hidden, a.inter, a.top_k, a.seed)
        out = {}
        for batched in (False, True):
            res = LayerResult()
            c0, w0 = time.process_time(), time.monotonic()
            eb = experts.ExpertBatch(res, cfg, batched_int4=batched)
            for f, names, ws, st in groups:
                eb.add(f, names, ws, st)
            eb.flush()
            out[batched] = (time.process_time() - c0, time.monotonic() - w0, res)
        (c1, w1, r1), (c2, w2, r2) = out[False], out[True]
        same = list(r1.tensors) == list(r2.tensors) and all(torch.equal(v, r2.tensors[k])
                                                             for k, v in r1.tensors.items())
        print(f"| {fmt} | {a.experts} x [{a.inter}, {a.hidden}] | {a.tokens} | {c1:.1f} / {w1:.1f} "
              f"| {c2:.1f} / {w2:.1f} | {c1 / c2:.2f}x | {'yes' if same else 'NO'} |", flush=True)


def _stored_layer0() -> dict:
    """Kimi K2's layer 0 (dense: MLA attention + an 18432-wide MLP) in parameters and stored bytes."""
    import torch

    from moepress.compress.arch import get_adapter

    cfg = json.loads((ROOT / "tests" / "data" / "kimi-k2-config.json").read_text())
    with torch.device("meta"):
        layer = get_adapter(cfg).build_layer(0)
    n = sum(p.numel() for p in layer.parameters())
    lin = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    return {"params": n, "bf16": 2 * n, "block_fp8": lin + 2 * (n - lin)}


def memory_child(a) -> None:
    """In the child: statistics of an a.width-wide input, then the INT4-GPTQ quantizer; prints JSON."""
    import torch

    torch.set_num_threads(a.threads)
    from moepress.compress import formats
    from moepress.compress.quantize.config import QuantConfig
    from moepress.compress.quantize.group import quant_context
    from moepress.compress.quantize.stats import LinearStats

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(a.out, a.width, generator=g) * 0.02).to(torch.bfloat16)  # the stored weight
    xs = torch.randn(a.tokens, a.width, generator=g).split(256)  # the calibration inputs
    base = _reset_peak()
    t0 = time.monotonic()
    st = LinearStats(hessian=True)
    for x in xs:
        st.add(x)
    st.single_use = True  # as the stage's groups of one format (compress/quantize/calibrated.py)
    fmt = next(n for n, f in formats.FORMATS.items() if f.gptq and f.quantize is not None)
    out = formats.FORMATS[fmt].quantize([w if a.stored else w.float()], quant_context(QuantConfig(format=fmt), st))
    peak = _status("VmHWM")
    digest = hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                                     for t in out.tensors[0].values())).hexdigest()
    print(json.dumps({"base": base, "peak": peak, "seconds": time.monotonic() - t0, "sha256": digest}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """The kernel's high-water mark reset to the RSS now (tests/memprobe.py); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def memory(a) -> None:
    layer = _stored_layer0()
    print(f"Kimi K2 layer 0: {layer['params'] / 1e6:.0f} M parameters, stored {layer['bf16'] / 1e9:.2f} GB bf16, "
          f"{layer['block_fp8'] / 1e9:.2f} GB block-FP8")
    print("| weight handed to the quantizer | input width | weight | tokens | peak above base (GB) "
          "| x stored layer (bf16) | seconds | sha256 of the stored tensors |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in a.weights.split(","):
        cmd = [sys.executable, __file__, "memory-child", "--width", str(a.width), "--out", str(a.out),
               "--tokens", str(a.tokens), "--threads", str(a.threads), *(["--stored"] if kind == "stored" else [])]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **({"PYTHONPATH": a.code}
                                                                                    if a.code else {})})
        if p.returncode:
            print(f"| {kind} | failed: {p.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["base"]
        label = {"stored": "stored bf16", "float32": "float32 copy"}[kind]
        print(f"| {label} | {a.width} | [{a.out}, {a.width}] | {a.tokens} | {extra / 1e9:.2f} "
              f"| {extra / layer['bf16']:.2f} | {r['seconds']:.0f} | {r['sha256'][:16]} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["speed", "memory", "memory-child"])
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (speed: 4096, memory: 512)")
    ap.add_argument("--hidden", type=int, default=512, help="Kimi K2's 7168 / 14 (make_synthetic's rounding)")
    ap.add_argument("--inter", type=int, default=128, help="Kimi K2's expert width 2048 / 16")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--formats", default="int4-gptq,int4-awq")
    ap.add_argument("--width", type=int, default=18432)
    ap.add_argument("--out", type=int, default=7168)
    ap.add_argument("--weights", default="stored", help="memory: stored (the bf16 weight as stored), float32 "
                    "(a float32 copy, as compress/quantize/group.py FloatWeights hands it), or both: stored,float32")
    ap.add_argument("--stored", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=None, help="memory: PYTHONPATH of another moepress tree to measure (A/B)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.tokens is None:
        a.tokens = 4096 if a.what == "speed" else 512
    {"speed": speed, "memory": memory, "memory-child": memory_child}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
