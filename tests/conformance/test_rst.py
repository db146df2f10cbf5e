"""RST in every state, in and out of the window (RFC 9293 3.10.7, RFC 5961 3, RFC 1337).

In a synchronized state an RST exactly at RCV.NXT resets the connection, one
elsewhere in the window draws a challenge ACK and changes nothing, one outside
the window is dropped without a word. TIME-WAIT ignores RSTs (RFC 1337).
SYN-SENT takes an RST only with an acceptable ACK; SYN-RECEIVED drops the
embryonic connection on an RST in the window it offered (Linux).
"""

from __future__ import annotations

import errno
import socket

import pytest

from . import states
from .harness import REMOTE_IP, ConformanceError, expect_errno

pytestmark = pytest.mark.integration

SYNCHRONIZED = ["ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING", "LAST_ACK"]


def _alive(testbed, conn, name: str) -> None:
    assert testbed.state(conn) == name, f"the connection left {name} after an RST it had to ignore"


@pytest.mark.parametrize("name", SYNCHRONIZED)
def test_rst_at_rcv_nxt_resets(testbed, dut, peer, port, name):
    fd, conn = states.DRIVERS[name](dut, peer, port)
    conn.send("R", advance=False)
    conn.expect_none(0.1, ignore_retransmits=False)
    assert testbed.state(conn) == "GONE"
    if name in ("ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2"):
        with pytest.raises(ConnectionResetError):
            dut.recv(fd, 10)
    elif name == "CLOSE_WAIT":                          # Linux: EPIPE once the peer had closed
        with pytest.raises(OSError) as e:
            dut.send(fd, b"x", socket.MSG_NOSIGNAL)
        assert e.value.errno == errno.EPIPE


@pytest.mark.parametrize("name", SYNCHRONIZED + ["TIME_WAIT"])
def test_rst_in_window_but_not_at_rcv_nxt_draws_a_challenge_ack(testbed, dut, peer, port, name):
    _fd, conn = states.DRIVERS[name](dut, peer, port)
    conn.send("R", seq=(conn.seq + 1000) & 0xFFFFFFFF, advance=False)
    if name == "TIME_WAIT":
        conn.expect_none(0.1)                           # RFC 1337: not even a challenge
    else:
        conn.expect("A", payload=b"", ignore_retransmits=True)
    _alive(testbed, conn, name)


@pytest.mark.parametrize("name", SYNCHRONIZED + ["TIME_WAIT"])
def test_rst_outside_the_window_is_dropped(testbed, dut, peer, port, name):
    _fd, conn = states.DRIVERS[name](dut, peer, port)
    for seq in ((conn.seq + (1 << 30)) & 0xFFFFFFFF, (conn.seq - 5000) & 0xFFFFFFFF):
        conn.send("R", seq=seq, advance=False)
    conn.expect_none(0.1, ignore_retransmits=True)
    _alive(testbed, conn, name)


def test_time_wait_survives_rst_at_rcv_nxt(testbed, dut, peer, port):
    """TIME-WAIT assassination (RFC 1337): an RST, even exactly in sequence, must not end
    TIME-WAIT; a retransmitted FIN afterwards is still acknowledged."""
    _fd, conn = states.time_wait(dut, peer, port)
    conn.send("R", advance=False)
    conn.expect_none(0.1)
    assert testbed.state(conn) == "TIME_WAIT"
    conn.send("FA", seq=(conn.seq - 1) & 0xFFFFFFFF, advance=False)
    conn.expect("A", payload=b"")


def test_rst_in_syn_sent(testbed, dut, peer):
    fd = dut.socket()
    pport = peer.port()
    pending = dut.connect(fd, REMOTE_IP, pport)
    conn, syn = peer.wait_syn(pport)
    conn.dut_ip = testbed.dut_ip
    # no ACK, or an ACK of something never sent: ignored (RFC 9293 3.10.7.3)
    conn.send("R", seq=0, advance=False)
    conn.send("RA", seq=0, ack=(syn.seq + 5) & 0xFFFFFFFF, advance=False)
    assert not pending.done(0.1)
    assert testbed.state(conn) == "SYN_SENT"
    # acknowledging the SYN: refused
    conn.send("RA", seq=0, ack=(syn.seq + 1) & 0xFFFFFFFF, advance=False)
    expect_errno(errno.ECONNREFUSED, pending)
    assert testbed.state(conn) == "GONE"


def test_rst_in_syn_received(testbed, dut, peer, port):
    lfd = dut.listener(testbed.dut_ip, port)
    dut.setblocking(lfd, False)
    out_of_window = peer.conn(port)
    out_of_window.dut_ip = testbed.dut_ip
    out_of_window.send("S", options=out_of_window.syn_options())
    out_of_window.expect("SA", seq=None)
    out_of_window.send("R", seq=(out_of_window.seq + (1 << 30)) & 0xFFFFFFFF, advance=False)
    out_of_window.expect_none(0.1)
    assert testbed.state(out_of_window) == "SYN_RCVD"
    out_of_window.send("A")                             # the handshake still completes
    fd, _, rport = dut.accept(lfd)
    assert rport == out_of_window.port

    in_window = peer.conn(port)
    in_window.dut_ip = testbed.dut_ip
    in_window.send("S", options=in_window.syn_options())
    in_window.expect("SA", seq=None)
    in_window.send("R", seq=(in_window.seq + 100) & 0xFFFFFFFF, advance=False)
    in_window.expect_none(0.1)
    assert testbed.state(in_window) == "GONE"
    in_window.send("A")                                 # nothing to complete: refused
    in_window.expect("R", seq=in_window.rcv_nxt)
    with pytest.raises(BlockingIOError):
        dut.accept(lfd)
    in_window.rcv_nxt = None                            # nothing left to reset at cleanup


def test_rst_to_a_listener_is_ignored(testbed, dut, peer, port):
    lfd = dut.listener(testbed.dut_ip, port)
    stray = peer.conn(port)
    stray.dut_ip = testbed.dut_ip
    stray.send("R", advance=False)
    stray.expect_none(0.1)
    conn = peer.connect(port)                            # still listening
    dut.accept(lfd)
    assert testbed.state(conn) == "ESTABLISHED"
    with pytest.raises(ConformanceError):
        stray.expect(within=0.05)
