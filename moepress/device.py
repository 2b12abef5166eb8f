"""The compute device of a stage: ``--device auto|cpu|cuda|cuda:N`` resolved once, and the memory
peaks (host RSS, GPU) every stage reports in its ``--json`` result.

One device argument flows from the CLI (or a recipe's ``device`` key) to the code that allocates
(../shared/STYLE.md, streaming to the GPU); no module picks a device on its own. The device is a runtime
argument, never part of a stage's config: it does not change what a stage writes (calibration-free
formats are byte-identical on every device; calibrated ones agree within float32 rounding), so a
manifest and a resume key do not depend on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moepress import memwatch
from moepress.errors import MoepressError

CHOICES = "auto|cpu|cuda|cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def is_spec(spec: str) -> bool:
    """Whether ``spec`` (lower case, stripped) is one of CHOICES: auto, cpu, cuda or cuda:N."""
    m = _SPEC.match(spec)
    return m is not None and (m.group(1) == "cuda" or m.group(2) is None)


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): a CUDA device when torch sees one (torchrun's LOCAL_RANK-th), else the CPU; ``cpu``;
    ``cuda`` (torchrun's LOCAL_RANK-th, else the first) / ``cuda:N``: that GPU, refused in one line where
    torch has no CUDA or no such GPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not is_spec(spec):
        raise MoepressError(f"--device {spec or repr(spec)}: expected {CHOICES}")
    m = _SPEC.match(spec)
    kind, index = m.group(1), m.group(2)
    if kind == "auto":  # under torchrun, each rank its own GPU
        n = cuda_count()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % n) if n else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    n = cuda_count()
    if n == 0:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise MoepressError(f"--device {spec}: {why} (torch {torch.__version__}); use --device cpu or auto")
    # a bare ``cuda`` under torchrun is each rank's own GPU, as ``auto`` (calib/distributed.py's NCCL
    # group uses cuda:LOCAL_RANK; every rank on cuda:0 would not match it)
    world = os.environ.get("WORLD_SIZE", "1").strip()  # a bad value is the process group's to refuse, in one line
    if index is not None and world.isdigit() and int(world) > 1:  # NCCL's group is on cuda:LOCAL_RANK
        raise MoepressError(f"--device {spec}: under torchrun each rank computes on its own GPU (cuda:LOCAL_RANK, "
                            "where its NCCL group is); expected --device cuda or auto")
    i = int(index) if index is not None else int(os.environ.get("LOCAL_RANK", 0)) % n
    if i >= n:
        raise MoepressError(f"--device {spec}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", i)


def cuda_count() -> int:
    """Visible CUDA devices (0 without CUDA, without initialising anything on a CPU-only build)."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):
        return 0


def is_cpu(device: torch.device | str | None) -> bool:
    return device is None or torch.device(device).type == "cpu"


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (timings); a no-op on the CPU."""
    if not is_cpu(device) and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak(device: torch.device | None) -> int | None:
    """Bytes of GPU memory torch's allocator held at most since :func:`reset_gpu_peak` (None on the CPU)."""
    if is_cpu(device) or torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_gpu_peak(device: torch.device | None) -> None:
    """Start the GPU allocator's peak afresh. CUDA is started first: a stage's first CUDA call is this one, and
    torch's ``reset_peak_memory_stats`` does not start it (torch 2.13 torch/cuda/memory.py calls the allocator
    directly, which refuses a device it has not set up: "Invalid device argument 0: did you call init?")."""
    if not is_cpu(device) and torch.device(device).type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryPeaks:
    """``with MemoryPeaks(device) as m: stage(...)`` then ``m.report()``: the host's resident-set
    peak (the kernel's high-water mark, reset at entry where the kernel allows, else sampled) and
    the GPU allocator's peak (``torch.cuda.max_memory_allocated``; None on the CPU)."""

    _open: list[MemoryPeaks] = []  # nested (a run and its stages): the GPU peak carried outward, as the host's

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.host = memwatch.HostPeak()
        self.gpu: int | None = None
        self._carried: int | None = None

    def __enter__(self) -> MemoryPeaks:
        mark = gpu_peak(self.device)
        for outer in MemoryPeaks._open:
            if mark is not None:
                outer._carried = max(outer._carried or 0, mark)
        reset_gpu_peak(self.device)
        self.host.__enter__()
        MemoryPeaks._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        MemoryPeaks._open.remove(self)
        self.host.__exit__(*exc)
        peak = gpu_peak(self.device)
        self.gpu = peak if self._carried is None or peak is None else max(peak, self._carried)

    def report(self) -> dict:
        """The ``memory`` section of a stage's JSON result."""
        return {"device": str(self.device or "cpu"), "host_rss_peak_bytes": self.host.peak,
                "gpu_peak_bytes": self.gpu}


class Uploader:
    """Stored tensors to the compute device: host -> pinned buffer -> device, on a side CUDA stream,
    so the next layer's copy runs while this layer computes (../shared/STYLE.md, streaming to the GPU).

    On the CPU every method returns its input unchanged.
    ``timings`` collects (what, start, end) wall times of uploads and waits, from which the
    benchmarks compute how long the device sat idle waiting for bytes.
    """

    PINNED_BYTES = 256 << 20

    def __init__(self, device: torch.device | None, host: tuple[str, ...] = ()):
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        # name suffixes of tensors left on the host: numbers a decoder reads (``tolist``), where each read of a
        # device tensor would wait for the device to finish its queue
        self.host = host
        self._stream = None
        self._lock = threading.Lock()
        self.timings: list[tuple[str, float, float]] = []

    def stays(self, name: str) -> bool:
        """Whether tensor ``name`` stays on the host (its suffix is one of ``host``)."""
        return bool(self.host) and name.endswith(self.host)

    def upload(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` on the device; the call returns once the copies are complete (from any thread).
        Host memory: each host tensor is let go once copied (where the caller holds no other
        reference) and at most ``PINNED_BYTES`` of pinned staging is in flight, so the pinned pool
        (torch keeps it cached) stays that size, not a layer's."""
        if self.on_cpu:
            return tensors
        t0 = time.perf_counter()
        src, tensors = dict(tensors), None
        out = {k: src.pop(k) for k in list(src) if self.stays(k)}
        if self.device.type != "cuda":
            for k in list(src):
                out[k] = src.pop(k).to(self.device)
        else:
            stream = self._side_stream()
            inflight = 0
            # the device first: leaving a stream context alone restores the thread's previous stream through
            # its current device, device 0 in a fresh thread, where CUDA 12 then makes a context (about 0.5 GB)
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                for k in list(src):
                    v = src.pop(k)
                    out[k] = v.pin_memory().to(self.device, non_blocking=True)
                    inflight += v.numel() * v.element_size()
                    del v
                    if inflight >= self.PINNED_BYTES:  # staging buffers free for reuse once copied
                        stream.synchronize()
                        inflight = 0
            stream.synchronize()
            # allocated on the side stream, used on the caller's: without this the allocator may hand a
            # block the caller has freed (kernels still queued on it) to the next upload's copy
            self.handover(out)
        self.timings.append(("upload", t0, time.perf_counter()))
        return out

    def _side_stream(self):
        """The one side stream of every upload, made once under a lock: two threads' first uploads at once would
        otherwise each make one, and a thread would then wait on the other's stream, not the one its copies are on."""
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            return self._stream

    def handover(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors uploaded on the side stream, now used by the compute stream: the allocator must
        not hand their memory back to the side stream before the compute stream is done with it."""
        if not self.on_cpu and self.device.type == "cuda":
            cur = torch.cuda.current_stream(self.device)
            for k, v in tensors.items():
                if not self.stays(k):
                    v.record_stream(cur)
        return tensors

    def ahead(self, layers: Iterator[tuple[int, list[dict[str, torch.Tensor]]]]
              ) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
        """``(i, [stored tensors])`` items with the tensors on the device, the next item read and
        uploaded in a background thread while the caller computes on this one."""
        if self.on_cpu:
            yield from layers
            return

        def nxt():
            got = next(layers, None)
            if got is None:
                return None
            i, box = got
            return i, [self.upload(box.pop())]

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-upload")
        fut: Future | None = pool.submit(nxt)
        try:
            while True:
                t0 = time.perf_counter()
                got = fut.result()
                self.timings.append(("wait", t0, time.perf_counter()))
                fut = None
                if got is None:
                    return
                fut = pool.submit(nxt)
                i, box = got
                self.handover(box[0])
                yield i, box
                del box, got
        finally:
            if fut is not None:
                fut.cancel()
                try:
                    fut.result()
                except Exception:  # noqa: BLE001  (the consumer stopped; its own error is what matters)
                    pass
            pool.shutdown(wait=True)
            close = getattr(layers, "close", None)
            if close is not None:
                close()


def idle_fraction(timings: list[tuple[str, float, float]], total: float) -> float | None:
    """The share of ``total`` seconds the compute thread spent waiting for uploads (None without any)."""
    waits = sum(b - a for what, a, b in timings if what == "wait")
    return None if total <= 0 or not timings else waits / total


def default_device(device: torch.device | None):
    """``with default_device(dev):`` tensors made without a device (``torch.zeros(n)``) land on ``dev``
    (torch's device context, this thread only), so a stage's per-layer math follows its layer onto
    the GPU. Only around compute: code that reads the checkpoint allocates host buffers. A no-op on
    the CPU."""
    return contextlib.nullcontext() if is_cpu(device) else torch.device(device)
