"""The TCP engine state by state, on a fake clock, against RFC 9293 rules."""

from __future__ import annotations

import errno
import gc
import select

import pytest

from nic_model.wire import tcp as T
from offload_daemon.abi import lib
from offload_daemon.tcp import RCV_WSCALE, State

from .fixtures import PEER, Harness


@pytest.fixture
def h():
    return Harness()


# LISTEN, SYN -> SYN-RECEIVED: SYN|ACK with our MSS and window scale (RFC 9293 3.10.7.2)
def test_listen_syn_gets_synack_with_options(h):
    h.listening(80)
    h.deliver(h.seg(T.SYN, 1000, options=T.TcpOptions(mss=1400, wscale=6)))
    (synack,) = h.take()
    assert synack.has(T.SYN | T.ACK)
    assert synack.ack == 1001
    assert synack.options.mss == 1460
    assert synack.options.wscale == RCV_WSCALE
    c = h.tcp.conns[(PEER, 40000, 80)]
    assert c.state == State.SYN_RCVD
    assert c.mss == 1400 and c.snd_wscale == 6


def test_no_window_scale_unless_peer_offers_it(h):
    h.listening(80)
    h.deliver(h.seg(T.SYN, 1000, options=T.TcpOptions(mss=1460)))
    (synack,) = h.take()
    assert synack.options.wscale is None
    assert h.tcp.conns[(PEER, 40000, 80)].rcv_wscale == 0


# no listener: RST|ACK acking the SYN (RFC 9293 3.10.7.1)
def test_syn_to_closed_port_gets_rst(h):
    h.deliver(h.seg(T.SYN, 77, dport=81))
    (rst,) = h.take()
    assert rst.has(T.RST | T.ACK) and rst.ack == 78 and rst.seq == 0


def test_ack_to_no_connection_gets_rst_with_its_ack_as_seq(h):
    h.deliver(h.seg(T.ACK, 5, 9999, dport=81))
    (rst,) = h.take()
    assert rst.flags == T.RST and rst.seq == 9999


def test_rst_is_never_answered(h):
    h.deliver(h.seg(T.RST, 5, dport=81))
    assert h.take() == []


# SYN-RECEIVED, ACK -> ESTABLISHED; the app's accept gets it with queued data
def test_passive_open_delivers_early_data_on_accept(h):
    lhs, lapp = h.listening(80)
    h.deliver(h.seg(T.SYN, 1000, options=T.TcpOptions(mss=1460, wscale=7)))
    synack = h.take()[-1]
    h.deliver(h.seg(T.ACK | T.PSH, 1001, synack.seq + 1, payload=b"hello"))
    assert lhs.shm.accept_pending == 1
    assert lapp.readable_tokens() == 1
    hs, app = h.socket()
    c = h.tcp.accept(lhs, hs, h.now)
    assert c.state == State.ESTABLISHED
    assert app.read() == b"hello"
    assert lhs.shm.accept_pending == 0
    assert hs.shm.state == lib.TOE_SS_CONNECTED


def test_backlog_overflow_drops_syns(h):
    lhs, _ = h.socket()
    h.tcp.bind(lhs, 0, 80)
    h.tcp.listen(lhs, 1)
    for port in (40001, 40002, 40003):
        h.deliver(h.seg(T.SYN, 1, sport=port))
    assert h.tcp.stats["syn_dropped_backlog"] == 1


# SYN-SENT (RFC 9293 3.10.7.3)
def test_active_open(h):
    c, hs, app, syn = h.established_active()
    assert syn.has(T.SYN) and syn.options.mss == 1460 and syn.options.wscale == RCV_WSCALE
    assert c.state == State.ESTABLISHED
    assert hs.shm.state == lib.TOE_SS_CONNECTED
    assert c.snd_wscale == 7


def test_syn_sent_rst_ack_is_connection_refused(h):
    hs, app = h.socket()
    h.tcp.connect(hs, PEER, 9, h.now)
    syn = h.take()[-1]
    h.deliver(h.seg(T.RST | T.ACK, 0, syn.seq + 1, sport=9, dport=syn.sport))
    assert hs.shm.so_error == errno.ECONNREFUSED
    assert hs.shm.state == lib.TOE_SS_CLOSED
    assert hs.shm.flags & lib.TOE_SF_RESET
    assert app.readable() & select.POLLIN
    assert (PEER, 9, syn.sport) not in h.tcp.conns


def test_syn_sent_unacceptable_ack_gets_rst_and_is_ignored(h):
    hs, _ = h.socket()
    h.tcp.connect(hs, PEER, 9, h.now)
    syn = h.take()[-1]
    h.deliver(h.seg(T.SYN | T.ACK, 0, syn.seq + 5, sport=9, dport=syn.sport))
    (rst,) = h.take()
    assert rst.flags == T.RST and rst.seq == syn.seq + 5
    assert hs.ccb.state == State.SYN_SENT


def test_syn_retries_then_etimedout():
    h = Harness(syn_retries=2)
    hs, _ = h.socket()
    h.tcp.connect(hs, PEER, 9, h.now)
    for _ in range(10):
        h.advance(10)
    syns = [s for s in h.take() if s.has(T.SYN)]
    assert len(syns) == 3                       # first + 2 retries
    assert hs.shm.so_error == errno.ETIMEDOUT


# ESTABLISHED: data out of the TX ring, acked, ring space released
def test_send_data_and_release_on_ack(h):
    c, hs, app, _ = h.established_active()
    assert app.write(b"x" * 3000) == 3000
    h.tcp.doorbell(hs, h.now)
    segs = h.take()
    data = b"".join(s.payload for s in segs)
    assert data == b"x" * 3000
    assert segs[0].seq == c.iss + 1
    h.deliver(h.seg(T.ACK, 5001, c.iss + 1 + 3000, sport=8080, dport=c.local_port))
    assert hs.shm.tx_head == 3000
    assert c.snd_una == c.snd_nxt


def test_segments_respect_mss_without_offloads():
    h = Harness(offloads=False)
    c, hs, app, _ = h.established_active()
    hs.shm.opt_flags |= lib.TOE_OF_NODELAY
    app.write(bytes(range(256)) * 20)
    h.tcp.doorbell(hs, h.now)
    segs = h.take()
    assert all(len(s.payload) <= 1460 for s in segs)
    assert b"".join(s.payload for s in segs) == bytes(range(256)) * 20


def test_nagle_holds_a_small_segment_while_another_small_one_is_unacked():
    """Linux's Nagle (Minshall's variant): a write's partial tail goes at once unless
    an earlier partial segment is still unacknowledged; full segments always go."""
    h = Harness(offloads=False)
    c, hs, app, _ = h.established_active()
    app.write(b"n" * 2000)
    h.tcp.doorbell(hs, h.now)
    first = h.take()
    assert [len(s.payload) for s in first] == [1460, 540]
    assert [s.flags & T.PSH for s in first] == [0, T.PSH]
    app.write(b"m" * 100)
    h.tcp.doorbell(hs, h.now)
    assert h.take() == []
    app.write(b"o" * 1500)
    h.tcp.doorbell(hs, h.now)
    assert [len(s.payload) for s in h.take()] == [1460]
    h.deliver(h.seg(T.ACK, 5001, c.snd_nxt, sport=8080, dport=c.local_port))
    assert [len(s.payload) for s in h.take() if s.payload] == [140]


def test_receive_window_is_ring_space(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.ACK, c.rcv_nxt, c.snd_nxt, payload=b"a" * 1000))
    (ack,) = h.take()
    assert ack.ack == c.rcv_nxt
    assert ack.window == (h.ring - 1000) >> RCV_WSCALE
    assert app.read() == b"a" * 1000


# retransmission (RFC 6298)
def test_rto_retransmits_from_snd_una_and_backs_off(h):
    c, hs, app, _ = h.established_active()
    app.write(b"r" * 100)
    h.tcp.doorbell(hs, h.now)
    first = h.take()
    assert first[0].payload == b"r" * 100
    rto = c.rto
    h.advance(rto + 0.001)
    again = h.take()
    assert again and again[0].seq == first[0].seq and again[0].payload == b"r" * 100
    assert c.rto == pytest.approx(2 * rto)
    assert c.cwnd == c.mss
    assert c.retransmits == 1


def test_ack_for_data_sent_before_an_rto_is_accepted(h):
    """The ACK of a whole flight was lost; after the RTO rewinds snd_nxt, the peer's
    cumulative ACK covers more than was re-sent (it must be taken, not refused)."""
    c, hs, app, _ = h.established_active()
    hs.shm.opt_flags |= lib.TOE_OF_NODELAY
    app.write(b"q" * 8000)
    h.tcp.doorbell(hs, h.now)
    h.take()
    end = c.snd_nxt
    h.advance(c.rto + 0.001)
    assert c.snd_nxt != end                      # rewound: one MSS re-sent
    h.deliver(h.seg(T.ACK, 5001, end, sport=8080, dport=c.local_port))
    assert c.snd_una == end and c.snd_nxt == end
    assert hs.shm.tx_head == 8000
    assert not c.timer.armed


def test_fast_retransmit_after_three_dupacks(h):
    c, hs, app, _ = h.established_active()
    # the SYN|ACK's window was unscaled (RFC 7323 2.2): a first ACK sets the scaled one,
    # or the first duplicate would count as a window update (RFC 5681 2)
    h.deliver(h.seg(T.ACK, 5001, c.snd_una, sport=8080, dport=c.local_port))
    c.cwnd = 100000
    app.write(b"d" * 20000)
    h.tcp.doorbell(hs, h.now)
    h.take()
    una = c.snd_una
    for _ in range(3):
        h.deliver(h.seg(T.ACK, 5001, una, sport=8080, dport=c.local_port))
    re = [s for s in h.take() if s.payload]
    assert re and re[0].seq == una and len(re[0].payload) == c.mss
    assert c.in_recovery
    assert h.tcp.stats["fast_retransmits"] == 1


# out of order: held, dup-ACKed, then delivered in order
def test_out_of_order_segments_are_reassembled(h):
    c, hs, app = h.established_passive()
    base = c.rcv_nxt
    h.deliver(h.seg(T.ACK, base + 5, c.snd_nxt, payload=b"world"))
    (dup,) = h.take()
    assert dup.ack == base
    assert app.read() == b""
    h.deliver(h.seg(T.ACK, base, c.snd_nxt, payload=b"hello"))
    assert app.read() == b"helloworld"
    assert c.rcv_nxt == base + 10


def test_old_duplicate_is_reacked_not_redelivered(h):
    c, hs, app = h.established_passive()
    base = c.rcv_nxt
    h.deliver(h.seg(T.ACK, base, c.snd_nxt, payload=b"abc"))
    h.take()
    h.deliver(h.seg(T.ACK, base, c.snd_nxt, payload=b"abc"))
    (ack,) = h.take()
    assert ack.ack == base + 3
    assert app.read() == b"abc"


# sequence numbers wrap (RFC 9293 3.4)
def test_receive_across_sequence_wrap(h):
    c, hs, app = h.established_passive(irs=0xFFFFFFFF - 2)
    base = c.rcv_nxt
    h.deliver(h.seg(T.ACK, base, c.snd_nxt, payload=b"0123456789"))
    assert app.read() == b"0123456789"
    assert c.rcv_nxt == (base + 10) & 0xFFFFFFFF


def test_send_across_sequence_wrap(h):
    c, hs, app, _ = h.established_active()
    c.snd_una = c.snd_nxt = 0xFFFFFFF0
    app.write(b"w" * 64)
    h.tcp.doorbell(hs, h.now)
    segs = h.take()
    assert segs[0].seq == 0xFFFFFFF0
    h.deliver(h.seg(T.ACK, 5001, (0xFFFFFFF0 + 64) & 0xFFFFFFFF, sport=8080, dport=c.local_port))
    assert c.snd_una == 0x30
    assert hs.shm.tx_head == 64


# RST handling (RFC 5961)
def test_rst_in_window_but_not_exact_gets_challenge_ack(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.RST, c.rcv_nxt + 10))
    (ack,) = h.take()
    assert ack.flags == T.ACK and ack.ack == c.rcv_nxt
    assert c.state == State.ESTABLISHED


def test_rst_exact_resets_connection(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.RST, c.rcv_nxt))
    assert hs.shm.so_error == errno.ECONNRESET
    assert c.state == State.CLOSED


def test_syn_in_established_gets_challenge_ack(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.SYN, c.rcv_nxt + 100))
    (ack,) = h.take()
    assert ack.flags == T.ACK
    assert c.state == State.ESTABLISHED


# closing
def test_passive_close(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.FIN | T.ACK, c.rcv_nxt, c.snd_nxt))
    assert c.state == State.CLOSE_WAIT
    assert hs.shm.flags & lib.TOE_SF_RX_EOF
    # POLLIN and POLLRDHUP together, as after a kernel socket's FIN
    assert app.readable() & (select.POLLIN | select.POLLRDHUP) == select.POLLIN | select.POLLRDHUP
    (ack,) = h.take()
    assert ack.ack == c.rcv_nxt
    h.tcp.app_closed(hs, h.now)
    (fin,) = h.take()
    assert fin.has(T.FIN | T.ACK)
    assert c.state == State.LAST_ACK
    h.deliver(h.seg(T.ACK, c.rcv_nxt, fin.seq + 1))
    assert c.state == State.CLOSED
    assert c.key not in h.tcp.conns


def test_active_close_through_time_wait(h):
    c, hs, app = h.established_passive()
    app.write(b"bye")
    h.tcp.app_closed(hs, h.now)
    segs = h.take()
    assert b"".join(s.payload for s in segs) == b"bye"
    fin = segs[-1]
    assert fin.has(T.FIN)
    assert c.state == State.FIN_WAIT_1
    h.deliver(h.seg(T.ACK, c.rcv_nxt, fin.seq + 1))
    assert c.state == State.FIN_WAIT_2
    h.deliver(h.seg(T.FIN | T.ACK, c.rcv_nxt, fin.seq + 1))
    assert c.state == State.TIME_WAIT
    h.advance(h.cfg.time_wait_s + 1)
    assert c.key not in h.tcp.conns


def test_time_wait_is_bounded_like_tcp_max_tw_buckets():
    """--max-time-wait 2: a third connection that closes first ends at once (its last ACK
    sent), counted; the first two wait their 2 MSL, and the room is free again after."""
    h = Harness(max_time_wait=2)
    conns = []
    for i in range(3):
        c, hs, app = h.established_passive(port=80 + i)
        h.tcp.app_closed(hs, h.now)
        fin = h.take()[-1]
        h.deliver(h.seg(T.FIN | T.ACK, c.rcv_nxt, fin.seq + 1, dport=80 + i))
        last = h.take()
        assert [s.flags for s in last] == [T.ACK], last
        conns.append(c)
    assert [c.state for c in conns] == [State.TIME_WAIT, State.TIME_WAIT, State.CLOSED]
    assert conns[2].key not in h.tcp.conns
    assert h.tcp.stats.time_wait == 2 and h.tcp.stats.time_wait_overflow == 1
    h.advance(h.cfg.time_wait_s + 1)
    assert not h.tcp.time_waits and all(c.key not in h.tcp.conns for c in conns)


def test_a_closed_connection_leaves_no_cycle_for_the_collector():
    """A connection's CCB and its timers' callbacks refer to each other; once it is closed
    (TIME-WAIT over), nothing of it may wait for the cycle collector: refcounting frees it
    (the collector used to cost ~10 µs per short connection, scanning everything)."""
    h = Harness()
    gc.collect()
    gc.disable()
    try:
        for i in range(50):
            c, hs, app = h.established_passive(port=1000 + i)
            h.tcp.app_closed(hs, h.now)
            fin = h.take()[-1]
            h.deliver(h.seg(T.FIN | T.ACK, c.rcv_nxt, fin.seq + 1, dport=1000 + i))
            h.advance(h.cfg.time_wait_s + 1)
            assert c.key not in h.tcp.conns
        del c
        h.tcp.closed.clear()
        left = gc.collect()
    finally:
        gc.enable()
    assert left < 50, f"{left} objects of 50 closed connections were cyclic garbage"


def test_simultaneous_close_goes_through_closing(h):
    c, hs, app = h.established_passive()
    h.tcp.shutdown(hs, 1, h.now)
    fin = h.take()[-1]
    h.deliver(h.seg(T.FIN | T.ACK, c.rcv_nxt, fin.seq))      # peer's FIN, not acking ours
    assert c.state == State.CLOSING
    h.deliver(h.seg(T.ACK, c.rcv_nxt, fin.seq + 1))
    assert c.state == State.TIME_WAIT


def test_close_with_unread_data_sends_rst(h):
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.ACK, c.rcv_nxt, c.snd_nxt, payload=b"unread"))
    h.take()
    h.tcp.app_closed(hs, h.now)
    (rst,) = h.take()
    assert rst.has(T.RST)
    assert c.key not in h.tcp.conns


def test_data_after_close_is_answered_with_rst(h):
    c, hs, app = h.established_passive()
    h.tcp.app_closed(hs, h.now)
    fin = h.take()[-1]
    h.deliver(h.seg(T.ACK, c.rcv_nxt, fin.seq + 1, payload=b"late"))
    assert any(s.has(T.RST) for s in h.take())


# flow control
def test_zero_window_probe(h):
    c, hs, app, _ = h.established_active()
    h.deliver(h.seg(T.ACK, 5001, c.snd_nxt, window=0, sport=8080, dport=c.local_port))
    app.write(b"z" * 10)
    h.tcp.doorbell(hs, h.now)
    assert [s for s in h.take() if s.payload] == []
    h.advance(c.rto + 0.01)
    probes = h.take()
    assert probes and probes[0].seq == (c.snd_una - 1) & 0xFFFFFFFF
    h.deliver(h.seg(T.ACK, 5001, c.snd_nxt, window=1000, sport=8080, dport=c.local_port))
    assert b"".join(s.payload for s in h.take()) == b"z" * 10


def test_window_update_after_app_reads():
    h = Harness(ring=1 << 14)
    c, hs, app = h.established_passive()
    h.deliver(h.seg(T.ACK, c.rcv_nxt, c.snd_nxt, payload=b"f" * 12000))
    (ack,) = h.take()
    assert ack.window << RCV_WSCALE <= (1 << 14) - 12000
    assert c.wnd_wait
    app.read()
    lib.toe_rx_arm_window(hs.shm)          # what toe_rx_consumed() reports to the shim
    h.tcp.doorbell(hs, h.now)
    (upd,) = h.take()
    assert upd.window << RCV_WSCALE >= (1 << 14) - 128


# keepalive (SO_KEEPALIVE + TCP_KEEPIDLE/INTVL/CNT from the socket's header)
def _keepalive(hs, idle=10, intvl=2, cnt=3):
    hs.shm.opt_flags |= lib.TOE_OF_KEEPALIVE
    hs.shm.keepidle_s, hs.shm.keepintvl_s, hs.shm.keepcnt = idle, intvl, cnt


def test_keepalive_probes_then_times_out(h):
    c, hs, app = h.established_passive()
    _keepalive(hs)
    h.tcp.setsockopt(hs, 1, 9, h.now)
    h.advance(9)
    assert h.take() == []
    h.advance(1.5)
    (probe,) = h.take()
    assert probe.flags == T.ACK and probe.seq == (c.snd_una - 1) & 0xFFFFFFFF and not probe.payload
    for _ in range(3):
        h.advance(2.01)
    assert hs.shm.so_error == errno.ETIMEDOUT
    assert h.tcp.stats["keepalive_probes"] == 3


def test_keepalive_answer_keeps_the_connection(h):
    c, hs, app = h.established_passive()
    _keepalive(hs)
    h.tcp.setsockopt(hs, 1, 9, h.now)
    h.advance(10.5)
    assert len(h.take()) == 1
    h.deliver(h.seg(T.ACK, c.rcv_nxt, c.snd_nxt))            # the peer answers the probe
    h.advance(9)
    assert h.take() == []
    assert c.state == State.ESTABLISHED and hs.shm.so_error == 0


def test_linger_zero_close_aborts_with_rst(h):
    c, hs, app = h.established_passive()
    hs.shm.opt_flags |= lib.TOE_OF_LINGER
    hs.shm.linger_s = 0
    h.tcp.app_closed(hs, h.now)
    (rst,) = h.take()
    assert rst.has(T.RST)
    assert c.key not in h.tcp.conns


def test_cork_holds_partial_segments_until_uncorked(h):
    c, hs, app, _ = h.established_active()
    hs.shm.opt_flags |= lib.TOE_OF_CORK | lib.TOE_OF_NODELAY
    app.write(b"c" * 100)
    h.tcp.doorbell(hs, h.now)
    assert [s for s in h.take() if s.payload] == []
    hs.shm.opt_flags &= ~lib.TOE_OF_CORK
    h.tcp.setsockopt(hs, 6, 3, h.now)                          # TCP_CORK off
    assert b"".join(s.payload for s in h.take()) == b"c" * 100


def test_cork_releases_after_200ms(h):
    c, hs, app, _ = h.established_active()
    hs.shm.opt_flags |= lib.TOE_OF_CORK
    app.write(b"d" * 10)
    h.tcp.doorbell(hs, h.now)
    assert [s for s in h.take() if s.payload] == []
    h.advance(0.21)
    assert b"".join(s.payload for s in h.take()) == b"d" * 10


def test_shutdown_read_makes_a_reader_see_eof(h):
    c, hs, app = h.established_passive()
    assert h.tcp.shutdown(hs, 0, h.now) == 0
    assert hs.shm.flags & lib.TOE_SF_RX_SHUT
    assert app.readable() & (select.POLLIN | select.POLLRDHUP) == select.POLLIN | select.POLLRDHUP
    assert c.state == State.ESTABLISHED                        # nothing on the wire


def test_so_rcvbuf_caps_the_advertised_window(h):
    """SO_RCVBUF set before connect (as Linux wants it): half of it holds data."""
    hs, app = h.socket()
    hs.shm.rcvbuf = 16384                       # what the shim stores for SO_RCVBUF 8192 (doubled)
    h.tcp.connect(hs, PEER, 8080, h.now)
    syn = h.take()[-1]
    assert syn.window <= 8192
    h.deliver(h.seg(T.SYN | T.ACK, 5000, syn.seq + 1, sport=8080, dport=syn.sport,
                    options=T.TcpOptions(mss=1460, wscale=7)))
    h.take()
    c = hs.ccb
    h.deliver(h.seg(T.ACK, c.rcv_nxt, c.snd_nxt, payload=b"r" * 1000, sport=8080, dport=syn.sport))
    (ack,) = h.take()
    assert ack.window << RCV_WSCALE <= 8192 - 1000
    assert app.read() == b"r" * 1000
