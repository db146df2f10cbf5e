"""The fast path's units against the software path for a connection connect() made as a
LazyCcb (tcp_ccb.py: only what names it; FastPath.push_new): the CCB the units get, the
object made whole in place, and random traces through the close in which nothing reads
the CCB from outside (that would make it whole), so the units' end releases it as it is.
The worlds and steps are test_fastpath_diff.py's.
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nic_model._fastpath import ffi as fp_ffi
from nic_model._fastpath import lib as fp_lib

from nic_model.wire import tcp as T
from offload_daemon.tcp_ccb import LAZY_SET, Ccb, LazyCcb, State

from .fixtures import PEER, Harness
from .test_fastpath_diff import Pair, World, _opts, _read


def _pushed(how: str) -> dict:
    """The CCB the units hold after connect(): through a LazyCcb ("lazy": FastPath.push_new,
    the fresh ARP entry; "unit": the units' command unit, nic_model/hw/host_cmd.c) or a
    whole Ccb ("whole": software's path, no fresh entry, send_syn)."""
    w = World(True, connecting=True, via_unit=how == "unit")
    if how == "whole":
        w = World(True)
        h = w.h
        h.tcp.fast = h.ad.fast = w.fast
        h.tcp.arp.lookup = lambda ip, now: None          # type: ignore[method-assign]
        w.hs, _app = h.socket()
        assert h.tcp.connect(w.hs, PEER, 8080, h.now) == -errno.EINPROGRESS
    c = w.hs.ccb
    assert (type(c) is LazyCcb) == (how != "whole") and c.fast_slot >= 0
    f = fp_ffi.new("struct fp_ccb *")
    assert fp_lib.fp_peek(w.units.st, c.fast_slot, f) == 0
    skip = {"tmpl", "hnext", "shm_addr", "b_fd", "conn_id", "local_port", "ip_base", "pseudo_base", "pad"}
    out = {}
    for name, _ in fp_ffi.typeof("struct fp_ccb").fields:
        if name in skip:
            continue
        v = getattr(f, name)
        out[name] = list(v) if isinstance(v, fp_ffi.CData) else v
    out["snd_rel"] = (f.snd_nxt - f.snd_una) & 0xFFFFFFFF, (f.snd_max - f.snd_una) & 0xFFFFFFFF, \
        (f.rtt_seq - f.snd_una) & 0xFFFFFFFF, (f.snd_sml - f.snd_una) & 0xFFFFFFFF
    for k in ("snd_una", "snd_nxt", "snd_max", "rtt_seq", "snd_sml"):   # (the ISN depends on the port)
        out.pop(k)
    return out


def test_a_lazy_connect_gives_the_units_the_same_ccb():
    """connect() with a fresh ARP entry gives the units the CCB of a LazyCcb from a template
    (FastPath.push_new), and the command unit's connect() the same CCB from its copy of the
    template: field for field what pushing a whole new Ccb gives them."""
    whole = _pushed("whole")
    assert _pushed("lazy") == whole
    assert _pushed("unit") == whole


def test_a_lazy_ccb_is_made_whole_in_place():
    """A LazyCcb has what names it (LAZY_SET) and nothing else; made whole, it is the same
    object with every field a new Ccb has, the units' values in it, its timers working."""
    w = World(True, connecting=True)
    c = w.c
    assert type(c) is LazyCcb
    assert {n for n in Ccb.__slots__ if hasattr(c, n)} == LAZY_SET
    s = World(False, connecting=True).state()
    w.fast.own(c)
    assert type(c) is Ccb and w.hs.ccb is c and w.h.tcp.conns[c.key] is c
    assert all(hasattr(c, n) for n in Ccb.__slots__)
    assert c.timer is not c.ka_timer and c.timer.callback is not c.dack_timer.callback
    assert c.state == State.SYN_SENT and c.rcv_wscale == 7 and c.snd_nxt == (c.iss + 1) & 0xFFFFFFFF
    w.fast.push_candidates()
    assert c.fast_slot >= 0 and w.state() == s    # back in the units; what software has too


def _both(p: Pair, name: str, *args) -> None:
    """A step on both worlds with the frames and what the application reads compared, but no
    CCB read: a LazyCcb stays as it is until the engine itself needs it whole."""
    for w in (p.s, p.f):
        getattr(w, name)(*args)
    fs, ff = p.s.frames(), p.f.frames()
    assert ff == fs, f"after {name}{args!r}: frames differ\nsoftware {fs}\nhybrid   {ff}"
    assert _read(p.s.app) == _read(p.f.app), f"after {name}{args!r}: the application reads different bytes"


LAZY_STEP = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 3000)),
    st.tuples(st.just("ack"), st.integers(0, 100)),
    st.tuples(st.just("write"), st.integers(1, 20000)),
    st.tuples(st.just("read"), st.just(0)),
    st.tuples(st.just("time"), st.sampled_from([0.001, 0.05, 0.3])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LAZY_STEP, max_size=8), st.booleans(), st.booleans())
def test_random_traces_of_a_lazy_connect_agree(steps, peer_closes_first, via_unit):
    """connect() as a LazyCcb (made by software, or by the units' command unit), its SYN|ACK
    in the units, then anything, then a close either way round: the same frames as
    software's all along (the SYN too: the same port and ISN), never looked at from outside
    (the units' end releases it as it is, or software makes it whole where it must), and
    the same end: state, bytes, the socket released, no port left in use."""
    try:
        p = Pair.__new__(Pair)
        p.s, p.f = World(False, connecting=True), World(True, connecting=True, via_unit=via_unit)
        assert type(p.f.c) is LazyCcb
        sc = p.s.c
        _both(p, "peer", T.SYN | T.ACK, 777000, (sc.snd_una + 1) & 0xFFFFFFFF, b"", 29200, _opts())
        for kind, a in steps:
            if kind == "data":
                _both(p, "peer", T.ACK | T.PSH, sc.rcv_nxt, sc.snd_una, bytes([a % 251]) * a)
            elif kind == "ack":
                out = (sc.snd_max - sc.snd_una) & 0xFFFFFFFF
                _both(p, "peer", T.ACK, sc.rcv_nxt, (sc.snd_una + out * a // 100) & 0xFFFFFFFF, b"")
            elif kind == "write":
                _both(p, "write", bytes([a % 7]) * a)
            elif kind == "read":
                _both(p, "read")
            else:
                _both(p, "advance", a)
        _both(p, "read")
        if peer_closes_first:
            _both(p, "peer", T.ACK | T.FIN, sc.rcv_nxt, sc.snd_max, b"")
            _both(p, "read")
            _both(p, "close")
        else:
            _both(p, "close")
        for _ in range(4):          # the peer takes everything sent, its FIN with the last ACK
            fin = 0 if peer_closes_first or sc.rx_fin else T.FIN
            _both(p, "peer", T.ACK | fin, sc.rcv_nxt, sc.snd_max, b"")
        _both(p, "advance", 0.001)
        ends = [_outcome(w) for w in (p.s, p.f)]
        assert ends[0] == ends[1], ends
        assert p.s.hs.mapped == p.f.hs.mapped
        assert _ports_used(p.s) == _ports_used(p.f)
    finally:
        Harness.close_all()


def _ports_used(w: World) -> dict[int, int]:
    """Local ports with users (TcpStack.port_users, which the command unit chooses from)."""
    u = w.h.tcp.port_users
    return {p: u[p] for p in range(65536) if u[p]}


def _outcome(w: World) -> tuple:
    """Where a connection ended up: its state and bytes, open (software's CCB, made whole or
    not) or closed (the closed list), a TIME-WAIT record of the units' counting as open."""
    c = w.c
    tcp = w.h.tcp
    if tcp.conns.get(c.key) is c:
        if w.fast is not None:
            w.fast.refresh(c)
        return "open", c.state.name, c.bytes_in, c.bytes_out
    closed = [(st_, k.bytes_in, k.bytes_out) for k, _pid, st_ in tcp.closed if k is c]
    if w.fast is not None and w.units.tw_has(*c.key):
        assert closed and closed[-1][0] == "TIME_WAIT", closed
        return ("open", *closed[-1])
    return ("closed", *closed[-1]) if closed else ("gone",)


def test_our_fin_sent_while_the_peers_fin_is_taken_is_closing():
    """The application closed with the last byte held by cwnd; the peer's FIN comes with an
    ACK of the data only. Taking its ACK sends that byte and our FIN (FIN-WAIT-1), so the FIN
    does not acknowledge ours: CLOSING (software's, as its _fin makes it), not CLOSE-WAIT.
    Found by test_random_traces_of_a_lazy_connect_agree."""
    p = Pair.__new__(Pair)
    p.s, p.f = World(False, connecting=True), World(True, connecting=True)
    sc = p.s.c
    _both(p, "peer", T.SYN | T.ACK, 777000, (sc.snd_una + 1) & 0xFFFFFFFF, b"", 29200, _opts())
    _both(p, "write", b"\x06" * (10 * 1460 + 1))       # one byte more than the first cwnd
    _both(p, "close")
    _both(p, "peer", T.ACK | T.FIN, sc.rcv_nxt, sc.snd_max, b"")
    assert sc.state == State.CLOSING and p.f.c.state == State.CLOSING and p.f.c.fast_slot < 0
    assert p.f.units.counters.punts[fp_lib.FP_PUNT_STATE] == 1
    _both(p, "peer", T.ACK, sc.rcv_nxt, sc.snd_max, b"")
    assert _outcome(p.s) == _outcome(p.f) == ("open", "TIME_WAIT", 0, 14601)
