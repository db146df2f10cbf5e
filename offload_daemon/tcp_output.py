"""TCP engine: the output side of TcpStack (see tcp.py).

MSS and windows (what we advertise, window updates), emitting segments, SYN / SYN|ACK /
ACK / RST, try_send (Nagle, cork, PSH, TSO), retransmission, and the per-connection
timers (SYN, SYN|ACK, RTO, persist, cork, TIME-WAIT / FIN-WAIT-2).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from nic_model.wire import tcp as T

from .abi import ffi, lib
from .seq import M32, seq_gt, seq_le, seq_lt
from .tcp_ccb import (
    ATO_S,
    CORK_MAX_S,
    DELACK_S,
    PRE_ACCEPT_WINDOW,
    PSH_ENDS_MAX,
    RCV_WSCALE,
    RTO_MAX,
    RTO_MIN,
    SEND_STATES,
    SYNACK_RETRIES,
    TCP_RETRIES2,
    Ccb,
    Sock,
    State,
    TcpStackBase,
)

if TYPE_CHECKING:  # pragma: no cover
    from nic_model.rx import Segment


class TcpOutput(TcpStackBase):
    """The output side of TcpStack (a mixin; TcpStack in tcp.py composes it). It calls nothing
    of the input side."""

    # ==================================================================
    # output
    # ==================================================================

    def _adv_mss(self, sock: "Sock | None") -> int:
        """The MSS option we send: the interface's, clamped by TCP_MAXSEG when set
        (Linux: tcp_connect_init / tcp_openreq_init_rwin clamp advmss to user_mss)."""
        user = sock.shm.user_mss if sock is not None and sock.mapped else 0
        return min(self.our_mss, max(user, 88)) if user else self.our_mss   # 88: TCP_MIN_MSS

    @staticmethod
    def _send_mss(c: Ccb, peer_mss: int | None) -> int:
        """Effective send MSS: the peer's option (536 when absent, RFC 9293 3.7.1),
        never above what we announced (Linux's mss_clamp holds TCP_MAXSEG)."""
        return max(min(536 if peer_mss is None else peer_mss, c.adv_mss), 64)

    def _rcv_space(self, c: Ccb) -> int:
        s = c.sock
        if s is None or not s.mapped:
            # before accept(): a holding buffer no larger than the ring the child will get,
            # so that the window never has to shrink when the ring takes over
            return max(min(PRE_ACCEPT_WINDOW, self.cfg.rx_ring_bytes) - len(c.pre_buf), 0)
        space = s.rx_space()
        buf = self._rcv_buf(s)
        return space if buf == s.rx_size else max(0, buf - (s.rx_size - space))

    @staticmethod
    def _rcv_buf(s: Sock) -> int:
        """What the receive window is cut from: the RX ring, or, with SO_RCVBUF set below
        it, half of that (like the kernel, half of the buffer holds data)."""
        rcvbuf = s.shm.rcvbuf
        return rcvbuf // 2 if rcvbuf and rcvbuf < s.rx_size else s.rx_size

    def _window(self, c: Ccb, syn: bool = False) -> int:
        """Window field for an outgoing segment; records the advertised right edge."""
        space = self._rcv_space(c)
        if syn:                                      # never scaled in a SYN (RFC 7323 2.2)
            w = min(space, 0xFFFF)
            c.rcv_adv = (c.rcv_nxt + w) & M32
            return w
        w = min(space >> c.rcv_wscale, 0xFFFF)
        edge = (c.rcv_nxt + (w << c.rcv_wscale)) & M32
        if seq_lt(edge, c.rcv_adv):                 # never shrink the window (RFC 9293 3.8.6.2.2)
            w = min(((c.rcv_adv - c.rcv_nxt) & M32) >> c.rcv_wscale, 0xFFFF)
            edge = c.rcv_adv
        c.rcv_adv = edge
        s = c.sock
        if s is not None and s.mapped and space < self._rcv_buf(s) // 2 and not c.wnd_wait:
            self._wait_for_window(c, s, space)
        return w

    def _wait_for_window(self, c: Ccb, s: Sock, space: int) -> None:
        """Ask the shim for a doorbell once the application has freed enough RX space for a
        window update to be worth sending: the window doubled (Linux's tcp_cleanup_rbuf), or,
        from a closed or sub-MSS window, one MSS open. One doorbell per update, not per read."""
        adv = (c.rcv_adv - c.rcv_nxt) & M32
        want = c.mss if adv < c.mss else 2 * adv
        c.wnd_wait = True
        self.wnd_watch.add(c)
        s.arm_rx_window((s.shm.rx_head + max(want - space, 1)) & M32)

    def _maybe_window_update(self, c: Ccb, now: float, force: bool = False) -> None:
        """The application freed RX space: advertise it if it grew enough (RFC 9293 3.8.6.2.2)."""
        s = c.sock
        if s is None or not s.mapped:
            return
        space = self._rcv_space(c)
        buf = self._rcv_buf(s)
        adv = (c.rcv_adv - c.rcv_nxt) & M32
        c.wnd_wait = False
        if force or (adv < c.mss <= space) or (adv >= c.mss and space >= 2 * adv):
            self.ackgen.window_updates += 1
            self.send_ack(c)
        elif space < buf // 2:
            self._wait_for_window(c, s, space)

    def _emit(self, c: Ccb, seq: int, flags: int, options: bytes = b"", payload=(), n: int = 0) -> None:
        if flags & T.ACK:
            ack = c.rcv_nxt
            window = self._window(c, bool(flags & T.SYN))
            if c.ack_pending and n:
                self.ackgen.piggybacked += 1          # the ACK we owed rides on data
            c.ack_pending = False
            c.rcv_unacked = 0
            if c.dack_timer.armed:
                self.timers.cancel(c.dack_timer)
        else:
            ack = 0
            window = self._window(c, True) if flags & T.SYN else 0
        self.tx.segment(c.key, c.peer_mac, c.local_ip, c.remote_ip, c.local_port, c.remote_port,
                           seq, ack, flags, window, options, payload, n, c.mss)
        c.segs_out += 1
        if n:
            c.sw_data += 1

    def _syn_options(self, c: Ccb, synack: bool, peer: T.TcpOptions | None) -> bytes:
        ws = None
        if not synack or (peer is not None and peer.wscale is not None):
            ws = RCV_WSCALE
        return T.TcpOptions(mss=c.adv_mss, wscale=ws).emit()

    def _send_syn(self, c: Ccb, now: float) -> None:
        c.rcv_wscale = RCV_WSCALE
        c.rcv_adv = 0
        self._emit(c, c.iss, T.SYN, self._syn_options(c, False, None))
        self._arm(c, "syn", c.rto * (1 << c.retries), now)

    def _send_synack(self, c: Ccb, peer: T.TcpOptions | None, now: float) -> None:
        self._emit(c, c.iss, T.SYN | T.ACK, self._syn_options(c, True, peer))
        self._arm(c, "synack", c.rto * (1 << c.retries), now)

    def send_ack(self, c: Ccb) -> None:
        self._emit(c, c.snd_nxt, T.ACK)
        self.ackgen.pure_acks += 1

    def abort(self, c: Ccb, now: float) -> None:
        """Reset and forget a connection (its socket failed on the host side)."""
        self.own(c)
        self._send_rst_for(c, now)
        self._free(c)

    def _send_rst_for(self, c: Ccb, now: float) -> None:
        self.own(c)
        if c.state in (State.SYN_SENT, State.CLOSED, State.TIME_WAIT):
            return
        self._emit(c, c.snd_nxt, T.RST | T.ACK)
        self.stats.resets_sent += 1
        self.ackgen.resets += 1

    def send_rst_reply(self, seg: "Segment") -> None:
        """RST for a segment that matches no connection (RFC 9293 3.10.7.1)."""
        if seg.flags & T.RST:
            return
        if seg.flags & T.ACK:
            seq, ack, flags = seg.ack, 0, T.RST
        else:
            seg_len = seg.payload_len + (1 if seg.flags & T.SYN else 0) + (1 if seg.flags & T.FIN else 0)
            seq, ack, flags = 0, (seg.seq + seg_len) & M32, T.RST | T.ACK
        key = ("rst", seg.src, seg.sport, seg.dport)
        self.tx.segment(key, seg.src_mac, seg.dst, seg.src, seg.dport, seg.sport,
                           seq, ack, flags, 0)
        self.tx.invalidate(key)
        self.stats.resets_sent += 1
        self.ackgen.resets += 1

    def try_send(self, c: Ccb, now: float) -> None:
        """Send what the TX ring, the peer's window and cwnd allow; then FIN if asked.

        Linux's rules (tcp_write_xmit): full segments go whenever the windows allow;
        a partial one (less than an MSS) waits while TCP_CORK is on or its bytes were
        written with MSG_MORE (at most CORK_MAX_S, the ceiling tcp(7) gives), and
        under Nagle while an earlier partial segment is unacknowledged (Minshall's
        variant, tcp_nagle_check). PSH marks the segment that ends a write
        (tcp_mark_push): the one holding the shim's push mark. With TSO a frame's
        partial tail is trimmed when it would have to wait (tcp_mss_split_point)."""
        s = c.sock
        if s is None or not s.mapped or c.state not in SEND_STATES:
            return
        shm = s.shm
        size_mask = s.tx_size - 1
        ring = s.tx_ring
        mss = c.mss
        max_seg = (self.tx_max_payload // mss) * mss if self.offloads else mss
        nodelay = shm.opt_flags & lib.TOE_OF_NODELAY
        corked = shm.opt_flags & lib.TOE_OF_CORK
        snd_max0 = c.snd_max
        while True:
            tail = lib.toe_ring_load(ffi.addressof(shm, "tx_tail"))
            push = shm.tx_push                      # published before the tail
            in_ring = min((tail - c.tx_head) & M32, s.tx_size)   # a tail past the ring is the app's lie
            sent = (c.snd_nxt - c.snd_una) & M32
            if c.fin_sent:
                sent -= 1
            unsent = in_ring - sent
            if unsent <= 0:
                break
            flight = (c.snd_nxt - c.snd_una) & M32
            room = min(c.snd_wnd, c.cwnd) - flight
            if room <= 0:
                if c.snd_wnd == 0 and flight == 0 and not (c.timer.armed):
                    self._arm(c, "persist", max(c.rto, RTO_MIN), now)
                break
            start = (c.tx_head + sent) & M32
            pushable = (push - start) & M32         # bytes up to the end of the last full write
            if pushable > unsent:
                pushable = 0                        # the mark lies behind: all of it is MSG_MORE
            n = min(unsent, room, max_seg)
            partial = n % mss
            if partial:
                if n < mss and n < unsent and flight > 0:
                    break                           # sender SWS avoidance (RFC 9293 3.8.6.2.1)
                if self._hold_partial(c, n == unsent, n > pushable, flight, nodelay, corked, now):
                    if n < mss:
                        break
                    n -= partial
            c.cork_since = None
            off = start & size_mask
            first = min(n, s.tx_size - off)
            parts = (ring[off:off + first],) if first == n else (ring[off:off + first], ring[:n - first])
            if 0 < pushable <= n:
                flags = T.ACK | T.PSH
                self._note_push(c, (c.snd_nxt + n) & M32)
            elif c.psh_ends and seq_lt(c.snd_nxt, c.snd_max) and self._pushed_within(c, c.snd_nxt, n):
                flags = T.ACK | T.PSH                  # resending the end of a write
            else:
                flags = T.ACK
            self._emit(c, c.snd_nxt, flags, b"", parts, n)
            if c.rtt_seq is None:
                c.rtt_seq = (c.snd_nxt + n) & M32
                c.rtt_time = now
            c.snd_nxt = (c.snd_nxt + n) & M32
            if n % mss:
                c.snd_sml = c.snd_nxt
            if seq_gt(c.snd_nxt, c.snd_max):
                c.bytes_out += (c.snd_nxt - c.snd_max) & M32
                c.snd_max = c.snd_nxt
            if not (c.timer.armed and c.timer_kind == "rto"):
                self._arm(c, "rto", c.rto, now)
            if now - c.last_data_rx < ATO_S:
                c.pingpong = True                   # a reply: interactive (Linux tcp_event_data_sent)
        if c.snd_max != snd_max0:
            s.tx_sent((c.tx_head + ((c.snd_max - c.snd_una) & M32)) & M32)   # TCP_NOTSENT_LOWAT
        if unsent > 0:
            return
        if c.fin_wanted and not c.fin_sent:
            c.fin_seq = c.snd_nxt
            c.fin_seq_set = True
            self._emit(c, c.snd_nxt, T.FIN | T.ACK)
            c.snd_nxt = (c.snd_nxt + 1) & M32
            if seq_gt(c.snd_nxt, c.snd_max):
                c.snd_max = c.snd_nxt
            c.fin_sent = True
            if c.state == State.ESTABLISHED:
                c.state = State.FIN_WAIT_1
            elif c.state == State.CLOSE_WAIT:
                c.state = State.LAST_ACK
            if not (c.timer.armed and c.timer_kind == "rto"):
                self._arm(c, "rto", c.rto, now)
            return
        if not c.fin_wanted:
            tail2 = s.arm_tx_doorbell()
            if tail2 != tail:
                self.try_send(c, now)

    @staticmethod
    def _note_push(c: Ccb, end: int) -> None:
        ends = c.psh_ends
        if not ends or seq_gt(end, ends[-1]):
            ends.append(end)
            if len(ends) > PSH_ENDS_MAX:
                del ends[0]

    @staticmethod
    def _pushed_within(c: Ccb, seq: int, n: int) -> bool:
        """Does [seq, seq+n) end a write that went out with PSH?"""
        end = (seq + n) & M32
        return any(seq_lt(seq, p) and seq_le(p, end) for p in c.psh_ends)

    def _hold_partial(self, c: Ccb, last: bool, more: bool, flight: int, nodelay: int, corked: int,
                      now: float) -> bool:
        """Must a partial segment wait? (the rules in try_send's docstring)"""
        if c.fin_wanted and last:
            return False                            # the final FIN is never held (tcp_nagle_test)
        if corked or more:
            if c.cork_since is None:
                c.cork_since = now
            if now - c.cork_since < CORK_MAX_S:
                if not c.timer.armed:
                    self._arm(c, "cork", CORK_MAX_S - (now - c.cork_since), now)
                return True
            return False
        # Nagle, Minshall's variant: hold only while a partial segment is in flight
        return not nodelay and flight > 0 and seq_gt(c.snd_sml, c.snd_una) and seq_le(c.snd_sml, c.snd_nxt)

    def _retransmit_one(self, c: Ccb, now: float) -> None:
        """Resend one MSS at snd_una (fast retransmit / NewReno partial ACK)."""
        s = c.sock
        if s is None or not s.mapped:
            return
        data_out = (c.snd_nxt - c.snd_una) & M32
        if c.fin_sent:
            data_out -= 1
        n = min(c.mss, data_out)
        c.retransmits += 1
        s.count_retransmit()
        c.rtt_seq = None                                # Karn
        if n <= 0:
            if c.fin_sent:
                self._emit(c, c.fin_seq, T.FIN | T.ACK)
            return
        off = c.tx_head & (s.tx_size - 1)
        first = min(n, s.tx_size - off)
        ring = s.tx_ring
        parts = (ring[off:off + first],) if first == n else (ring[off:off + first], ring[:n - first])
        flags = T.ACK | T.PSH if self._pushed_within(c, c.snd_una, n) else T.ACK
        self._emit(c, c.snd_una, flags, b"", parts, n)

    # ==================================================================
    # timers
    # ==================================================================

    def _ack_policy(self, c: Ccb, n: int, now: float) -> None:
        """In-order data of n bytes arrived: ACK at the end of the loop pass, or later.
        Linux's rule (__tcp_ack_snd_check): at once unless the connection is interactive
        (we replied within ATO_S of data) and at most one MSS is unacknowledged; then the ACK
        waits up to DELACK_S for a reply to ride on. The compiled ACK generator runs the
        same policy (nic_model/hw/ack_gen.c)."""
        c.rcv_unacked += n
        c.last_data_rx = now
        c.ack_pending = True
        if (not c.pingpong or c.rcv_unacked > c.mss) and c.dack_timer.armed:
            self.timers.cancel(c.dack_timer)
        elif c.pingpong and c.rcv_unacked <= c.mss and not c.dack_timer.armed:
            self.timers.arm(c.dack_timer, now + DELACK_S)

    def _on_delayed_ack(self, c: Ccb, now: float) -> None:
        self.own(c)
        if c.ack_pending and c.state != State.CLOSED:
            c.pingpong = False                      # delayed ACK missed: not interactive after all
            self.ackgen.delayed_acks += 1
            self.send_ack(c)

    def _on_timer(self, c: Ccb, now: float) -> None:
        self.own(c)
        kind = c.timer_kind
        c.timer_kind = ""
        if kind == "syn":
            c.retries += 1
            if c.retries > self.cfg.syn_retries:
                self.stats.conn_timeouts += 1
                self._fail(c, errno.ETIMEDOUT, now)
                return
            self._send_syn(c, now)
        elif kind == "synack":
            c.retries += 1
            if c.retries > SYNACK_RETRIES:
                self._free(c)
                return
            self._send_synack(c, T.TcpOptions(wscale=c.snd_wscale) if c.rcv_wscale else None, now)
        elif kind == "rto":
            self._on_rto(c, now)
        elif kind == "persist":
            if c.state in SEND_STATES and c.snd_wnd == 0:
                # zero-window probe: an old sequence number elicits an ACK with the window
                self._emit(c, (c.snd_una - 1) & M32, T.ACK)
                c.rto = min(c.rto * 2, RTO_MAX)
                self._arm(c, "persist", c.rto, now)
            elif c.state in SEND_STATES:
                self.try_send(c, now)
        elif kind in ("time_wait", "fin_wait_2"):
            self._free(c)
        elif kind == "cork":
            self.try_send(c, now)

    def _on_rto(self, c: Ccb, now: float) -> None:
        if c.snd_una == c.snd_nxt:
            return
        c.retries += 1
        self.stats.retransmit_timeouts += 1
        if c.retries > TCP_RETRIES2:
            self.stats.conn_timeouts += 1
            self._fail(c, errno.ETIMEDOUT, now)
            return
        flight = (c.snd_nxt - c.snd_una) & M32
        c.ssthresh = max(flight // 2, 2 * c.mss)
        c.cwnd = c.mss
        c.in_recovery = False
        c.dupacks = 0
        c.rto = min(c.rto * 2, RTO_MAX)
        c.rtt_seq = None
        # go back N: everything after snd_una is sent again
        c.snd_nxt = c.snd_una
        if c.fin_sent:
            c.fin_sent = False
        c.retransmits += 1
        if c.sock is not None and c.sock.mapped:
            c.sock.count_retransmit()
        self._disarm(c)
        self.try_send(c, now)
        if not (c.timer.armed):
            self._arm(c, "rto", c.rto, now)
