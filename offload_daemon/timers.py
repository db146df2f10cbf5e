"""Deadline timers driven by the event loop's clock.

Each owner (a CCB, an ARP entry) holds `Timer` objects; re-arming is O(1)
when the new deadline is later than the queued one (the queued entry is
re-pushed when it fires early), which keeps per-ACK RTO restarts cheap.
Only the event loop reads the clock: `poll(now)` fires what is due.

Cancelling leaves the heap entry behind (it is skipped when it comes up), and so
does re-arming earlier. Those dead entries are counted; once they are more than
half the heap, it is rebuilt from the live ones, so the heap does not grow with
cancellations (a keepalive armed two hours ahead on every short connection
would otherwise stay two hours).
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


COMPACT_MIN = 1024                 # dead entries before a rebuild is worth it


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._dead = 0                 # entries superseded or cancelled (an upper bound)
        self.compactions = 0

    def arm(self, t: Timer, deadline: float) -> None:
        t.deadline = deadline
        if t.queued is None or deadline < t.queued:
            if t.queued is not None:
                self._dead += 1        # the later entry is superseded
            t.queued = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), t))
            self._maybe_compact()

    def cancel(self, t: Timer) -> None:
        if t.deadline is not None and t.queued is not None:
            self._dead += 1
            self._maybe_compact()
        t.deadline = None

    def __len__(self) -> int:
        return len(self._heap)

    def _maybe_compact(self) -> None:
        h = self._heap
        if self._dead < COMPACT_MIN or 2 * self._dead < len(h):
            return
        live = []
        for d, seq, t in h:
            if t.queued != d:
                continue                  # superseded
            if t.deadline is None:
                t.queued = None           # cancelled
                continue
            live.append((d, seq, t))
        heapq.heapify(live)
        h[:] = live                       # in place: poll() may be iterating over it
        self._dead = 0
        self.compactions += 1

    def next_deadline(self) -> float | None:
        h = self._heap
        while h:
            d, _, t = h[0]
            if t.queued == d and t.deadline is not None:
                return d                      # may be early: poll() re-queues
            heapq.heappop(h)
            self._dead = max(0, self._dead - 1)
            if t.queued == d:
                t.queued = None
        return None

    def poll(self, now: float) -> None:
        h = self._heap
        while h and h[0][0] <= now:
            d, _, t = heapq.heappop(h)
            if t.queued != d:
                self._dead = max(0, self._dead - 1)
                continue                      # superseded by an earlier entry
            t.queued = None
            if t.deadline is None:
                self._dead = max(0, self._dead - 1)
                continue                      # cancelled
            if t.deadline > now:              # pushed back since queued
                t.queued = t.deadline
                heapq.heappush(h, (t.deadline, next(self._seq), t))
                continue
            t.deadline = None
            t.callback(now)
