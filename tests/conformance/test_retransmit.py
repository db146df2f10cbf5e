"""Retransmission (RFC 6298): a lost segment is resent from SND.UNA, the RTO doubles
each time (5.5), at least 200 ms as Linux's TCP_RTO_MIN, and an ACK ends it.

Timing is checked on the frames' kernel timestamps with a wide tolerance (these
machines are shared): the gaps must double, give or take; the adapter's own RTO
(`toe stat`) must double exactly.
"""

from __future__ import annotations

import socket

import pytest

from . import states

pytestmark = pytest.mark.integration


def test_lost_segment_is_resent_with_the_rto_doubling(testbed, dut, peer, port):
    fd, conn = states.established(dut, peer, port)
    dut.send(fd, b"lost" * 25)
    first = conn.expect("PA", payload=b"lost" * 25)
    times, rtos = [first.ts], []
    for _ in range(3):
        again = conn.expect("PA", seq=first.seq, payload=first.payload, within=5.0, advance=False)
        times.append(again.ts)
        rtos.append(testbed.connection(conn.port)["rto_ms"])
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.18, f"first retransmission after {gaps[0]:.3f} s: below the 200 ms minimum"
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert 1.4 <= b / a <= 3.0, f"retransmission gaps {gaps} do not double"
    assert rtos[1] == 2 * rtos[0] and rtos[2] == 2 * rtos[1], f"RTO {rtos} ms does not double"
    conn.send("A")                                      # the ACK ends it
    conn.expect_none(2 * gaps[-1] + 0.2)
    assert testbed.connection(conn.port)["retransmits"] >= 3


def test_go_back_n_after_a_partial_ack(testbed, dut, peer, port):
    def nodelay(d, fd):
        d.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    fd, conn, _ = peer.accepted_by(dut, port, setup=nodelay)
    segs = []
    for ch in b"xyz":
        dut.send(fd, bytes([ch]) * 500)
        segs.append(conn.expect("PA", length=500))
    conn.send("A", ack=segs[1].seq)                     # only the first arrived
    again = conn.expect(seq=segs[1].seq, within=3.0, advance=False)
    assert again.payload[:500] == b"y" * 500
    conn.send("A")                                      # everything else did arrive after all
    conn.expect_none(0.5, ignore_retransmits=True)
    assert testbed.state(conn) == "ESTABLISHED"
