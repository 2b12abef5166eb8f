"""Memory figures (moepress/memwatch.py, moepress/device.py) against the kernel's own /proc/self/status, and the
device resolution and GPU peaks on a fake CUDA (no GPU needed)."""

from __future__ import annotations

import time

import pytest
import torch

import moepress.device as device
from moepress import memwatch
from moepress.device import MemoryPeaks, idle_fraction, resolve
from moepress.errors import MoepressError

MB = 1 << 20


def _proc(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))


def test_rss_and_high_water_mark_are_the_kernels_bytes():
    """hwm() is VmHWM and rss() VmRSS in bytes (kB x 1024); after 256 MB touched and freed they part."""
    memwatch.reset_hwm()
    x = torch.ones(64 * MB)  # 256 MB, touched
    del x
    assert memwatch.hwm() == _proc("VmHWM")
    assert abs(memwatch.rss() - _proc("VmRSS")) < 8 * MB
    assert memwatch.hwm() - memwatch.rss() > 200 * MB


def test_sampled_peak_where_the_kernel_refuses_the_reset(monkeypatch):
    """Where /proc/self/clear_refs is refused, HostPeak samples: 256 MB held 250 ms
    (many of its 10 ms samples, even on a loaded machine) is in its peak."""
    monkeypatch.setattr(memwatch, "reset_hwm", lambda: False)
    with memwatch.HostPeak() as quiet:
        time.sleep(0.02)
    with memwatch.HostPeak() as p:
        x = torch.ones(64 * MB)  # 256 MB, touched
        time.sleep(0.25)
        del x
        time.sleep(0.02)
    assert p._sampler is not None and p.peak >= quiet.peak + 200 * MB


def test_trim_heap_hands_freed_heap_pages_back():
    """Small blocks freed below a live one stay resident until malloc_trim: trim_heap() gives them back (VmRSS)."""
    libc = memwatch.glibc()
    if libc is None:
        pytest.skip("not glibc")
    import ctypes

    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4000) for _ in range(16000)]  # 64 MB of heap blocks (under the mmap threshold)
    for b in blocks:
        ctypes.memset(b, 1, 4000)
    keep = libc.malloc(4000)  # above them: free() alone cannot shrink the heap's top
    for b in blocks:
        libc.free(b)
    before = _proc("VmRSS")
    memwatch.trim_heap()
    after = _proc("VmRSS")
    libc.free(keep)
    assert before - after > 40 * MB, (before, after)


def test_trim_heap_hands_mkl_work_buffers_back():
    """MKL's Memory Allocator keeps the work buffers of its GEMMs for reuse, whatever the next call needs:
    trim_heap() frees them (MKL's own count of the bytes it holds, ``mkl_serv_mem_stat``)."""
    mkl = memwatch.mkl_service()
    if mkl is None:
        pytest.skip("torch without MKL")
    import ctypes

    mkl.mkl_serv_mem_stat.restype = ctypes.c_int64
    n = ctypes.c_int(0)
    a = torch.randn(512, 512, dtype=torch.float64)
    b = a @ a
    held = mkl.mkl_serv_mem_stat(ctypes.byref(n))
    memwatch.trim_heap()
    assert held > 0 and mkl.mkl_serv_mem_stat(ctypes.byref(n)) == 0, held
    assert torch.equal(a @ a, b)  # MKL works on afterwards, as before


def test_auto_and_cuda_n_on_a_machine_with_gpus(monkeypatch):
    """auto under torchrun: each rank its LOCAL_RANK-th GPU; cuda:N past the visible GPUs is refused in one line."""
    monkeypatch.setattr(device, "cuda_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve("auto") == torch.device("cuda", 2)
    assert resolve("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(MoepressError, match=r"^--device cuda:4: only 4 CUDA device\(s\) visible \(cuda:0..cuda:3\)$"):
        resolve("cuda:4")


@pytest.mark.parametrize("build, why", [(None, "this torch build has no CUDA"), ("12.8", "no CUDA GPU is visible")])
def test_no_gpu_says_why(monkeypatch, build, why):
    monkeypatch.setattr(device, "cuda_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", build)
    with pytest.raises(MoepressError, match=f"^--device cuda: {why} "):
        resolve("cuda")


def test_nested_gpu_peaks_carry_outward(monkeypatch):
    """On a fake allocator (peak since the last reset): a run's GPU peak includes a stage's, though the next stage
    reset the allocator's one peak counter; the report names the device, the CPU where none was given."""
    alloc = {"now": 0, "peak": 0}
    monkeypatch.setattr(device, "gpu_peak", lambda d: None if d is None else alloc["peak"])
    monkeypatch.setattr(device, "reset_gpu_peak", lambda d: alloc.update(peak=alloc["now"]))
    gpu = torch.device("cuda", 0)
    with MemoryPeaks(gpu) as run:
        with MemoryPeaks(gpu) as first:
            alloc["peak"] = 300 * MB
        with MemoryPeaks(gpu) as second:
            alloc["peak"] = max(alloc["peak"], 10 * MB)
    assert (first.gpu, second.gpu, run.gpu) == (300 * MB, 10 * MB, 300 * MB)
    assert run.report()["device"] == "cuda:0" and run.report()["gpu_peak_bytes"] == 300 * MB
    with MemoryPeaks(None) as cpu:
        pass
    assert cpu.report()["device"] == "cpu" and cpu.report()["gpu_peak_bytes"] is None


def test_idle_fraction_is_the_share_of_time_spent_waiting():
    timings = [("wait", 0.0, 1.0), ("upload", 0.0, 3.0), ("wait", 2.0, 2.5)]
    assert idle_fraction(timings, 3.0) == pytest.approx(0.5)
    assert idle_fraction([], 3.0) is None and idle_fraction(timings, 0.0) is None


@pytest.mark.parametrize("below", [True, False])
def test_a_streamed_model_gets_the_bounded_heap_from_its_stored_size(monkeypatch, below):
    """StreamedModel asks glibc to map every buffer of 128 KB and more (mallopt M_MMAP_THRESHOLD) for a model
    stored in BOUND_FROM_BYTES or more, and leaves a smaller one's heap as glibc runs it. The bundled model's
    stored size is put just over or at the bound (a fake C library records the call)."""
    from moepress import models
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.stream import StreamedModel

    calls = []

    class Libc:
        def mallopt(self, *args):
            calls.append(args)

    reader = CheckpointReader(models.path("tiny-mixtral"))
    stored = sum(reader.bytes_by_dtype().values())
    monkeypatch.setattr(memwatch, "glibc", lambda: Libc())
    monkeypatch.setattr(memwatch, "_heap_bounded", False)
    monkeypatch.setattr(memwatch, "BOUND_FROM_BYTES", stored + 1 if below else stored)
    StreamedModel(reader)
    assert calls == ([] if below else [(-3, 128 << 10)])
    StreamedModel(reader)
    assert len(calls) == (0 if below else 1)  # asked once per process
