"""Resident memory of this process: now, and the peak over a stretch of code (sampled in a thread).

Used by the benchmarks (bench/check_memory.py); the memory tests read the kernel's high-water mark
instead (tests/memprobe.py).
"""

from __future__ import annotations

import threading
import time


def rss() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.peak`` (bytes); samples every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
