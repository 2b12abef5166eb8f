"""Progress for long stages: per-layer bar with ETA on a terminal, one line per step in
logs, JSON events with --json, nothing with --quiet. Always on stderr (stdout is for results).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# MOEPRESS_KILL_AT=STAGE:N[:SIGNAME] sends SIGKILL (or SIGNAME) to this process when STAGE finishes step N
# (tests only). Read at each step, not at import: the tests fork processes from one that imported moepress.
KILL_AT = "MOEPRESS_KILL_AT"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Task:
    def __init__(self, reporter: "Progress", stage: str, total: int, unit: str):
        self.r, self.stage, self.total, self.unit = reporter, stage, total, unit
        self.done = 0
        self.t0 = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, steps) at the first advance
        self._bar = None

    def eta(self) -> float | None:
        """Seconds left at the rate of the steps after the first: the first is unlike the rest (DeepSeek's dense
        layer 0 before 60 MoE layers, the embedding, a resume's finished layers counted at once)."""
        if not self.done:
            return None
        now = time.monotonic()
        t, d = self._first if self._first is not None and self.done > self._first[1] else (self.t0, 0)
        return (now - t) / (self.done - d) * (self.total - self.done)

    def advance(self, n: int = 1, note: str = "") -> None:
        first = self.done == 0
        self.done += n
        if first:
            self._first = (time.monotonic(), self.done)
        at, _, sig = os.environ.get(KILL_AT, "").partition(":SIG")
        if at and at == f"{self.stage}:{self.done}":
            # fault injection for resume tests: die like `kill -9` right after this step
            os.kill(os.getpid(), getattr(signal, "SIG" + sig, signal.SIGKILL) if sig else signal.SIGKILL)
        el = time.monotonic() - self.t0
        eta = self.eta()
        if self.r.mode == "json":
            self.r.event("progress", stage=self.stage, unit=self.unit, done=self.done, total=self.total,
                         elapsed_s=round(el, 3), eta_s=None if eta is None else round(eta, 3), note=note or None)
        elif self.r.mode == "human":
            if self._bar is not None:
                self._bar.update(self._task_id, advance=n, description=f"{self.stage} {note}".strip())
            else:
                pct = 100.0 * self.done / max(self.total, 1)
                line = (f"{self.stage}: {self.unit} {self.done}/{self.total} ({pct:.0f}%) "
                        f"elapsed {_fmt_s(el)} ETA {_fmt_s(eta or 0)}")
                self.r.write(line + (f"  {note}" if note else ""))


class Progress:
    """mode: "human" (default), "quiet" or "json"."""

    def __init__(self, mode: str = "human", stream: TextIO | None = None):
        self.mode = mode
        self.stream = stream or sys.stderr

    @classmethod
    def from_flags(cls, quiet: bool = False, json_events: bool = False) -> "Progress":
        return cls("quiet" if quiet else "json" if json_events else "human")  # --quiet: no progress at all

    def write(self, line: str) -> None:
        if self.mode == "human":
            print(line, file=self.stream, flush=True)

    def info(self, msg: str) -> None:
        if self.mode == "json":
            self.event("info", message=msg)
        else:
            self.write(msg)

    def event(self, kind: str, **fields) -> None:
        if self.mode == "json":
            rec = {"event": kind, "time": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}
            print(json.dumps(rec, default=str), file=self.stream, flush=True)

    @contextmanager
    def task(self, stage: str, total: int, unit: str = "layer") -> Iterator[Task]:
        t = Task(self, stage, total, unit)
        self.event("start", stage=stage, total=total, unit=unit)
        use_bar = self.mode == "human" and getattr(self.stream, "isatty", lambda: False)()
        if use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                               console=Console(file=self.stream), transient=False)
            with bar:
                t._bar, t._task_id = bar, bar.add_task(stage, total=total)
                yield t
        else:
            yield t
        self.event("end", stage=stage, done=t.done, elapsed_s=round(time.monotonic() - t.t0, 3))


QUIET = Progress("quiet")
