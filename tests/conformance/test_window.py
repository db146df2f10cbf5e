"""Flow control: a closed window on either side (RFC 9293 3.8.6).

* The peer closes its window: the adapter holds its data and probes with a
  segment one below SND.UNA (Linux's tcp_xmit_probe_skb), backing off, and
  sends as soon as the window opens.
* The adapter's window closes (SO_RCVBUF caps it, the application does not
  read): further data is not accepted and is answered with a zero-window ACK;
  once the application reads, a window update goes out without the peer having
  to probe.
"""

from __future__ import annotations

import socket

import pytest

from .harness import ANY

pytestmark = pytest.mark.integration


def test_zero_window_is_probed_with_backoff_and_data_follows_the_opening(testbed, dut, peer):
    fd, conn, _ = peer.connected_from(dut)
    conn.send("A", window=0)
    dut.send(fd, b"w" * 100)
    conn.expect_none(0.15)                         # nothing may be sent into a zero window
    probe_seq = (conn.rcv_nxt - 1) & 0xFFFFFFFF
    first = conn.expect("A", seq=probe_seq, payload=b"", within=2.0, advance=False)
    second = conn.expect("A", seq=probe_seq, payload=b"", within=4.0, advance=False)
    third = conn.expect("A", seq=probe_seq, payload=b"", within=8.0, advance=False)
    assert third.ts - second.ts > 1.4 * (second.ts - first.ts) * 0.9, "zero-window probes do not back off"
    conn.send("A", window=100)                      # (scaled by 7: 12800 bytes)
    conn.expect("PA", payload=b"w" * 100, within=1.0)


def test_receive_window_closes_and_reopens_when_the_application_reads(testbed, dut, peer):
    def small_rcvbuf(d, fd):
        d.setsockopt(fd, socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # 8192, half for data

    fd, conn, syn = peer.connected_from(dut, setup=small_rcvbuf)
    assert syn.window == 4096
    for i in range(0, 4096, 1024):
        conn.send("PA", bytes([i // 1024 + 48]) * 1024)
    last = conn.expect_acked(within=1.0)
    assert last.window == 0, f"window {last.window} after 4096 bytes into a 4096-byte window"
    conn.send("PA", b"!", advance=False)           # beyond the window: re-ACKed, not taken
    again = conn.expect("A", payload=b"", window=0)
    assert again.ack == conn.seq
    conn.expect_none(0.1)                          # and nothing more while nobody reads
    got = b""
    while len(got) < 4096:
        got += dut.recv(fd, 4096)
    assert got == b"0" * 1024 + b"1" * 1024 + b"2" * 1024 + b"3" * 1024
    update = conn.expect("A", payload=b"", window=ANY, within=1.0)
    assert update.window << 7 >= 1460, f"window update to {update.window << 7} bytes"
    conn.send("PA", b"more")
    conn.expect_acked()
    assert dut.recv(fd, 10) == b"more"
