"""The hardware units under AddressSanitizer and UBSan (tests/nic_model/sanitized.py).

The units are compiled a second time with -fsanitize=address,undefined as `_fastpath_san`
(once per module); then a child Python with the sanitizer runtimes preloaded
  - parses tens of thousands of random and mutated frames, each in a buffer of exactly its
    length (a read past the frame is a heap-buffer-overflow report);
  - drives the engine (fp_push, fp_rx_frame, fp_doorbell, fp_scan, fp_end_burst, fp_pull)
    with one connection whose shared header is rewritten with garbage between frames and
    whose mapping sits between PROT_NONE guard pages (a write outside the rings faults),
    once with fp_end_burst after every call and once in bursts of several calls, as
    fp_poll runs them;
  - runs fp_poll itself on an epoll set holding one end of a datagram socketpair as the
    TAP, with batches of frames sent into the other end: the units read them (rx_burst)
    and, with a placement guess, split them between a header buffer, the connection's RX
    ring and a frame buffer (rx_placed), also while the RX ring is full; the child fails
    unless payloads were both placed and misplaced;
  - and the same with seed 003's second processor (tx_proc.c) running, taking doorbells
    while fp_poll runs and the child pulls and pushes the connection: under ASan/UBSan,
    and once more built with ThreadSanitizer (a race between the processors is a report).
A sanitizer report, a fault, or a unit that never returns (the child's watchdog) fails
the test with the child's stderr.
"""

from __future__ import annotations

import re

import pytest

from . import sanitized

SEED = 20240601


@pytest.fixture(scope="module")
def san_module(tmp_path_factory):
    preload, why = sanitized.runtime()
    if preload is None:
        pytest.skip(f"sanitizers unavailable: {why}")
    tmp = tmp_path_factory.mktemp("fastpath_san")
    path = sanitized.build(str(tmp))
    with open(path, "rb") as f:
        blob = f.read()
    # the module is really instrumented (not the plain build under another name)
    assert b"__asan_report_load" in blob and b"__ubsan_handle" in blob
    return str(tmp), preload


def _run(san_module, parse_frames: int, engine_frames: int, mode: str, watchdog_s: float = 20) -> str:
    tmp, preload = san_module
    p = sanitized.run(tmp, preload, SEED, parse_frames, engine_frames, mode=mode, watchdog_s=watchdog_s,
                      timeout=watchdog_s + 30)
    report = f"exit status {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-20000:]}"
    assert p.returncode == 0, report
    assert p.stdout.startswith("DONE"), report
    return p.stdout


def test_rx_parse_reads_nothing_past_the_frame(san_module):
    out = _run(san_module, parse_frames=20000, engine_frames=0, mode="single")
    assert "parse=20000" in out


def test_engine_with_a_lying_header(san_module):
    out = _run(san_module, parse_frames=0, engine_frames=30000, mode="single")
    # the connection state unit's paths were taken too (conn_fsm.c), and TIME-WAIT records
    # (time_wait.c), with the header lying
    for what in ("syns", "syn_acks", "fins_in", "app_closes", "fins_out", "closes", "tw_entered", "tw_segments"):
        counts = [int(n) for n in re.findall(rf"'{what}': (\d+)", out)]
        assert len(counts) == 2 and min(counts) > 0, (what, out)   # offloads on and off


def test_engine_in_bursts_with_a_lying_header(san_module):
    _run(san_module, parse_frames=0, engine_frames=20000, mode="bursts")


def test_engine_polling_the_tap_with_direct_placement(san_module):
    out = _run(san_module, parse_frames=0, engine_frames=20000, mode="poll")
    assert "engine (poll)" in out


def test_engine_with_two_processors(san_module):
    """The TX processor takes doorbells while fp_poll runs and software pulls and pushes."""
    out = _run(san_module, parse_frames=0, engine_frames=20000, mode="poll2")
    assert "engine (poll2)" in out


def test_command_unit_with_a_hostile_host(san_module):
    """CONNECTs and everything else on the control channels, fresh sockets with headers of
    garbage, neighbours and port counts changing (sanitized_cmd.py): every command looked at
    counted once, and each way of leaving one to software taken."""
    out = _run(san_module, parse_frames=0, engine_frames=12000, mode="commands")
    for what in ("connects", "passed", "not_fresh", "no_neighbour", "no_port", "no_room", "fresh_stuffed"):
        counts = [int(n) for n in re.findall(rf"'{what}': (\d+)", out)]
        assert len(counts) == 2 and min(counts) > 0, (what, out)


@pytest.fixture(scope="module")
def tsan_module(tmp_path_factory):
    preload, why = sanitized.runtime("tsan")
    if preload is None:
        pytest.skip(f"ThreadSanitizer unavailable: {why}")
    tmp = tmp_path_factory.mktemp("fastpath_tsan")
    path = sanitized.build(str(tmp), kind="tsan")
    with open(path, "rb") as f:
        assert b"__tsan_read" in f.read()
    return str(tmp), preload


def test_two_processors_under_thread_sanitizer(tsan_module):
    """No data race between the processors: every shared CCB use is under its lock."""
    tmp, preload = tsan_module
    p = sanitized.run(tmp, preload, SEED, 0, 12000, mode="poll2", watchdog_s=60, timeout=120, kind="tsan")
    report = f"exit status {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-20000:]}"
    assert p.returncode == 0 and p.stdout.startswith("DONE"), report
    assert "engine (poll2)" in p.stdout
