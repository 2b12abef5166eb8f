"""Throughput at the I/O limit: moepress quantize vs the time to just read the checkpoint.

    python bench/throughput.py MODEL [--modes fp8-block,fp8,int4-awq] [--num-samples 16 --seq-len 256]

For one checkpoint (e.g. from bench/make_synthetic.py), in one run:
  * the I/O floor: reading every shard once, sequentially, with the page cache dropped first
    (so the number is the disk's, not RAM's), through the page cache and with O_DIRECT; the
    faster of the two is the floor the ratios use;
  * `moepress quantize` for each mode (calibration-free fp8-block; calibrated fp8 and int4-awq),
    each in its own process, cache dropped before each: the process's wall time (start-up and imports
    included), ratio to the floor, peak RSS (from wait4 of that process alone) and, less an import-only
    process's, as a multiple of the largest layer;
  * llm-compressor's `model_free_ptq` FP8_BLOCK as the peer, where llmcompressor is installed
    (--peer-python: it pins other transformers / compressed-tensors versions, so its own venv).
  * core scaling of calibration-free fp8-block on the CPU (issue 22): the same run pinned to 1, 2, ...
    cores (``--cores 1,2``; the affinity mask ``taskset -c 0`` / ``-c 0,1`` sets, with OMP_NUM_THREADS
    to match), its speed-up over one core and its ratio to the raw read.
Prints a Markdown table. Targets: calibration-free quantization within 1.5x of the raw read and
faster than the peer (issue #10); peak RSS under 2x the largest layer plus activations; 2 cores
>= 1.8x one core, and on a machine with the cores for it, the disk's speed (issue 22).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def drop_cache(paths, whole: bool = True) -> str:
    """Empty the page cache: all of it where we may and ``whole`` (root: /proc/sys/vm/drop_caches), else
    these files' pages (posix_fadvise DONTNEED, advisory: the kernel may keep some, a sandboxed kernel all).
    Returns which was done, for the record beside the raw read it makes cold."""
    os.sync()
    try:
        if whole:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise (advisory)"


def raw_read(files: list[Path], chunk: int = 64 << 20, direct: bool = False) -> float | None:
    """Seconds to read every shard once, sequentially, in 64 MiB requests: through the page
    cache, or with O_DIRECT into an aligned buffer (no kernel copy; None where refused)."""
    import mmap

    drop_cache(files)
    t0 = time.monotonic()
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    try:
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError:
                return None
            try:
                off = 0
                while n := os.preadv(fd, [view], off):
                    off += n
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    return time.monotonic() - t0


def timed(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MB (1e6 bytes, as the pinned runs' host_rss_peak_bytes) of that process, exit
    code, stderr tail). stderr goes to a file: a pipe read only after the wait would block a child writing more
    than the pipe holds."""
    with tempfile.TemporaryFile("w+") as err_file:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        err_file.seek(0)
        err = err_file.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_maxrss * 1024 / 1e6, p.returncode, err[-400:]  # ru_maxrss: KiB


def import_baseline_mb(env: dict) -> float:
    """Peak RSS MB of a process that only imports what `moepress quantize` imports: what does not grow with
    the layer, left out of the "x largest layer" column."""
    code = "import torch, moepress.cli, moepress.compress.quantize"
    return timed([sys.executable, "-c", code], env)[1]


def one_cpu_per_core(cpus: list[int]) -> list[int]:
    """``cpus`` ordered so that each physical core's first logical CPU comes before any core's second
    (hyperthreads): the first n are n cores where the machine has them (sysfs topology; as given without it)."""
    def core(c: int) -> tuple[str, str]:
        t = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            return (t / "physical_package_id").read_text().strip(), (t / "core_id").read_text().strip()
        except OSError:
            return ("", str(c))
    seen: dict[tuple[str, str], int] = {}
    rank = {}
    for c in cpus:
        k = core(c)
        rank[c] = seen.get(k, 0)
        seen[k] = rank[c] + 1
    return sorted(cpus, key=lambda c: (rank[c], c))


def largest_layer_bytes(model: Path) -> int:
    idx = json.loads((model / "model.safetensors.index.json").read_text())
    from moepress.compress.checkpoint import CheckpointReader

    r = CheckpointReader(model)
    per: dict[int, int] = {}
    for name in idx["weight_map"]:
        parts = name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            info = r.info(name)
            per[i] = per.get(i, 0) + info.nbytes
    return max(per.values()) if per else 0


def core_scaling(model: Path, out: Path, cores: list[int], floor: float, files: list[Path],
                 repeat: int = 1) -> list[tuple]:
    """fp8-block on n allowed cores (one logical CPU per physical core first) for each n in ``cores``,
    ``repeat`` rounds over the core counts (interleaved, so a shared machine's load drifts over all of them
    alike; the median counts, the spread shows the noise): rows (name, seconds, x floor, peak RSS MB,
    status). Seconds are the stage's own (its ``--json`` result: the interpreter's start and imports
    excluded, which on a loaded machine would swamp the difference); the status gives the speed-up over
    the first core count."""
    allowed = one_cpu_per_core(sorted(os.sched_getaffinity(0)))
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in cores if n <= len(allowed)}
    errors: dict[int, str] = {}
    for _ in range(repeat):
        for n in runs:
            if n not in errors:
                res = _pinned_fp8_block(model, out, set(allowed[:n]), files)
                if isinstance(res, str):
                    errors[n] = res
                else:
                    runs[n].append((res["seconds"], res["memory"]["host_rss_peak_bytes"] / 1e6))
    rows, first = [], None
    for n in cores:
        if n not in runs:
            rows.append((f"fp8-block on {n} cores", None, None, None, f"only {len(allowed)} cores here"))
            continue
        cpus = allowed[:n]
        name = f"fp8-block, taskset -c {','.join(map(str, sorted(cpus))) if n <= 4 else f'{n} cores'}"
        if n in errors:
            rows.append((name, None, None, None, errors[n]))
            continue
        secs, rss = statistics.median(r[0] for r in runs[n]), max(r[1] for r in runs[n])
        first = first or (n, secs)
        spread = (f"median of {len(runs[n])} ({min(r[0] for r in runs[n]):.2f}-{max(r[0] for r in runs[n]):.2f} s); "
                  if len(runs[n]) > 1 else "")
        status = spread + ("ok" if n == first[0] else
                           f"ok; {first[1] / secs:.2f}x {first[0]} core(s) (target 2 vs 1: >= 1.8x)"
                           + _paired(runs[first[0]], runs[n]))
        rows.append((f"{name} (stage seconds)", secs, secs / floor, rss, status))
    return rows


def _paired(base: list[tuple[float, float]], runs: list[tuple[float, float]]) -> str:
    """The speed-up within each round (each core count runs once per round, one after the other),
    median and range: a load that drifts between rounds cancels out of these, unlike out of the
    ratio of the medians."""
    ratios = [b[0] / r[0] for b, r in zip(base, runs, strict=False)]  # rounds both completed
    if len(ratios) < 2:
        return ""
    return f"; per round {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _pinned_fp8_block(model: Path, out: Path, cpus: set[int], files: list[Path]) -> dict | str:
    """One fp8-block run on ``cpus`` (what ``taskset -c`` sets, OMP_NUM_THREADS to match), the page
    cache dropped first: its ``--json`` result, or the error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus))}
    drop_cache(files)
    p = subprocess.run([sys.executable, "-m", "moepress", "quantize", str(model), "--format", "fp8-block",
                        "--device", "cpu", "-o", str(out), "--force", "--quiet", "--json"],
                       env=env, capture_output=True, text=True,
                       preexec_fn=lambda c=cpus: os.sched_setaffinity(0, c))
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        return f"exit {p.returncode}: {p.stderr.strip()[-200:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--modes", default="fp8-block,fp8,int4-awq")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cores", default="1,2", help="Core counts for the fp8-block scaling rows ('' for none); "
                    "e.g. 1,2,16 on a 16-core machine.")
    ap.add_argument("--repeat", type=int, default=3, help="Rounds over the core counts in the scaling rows "
                    "(the median counts).")
    ap.add_argument("--workdir", type=Path, default=None, help="Where outputs go (default: next to MODEL).")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="Python with llmcompressor installed (it pins other transformers / compressed-tensors "
                         "versions than moepress, so it usually lives in its own venv).")
    a = ap.parse_args(argv)

    files = sorted(a.model.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    parent = Path(a.workdir or a.model.parent)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moepress-bench-", dir=parent))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    try:
        buffered, direct = raw_read(files), raw_read(files, direct=True)
        floor = min(t for t in (buffered, direct) if t is not None)
        rows.append(("raw read, page cache (cat)", buffered, buffered / floor, None, "ok"))
        rows.append(("raw read, O_DIRECT", direct, direct / floor if direct else None, None,
                     "ok" if direct else "O_DIRECT refused here"))
        rows += core_scaling(a.model, work / "scaling", [int(c) for c in a.cores.split(",") if c], floor, files,
                             a.repeat)
        exe = [sys.executable, "-m", "moepress"]
        from moepress.compress.formats import FORMATS

        for mode in [m for m in a.modes.split(",") if m]:
            out = work / mode
            # a calibration-free format refuses the calibration options
            calibrated = FORMATS[mode].calibrated
            calib = ["--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len)] if calibrated else []
            drop_cache(files)
            wall, rss, rc, err = timed(exe + ["quantize", str(a.model), "--format", mode, "-o", str(out),
                                              "--force", "--quiet", *calib], env)
            rows.append((f"moepress quantize {mode} (process wall)", wall, wall / floor, rss,
                         "ok" if rc == 0 else f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"))
            shutil.rmtree(out, ignore_errors=True)
        has_peer = subprocess.run([a.peer_python, "-c", "import llmcompressor"], capture_output=True).returncode == 0
        if has_peer:
            ver = subprocess.run([a.peer_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            peer = [a.peer_python, "-c",
                    "import sys; from llmcompressor import model_free_ptq; "
                    "model_free_ptq(sys.argv[1], sys.argv[2], scheme='FP8_BLOCK', "
                    "ignore=['lm_head', 're:.*mlp.gate$'], max_workers=int(sys.argv[3]))",
                    str(a.model), str(work / "peer"), str(a.threads)]
            drop_cache(files)
            wall, rss, rc, err = timed(peer, env)
            rows.append((f"llm-compressor {ver} model_free_ptq FP8_BLOCK ({a.threads} workers, process wall)", wall,
                         wall / floor, rss, "ok" if rc == 0 else f"exit {rc}: {err.strip()[-200:]}"))
            shutil.rmtree(work / "peer", ignore_errors=True)
        else:
            rows.append(("llm-compressor model_free_ptq FP8_BLOCK", None, None, None,
                         f"not installed for {a.peer_python}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    layer, base = largest_layer_bytes(a.model), import_baseline_mb(env)
    print(f"checkpoint {a.model}: {total / 1e9:.2f} GB in {len(files)} shards; largest layer {layer / 1e6:.0f} MB; "
          f"import-only process {base:.0f} MB (left out of x largest layer); "
          f"{a.threads} threads; {os.cpu_count()} CPUs")
    print("| run | seconds | x I/O floor | peak RSS MB | (peak - import-only) x largest layer | status |")
    print("|---|---|---|---|---|---|")
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, secs, ratio, rss, status in rows:
        own = rss and layer and not name.startswith("llm-compressor")  # the peer imports other things
        print(f"| {name} | {f(secs, '.1f')} | {f(ratio, '.2f')} | {f(rss, '.0f')} | "
              f"{f((rss - base) * 1e6 / layer if own else None, '.2f')} | {status} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
