"""Three-way handshakes both ways, and what the options negotiate.

RFC 9293 3.5 (handshake), 3.7.1 (MSS: 536 when absent), RFC 7323 2
(window scale: offered only if offered to us, never applied to a SYN's
window, > 14 used as 14); Linux for what the RFCs leave open (no extra ACK
after the handshake, TCP_MAXSEG clamps the MSS we announce and use).
"""

from __future__ import annotations

import socket

import pytest

from .harness import ANY, MSS, REMOTE_IP, WSCALE

pytestmark = pytest.mark.integration

RING_WINDOW = (1 << 20) >> 7          # the adapter's 1 MiB RX ring, scaled by its shift 7


def test_active_open_sends_syn_with_mss_and_window_scale(testbed, dut, peer):
    fd, conn, syn = peer.connected_from(dut, synack_options=[("MSS", 1000), ("NOP", None), ("WScale", 2)])
    assert syn.options == {MSS: 1460, WSCALE: 7}
    assert syn.window == 65535 and syn.ack == 0
    assert conn.log[-1].window == RING_WINDOW          # the handshake's ACK: scaled from now on
    assert dut.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1000
    dut.send(fd, b"m" * 2500)
    assert [len(s.payload) for s in conn.expect_data(b"m" * 2500)] == [1000, 1000, 500]


def test_active_open_to_a_peer_without_options_uses_536_and_no_scaling(testbed, dut, peer):
    fd, conn, _syn = peer.connected_from(dut, synack_options=[])
    assert conn.log[-1].window == 65535                 # unscaled: the peer offered no window scale
    assert dut.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 536
    dut.send(fd, b"d" * 1200)
    assert [len(s.payload) for s in conn.expect_data(b"d" * 1200)] == [536, 536, 128]


def test_passive_open_answers_with_the_options_offered(testbed, dut, peer, port):
    lfd = dut.listener(testbed.dut_ip, port)
    with_ws = peer.conn(port, mss=1200, wscale=3)
    synack = with_ws.open_to(testbed.dut_ip)
    assert synack.options == {MSS: 1460, WSCALE: 7} and synack.window == 65535
    assert synack.ack == (with_ws.iss + 1) & 0xFFFFFFFF
    fd, addr, rport = dut.accept(lfd)
    assert (addr, rport) == (REMOTE_IP, with_ws.port)
    dut.send(fd, b"p" * 3000)
    assert [len(s.payload) for s in with_ws.expect_data(b"p" * 3000)] == [1200, 1200, 600]

    bare = peer.conn(port, mss=None, wscale=None)
    synack = bare.open_to(testbed.dut_ip)
    assert synack.options == {MSS: 1460}                # no window scale unless offered
    fd2, _, _ = dut.accept(lfd)
    assert dut.getsockopt(fd2, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 536
    dut.send(fd2, b"q" * 600)
    got = bare.expect_data(b"q" * 600)
    assert [len(s.payload) for s in got] == [536, 64]
    assert got[0].window == 65535                       # unscaled, and capped at 64 KB


@pytest.mark.parametrize("side", ["active", "passive"])
def test_window_scale_above_14_is_used_as_14(testbed, dut, peer, port, side):
    if side == "active":
        _fd, conn, _ = peer.connected_from(dut, synack_options=[("MSS", 1460), ("NOP", None), ("WScale", 15)])
        # the SYN|ACK's own window is never scaled (RFC 7323 2.2)
        assert testbed.connection(conn.port)["snd_wnd"] == 65535
    else:
        _fd, conn, _ = peer.accepted_by(dut, port, wscale=15)
    conn.send("A", window=3)
    conn.expect_none(0.1)
    assert testbed.connection(conn.port)["snd_wnd"] == 3 << 14


@pytest.mark.parametrize("side", ["active", "passive"])
def test_no_pure_ack_between_handshake_and_first_data(testbed, dut, peer, port, side):
    """Linux sends nothing after the handshake until there is something to say; the
    adapter used to follow every handshake with a window update."""
    if side == "active":
        fd, conn, _ = peer.connected_from(dut)
    else:
        fd, conn, _ = peer.accepted_by(dut, port)
    conn.expect_none(0.3)
    conn.send("PA", b"ping")
    conn.expect("A", payload=b"", within=1.0)
    assert dut.recv(fd, 4) == b"ping"
    dut.send(fd, b"pong")
    conn.expect("PA", payload=b"pong")


@pytest.mark.parametrize("side", ["active", "passive"])
def test_tcp_maxseg_clamps_the_mss_announced_and_used(testbed, dut, peer, port, side):
    def setup(d, fd):
        d.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1100)

    if side == "active":
        fd, conn, syn = peer.connected_from(dut, setup=setup)
        assert syn.options[MSS] == 1100
    else:
        lfd = dut.socket()
        setup(dut, lfd)
        dut.bind(lfd, testbed.dut_ip, port)
        dut.listen(lfd)
        conn = peer.conn(port)
        synack = conn.open_to(testbed.dut_ip)
        assert synack.options[MSS] == 1100
        fd, _, _ = dut.accept(lfd)
    assert dut.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1100
    dut.send(fd, b"s" * 3000)
    assert [len(s.payload) for s in conn.expect_data(b"s" * 3000)] == [1100, 1100, 800]


def test_syn_to_a_closed_port_is_refused_with_rst(testbed, dut, peer, port):
    conn = peer.conn(port)
    conn.dut_ip = testbed.dut_ip
    conn.send("S", options=conn.syn_options())
    conn.expect("RA", seq=0, ack=ANY)
    assert conn.log[-1].ack == (conn.iss + 1) & 0xFFFFFFFF
