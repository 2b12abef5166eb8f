"""How torch's idle OpenMP threads wait, on an idle CPU and beside busy processes (other jobs, torchrun ranks
sharing a host, a container's CPU quota): one stage run with libgomp's default (an idle thread spins 300,000
rounds, then sleeps), with the `moepress` command's default (GOMP_SPINCOUNT=10000, unless the user set a spin
count or OMP_WAIT_POLICY) and with OMP_WAIT_POLICY=PASSIVE (it sleeps at once).

    python bench/threads.py MODEL [--stage "prune --method frequency --ratio 0.5"] [--load 2] [--repeat 3]

Prints wall (and CPU) seconds per setting and load, the ratio to libgomp's default, and whether the outputs
are byte for byte the same (the setting only decides how an idle thread waits). A MoE layer with hundreds of
experts runs thousands of small per-expert ops; with more runnable threads than cores a spinning thread holds
the core the working one needs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True: pass"
# the Click group without moepress.cli.main, which would set the spin count: libgomp's own default
UNSET = "import sys; from moepress.cli import cli; sys.argv[0] = 'moepress'; cli(prog_name='moepress')"
POLICIES = {"libgomp": {}, "moepress": {"GOMP_SPINCOUNT": "10000"}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_once(model: str, stage: list[str], policy: str, load: int, work: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the stage, digest of its safetensors) with ``load`` busy processes beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        out = work / f"out-{policy}"
        env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
               **POLICIES[policy]}
        cmd = [sys.executable, *(["-c", UNSET] if policy == "libgomp" else ["-m", "moepress"])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run([*cmd, *stage, model, "-o", str(out), "--force", "--quiet"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, digest(out)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--stage", default="prune --method frequency --ratio 0.5",
                    help="the moepress command and its options, before MODEL")
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes beside the loaded runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"of: {', '.join(POLICIES)}")
    a = ap.parse_args(argv)
    stage, policies = shlex.split(a.stage), a.policies.split(",")
    print(f"{a.stage} {a.model}; {os.cpu_count()} cores, torch threads = cores; median of {a.repeat}, interleaved; "
          "wall s (CPU s), ratio to libgomp's default")
    print(f"| load | {' | '.join(policies)} | same bytes |")
    print("|---|" + "---|" * (len(policies) + 1))
    with tempfile.TemporaryDirectory(prefix="moepress-threads-") as tmp:
        for load in (0, a.load):
            runs: dict[str, list[tuple[float, float, str]]] = {p: [] for p in policies}
            for _ in range(a.repeat):
                for policy in runs:
                    runs[policy].append(run_once(a.model, stage, policy, load, Path(tmp)))
            wall = {p: statistics.median(r[0] for r in rs) for p, rs in runs.items()}
            cpu = {p: statistics.median(r[1] for r in rs) for p, rs in runs.items()}
            base = wall.get("libgomp", wall[policies[0]])
            same = len({r[2] for rs in runs.values() for r in rs}) == 1
            cells = [f"{wall[p]:.1f} s ({cpu[p]:.1f}) {wall[p] / base:.2f}x" for p in policies]
            print(f"| {load} busy | {' | '.join(cells)} | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
