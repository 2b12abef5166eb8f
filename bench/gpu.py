"""One command, one table: what each stage costs per layer on the CPU and on the GPU, at Kimi K2's
real widths, projected to the whole Kimi K2 (61 layers, 384 experts) against issue 22's targets.

    python bench/gpu.py                 # on a GPU host: Kimi K2 widths, GPU + CPU, under 8 minutes
    python bench/gpu.py --small         # tiny shapes (automatic without CUDA): CI keeps it alive
    python bench/gpu.py --experts 384   # every expert of a real layer on the GPU, if time allows

What it does, in one run:
  * writes two synthetic checkpoints (compress/synthetic.py) with Kimi K2's widths (hidden 7168,
    routed-expert width 2048, dense width 18432; block FP8 as Kimi K2 ships; MLA attention,
    sigmoid routing, a shared expert): layer 0 dense, layer 1 MoE; ``--experts`` routed experts for
    the GPU runs, ``--cpu-experts`` for the CPU runs (the CPU cannot do 384 in the time);
  * reads the GPU checkpoint once from a dropped page cache (the raw read, fp8-block's reference);
  * runs each mode (fp8-block calibration-free; fp8 calibrated; int4-awq, the default, with GPTQ
    rounding; int4-gptq; prune ``auto`` at 50%) as ``python -m moepress ... --device D --json`` in its
    own process: per-layer seconds from the progress events, host RSS and GPU peaks from the JSON
    result (moepress/device.py); GPU runs first (issue 22's targets first: int4-awq, prune auto,
    fp8-block), each with its WEIGHT's share of the time left, then the CPU runs (beside a GPU only
    ``--cpu-modes`` fp8-block: a calibrated mode does not finish a Kimi-width layer on a CPU in the
    time); a run that would overrun is stopped and shows the layers it finished;
  * a streamed forward on each device: the share of time the compute waited for uploads;
  * projects: Kimi K2 = dense layer + 60 x (MoE layer / experts x 384) (an upper bound: the MoE
    layer's attention and shared expert are counted per expert); fp8-block as a multiple of the raw
    read of the same bytes (the faster of a buffered and an O_DIRECT read); host RAM as the baseline
    (imports, and CUDA's context and pinned staging for a GPU row) plus what grew, scaled by Kimi K2's stored
    MoE layer / the checkpoint's (none where the checkpoint's dense layer is the larger: it sets the peak).

Targets (issue 22, one H200): fp8-block within 1.5x the raw read; int4-awq <= 2 h; prune auto
<= 1 h; host RAM <= 64 GB. Prints a Markdown table; ``--json PATH`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_synthetic import scaled_config  # noqa: E402
from throughput import drop_cache, raw_read  # noqa: E402

KIMI_LAYERS, KIMI_MOE_LAYERS, KIMI_EXPERTS = 61, 60, 384
# Kimi K2's stored MoE layer (block FP8): 384 routed + 1 shared expert x 3 x 7168 x 2048 bytes, plus
# its MLA attention (q_a, q_b, kv_a, kv_b, o: ~101M FP8 weights) and router: one streamed layer's bytes
KIMI_MOE_LAYER_BYTES = 385 * 3 * 7168 * 2048 + 112e6  # attention: ~101M FP8 weights; router 384 x 7168 F32
MODES = {  # name -> (stage command, options, calibrated); the order they run in: issue 22's targets first
    "int4-awq": (["quantize", "--format", "int4-awq"], True),
    "prune-auto": (["prune", "--method", "auto", "--ratio", "0.5"], True),
    "fp8-block": (["quantize", "--format", "fp8-block"], False),
    "int4-gptq": (["quantize", "--format", "int4-gptq"], True),
    "fp8": (["quantize", "--format", "fp8"], True),
}
# each run's share of the time left (run_timeout): issue 22's targets first and most (int4-awq <= 2 h,
# prune auto <= 1 h), calibration-free fp8-block needs one read of the layers
WEIGHT = {"int4-awq": 4.0, "prune-auto": 3.0, "fp8-block": 1.0, "int4-gptq": 2.0, "fp8": 1.0}
CPU_WEIGHT = 1.5  # a CPU run (fp8-block beside a GPU)
TARGET_HOURS = {"int4-awq": 2.0, "prune-auto": 1.0}
TARGET_RAW_RATIO = 1.5
TARGET_HOST_GB = 64.0


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synthetic(out: Path, f: float, experts: int, vocab: int, top_k: int = 8, layers: int = 2) -> Path:
    """Kimi K2 at width factor ``f``: layer 0 dense, the others MoE; block FP8; with a tokenizer."""
    from moepress.compress.checkpoint import aux_files
    from moepress.compress.synthetic import write_synthetic
    from moepress.manifest import file_digests, read_manifest, update_manifest
    from moepress.models import resolve as resolve_model

    cfg = scaled_config(f, layers, experts, top_k, vocab)
    cfg["first_k_dense_replace"] = 1
    write_synthetic(cfg, out, block_fp8=True, force=True)
    for p in aux_files(resolve_model("tiny-qwen3-moe")):  # its vocabulary (4096) fits ``vocab``
        if p.name.startswith("tokenizer"):
            shutil.copy2(p, out / p.name)
    update_manifest(out, files=file_digests(out, read_manifest(out).get("files")))
    return out


def layer_bytes(path: Path) -> list[int]:
    from moepress.compress.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return [sum(r.info(n).nbytes for n in r.layer_names(i)) for i in r.layer_indices()]


def run_stage(mode: str, src: Path, out: Path, device: str, calib: list[str], timeout: float) -> dict:
    """One stage in its own process; per-layer seconds from its progress events, peaks from its result."""
    args, calibrated = MODES[mode]
    cmd = [sys.executable, "-m", "moepress", *args, str(src), "-o", str(out), "--force", "--json",
           "--device", device, *(calib if calibrated else [])]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done: list[float] = []
    race: list[float] = []  # prune auto: the plan race's own per-layer progress (stage "plans")
    err_tail: list[str] = []
    stdout: list[str] = []

    def events():
        for line in p.stderr:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                err_tail.append(line.strip())
                continue
            if ev.get("event") == "progress" and ev.get("stage") == args[0]:
                done.append(float(ev["elapsed_s"]))
            elif ev.get("event") == "progress" and ev.get("stage") == "plans":
                race.append(float(ev["elapsed_s"]))
            elif ev.get("event") == "info" or "error" in ev.get("event", ""):
                err_tail.append(str(ev.get("message", ev)))

    readers = [threading.Thread(target=events, daemon=True),
               threading.Thread(target=lambda: stdout.extend(p.stdout), daemon=True)]
    for r in readers:
        r.start()
    try:
        p.wait(timeout=max(timeout, 1.0))
        for r in readers:
            r.join(timeout=10)
        status = "ok" if p.returncode == 0 else f"exit {p.returncode}: {(err_tail or [''])[-1][:160]}"
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        status = f"stopped after {timeout:.0f} s (time budget)"
    wall = time.monotonic() - t0
    result = {}
    for line in reversed("".join(stdout).strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    layers = per_layer(done, race)
    mem = result.get("memory") or {}
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "device": device, "status": status, "wall_s": wall, "layer_s": layers,
            "stage_s": result.get("seconds"),
            "host_peak": mem.get("host_rss_peak_bytes"), "gpu_peak": mem.get("gpu_peak_bytes")}


def per_layer(done: list[float], race: list[float]) -> list[float]:
    """Seconds per layer from a task's cumulative ``elapsed_s``; prune auto's plan race (its own task, run
    inside the prune task before the prune's first layer, whose elapsed time therefore holds the whole
    race) is given back to the layers it ran: each layer's race time is added to that layer."""
    layers = [b - a for a, b in zip([0.0] + done, done, strict=False)]
    raced = [b - a for a, b in zip([0.0] + race, race, strict=False)]
    if layers and raced:
        layers[0] = max(layers[0] - race[-1], 0.0)
        layers = [t + (raced[i] if i < len(raced) else 0.0) for i, t in enumerate(layers)]
    return layers


def idle_share(src: Path, device: str, tokens: int) -> float | None:
    """A streamed forward over ``src`` on ``device``: the share of its time spent waiting for uploads."""
    import torch

    from moepress.compress.stream import StreamedModel
    from moepress.device import idle_fraction, resolve, synchronize

    dev = resolve(device)
    sm = StreamedModel(str(src), device=dev, keep_stored=True)
    ids = [torch.randint(0, sm.adapter.vocab_size, (1, tokens))]
    t0 = time.perf_counter()
    sm.forward(ids)
    synchronize(dev)
    return idle_fraction(sm.uploader.timings, time.perf_counter() - t0) if sm.uploader.timings else 0.0


def baseline_rss(device: str = "cpu") -> int:
    """Peak RSS of a process that only imports what a stage imports (Python, torch, moepress) and, for a GPU
    row, starts CUDA as a stage does (context, cuBLAS, the uploader's pinned staging): what does not grow
    with the layer."""
    code = ("import torch, moepress.cli, moepress.compress.quantize, moepress.compress.prune; "
            "from moepress import memwatch; from moepress.device import Uploader; "
            + ("torch.cuda.init(); a = torch.ones(256, 256, device='cuda'); (a @ a).sum().item(); "
               "p = torch.empty(Uploader.PINNED_BYTES, dtype=torch.uint8, pin_memory=True); p.fill_(0); "
               if device != "cpu" else "")
            + "print(memwatch.hwm())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def project(row: dict, experts: int, moe_layer_bytes: int, raw_s: float | None, raw_bytes: int,
            base: int, dense_layer_bytes: int = 0) -> dict:
    """Kimi K2 figures from one row: hours, x raw read (fp8-block), host GB (the process's baseline
    plus what grew with the layer, scaled to Kimi K2's stored MoE layer; none where the checkpoint's dense
    layer is larger than its MoE layer)."""
    ls = row["layer_s"]
    out = {"per_expert_s": None, "kimi_h": None, "raw_ratio": None, "kimi_host_gb": None}
    if len(ls) >= 2:
        per_expert = ls[1] / experts
        out["per_expert_s"] = per_expert
        out["kimi_h"] = (ls[0] + KIMI_MOE_LAYERS * per_expert * KIMI_EXPERTS) / 3600
    if row["mode"] == "fp8-block" and raw_s and row["status"] == "ok":
        out["raw_ratio"] = row["stage_s"] / raw_s if row.get("stage_s") else None  # the whole stage, all bytes
        if out["kimi_h"] is not None:  # at the raw read's rate, Kimi K2's bytes take
            out["kimi_raw_h"] = KIMI_MOE_LAYER_BYTES * KIMI_MOE_LAYERS / (raw_bytes / raw_s) / 3600
    if row["host_peak"] and moe_layer_bytes >= dense_layer_bytes:
        # what grew with the layer, scaled to Kimi K2's; not where the dense layer is the larger (then it sets
        # the peak, which the same dense layer in Kimi K2 would set too, and scaling it by the MoE layer misleads)
        grown = max(row["host_peak"] - base, 0)
        out["kimi_host_gb"] = (base + grown / moe_layer_bytes * KIMI_MOE_LAYER_BYTES) / 1e9
    return out


def verdict(row: dict) -> str:
    if row["status"] != "ok":
        return "-"
    checks = []
    if row["mode"] in TARGET_HOURS and row.get("kimi_h") is not None:
        checks.append(row["kimi_h"] <= TARGET_HOURS[row["mode"]])
    if row["mode"] == "fp8-block" and row.get("raw_ratio") is not None:
        checks.append(row["raw_ratio"] <= TARGET_RAW_RATIO)
    if row.get("kimi_host_gb") is not None:
        checks.append(row["kimi_host_gb"] <= TARGET_HOST_GB)
    return "-" if not checks else ("meets" if all(checks) else "misses")


def table(rows: list[dict], head: str) -> str:
    def f(v, spec, scale=1.0):
        return "-" if v is None else format(v / scale, spec)

    lines = [head, "",
             "| mode | device | experts | dense layer s | MoE layer s | s / expert | host RSS GB | GPU peak GB | "
             "Kimi K2 h (proj.) | x raw read | Kimi K2 host GB (proj.) | targets | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls = r["layer_s"] + [None, None]
        lines.append(
            f"| {r['mode']} | {r['device']} | {r['experts']} | {f(ls[0], '.2f')} | {f(ls[1], '.2f')} | "
            f"{f(r.get('per_expert_s'), '.4f')} | {f(r['host_peak'], '.2f', 1e9)} | {f(r['gpu_peak'], '.2f', 1e9)} | "
            f"{f(r.get('kimi_h'), '.2f')} | {f(r.get('raw_ratio'), '.2f')} | {f(r.get('kimi_host_gb'), '.1f')} | "
            f"{verdict(r)} | {r['status']} |")
    return "\n".join(lines)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="Tiny shapes, CPU only (automatic without CUDA).")
    ap.add_argument("--experts", type=int, default=None, help="Routed experts of the GPU runs (default 64; small 8).")
    ap.add_argument("--cpu-experts", type=int, default=None, help="Routed experts of the CPU runs (4; small 8).")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--cpu-modes", default=None,
                    help="Modes of the CPU runs (default: fp8-block beside a GPU, whose calibrated modes cannot "
                         "finish a Kimi-width layer on a CPU in the time; else --modes).")
    ap.add_argument("--devices", default=None, help="Comma list (default: cuda,cpu where CUDA is, else cpu).")
    ap.add_argument("--num-samples", type=int, default=None, help="Calibration samples (default 16; small 4).")
    ap.add_argument("--seq-len", type=int, default=None, help="Tokens per sample (default 256; small 32).")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="Time for the whole bench (default 450 s; small 300): each GPU run may take what is "
                         "left but a floor for each run after it; CPU runs share what is left and stop at their "
                         "share.")
    ap.add_argument("--work", type=Path, default=None, help="Where the synthetic checkpoints go (default: a tmp dir).")
    ap.add_argument("--json", dest="json_path", type=Path, default=None, help="Also write every figure here.")
    a = ap.parse_args(argv)
    cuda = has_cuda()
    a.small = a.small or not cuda
    a.devices = (a.devices or ("cuda,cpu" if cuda and not a.small else "cpu")).split(",")
    a.experts = a.experts or (8 if a.small else 64)
    a.cpu_experts = a.cpu_experts or (8 if a.small else 4)
    a.num_samples = a.num_samples or (4 if a.small else 16)
    a.seq_len = a.seq_len or (32 if a.small else 256)
    a.budget_s = a.budget_s or (300.0 if a.small else 450.0)
    a.modes = [m for m in a.modes.split(",") if m]
    a.cpu_modes = [m for m in (a.cpu_modes or ("fp8-block" if cuda and not a.small else ",".join(a.modes))).split(",")
                   if m]
    bad = [m for m in a.modes + a.cpu_modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad[0]} (expected {', '.join(MODES)})")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    t_start = time.monotonic()
    f = 256 / 7168 if a.small else 1.0
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moepress-gpu-bench-", dir=a.work))
    calib = ["--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len)]
    rows: list[dict] = []
    try:
        counts = {d: (a.cpu_experts if d == "cpu" else a.experts) for d in a.devices}
        top_k = 2 if a.small else 8
        srcs = {n: synthetic(work / f"kimi-{n}e", f, n, 4096, top_k) for n in sorted(set(counts.values()))}
        base = {d: baseline_rss(d) for d in a.devices}
        synth_s = time.monotonic() - t_start
        gpu_src = srcs[counts[a.devices[0]]]
        shapes = json.loads((gpu_src / "config.json").read_text())
        files = sorted(gpu_src.glob("*.safetensors"))
        raw_bytes = sum(p.stat().st_size for p in files)
        cache_drop = drop_cache(files)  # how the reads below were made cold (raw_read drops it the same way)
        reads = {"buffered": raw_read(files), "O_DIRECT": raw_read(files, direct=True)}  # moepress reads O_DIRECT
        raw_s = min(t for t in reads.values() if t is not None)
        runs = [(d, m) for d in a.devices for m in (a.cpu_modes if d == "cpu" else a.modes)]
        for k, (dev, mode) in enumerate(runs):
            left = a.budget_s - (time.monotonic() - t_start) - 20  # 20 s for the table and the idle figure
            timeout = run_timeout(left, dev, runs[k:])
            src = srcs[counts[dev]]
            # cold reads where the raw read is the reference (calibration-free); elsewhere these files' pages
            # only: a whole-cache drop makes every stage re-read torch's CUDA libraries
            drop_cache(sorted(src.glob("*.safetensors")), whole=not MODES[mode][1])
            row = run_stage(mode, src, work / "out", dev, calib, timeout)
            row["experts"] = counts[dev]
            sizes = layer_bytes(src)
            row.update(project(row, counts[dev], sizes[1], raw_s if src == gpu_src else None, raw_bytes,
                               base[dev], sizes[0]))
            if a.small:  # tiny widths say nothing about Kimi K2: no projection, no verdict
                row.update(kimi_h=None, kimi_host_gb=None, raw_ratio=None)
            rows.append(row)
            print(f"  {mode} on {dev}: {row['status']}, layers {[round(x, 2) for x in row['layer_s']]}",
                  file=sys.stderr, flush=True)
            save(a.json_path, {"partial": True, "rows": rows, "raw_read_s": raw_s, "raw_bytes": raw_bytes})
        idle = {d: guarded(idle_share, srcs[counts[d]], d, 2 * a.seq_len) for d in a.devices if d != "cpu"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cfg = shapes
    head = (f"bench/gpu.py on {platform.node()} ({os.cpu_count()} CPUs"
            + (f", {gpu_name()}" if "cuda" in ",".join(a.devices) else ", no GPU") + f"), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; synthetic: Kimi K2 "
            f"{'real widths' if not a.small else 'small widths'} (hidden {cfg['hidden_size']}, experts "
            f"{cfg['moe_intermediate_size']} wide, dense {cfg['intermediate_size']}), layer 0 dense, layer 1 MoE, "
            f"block FP8; raw read {raw_bytes / 1e9:.2f} GB in {raw_s:.2f} s ({raw_bytes / 1e9 / raw_s:.2f} GB/s; "
            + ", ".join(f"{k} {v:.2f} s" if v is not None else f"{k} refused" for k, v in reads.items())
            + f"; page cache dropped by {cache_drop}; {fs_type(work)}); calibration {a.num_samples} x "
            f"{a.seq_len} tokens; process baseline RSS "
            + ", ".join(f"{d} {b / 1e9:.2f} GB" for d, b in base.items()) + "; host RAM not projected where the "
            "dense layer outweighs the MoE layer")
    print(table(rows, head))
    print("\nstreamed forward, share of its time the GPU waited for uploads (idle fraction): "
          + (", ".join(f"{d} {v:.3f}" if v is not None else f"{d} -" for d, v in idle.items()) or "no GPU run"))
    print(f"\ntotal {time.monotonic() - t_start:.0f} s (synthetic checkpoints {synth_s:.0f} s)")
    save(a.json_path, {"head": head, "rows": rows, "idle": idle, "raw_read_s": raw_s, "raw_bytes": raw_bytes,
                       "raw_reads_s": reads, "cache_drop": cache_drop, "baseline_rss": base})
    return 0


def run_timeout(left: float, dev: str, runs: list[tuple[str, str]]) -> float:
    """Seconds for the next run: its WEIGHT's share of what is left among the runs still to come (at most
    600 s; at least 30 s on a GPU, 5 s on the CPU). The time is read from the clock before each run, so a run
    that finishes early leaves its time to the ones after it; issue 22's targets weigh most."""
    share = _weight(dev, runs[0][1]) / sum(_weight(d, m) for d, m in runs)
    return max(min(600.0, left * share), 30.0 if dev != "cpu" else 5.0)


def _weight(dev: str, mode: str) -> float:
    return CPU_WEIGHT if dev == "cpu" else WEIGHT[mode]


def guarded(fn, *args):
    """``fn(*args)``, or the error's text: one failed figure must not lose the rows measured before it."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (recorded in the table, never hidden)
        print(f"  {fn.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def save(path: Path | None, record: dict) -> None:
    """The JSON record, rewritten after every row (a run killed by its time limit keeps what it measured)."""
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, path)


def fs_type(path: Path) -> str:
    """The file system the checkpoints were read from (a tmpfs "raw read" is a memory copy), from /proc/mounts."""
    try:
        mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "file system unknown"
    p = str(Path(path).resolve())
    best = max((m for m in mounts if len(m) > 2 and (p == m[1] or p.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    if best is None:
        return "file system unknown"
    return f"read from {best[2]}" + (" (memory: the raw read is no disk's)" if best[2] in ("tmpfs", "ramfs") else "")


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    sys.exit(main())
