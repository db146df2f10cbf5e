"""Drive a connection into each TCP state, from the remote peer's side.

Each driver takes (dut, peer, port) and returns (fd, conn) with the adapter's
end of the connection in the named state, every segment on the way checked.
"""

from __future__ import annotations

import socket

from .harness import Conn, Dut, Peer


def established(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn, _ = peer.accepted_by(dut, port)
    return fd, conn


def fin_wait_1(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn = established(dut, peer, port)
    dut.shutdown(fd, socket.SHUT_WR)
    conn.expect("FA")                       # not acknowledged: FIN-WAIT-1
    return fd, conn


def fin_wait_2(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn = fin_wait_1(dut, peer, port)
    conn.send("A")
    return fd, conn


def close_wait(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn = established(dut, peer, port)
    conn.send("FA")
    conn.expect("A")
    return fd, conn


def last_ack(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn = close_wait(dut, peer, port)
    dut.shutdown(fd, socket.SHUT_WR)
    conn.expect("FA")
    return fd, conn


def closing(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    """Both FINs cross: the peer's FIN does not acknowledge the adapter's."""
    fd, conn = fin_wait_1(dut, peer, port)
    fin_seq = (conn.rcv_nxt - 1) & 0xFFFFFFFF
    conn.send("FA", ack=fin_seq)
    conn.expect("A", ignore_retransmits=True)
    return fd, conn


def time_wait(dut: Dut, peer: Peer, port: int) -> tuple[int, Conn]:
    fd, conn = fin_wait_2(dut, peer, port)
    conn.send("FA")
    conn.expect("A")
    return fd, conn


DRIVERS = {"ESTABLISHED": established, "FIN_WAIT_1": fin_wait_1, "FIN_WAIT_2": fin_wait_2,
           "CLOSE_WAIT": close_wait, "LAST_ACK": last_ack, "CLOSING": closing, "TIME_WAIT": time_wait}
