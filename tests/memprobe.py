"""Peak memory of code run in a child process, read from the kernel's high-water mark.

The child resets its high-water mark (``/proc/self/clear_refs`` 5) after a warm-up, runs the code
under test and reads ``VmHWM``: the kernel raises that mark before any page leaves the resident set
(munmap, brk, madvise), so no spike is missed, unlike a sampling thread. ``wait4``'s ``ru_maxrss``
of the child cannot be used from pytest: a child started by fork/vfork + exec inherits the parent's
(here pytest's, with torch loaded) high-water mark at exec (Linux ``exec_mmap``), measured 411 MB
for a 110 MB child of a 400 MB parent.

Several measurements: ``run_probes`` imports once in a child, then forks it for each case; each
case's process starts from that same state (its RSS that of the imports, as a fresh child's) and
runs its own warm-up, reset and measurement, so no case sees memory another case allocated or
freed. Each process has its own high-water mark; only the imports (a Python subprocess's ~5 s of
CPU) are shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# defined in the child before the probe's code: reset_peak() -> RSS now; peak() -> high-water mark
PRELUDE = textwrap.dedent("""
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")

    def peak():
        return _status("VmHWM")
""")

# a child that forks itself once per case (run_probes): each case runs in a process of its own
FORKER = textwrap.dedent("""
    import io, json, os, sys, traceback

    def _case(code, argv):
        if len(os.listdir("/proc/self/task")) != 1:  # a thread would not exist in the fork
            sys.exit("run_probes: the preload started a thread; a forked case would lack it")
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the case's own process: its code, its last printed line into the pipe
            os.close(r)
            status = 1
            try:
                sys.stdout, sys.argv = io.StringIO(), argv
                exec(code, {**globals(), "__name__": "__main__"})
                os.write(w, sys.stdout.getvalue().strip().splitlines()[-1].encode())
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        os.close(w)
        out = b""
        while chunk := os.read(r, 1 << 16):
            out += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if status:
            sys.exit(f"case {argv[1:]} failed (wait status {status})")
        return json.loads(out)

    _cases = json.loads(sys.argv[1])
    exec(_PRELOAD)  # the imports every case shares, done before the first fork
    print(json.dumps([_case(_CODE, [sys.argv[0], *c]) for c in _cases]))
""")

MB = 2**20


def run_probe(code: str, *args, timeout: int = 300, threads: int | None = None) -> dict:
    """Run ``code`` (which prints one JSON object as its last line) in a child; that object."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_probes(code: str, cases: list[tuple], *, preload: str, timeout: int = 300,
               threads: int | None = None) -> list[dict]:
    """``run_probe(code, *case)`` for each of ``cases``, each in a process of its own forked from one
    child that ran ``preload`` (imports only: it must start no thread, nor allocate what a case
    measures); the cases' objects, in order."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    program = (PRELUDE + f"_PRELOAD = {textwrap.dedent(preload)!r}\n_CODE = {textwrap.dedent(code)!r}\n"
               + FORKER)
    cases_json = json.dumps([[str(a) for a in c] for c in cases])
    p = subprocess.run([sys.executable, "-c", program, cases_json], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
