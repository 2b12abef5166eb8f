"""Nested HostPeak blocks (a run's stages inside the run): a peak reached in the enclosing block before
its inner blocks reset the kernel's high-water mark is still the enclosing block's peak, however many
inner blocks follow. Expectation: the kernel's own VmRSS (/proc/self/status) before the 256 MB spike."""

from __future__ import annotations

import pytest
import torch

from moepress import memwatch

MB = 1 << 20


def _proc(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))


@pytest.mark.parametrize("inner_blocks", [1, 2])
def test_a_spike_before_inner_blocks_is_the_enclosing_blocks_peak(inner_blocks):
    if not memwatch.reset_hwm() or memwatch.hwm() == 0:
        pytest.skip("the kernel refuses the high-water-mark reset here (sampled peaks)")
    with memwatch.HostPeak() as outer:
        before = _proc("VmRSS")
        x = torch.ones(64 * MB)  # 256 MB, touched, then freed (mmap: back to the OS)
        del x
        assert _proc("VmRSS") < before + 100 * MB
        for _ in range(inner_blocks):
            with memwatch.HostPeak() as inner:
                pass
            assert inner.peak < before + 100 * MB  # the inner block saw none of it
    assert outer._sampler is None
    assert outer.peak >= before + 200 * MB


def test_a_sampled_peak_includes_what_is_resident_when_the_block_ends():
    """PeakRSS samples every `interval`; memory still held as the block ends is in its peak however the
    samples fell (here the only sample is taken before the 256 MB are touched)."""
    import time

    with memwatch.PeakRSS(interval=3.0) as p:
        time.sleep(0.05)  # the sampler's first sample: before the allocation
        x = torch.ones(64 * MB)
        held = _proc("VmRSS")
    del x
    assert p.peak >= held - 8 * MB
