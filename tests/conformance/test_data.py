"""Data both ways, and the send-side rules of Linux's tcp_sendmsg/tcp_write_xmit.

RFC 9293 3.8 (ACKs cover what arrived, in order), RFC 896 / Minshall (Nagle:
Linux's variant), tcp(7) and Linux's tcp_mark_push (PSH on the segment that
ends a write), MSG_MORE (held like TCP_CORK, at most 200 ms), SO_SNDBUF and
TCP_NOTSENT_LOWAT (how much a write may queue, when the socket is writable).
"""

from __future__ import annotations

import errno
import select
import socket

import pytest

from .harness import ConformanceError

pytestmark = pytest.mark.integration

MSG_MORE = 0x8000
TCP_NOTSENT_LOWAT = 25
INIT_CWND = 10 * 1460


def _recv_exactly(dut, fd, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = dut.recv(fd, n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


def test_peer_data_is_acked_exactly_and_delivered(testbed, dut, peer, port):
    fd, conn, _ = peer.accepted_by(dut, port)
    chunks = (b"a" * 100, b"b" * 1460, b"c" * 7)
    for chunk in chunks:
        conn.send("PA", chunk)
    conn.expect_acked(within=1.0)
    assert _recv_exactly(dut, fd, 1567) == b"".join(chunks)
    conn.send("PA", b"tail")
    conn.expect_acked(within=1.0)
    assert dut.recv(fd, 10) == b"tail"


def test_data_both_ways(testbed, dut, peer, port):
    fd, conn, _ = peer.accepted_by(dut, port)
    sent = b"".join(bytes([i]) * 300 for i in range(10))
    for i in range(0, len(sent), 1000):
        conn.send("PA", sent[i:i + 1000])
    conn.expect_acked(within=1.0)
    assert _recv_exactly(dut, fd, len(sent)) == sent
    reply = bytes(range(256)) * 20
    dut.send(fd, reply)
    assert b"".join(s.payload for s in conn.expect_data(reply)) == reply


def test_server_writes_first(testbed, dut, peer, port):
    """SMTP, FTP, POP3/IMAP, SSH and MySQL servers speak first: a banner written right
    after accept() goes out without waiting for the client."""
    fd, conn, _ = peer.accepted_by(dut, port)
    dut.send(fd, b"220 toe ESMTP ready\r\n")
    conn.expect("PA", payload=b"220 toe ESMTP ready\r\n", within=0.5)
    conn.send("A")
    dut.send(fd, b"250 ok\r\n")
    conn.expect("PA", payload=b"250 ok\r\n", within=0.5)


def test_psh_marks_the_segment_that_ends_each_write(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"w" * 3000)
    segs = conn.expect_data(b"w" * 3000)
    assert [s.flags for s in segs] == ["A", "A", "PA"]
    dut.send(fd, b"x" * 10)
    assert conn.expect(payload=b"x" * 10).flags == "PA"


def test_psh_survives_retransmission(testbed, dut, peer, port):
    """Four writes of 1000 bytes (PSH each); the first is lost, three duplicate ACKs:
    the fast retransmission from snd_una still ends that write with PSH."""
    def nodelay(d, fd):
        d.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    fd, conn, _ = peer.connected_from(dut, setup=nodelay)
    first = None
    for i in range(4):
        dut.send(fd, bytes([65 + i]) * 1000)
        seg = conn.expect("PA", length=1000)
        first = first or seg
    for _ in range(3):
        conn.send("A", ack=first.seq)
    again = conn.expect(seq=first.seq, within=1.0, advance=False)
    assert again.payload[:1000] == b"A" * 1000
    assert "P" in again.flags, f"retransmitted end of a write without PSH: {again}"


def test_nagle_holds_a_small_segment_only_while_one_is_unacked(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"1" * 100)
    conn.expect("PA", payload=b"1" * 100)
    dut.send(fd, b"2" * 100)                    # a small segment is in flight: wait for its ACK
    conn.expect_none(0.1)                       # (well before the RTO, 200 ms at least)
    conn.send("A")
    conn.expect("PA", payload=b"2" * 100, within=0.5)


def test_tcp_nodelay_sends_what_nagle_holds_at_once(testbed, dut, peer, port):
    """Linux's do_tcp_setsockopt pushes pending frames when TCP_NODELAY is set: the held
    segment goes without waiting for the ACK (toe: a kick, no round trip to the daemon)."""
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"1" * 100)
    conn.expect("PA", payload=b"1" * 100)
    dut.send(fd, b"2" * 100)                    # held by Nagle: the first is unacked
    conn.expect_none(0.1)
    dut.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.expect("PA", payload=b"2" * 100, within=0.5)


def test_msg_more_waits_for_the_next_write(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"head:", MSG_MORE)
    conn.expect_none(0.1)
    dut.send(fd, b"body")
    conn.expect("PA", payload=b"head:body", within=0.5)


def test_msg_more_data_goes_out_after_200_ms_without_psh(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"lonely", MSG_MORE)
    conn.expect_none(0.1)
    seg = conn.expect(payload=b"lonely", within=1.0)
    assert seg.flags == "A"                     # never pushed: the write asked for more


def test_msg_more_sends_full_segments_at_once(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.send(fd, b"f" * 3000, MSG_MORE)
    segs = [conn.expect(length=1460, within=0.5), conn.expect(length=1460, within=0.5)]
    assert [s.flags for s in segs] == ["A", "A"]
    conn.send("A")
    conn.expect_none(0.1)                       # the 80-byte tail waits for more
    dut.send(fd, b"!")
    conn.expect("PA", payload=b"f" * 80 + b"!", within=0.5)


def test_tcp_cork_holds_partial_segments(testbed, dut, peer, port):
    fd, conn, _ = peer.connected_from(dut)
    dut.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    dut.send(fd, b"c" * 500)
    dut.send(fd, b"d" * 500)
    conn.expect_none(0.1)
    dut.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    conn.expect("PA", payload=b"c" * 500 + b"d" * 500, within=0.5)


def _fill(dut, fd, total: int) -> int:
    """Nonblocking sends of `total` bytes until EAGAIN; what the socket took."""
    took = 0
    while took < total:
        try:
            took += dut.send(fd, b"z" * min(total - took, 65536))
        except BlockingIOError:
            break
    return took


def test_so_sndbuf_bounds_what_a_write_queues(testbed, dut, peer, port):
    """SO_SNDBUF=8192: getsockopt reports 16384, and unacknowledged plus unsent bytes never
    exceed it; the socket is writable again once enough is acknowledged (tcp_poll's
    free >= queued/2)."""
    def small_sndbuf(d, fd):
        d.setsockopt(fd, socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)

    fd, conn, _ = peer.connected_from(dut, setup=small_sndbuf)
    sndbuf = dut.getsockopt(fd, socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert sndbuf == 16384
    dut.setblocking(fd, False)
    took = _fill(dut, fd, 1 << 20)
    assert 0 < took <= sndbuf, f"a write queued {took} bytes with SO_SNDBUF {sndbuf}"
    assert dut.poll(fd, select.POLLOUT, 100) == 0
    got = b""
    while len(got) < min(took, INIT_CWND):
        got += conn.expect(within=1.0).payload
    conn.send("A")                               # acknowledge what arrived: room again
    assert dut.poll(fd, select.POLLOUT, 2000) & select.POLLOUT
    assert _fill(dut, fd, 1 << 20) > 0


def test_notsent_lowat_bounds_unsent_bytes_and_writability(testbed, dut, peer, port):
    """TCP_NOTSENT_LOWAT=4096: writes stop at 4096 unsent bytes, and poll says writable
    only below half of it (tcp_stream_memory_free with wake). Without ACKs, what the
    socket takes is the initial window (sent) plus at most the mark (unsent)."""
    fd, conn, _ = peer.connected_from(dut)
    dut.setsockopt(fd, socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, 4096)
    dut.setblocking(fd, False)
    total = dut.send(fd, b"n" * 100000)
    # no ACKs: the initial window goes out, then unsent bytes pile up to the mark
    while dut.poll(fd, select.POLLOUT, 500):
        total += _fill(dut, fd, 100000)
    assert total <= INIT_CWND + 4096
    seen = b""
    while True:
        try:
            seen += conn.expect(within=0.3).payload
        except ConformanceError:
            break
    assert len(seen) >= INIT_CWND - 1460
    conn.send("A")
    assert dut.poll(fd, select.POLLOUT, 2000) & select.POLLOUT


def test_send_after_peer_reset_fails(testbed, dut, peer, port):
    fd, conn, _ = peer.accepted_by(dut, port)
    conn.send("R", advance=False)
    with pytest.raises(ConnectionResetError):
        dut.recv(fd, 10)
    with pytest.raises(OSError) as e:
        dut.send(fd, b"x", socket.MSG_NOSIGNAL)
    assert e.value.errno == errno.EPIPE
