"""Resident memory of this process: now, and the peak over a stretch of code.

:class:`HostPeak` reads the kernel's high-water mark (``VmHWM``) after resetting it
(``/proc/self/clear_refs``), so it sees every page, however brief; where the reset is refused it
falls back to sampling (:class:`PeakRSS`). Used by every stage's ``--json`` result
(moepress/device.py) and the benchmarks; the memory tests read a child's high-water mark
(tests/memprobe.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time


def _status(key: str) -> int:
    """A ``/proc/self/status`` size field in bytes (0 where there is none: not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    return _status("VmRSS:")


def hwm() -> int:
    """The kernel's high-water mark of the resident set (bytes) since the process started or the
    last :func:`reset_hwm`."""
    return _status("VmHWM:")


def reset_hwm() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``);
    False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def glibc():
    """The process's glibc (``ctypes.CDLL``), loaded once; None where the C library is not glibc. The heap
    policy of the streamed stages (:func:`bound_heap`, :func:`trim_heap`) goes through it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (absent outside glibc: AttributeError)
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> None:
    """Hand freed memory back to the OS: MKL's cached work buffers (:func:`mkl_service`) and the C heap's free
    pages (glibc ``malloc_trim(0)``: the free top of every arena and, since glibc 2.8, the whole free pages
    inside it). Blocks under the mmap threshold (compress/stream.py :func:`bound_heap`) that a layer's work
    freed stay in the heap, fragmented, and the resident set creeps up layer after layer; MKL keeps the
    buffers of its largest recent GEMM and LAPACK calls for reuse, whatever the next call needs. A stage
    bound to stored layers calls this between layers and between the phases of a layer. A no-op where the
    C library is not glibc and torch has no MKL."""
    mkl = mkl_service()
    if mkl is not None:
        mkl.mkl_serv_free_buffers()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def mkl_service():
    """torch's MKL (``ctypes.CDLL`` of libtorch_cpu, already loaded), loaded once; None where torch is built
    without MKL or does not export it. oneMKL's ``mkl_free_buffers`` ("frees unused memory allocated by the
    oneMKL Memory Allocator", all threads; oneMKL developer reference for C 2025.2, Support Functions) is
    exported by torch's static MKL under its service-layer name ``mkl_serv_free_buffers``. Only unused
    buffers go; the next call that needs one allocates it again."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.mkl_serv_free_buffers  # noqa: B018  (not exported: AttributeError)
    except (OSError, AttributeError):
        return None
    return lib


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


class HostPeak:
    """``with HostPeak() as p: ...`` then ``p.peak``: the resident-set peak over the block, from the
    kernel's high-water mark where it can be reset, else sampled every 10 ms.

    Nested blocks (a run's stages inside the run) each reset the one high-water mark: before a
    reset, the mark so far is carried into every enclosing block, so each still sees its whole peak."""

    _open: list[HostPeak] = []

    def __init__(self):
        self.peak = 0
        self._carried = 0
        self._sampler: PeakRSS | None = None

    def __enter__(self) -> HostPeak:
        mark = hwm()
        for outer in HostPeak._open:
            outer._carried = max(outer._carried, mark)
        if not reset_hwm() or hwm() == 0:
            self._sampler = PeakRSS(interval=0.01).__enter__()
        HostPeak._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        HostPeak._open.remove(self)
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak = self._sampler.peak
        else:
            self.peak = max(hwm(), rss(), self._carried)


MMAP_THRESHOLD = 128 << 10
# The stored size from which a streamed model gets the bounded heap: what glibc's own heap keeps is a few layers,
# which matters for a model of gigabytes and not for one of megabytes, whose many small buffers would each cost
# fresh pages (a page fault per 4 KB) under the bound.
BOUND_FROM_BYTES = 64 << 20
_heap_bounded = False


def bound_heap(model_bytes: int | None = None) -> None:
    """Make glibc serve buffers of 128 KB and more with mmap, so a freed layer goes back to the OS.

    glibc's default threshold grows (up to 32 MB) as large blocks are freed, after which weight
    and activation buffers come from the heap and freed ones stay there, fragmented, so a streamed
    stage's memory grows layer after layer (tests/test_quant_memory.py bounds it). ``model_bytes``: the
    stored size of the model a stage streams; under :data:`BOUND_FROM_BYTES` the heap is left as glibc runs
    it (None: bound whatever the size). Once bound, the process stays so. A no-op where the C library is
    not glibc.
    """
    global _heap_bounded
    if _heap_bounded or (model_bytes is not None and model_bytes < BOUND_FROM_BYTES):
        return
    _heap_bounded = True
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
