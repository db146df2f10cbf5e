"""Deadline timers driven by the event loop's clock.

Each owner (a CCB, an ARP entry) holds `Timer` objects; re-arming is O(1)
when the new deadline is later than the queued one (the queued entry is
re-pushed when it fires early), which keeps per-ACK RTO restarts cheap.
Only the event loop reads the clock: `poll(now)` fires what is due.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class Timer:
    __slots__ = ("deadline", "callback", "queued")

    def __init__(self, callback: Callable[[float], None]):
        self.callback = callback
        self.deadline: float | None = None
        self.queued: float | None = None   # deadline of this timer's heap entry

    @property
    def armed(self) -> bool:
        return self.deadline is not None


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def arm(self, t: Timer, deadline: float) -> None:
        t.deadline = deadline
        if t.queued is None or deadline < t.queued:
            t.queued = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), t))

    @staticmethod
    def cancel(t: Timer) -> None:
        t.deadline = None

    def next_deadline(self) -> float | None:
        h = self._heap
        while h:
            d, _, t = h[0]
            if t.queued == d and t.deadline is not None:
                return d                      # may be early: poll() re-queues
            heapq.heappop(h)
            if t.queued == d:
                t.queued = None
        return None

    def poll(self, now: float) -> None:
        h = self._heap
        while h and h[0][0] <= now:
            d, _, t = heapq.heappop(h)
            if t.queued != d:
                continue                      # superseded by an earlier entry
            t.queued = None
            if t.deadline is None:
                continue                      # cancelled
            if t.deadline > now:              # pushed back since queued
                t.queued = t.deadline
                heapq.heappush(h, (t.deadline, next(self._seq), t))
                continue
            t.deadline = None
            t.callback(now)
