"""The units' command unit (nic_model/hw/host_cmd.c): a CONNECT read from a process's control
channel and answered by the units, or left where it is for software.

The engine is test_fastpath_diff.py's hybrid World (real units, a socket pair standing in
for the TAP, the harness's SEQPACKET channel); the CONNECT goes in on the shim's end of
the channel and the unit is given the channel's readiness as fp_poll gives it
(fp_hc_event). What it answers must be what software answers (the same port, ISN, CCB
and SYN: test_fastpath_lazy.py compares those); what it does not answer must still be on
the channel, byte for byte, for software to read, with nothing of it (descriptors) taken.
"""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest
from nic_model._fastpath import ffi as fp_ffi
from nic_model._fastpath import lib as fp_lib

from nic_model.fastpath import HC_NAMES
from offload_daemon.abi import ffi, lib
from offload_daemon.seq import initial_seq
from offload_daemon.tcp_ccb import EPHEMERAL, LazyCcb, State

from .fixtures import ME, PEER, PEER_MAC, Harness
from .test_fastpath_diff import World, _frame, _opts, _parse_out


@pytest.fixture(autouse=True)
def _close():
    yield
    Harness.close_all()


def _counts(w: World) -> dict[str, int]:
    h = fp_ffi.new("struct fp_hc_counters *")
    fp_lib.fp_hc_counters(w.units.st, h)
    return {n: getattr(h, n) for n in HC_NAMES}


class Unit:
    """A hybrid world with its channel the command unit's, the peer a known neighbour."""

    def __init__(self, gen: int = 1):
        self.w = World(True)                # (with an established connection of its own)
        self.h, self.st = self.w.h, self.w.units.st
        self.h.tcp.fast = self.h.ad.fast = self.w.fast
        self.ch = self.h.proc.conn.fileno()
        assert fp_lib.fp_hc_channel(self.st, self.ch, gen) == 0
        assert fp_lib.fp_hc_neighbour(self.st, PEER, PEER_MAC, self.h.now + 60) == 0

    def fresh(self, chan: int | None = None):
        hs, app = self.h.socket()
        r = fp_lib.fp_hc_sock(self.st, hs.id, hs.b_fd, self.ch if chan is None else chan,
                              int(ffi.cast("uintptr_t", hs.shm)), hs.tx_size, hs.rx_size, hs.uid)
        assert r == 0
        return hs, app

    def event(self, fd: int | None = None, ev: int = select.EPOLLIN) -> int:
        self.st.nevents = 0
        return fp_lib.fp_hc_event(self.st, self.ch if fd is None else fd, ev, self.h.now)

    def left(self, msg: bytes) -> None:
        """The command is still on the channel, as it was sent, for software to read."""
        assert self.st.nevents == 0
        assert self.h.proc.conn.recv(4096, socket.MSG_DONTWAIT) == msg


def test_a_connect_is_answered_with_the_socket_connecting():
    """The answer is software's (-EINPROGRESS); the header has the addresses and state
    CONNECTING; the record names the socket, port, ISN (software's function) and slot;
    the SYN is on the wire; the port counts the socket's bind and the connection."""
    u = Unit()
    hs, _app = u.fresh()
    u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 1
    e = u.st.events[0]
    assert u.st.nevents == 1 and e.kind == fp_lib.FP_EV_CONNECT and e.fd == hs.b_fd
    r = u.w.fast.hc_conns[e.buf]
    lo, hi = EPHEMERAL
    assert lo <= r.local_port <= hi and r.remote_ip == PEER and r.remote_port == 8080 and r.slot == e.slot
    assert r.iss == initial_seq(ME, r.local_port, PEER, 8080, u.h.now) and r.adv_mss == u.h.tcp.our_mss
    assert r.sock_id == hs.id and not r.lost and bytes(fp_ffi.buffer(r.peer_mac, 6)) == PEER_MAC
    assert u.h.answer().result == -errno.EINPROGRESS
    sh = hs.shm
    assert sh.state == lib.TOE_SS_CONNECTING
    assert (socket.ntohl(sh.local_addr_be32), socket.ntohs(sh.local_port_be16)) == (ME, r.local_port)
    assert (socket.ntohl(sh.remote_addr_be32), socket.ntohs(sh.remote_port_be16)) == (PEER, 8080)
    seq, _ack, flags, _win, opts, payload = _parse_out(u.w.tap_r.recv(4096))
    assert flags == 0x02 and seq == r.iss and opts.mss == r.adv_mss and payload == b""
    assert u.h.tcp.port_users[r.local_port] == 2
    u.h.tcp.units_connected(hs, r, u.h.now)
    c = hs.ccb
    assert type(c) is LazyCcb and c.state == State.SYN_SENT and c.fast_slot == r.slot
    assert u.h.tcp.conns[c.key] is c and hs.bound == (ME, r.local_port) and u.h.tcp.port_users[r.local_port] == 2
    assert _counts(u.w)["connects"] == 1
    # used: a second CONNECT of the same socket is software's (EALREADY there)
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 0
    u.left(msg)
    # the connection's end gives both uses back
    u.h.tcp.own(c)
    u.h.tcp.abort(c, u.h.now)
    u.h.tcp.unbind(hs)
    assert u.h.tcp.port_users[r.local_port] == 0


@pytest.mark.parametrize("case", ["op", "unknown id", "zero id", "other channel", "stale neighbour",
                                  "no neighbour", "off subnet", "own address", "broadcast", "network",
                                  "port 0", "no port", "software used it"])
def test_what_the_unit_does_not_answer_stays_for_software(case):
    u = Unit()
    hs, _app = u.fresh()
    sid, ip, port, op = hs.id, PEER, 8080, lib.TOE_OP_CONNECT
    expect = {"op": "passed", "unknown id": "not_fresh", "zero id": "not_fresh", "other channel": "not_fresh",
              "software used it": "not_fresh", "no port": "no_port"}.get(case, "no_neighbour")
    if case == "op":
        op = lib.TOE_OP_BIND
    elif case == "unknown id":
        sid = (hs.id + 1) & 0xFFFFFFFF or 1
    elif case == "zero id":
        sid = 0
    elif case == "other channel":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        u.h.extra += [a, b]
        assert fp_lib.fp_hc_channel(u.st, b.fileno(), 2) == 0
        other, _ = u.fresh(chan=b.fileno())
        sid = other.id                    # registered through another channel: not this one's
    elif case == "stale neighbour":
        fp_lib.fp_hc_neighbour(u.st, PEER, PEER_MAC, u.h.now - 0.001)
    elif case == "no neighbour":
        ip = PEER + 1
    elif case == "off subnet":
        ip = 0x0A000001
    elif case == "own address":
        ip = ME
    elif case == "broadcast":
        ip = (ME & 0xFFFFFF00) | 0xFF
    elif case == "network":
        ip = ME & 0xFFFFFF00
    elif case == "port 0":
        port = 0
    elif case == "no port":
        for p in range(EPHEMERAL[0], EPHEMERAL[1] + 1):
            u.h.tcp.port_users[p] = 1
    elif case == "software used it":
        fp_lib.fp_hc_unsock(u.st, hs.b_fd)
    if case not in ("stale neighbour", "no neighbour"):
        fp_lib.fp_hc_neighbour(u.st, ip, PEER_MAC, u.h.now + 60)   # refused for what it is, not as unknown
    active = u.st.active                                  # (the World's own connection)
    msg = u.h.send_cmd(op, sid, ip, port)
    assert u.event() == 0
    u.left(msg)
    counts = _counts(u.w)
    assert counts[expect] == 1 and counts["connects"] == 0, counts
    with pytest.raises(BlockingIOError):
        u.w.tap_r.recv(4096, socket.MSG_DONTWAIT)          # no SYN
    assert hs.shm.state == lib.TOE_SS_NEW and u.st.active == active


def test_a_command_with_descriptors_is_left_with_them():
    """A CONNECT carrying descriptors (SCM_RIGHTS) is software's: the unit's look installs
    none of them in the daemon, and software still receives them."""
    u = Unit()
    hs, _app = u.fresh()
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080, fds=[r])
    os.close(r)
    os.close(w)
    assert u.event() == 0 and len(os.listdir("/proc/self/fd")) == before
    got, fds, _flags, _ = socket.recv_fds(u.h.proc.conn, 4096, 4)
    assert got == msg and len(fds) == 1
    os.close(fds[0])
    assert _counts(u.w)["passed"] == 1


def test_a_new_channel_on_the_same_descriptor_cannot_name_the_old_ones_sockets():
    """Sockets registered through a channel that went: its successor on the same descriptor
    (another generation) names them in vain; what the unit does not know is software's."""
    u = Unit(gen=1)
    hs, _app = u.fresh()
    assert fp_lib.fp_hc_channel(u.st, u.ch, 0) == 0       # the channel goes ...
    assert fp_lib.fp_hc_channel(u.st, u.ch, 2) == 0       # ... and another comes on its fd
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 0
    u.left(msg)
    assert _counts(u.w)["not_fresh"] == 1
    assert fp_lib.fp_hc_channel(u.st, u.ch, 0) == 0
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 0                                 # not the unit's channel at all
    u.left(msg)


def test_a_fresh_sockets_b_events():
    """Readable (the shim stuffing A: an unconnected socket is not writable) is nothing to
    do; a hang-up (the application closed it) is software's, and the socket is no longer
    the unit's: its CONNECT, if one follows in the same wait, is software's too."""
    u = Unit()
    hs, app = u.fresh()
    app.a.send(b"\0" * 100)
    assert u.event(hs.b_fd, select.EPOLLIN) == 1 and u.st.nevents == 0
    assert _counts(u.w)["fresh_stuffed"] == 1
    assert u.event(hs.b_fd, select.EPOLLIN | select.EPOLLRDHUP) == 0
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 0
    u.left(msg)
    assert u.event(hs.b_fd, select.EPOLLIN) == 0           # software's now


def test_an_answer_the_channel_does_not_take_drops_it():
    """The connection is made, but its answer cannot be sent (the shim's end is full): the
    record says so, and the adapter drops the channel as software's answer path would."""
    u = Unit()
    hs, _app = u.fresh()
    u.h.proc.conn.setblocking(False)
    filled = 0
    while True:                                           # the shim's end never reads
        try:
            u.h.proc.conn.send(b"\0" * lib.TOE_RSP_SIZE)
            filled += 1
        except BlockingIOError:
            break
    u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 1
    r = u.w.fast.hc_conns[u.st.events[0].buf]
    assert r.lost == 1 and _counts(u.w)["lost_answers"] == 1 and filled > 0


def _connect_waiting(u: Unit):
    """A blocking connect (TOE_CONNECT_WAIT) taken by the unit: its answer is owed."""
    hs, app = u.fresh()
    u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080, arg1=lib.TOE_CONNECT_WAIT)
    assert u.event() == 1 and fp_lib.fp_hc_owed(u.st) == 1
    r = u.w.fast.hc_conns[u.st.events[0].buf]
    assert r.owed == u.ch and not r.lost
    with pytest.raises(BlockingIOError):                 # nothing answered yet
        u.h._ctl_a.recv(lib.TOE_RSP_SIZE, socket.MSG_DONTWAIT)
    syn = _parse_out(u.w.tap_r.recv(4096))
    return hs, app, r, syn


def test_a_blocking_connect_whose_handshake_ends_in_the_pass_is_answered_connected():
    """The SYN|ACK taken before the pass's end: the answer is 0 (the shim returns from
    connect() without waiting on A), the header says CONNECTED, the ACK is on the wire."""
    u = Unit()
    hs, _app, r, syn = _connect_waiting(u)
    frame = _frame(5000, syn[0] + 1, 0x12, 29200, b"", 8080, r.local_port, _opts(1460, 7))
    u.w.bufs[0][:len(frame)] = frame
    u.st.now = u.h.now
    assert fp_lib.fp_rx_frame(u.st, 0, len(frame), u.h.now) == 0      # the units take it (fp_synack)
    fp_lib.fp_end_burst(u.st)
    fp_lib.fp_hc_settle(u.st)
    assert u.h.answer().result == 0 and fp_lib.fp_hc_owed(u.st) == 0
    assert hs.shm.state == lib.TOE_SS_CONNECTED and r.owed == -1 and not r.lost
    seq, ack, flags, *_ = _parse_out(u.w.tap_r.recv(4096))
    assert (seq, ack, flags) == (syn[0] + 1, 5001, 0x10)
    assert _counts(u.w)["completed"] == 1
    fp_lib.fp_hc_settle(u.st)                            # answered once
    with pytest.raises(BlockingIOError):
        u.h._ctl_a.recv(lib.TOE_RSP_SIZE, socket.MSG_DONTWAIT)


def test_a_blocking_connect_still_connecting_at_the_pass_end_is_answered_in_progress():
    """No SYN|ACK in the pass (a peer further away): -EINPROGRESS, as without the flag; so
    is a refusal (the RST is software's: the connection is no longer the units')."""
    u = Unit()
    _hs, _app, _r, _syn = _connect_waiting(u)
    fp_lib.fp_hc_settle(u.st)
    assert u.h.answer().result == -errno.EINPROGRESS and _counts(u.w)["completed"] == 0
    # the next fp_poll settles what a pass left owed before its records go
    _hs2, _app2, r2, syn2 = _connect_waiting(u)
    frame = _frame(0, syn2[0] + 1, 0x14, 0, b"", 8080, r2.local_port)
    u.w.bufs[0][:len(frame)] = frame
    fp_lib.fp_rx_frame(u.st, 0, len(frame), u.h.now)
    fp_lib.fp_poll(u.st, 0)
    assert u.h.answer().result == -errno.EINPROGRESS and _counts(u.w)["completed"] == 0


def test_a_blocking_connects_answer_the_channel_does_not_take_drops_it():
    u = Unit()
    _hs, _app, r, _syn = _connect_waiting(u)
    u.h.proc.conn.setblocking(False)
    while True:
        try:
            u.h.proc.conn.send(b"\0" * lib.TOE_RSP_SIZE)
        except BlockingIOError:
            break
    fp_lib.fp_hc_settle(u.st)
    assert r.lost == 1 and _counts(u.w)["lost_answers"] == 1


def test_the_neighbour_copy_keeps_the_entries_that_last():
    """Full (256 entries), a new neighbour replaces the one that goes stale first; one learnt
    again is updated in place (or takes the next one's place)."""
    u = Unit()
    assert fp_lib.fp_hc_neighbour(u.st, PEER, PEER_MAC, u.h.now + 10) == 0     # the first to go stale
    for i in range(255):
        assert fp_lib.fp_hc_neighbour(u.st, 0x0A000000 + i, PEER_MAC, u.h.now + 1000 + i) == 0
    hs, _app = u.fresh()
    u.h.send_cmd(lib.TOE_OP_CONNECT, hs.id, PEER, 8080)
    assert u.event() == 1 and u.h.answer().result == -errno.EINPROGRESS
    assert fp_lib.fp_hc_neighbour(u.st, 0x0B000000, PEER_MAC, u.h.now + 5000) == 0  # full: PEER gives way
    hs2, _app2 = u.fresh()
    msg = u.h.send_cmd(lib.TOE_OP_CONNECT, hs2.id, PEER, 8081)
    assert u.event() == 0
    u.left(msg)
    assert _counts(u.w)["no_neighbour"] == 1
    assert fp_lib.fp_hc_neighbour(u.st, PEER, PEER_MAC, u.h.now + 60) == 0       # learnt again
    u.h.send_cmd(lib.TOE_OP_CONNECT, hs2.id, PEER, 8081)
    assert u.event() == 1
