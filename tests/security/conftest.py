"""Fixtures of the security tests (tests/conftest.py's fixtures are used as they are).

`shared_adapter(*toe_up_args)`: one adapter per module and set of `toe up` flags,
for tables of many small cases. Each test that asks gets it only while its
daemon is alive and answers HELLO: a case that killed it fails by itself, and
the next case gets a fresh adapter (so one crash does not fail the rest of the
table). Everything is torn down with tests/conftest.py's teardown_adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from offload_daemon import netns
from offload_daemon.config import AdapterConfig
from tests.conftest import Adapter, run_toe, teardown_adapter, unique
from tests.security import hostile


def start_adapter(*extra: str) -> Adapter:
    """`toe up --netns <unique> --tap <unique> *extra` (as adapter_factory does)."""
    ns, tap = unique("toe-s"), unique("ts")
    res = run_toe("up", "--netns", ns, "--tap", tap, *extra)
    if res.returncode != 0:
        if netns.exists(ns):
            netns.delete(ns)
        pytest.fail(f"toe up {' '.join(extra)} failed: {res.stderr.strip()}")
    return Adapter(netns=ns, tap=tap, addr=AdapterConfig.addr, host_addr=AdapterConfig.host_addr)


def serving(ad: Adapter) -> bool:
    """The adapter's daemon is alive and answers HELLO on a fresh channel (as root)."""
    try:
        pid = hostile.daemon_pid(ad.tap)
        if not hostile.alive(pid):
            return False
        with hostile.Channel(hostile.ctl_path(ad.tap), timeout=10) as ch:
            return ch.hello().result == 0
    except (OSError, ValueError, KeyError, hostile.ChannelClosed):
        return False


@pytest.fixture(scope="module")
def shared_adapter() -> Iterator[Callable[..., Adapter]]:
    live: dict[tuple[str, ...], Adapter] = {}
    made: list[Adapter] = []

    def get(*extra: str) -> Adapter:
        ad = live.get(extra)
        if ad is None or not serving(ad):
            ad = start_adapter(*extra)
            made.append(ad)
            live[extra] = ad
        return ad

    problems: list[str] = []
    try:
        yield get
    finally:
        for ad in reversed(made):
            problems += teardown_adapter(ad)
    if problems:
        pytest.fail("adapter teardown: " + "; ".join(problems))


@pytest.fixture
def ad(shared_adapter):
    """The shared adapter that lets nobody in (the hostile client's tests)."""
    from tests.security.test_bad_input import ALLOW_NOBODY
    return shared_adapter(*ALLOW_NOBODY)
