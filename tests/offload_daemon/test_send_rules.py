"""The send side's Linux rules, on a fake clock: MSG_MORE, PSH, the send buffer.

The wire-level versions are in tests/conformance/test_data.py; these pin the
engine's decisions (and the shared toe_tx_room/toe_tx_writable arithmetic)
without a network.
"""

from __future__ import annotations

import pytest

from nic_model.wire import tcp as T
from offload_daemon.abi import ffi, lib
from offload_daemon.tcp import CORK_MAX_S

from .fixtures import Harness


@pytest.fixture
def h() -> Harness:
    return Harness(offloads=False)


def _ack_all(h: Harness, c) -> None:
    h.deliver(h.seg(T.ACK, 5001, c.snd_nxt, sport=8080, dport=c.local_port))


def test_msg_more_holds_a_partial_segment_until_the_next_write(h):
    c, hs, app, _ = h.established_active()
    app.write(b"a" * 100, more=True)
    h.tcp.doorbell(hs, h.now)
    assert h.take() == []
    app.write(b"b" * 100)
    h.tcp.doorbell(hs, h.now)
    (seg,) = h.take()
    assert seg.payload == b"a" * 100 + b"b" * 100 and seg.flags == T.ACK | T.PSH


def test_msg_more_data_goes_after_the_cork_ceiling_without_psh(h):
    c, hs, app, _ = h.established_active()
    app.write(b"m" * 100, more=True)
    h.tcp.doorbell(hs, h.now)
    h.advance(CORK_MAX_S / 2)
    assert h.take() == []
    h.advance(CORK_MAX_S / 2 + 0.001)
    (seg,) = h.take()
    assert seg.payload == b"m" * 100 and seg.flags == T.ACK


def test_msg_more_sends_full_segments_and_holds_the_tail(h):
    c, hs, app, _ = h.established_active()
    app.write(b"f" * 3000, more=True)
    h.tcp.doorbell(hs, h.now)
    assert [(len(s.payload), s.flags) for s in h.take()] == [(1460, T.ACK), (1460, T.ACK)]


def test_tso_frame_tail_is_trimmed_when_it_must_wait():
    h = Harness(offloads=True)
    c, hs, app, _ = h.established_active()
    app.write(b"t" * 3000, more=True)
    h.tcp.doorbell(hs, h.now)
    assert [len(s.payload) for s in h.take()] == [2920]


def test_psh_marks_the_end_of_each_write_even_when_segments_span_writes(h):
    c, hs, app, _ = h.established_active()
    hs.shm.opt_flags |= lib.TOE_OF_NODELAY
    c.snd_wnd = 0                                   # queue two writes before anything goes
    app.write(b"1" * 1000)
    app.write(b"2" * 1000)
    h.tcp.doorbell(hs, h.now)
    assert [s.payload for s in h.take() if s.payload] == []
    h.deliver(h.seg(T.ACK, 5001, c.snd_una, window=65535, sport=8080, dport=c.local_port))
    segs = [s for s in h.take() if s.payload]
    assert [(len(s.payload), bool(s.flags & T.PSH)) for s in segs] == [(1460, False), (540, True)]


@pytest.mark.parametrize("sndbuf,queued,sent,lowat,room,writable", [
    (0, 0, 0, 0, 1 << 16, True),                  # no SO_SNDBUF: the ring
    (16384, 0, 0, 0, 16384, True),
    (16384, 10000, 10000, 0, 6384, True),          # free 6384 >= queued/2 5000
    (16384, 12000, 12000, 0, 4384, False),         # free 4384 < 6000: not writable yet
    (16384, 16384, 16384, 0, 0, False),
    (0, 3000, 500, 4096, 1596, False),             # unsent 2500 >= 4096/2
    (0, 3000, 2000, 4096, 3096, True),             # unsent 1000 < 2048
    (0, 5000, 0, 4096, 0, False),                  # unsent beyond the mark: no room
])
def test_send_buffer_room_and_writability(sndbuf, queued, sent, lowat, room, writable):
    m = ffi.new("struct toe_sock_shm *")
    m.tx_size = 1 << 16
    m.sndbuf, m.notsent_lowat = sndbuf, lowat
    m.tx_head, m.tx_sent, m.tx_tail = 100, 100 + sent, 100 + queued
    assert lib.toe_tx_room(m) == room
    assert bool(lib.toe_tx_writable(m)) is writable


def test_a_waiting_writer_is_woken_only_once_writable():
    m = ffi.new("struct toe_sock_shm *")
    m.tx_size = 1 << 16
    m.sndbuf = 16384
    m.tx_tail = 16384
    m.tx_full_wait = 1
    assert lib.toe_tx_release(m, 2000) == 0       # queued 14384: still not writable
    assert m.tx_full_wait == 1
    assert lib.toe_tx_release(m, 8000) == 1       # queued 8384, free 8000 >= 4192
    assert m.tx_full_wait == 0


def test_notsent_lowat_wake_comes_from_transmission():
    m = ffi.new("struct toe_sock_shm *")
    m.tx_size = 1 << 16
    m.notsent_lowat = 4096
    m.tx_tail = 4096
    m.tx_full_wait = 1
    assert lib.toe_tx_sent(m, 1000) == 0          # 3096 unsent
    assert lib.toe_tx_sent(m, 3000) == 1          # 1096 unsent < 2048
