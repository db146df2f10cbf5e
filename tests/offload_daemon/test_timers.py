"""offload_daemon/timers.py: deadlines fire in order, once, at or after their time; the heap
does not grow with cancelled or superseded entries (issue 12)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from offload_daemon.timers import COMPACT_MIN, Timer, Timers


def test_cancelled_far_deadlines_do_not_pile_up():
    """Every short connection arms a keepalive two hours ahead and cancels it when it ends."""
    ts = Timers()
    fired: list[int] = []
    keep = Timer(lambda now: fired.append(-1))
    ts.arm(keep, 10.0)
    for i in range(100_000):
        t = Timer(lambda now, i=i: fired.append(i))
        ts.arm(t, 7200.0 + i)
        ts.cancel(t)
    assert len(ts) <= 2 * COMPACT_MIN + 2, len(ts)
    assert ts.compactions >= 1
    assert ts.next_deadline() == 10.0
    ts.poll(1e9)
    assert fired == [-1]


def test_rearming_earlier_and_later():
    ts = Timers()
    out: list[tuple[str, float]] = []
    a = Timer(lambda now: out.append(("a", now)))
    for i in range(5000):                 # earlier each time: a new entry each time
        ts.arm(a, 10_000.0 - i)
    assert len(ts) <= 2 * COMPACT_MIN + 1
    ts.arm(a, 20.0)
    ts.arm(a, 30.0)                       # later: the queued entry fires early and re-queues
    ts.poll(25.0)
    assert out == []
    ts.poll(30.0)
    assert out == [("a", 30.0)]
    assert ts.next_deadline() is None


def test_compaction_while_polling():
    """Callbacks that cancel and arm (and so compact) while poll() runs."""
    ts = Timers()
    fired: list[int] = []
    timers: list[Timer] = []

    def cb(i: int):
        def run(now: float) -> None:
            fired.append(i)
            for _ in range(3 * COMPACT_MIN):        # enough to compact more than once
                t = Timer(lambda now: fired.append(-2))
                ts.arm(t, now + 1000.0)
                ts.cancel(t)
        return run

    for i in range(10):
        t = Timer(cb(i))
        timers.append(t)
        ts.arm(t, float(i))
    ts.poll(100.0)
    assert fired == list(range(10))
    assert ts.compactions >= 2
    ts.poll(1e9)
    assert fired == list(range(10))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["arm", "cancel", "poll"]), st.integers(0, 7),
                          st.floats(0, 100, allow_nan=False)), max_size=300),
       st.integers(0, 2**32))
def test_against_a_model(ops, seed):
    """Whatever the order of arms, cancels and polls, the same timers fire at the same
    clock as a plain dict of deadlines says (COMPACT_MIN lowered to compact often)."""
    import offload_daemon.timers as tm

    saved = tm.COMPACT_MIN
    tm.COMPACT_MIN = 2
    try:
        ts = Timers()
        fired: list[tuple[int, float]] = []
        model: dict[int, float] = {}
        timers = [Timer(lambda now, i=i: fired.append((i, now))) for i in range(8)]
        now = 0.0
        want: list[tuple[int, float]] = []
        rnd = random.Random(seed)
        for op, i, x in ops:
            if op == "arm":
                model[i] = now + x
                ts.arm(timers[i], now + x)
            elif op == "cancel":
                model.pop(i, None)
                ts.cancel(timers[i])
            else:
                now += x * rnd.random()
                due = sorted((d, k) for k, d in model.items() if d <= now)
                for _d, k in due:
                    want.append((k, now))
                    del model[k]
                ts.poll(now)
                assert sorted(fired) == sorted(want), (fired, want)
            nd = ts.next_deadline()
            assert (nd is None) == (not model)
            if model:
                assert nd <= min(model.values())
    finally:
        tm.COMPACT_MIN = saved
