"""Fixed, pre-registered receive buffer pool (seed 002).

Every buffer is allocated and "DMA-mapped" (given a stable C pointer through
cffi) once, when the adapter starts; the RX path rotates through them, so the
steady state allocates nothing per packet. The counters prove it.
"""

from __future__ import annotations

from .counters import PoolCounters


class BufferPool:
    def __init__(self, count: int, size: int, mapper=None):
        """`mapper(buf)` returns the buffer's DMA handle (a cffi pointer), or None."""
        self.size = size
        self.counters = PoolCounters(buffers=count, buffer_bytes=count * size)
        self._free: list[int] = list(range(count))
        self.bufs = [bytearray(size) for _ in range(count)]
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
        return i

    def put(self, i: int) -> None:
        self._free.append(i)
        self.counters.in_use -= 1
