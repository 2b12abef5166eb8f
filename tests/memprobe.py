"""Peak memory of code run in a child process, read from the kernel's high-water mark.

The child resets its high-water mark (``/proc/self/clear_refs`` 5) after a warm-up, runs the code
under test and reads ``VmHWM``: the kernel raises that mark before any page leaves the resident set
(munmap, brk, madvise), so no spike is missed, unlike a sampling thread. ``wait4``'s ``ru_maxrss``
of the child cannot be used from pytest: a child started by fork/vfork + exec inherits the parent's
(here pytest's, with torch loaded) high-water mark at exec (Linux ``exec_mmap``), measured 411 MB
for a 110 MB child of a 400 MB parent.

The child is forked from tests/forkserver.py's server, which has imported torch, transformers and
moepress (what a probe would import first, ~5 s of CPU a fresh interpreter pays): a process of its own
with its own high-water mark, reset after the probe's warm-up, so the server's pages count as the
imports' baseline, as in a fresh child.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import forkserver

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

    # the heap of a streamed model of gigabytes (moepress/memwatch.py bound_heap), which the probes' stand-ins,
    # of megabytes, would not get by their size
    from moepress.memwatch import bound_heap
    bound_heap()
""")

MB = 2**20


def run_probe(code: str, *args, timeout: int = 300, threads: int | None = None) -> dict:
    """Run ``code`` (which prints one JSON object as its last line) in a child; that object."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    p = forkserver.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)], text=True,
                       timeout=timeout, env=env, moepress=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
