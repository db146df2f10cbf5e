"""Closing: FIN from either side, from both at once, with data (RFC 9293 3.6, 3.10.7.4)."""

from __future__ import annotations

import socket

import pytest

from . import states

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", sorted(states.DRIVERS))
def test_each_state_is_reached(testbed, dut, peer, port, name):
    _fd, conn = states.DRIVERS[name](dut, peer, port)
    assert testbed.state(conn) == name


def test_adapter_closes_first(testbed, dut, peer, port):
    fd, conn = states.established(dut, peer, port)
    dut.close(fd)
    conn.expect("FA", payload=b"")
    conn.send("A")
    assert testbed.state(conn) == "FIN_WAIT_2"
    conn.send("FA")
    conn.expect("A")
    assert testbed.state(conn) == "TIME_WAIT"
    conn.send("FA", seq=(conn.seq - 1) & 0xFFFFFFFF, advance=False)   # our FIN again: re-ACKed
    conn.expect("A")


def test_peer_closes_first(testbed, dut, peer, port):
    fd, conn = states.established(dut, peer, port)
    conn.send("PA", b"last words")
    conn.send("FA")
    conn.expect_acked()
    assert dut.recv(fd, 100) == b"last words"
    assert dut.recv(fd, 100) == b""                  # EOF
    dut.send(fd, b"reply")                            # half-closed: the other way still works
    conn.expect("PA", payload=b"reply")
    dut.close(fd)
    conn.expect("FA")
    assert testbed.state(conn) == "LAST_ACK"
    conn.send("A")
    conn.expect_none(0.1)
    assert testbed.state(conn) == "GONE"              # no TIME-WAIT for the side that closed last


def test_fin_carried_with_data(testbed, dut, peer, port):
    fd, conn = states.established(dut, peer, port)
    conn.send("FPA", b"bye")
    ack = conn.expect("A")
    assert ack.ack == conn.seq                        # data and FIN acknowledged together
    assert dut.recv(fd, 10) == b"bye"
    assert dut.recv(fd, 10) == b""


def test_simultaneous_close(testbed, dut, peer, port):
    fd, conn = states.closing(dut, peer, port)
    assert testbed.state(conn) == "CLOSING"
    conn.send("A")                                    # now the adapter's FIN is acknowledged
    conn.expect_none(0.1)
    assert testbed.state(conn) == "TIME_WAIT"
    assert dut.recv(fd, 10) == b""


def test_shutdown_write_sends_fin_after_the_data(testbed, dut, peer, port):
    fd, conn = states.established(dut, peer, port)
    dut.send(fd, b"q" * 4000)
    dut.shutdown(fd, socket.SHUT_WR)
    got = b""
    while True:
        seg = conn.expect(within=1.0)
        got += seg.payload
        if "F" in seg.flags:
            break
    assert got == b"q" * 4000
    conn.send("A")
    assert testbed.state(conn) == "FIN_WAIT_2"
