"""Initial sequence numbers (RFC 6528) and ephemeral ports (RFC 6056 algorithm 3).

Both matter when connections to one peer come fast (TCP_CRR): the peer keeps
the old incarnation of a 4-tuple in TIME-WAIT, and accepts a new SYN for it
only when the new ISN lies above the old sequence space.
"""

from __future__ import annotations

from offload_daemon.seq import ISN_TICKS_PER_S, M32, initial_seq, seq_gt
from offload_daemon.tcp import EPHEMERAL

from .fixtures import Harness

A, B = 0xC6120002, 0xC6120001  # 198.18.0.2, 198.18.0.1


def test_isn_grows_with_the_4us_clock():
    t = 1000.0
    first = initial_seq(A, 40000, B, 80, t)
    later = initial_seq(A, 40000, B, 80, t + 0.5)
    assert (later - first) & M32 == ISN_TICKS_PER_S // 2
    assert seq_gt(later, first)


def test_isn_differs_between_4_tuples():
    isns = {initial_seq(A, port, B, 80, 5.0) for port in range(40000, 40100)}
    assert len(isns) == 100


def test_ephemeral_ports_cycle_through_the_range():
    h = Harness()
    sock, _ = h.socket()
    lo, hi = EPHEMERAL
    ports = [h.tcp._ephemeral(sock, B, 80) for _ in range(1000)]
    assert all(lo <= p <= hi for p in ports)
    assert len(set(ports)) == 1000  # no port handed out twice before the range is used up


def test_ephemeral_port_skips_ports_in_use():
    h = Harness()
    sock, _ = h.socket()
    first = h.tcp._ephemeral(sock, B, 80)
    h.tcp.bound[first + 1 if first < EPHEMERAL[1] else EPHEMERAL[0]] = [sock]
    second = h.tcp._ephemeral(sock, B, 80)
    assert second not in h.tcp.bound and second != first
