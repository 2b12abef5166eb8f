"""Reusable page-aligned read buffers: a stream of stored tensors read into recycled memory.

A streamed stage reads every stored byte once, tensor after tensor. Into fresh buffers, each read
costs the kernel a page fault and a zeroed page per 4 KiB (glibc serves blocks of 128 KB and more
with fresh mmaps: moepress/memwatch.py ``bound_heap``), and the unmap when it is freed: about as much
CPU time as quantizing the bytes. A :class:`BufferPool` lends page-aligned blocks (anonymous mmaps,
so O_DIRECT can read into them) and takes each one back when the last tensor using its memory is
freed, whoever holds it and for however long (a quantizer, the shard writer, a layer module):
the tensor's storage owns the lease, so a block is never reused while any view of it lives.
At most ``keep_bytes`` of returned blocks wait idle; the rest are unmapped.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections import deque

import torch

POOL_MIN_BYTES = 128 << 10  # smaller blocks come from glibc's heap (moepress/memwatch.py MMAP_THRESHOLD): no faults
GRAIN = 64 << 10  # block sizes are rounded up to this, so tensors of nearly the same size share blocks


class BufferPool:
    """Page-aligned byte buffers lent as tensors and recycled when their storage is freed.

    Thread-safe: leases are taken by read-ahead threads and come back from whichever thread drops
    the last reference, possibly from inside the pool's own critical section (a free run by the
    garbage collector there), so a return never waits for the lock: it queues the block, and
    whoever holds the lock files it.
    """

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._idle: dict[int, list[mmap.mmap]] = {}  # by size, least recently returned size first
        self._idle_bytes = 0
        self._returned: deque[mmap.mmap] = deque()  # appended without the lock
        self._lock = threading.Lock()
        self.reused = self.mapped = 0  # blocks lent from the idle list / newly mapped (for tests)

    def lease(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes`` bytes starting on a page boundary (an idle block of up
        to twice the size may serve). Its memory returns to the pool when the tensor and every view
        of it are gone; its contents are whatever the previous lease left."""
        size = max(GRAIN, -(-nbytes // GRAIN) * GRAIN)
        with self._lock:
            dropped = self._file_returned()
            # the smallest idle block that fits and wastes at most half of itself
            fit = min((s for s in self._idle if size <= s <= 2 * size), default=None)
            block = None
            if fit is not None:
                block = self._idle[fit].pop()
                self._idle_bytes -= fit
                if not self._idle[fit]:
                    del self._idle[fit]
                self.reused += 1
            else:
                self.mapped += 1
            dropped += self._file_returned()
        del dropped  # unmapped outside the lock
        if block is None:
            block = mmap.mmap(-1, size)
        view = memoryview(block)
        # torch.frombuffer keeps ``view`` alive as long as the storage (and so any view of it) lives;
        # when the storage goes, ``view`` goes, and the block comes back
        weakref.finalize(view, self._give_back, block).atexit = False
        return torch.frombuffer(view, dtype=torch.uint8)

    def _give_back(self, block: mmap.mmap) -> None:
        self._returned.append(block)
        del block
        if self._lock.acquire(blocking=False):  # else the holder files it
            try:
                dropped = self._file_returned()
            finally:
                self._lock.release()
            del dropped  # unmapped outside the lock

    def _file_returned(self) -> list[mmap.mmap]:
        """(Lock held.) Returned blocks into the idle lists, each size the most recent as it comes;
        over ``keep_bytes``, the blocks of the sizes returned least recently go (a size that stopped
        coming, e.g. the first dense layer's MLP, must not hold the room the recurring sizes need).
        Returns the dropped blocks, for the caller to let go once the lock is released."""
        dropped = []
        while self._returned:
            block = self._returned.popleft()
            size = len(block)
            self._idle[size] = self._idle.pop(size, [])
            self._idle[size].append(block)
            self._idle_bytes += size
        while self._idle_bytes > self.keep_bytes:
            old = next(iter(self._idle))
            dropped.append(self._idle[old].pop(0))
            self._idle_bytes -= old
            if not self._idle[old]:
                del self._idle[old]
        return dropped

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes
