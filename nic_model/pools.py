"""Fixed, pre-registered receive buffer pool (seed 002).

Every buffer is allocated and "DMA-mapped" (given a stable C pointer through
cffi) once, when the adapter starts; the RX path rotates through them, so the
steady state allocates nothing per packet. The counters prove it.

With `reuse=False` (`toe up --no-buffer-reuse`, seed 002's comparison) every
`get` maps a fresh buffer (an anonymous mmap) and every `put` unmaps it: what
reuse saves, counted in `allocations`, `dma_mappings` and `dma_unmaps`.
"""

from __future__ import annotations

import mmap

from .counters import PoolCounters


class BufferPool:
    def __init__(self, count: int, size: int, mapper=None, reuse: bool = True):
        """`mapper(buf)` returns the buffer's DMA handle (a cffi pointer), or None."""
        self.size = size
        self.reuse = reuse
        self.mapper = mapper
        self.counters = PoolCounters(buffers=count, buffer_bytes=count * size)
        self._free: list[int] = list(range(count))
        self.bufs: list = [bytearray(size) for _ in range(count)]
        self.views = [memoryview(b) for b in self.bufs]
        self.handles = [mapper(b) if mapper else None for b in self.bufs]
        self.counters.allocations = count
        self.counters.dma_mappings = count if mapper else 0

    def get(self) -> int:
        """Index of a free buffer; raises IndexError when the pool is exhausted."""
        try:
            i = self._free.pop()
        except IndexError:
            self.counters.exhausted += 1
            raise
        self.counters.in_use += 1
        if not self.reuse:
            m = mmap.mmap(-1, self.size)
            self.bufs[i], self.views[i] = m, memoryview(m)
            self.handles[i] = self.mapper(m) if self.mapper else None
            self.counters.allocations += 1
            self.counters.dma_mappings += 1
        return i

    def put(self, i: int) -> None:
        self._free.append(i)
        self.counters.in_use -= 1
        if not self.reuse:
            buf, view, handle = self.bufs[i], self.views[i], self.handles[i]
            self.handles[i] = None
            release = getattr(handle, "__exit__", None)    # a cffi from_buffer handle: let go of it
            if release is not None:
                release(None, None, None)
            view.release()
            if isinstance(buf, mmap.mmap):
                try:
                    buf.close()
                except BufferError:                     # still exported: unmapped when collected
                    pass
            self.counters.dma_unmaps += 1
