"""Real processes without the import bill: ``run`` / ``Popen`` for ``python -c CODE`` and ``python -m moepress``,
forked from a server that has already imported torch and transformers (and, for ``-m moepress``, moepress).

A test that needs a process of its own (an exit code, a signal, kill -9, stderr without a traceback, a
consumer that never imports moepress) used to start a fresh interpreter, ~5 s of imports each on CI's
2-core machines. A forked child is a process like any other: its own pid, signals, exit status, files and
memory; it runs ``CODE`` / moepress's ``__main__`` exactly as the interpreter would (uncaught exception: a
traceback and exit 1; ``SystemExit``; atexit handlers; non-daemon threads joined). What it does not re-run is
interpreter start-up and the imports the server made, so a test of start-up itself (the ``moepress`` script,
an import error, what importing the CLI imports) keeps ``subprocess``; and a fork starts with the server's
pages resident, so a peak RSS is read from a high-water mark reset after a warm-up (tests/memprobe.py). The
``-c`` server never imports moepress (the consumer scripts assert it); ``moepress=True`` sends a ``-c`` script
that would import it anyway to the server that has.

One server per kind per test worker, started on first use, single-threaded (it forks; a thread holding a
lock would leave that lock held in the child). Children write stdout / stderr to files the client reads.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r'''
import json, os, select, sys
kind = sys.argv[1]
import torch, transformers, transformers.modeling_utils  # noqa: E401 (what every child would import first)
from transformers import AutoModelForCausalLM  # noqa: F401
if kind == "moepress":  # the CLI and what its stages import (the three families' modeling files among them)
    import importlib
    for m in ("cli", "calib.distributed", "calib.config", "compress.arch.deepseek_v3", "compress.arch.mixtral",
              "compress.arch.qwen3_moe", "compress.quantize", "compress.prune", "exporters", "checks", "pipeline"):
        importlib.import_module("moepress." + m)
threads = torch.get_num_threads()
jobs, buf = {}, b""
stdin = sys.stdin.buffer.raw


def child(job):
    import atexit, runpy, signal, threading, traceback  # noqa: E401
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if job["new_session"]:
        os.setsid()
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    torch.set_num_threads(int(job["env"].get("OMP_NUM_THREADS") or threads))
    for fd, path, mode in ((0, job["stdin"], os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_APPEND),
                           (2, job["stderr"], os.O_WRONLY | os.O_APPEND)):
        f = os.open(path, mode)
        os.dup2(f, fd)
        os.close(f)
    argv = job["argv"]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:  # as the interpreter prints it: from the script's frame on, not this function's
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


print(json.dumps({"ready": os.getpid()}), flush=True)
while True:
    ready, _, _ = select.select([stdin], [], [], 0.02 if jobs else None)  # children to reap: poll, else wait
    if ready:
        chunk = os.read(stdin.fileno(), 1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(job)
            jobs[pid] = job["id"]
            print(json.dumps({"id": job["id"], "pid": pid}), flush=True)
    while jobs:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        print(json.dumps({"id": jobs.pop(pid), "rc": os.waitstatus_to_exitcode(status)}), flush=True)
while jobs:
    pid, status = os.waitpid(-1, 0)
    jobs.pop(pid, None)
'''

_servers: dict[str, _Server] = {}


class _Server:
    def __init__(self, kind: str):
        # a moepress child runs the code this process imports (PYTHONPATH kept: a checkout run through a path hook
        # or sitecustomize); a consumer child imports only what is installed
        drop = ("OMP_NUM_THREADS",) if kind == "moepress" else ("PYTHONPATH", "OMP_NUM_THREADS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        if kind == "moepress" and "OMP_WAIT_POLICY" not in env:  # what the `moepress` entry point sets before torch
            env.setdefault("GOMP_SPINCOUNT", "10000")
        self.dir = Path(tempfile.mkdtemp(prefix=f"forkserver-{kind}-"))
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=self.dir, env=env)
        self.buf, self.done, self.pids, self.n = b"", {}, {}, 0
        line = self._line(time.monotonic() + 300)
        assert line and "ready" in line, f"forkserver {kind} did not start"

    def _line(self, deadline: float) -> dict | None:
        """The server's next message, None at the deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"forkserver exited ({self.proc.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _take(self, msg: dict) -> None:
        if "rc" in msg:
            self.done[msg["id"]] = msg["rc"]
        elif "pid" in msg:
            self.pids[msg["id"]] = msg["pid"]

    def start(self, argv, env, cwd, stdin, new_session, merge) -> tuple[int, int, Path]:
        self.n += 1
        job_id, d = self.n, self.dir / str(self.n)
        d.mkdir()
        (d / "out").touch()
        (d / "err").touch()
        if stdin is None:
            (d / "in").touch()
        else:
            (d / "in").write_bytes(stdin)
        job = {"id": job_id, "argv": argv, "env": dict(env), "cwd": str(cwd or os.getcwd()), "stdin": str(d / "in"),
               "stdout": str(d / "out"), "stderr": str(d / ("out" if merge else "err")), "new_session": new_session}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        while job_id not in self.pids:
            msg = self._line(time.monotonic() + 60)
            assert msg is not None, "forkserver did not fork"
            self._take(msg)
        return job_id, self.pids.pop(job_id), d

    def wait(self, job_id: int, timeout: float | None) -> int | None:
        deadline = time.monotonic() + (1e9 if timeout is None else timeout)
        while job_id not in self.done:
            msg = self._line(deadline)
            if msg is None:
                return None
            self._take(msg)
        return self.done.pop(job_id)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _server(argv: list[str], moepress: bool) -> _Server:
    if len(argv) < 3 or argv[0] != sys.executable or argv[1] not in ("-c", "-m") or \
            (argv[1] == "-m" and argv[2] != "moepress"):
        raise ValueError(f"forkserver runs `python -c CODE ...` and `python -m moepress ...`, not {argv[:3]}")
    kind = "moepress" if moepress or argv[1] == "-m" else "plain"
    if kind not in _servers:
        _servers[kind] = _Server(kind)
    return _servers[kind]


@atexit.register
def _close_all() -> None:
    for s in _servers.values():
        s.close()


class Popen:
    """The part of ``subprocess.Popen`` the tests use; stdout / stderr are read when the process has ended, or
    followed as written (``follow``). ``moepress=True``: a ``-c`` script forked from the server that imported
    moepress (a script that imports it anyway)."""

    def __init__(self, argv, *, env=None, cwd=None, text=False, input=None, start_new_session=False, stderr=None,
                 moepress=False, **_ignored):
        argv = [str(a) for a in argv]
        self.args, self.text, self.returncode = argv, text, None
        self._srv = _server(argv, moepress)
        data = input.encode() if isinstance(input, str) else input
        self._id, self.pid, self._dir = self._srv.start(argv[1:], os.environ if env is None else env, cwd, data,
                                                        start_new_session, stderr == subprocess.STDOUT)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._srv.wait(self._id, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._srv.wait(self._id, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _read(self, name: str):
        data = (self._dir / name).read_bytes()
        return data.decode(errors="replace") if self.text else data

    def follow(self, name: str = "err", poll: float = 0.02):
        """The lines of the child's stderr ("err") or stdout ("out") as it writes them, until it has ended."""
        with open(self._dir / name, errors="replace") as f:
            part = ""
            while True:
                chunk = f.readline()
                if chunk:
                    part += chunk
                    if part.endswith("\n"):
                        yield part
                        part = ""
                elif self.poll() is not None:
                    rest = part + f.read()
                    yield from rest.splitlines(keepends=True)
                    return
                else:
                    time.sleep(poll)

    def communicate(self, input=None, timeout: float | None = None):
        self.wait(timeout)
        return self._read("out"), self._read("err")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(argv, *, env=None, cwd=None, timeout=None, text=False, input=None, capture_output=True, check=False,
        moepress=False) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, ...)`` in a forked child (a timeout kills it and raises)."""
    p = Popen(argv, env=env, cwd=cwd, text=text, input=input, moepress=moepress)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    res = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check:
        res.check_returncode()
    return res


SPAWN = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
fn = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])
fn(int(sys.argv[4]), *__import__("json").loads(sys.argv[5]))
"""


def spawn(fn, args: tuple, nprocs: int, timeout: float = 600) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``: ``fn(i, *args)`` in ``nprocs`` forked processes at once
    (``fn`` a module-level function, ``args`` JSON values); raises with a failed process's stderr."""
    where = str(Path(sys.modules[fn.__module__].__file__).parent)
    procs = [Popen([sys.executable, "-c", SPAWN, where, fn.__module__, fn.__name__, str(i), json.dumps(list(args))],
                   text=True, moepress=True) for i in range(nprocs)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"process {i} of {nprocs} exited {p.returncode}: {err[-3000:]}")
