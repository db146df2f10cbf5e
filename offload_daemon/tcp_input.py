"""TCP engine: the input side of TcpStack (see tcp.py).

A segment from the RX classifier through the state machine (RFC 9293 3.10.7):
LISTEN / no connection, SYN-SENT, SYN-RECEIVED, TIME-WAIT and the synchronized states;
ACK processing with congestion control (RFC 5681/6582) and RTT samples (RFC 6298),
in-order and out-of-order payload, the peer's FIN.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from nic_model.wire import tcp as T

from .abi import ffi
from .seq import M32, seq_ge, seq_gt, seq_le, seq_lt
from .tcp_ccb import (
    CWND_MAX,
    FIN_TIMEOUT,
    INIT_CWND_SEGS,
    RCV_WSCALE,
    RTO_MAX,
    RTO_MIN,
    SEND_STATES,
    WSCALE_MAX,
    Ccb,
    Listener,
    State,
)
from .tcp_output import TcpOutput

if TYPE_CHECKING:  # pragma: no cover
    from nic_model.rx import Segment


class TcpInput(TcpOutput):
    """The input side of TcpStack (a mixin; TcpStack in tcp.py composes it), on top of the
    output side: processing a segment sends (ACKs, RSTs, SYN|ACKs, try_send)."""

    # ==================================================================
    # input
    # ==================================================================

    def input(self, seg: "Segment", now: float) -> None:
        c = self.conns.get((seg.src, seg.sport, seg.dport))
        if c is None:
            self._no_connection(seg, now)
            return
        if self.fast is not None:
            self.fast.own(c)
        c.segs_in += 1
        if seg.payload_len:
            c.sw_data += 1
        c.last_rx = now
        if c.ka_probes:
            c.ka_probes = 0
            self._keepalive_arm(c, now)
        st = c.state
        if st == State.SYN_SENT:
            self._in_syn_sent(c, seg, now)
        elif st == State.SYN_RCVD:
            self._in_syn_rcvd(c, seg, now)
        elif st == State.TIME_WAIT:
            self._in_time_wait(c, seg, now)
        else:
            self._in_synchronized(c, seg, now)
        if c.ack_pending and not c.dack_timer.armed:
            self.dirty.add(c)

    # LISTEN (or nothing): SYN -> SYN_RCVD child, anything else -> RST (RFC 9293 3.10.7.1-2)
    def _no_connection(self, seg: "Segment", now: float) -> None:
        if seg.flags & T.RST:
            return
        if not (seg.flags & T.SYN) or seg.flags & T.ACK:
            self.send_rst_reply(seg)
            return
        lst = self._find_listener(seg.dst, seg.dport)
        if lst is None:
            self.send_rst_reply(seg)
            return
        if lst.full:
            self.stats.syn_dropped_backlog += 1
            return
        c = self._new_ccb(self.my_ip, seg.dport, seg.src, seg.sport, now)
        c.state = State.SYN_RCVD
        c.listener = lst
        c.peer_mac = seg.src_mac
        c.irs = seg.seq
        c.rcv_nxt = (seg.seq + 1) & M32
        c.rcv_adv = c.rcv_nxt
        c.snd_nxt = c.snd_max = (c.iss + 1) & M32
        opts = seg.options
        c.adv_mss = self._adv_mss(lst.sock)
        c.mss = self._send_mss(c, opts.mss or None)
        if opts.wscale is not None:
            c.snd_wscale = min(opts.wscale, WSCALE_MAX)   # RFC 7323 2.3: > 14 is used as 14
            c.rcv_wscale = RCV_WSCALE
        c.snd_wnd = seg.window
        c.snd_wl1, c.snd_wl2 = seg.seq, c.iss
        self._add_conn(c)
        lst.embryonic.add(c)
        self.stats.passive_opens += 1
        self._send_synack(c, opts, now)

    def _find_listener(self, ip: int, port: int) -> Listener | None:
        cands = self.listeners.get(port)
        if not cands:
            return None
        ok = [lst for lst in cands if lst.ip in (0, ip) and not lst.full] or \
             [lst for lst in cands if lst.ip in (0, ip)]
        if not ok:
            return None
        return ok[0] if len(ok) == 1 else min(ok, key=lambda lst: len(lst.queue))

    # SYN-SENT (RFC 9293 3.10.7.3)
    def _in_syn_sent(self, c: Ccb, seg: "Segment", now: float) -> None:
        f = seg.flags
        if f & T.ACK and seg.ack != c.snd_nxt:
            if not f & T.RST:
                self.send_rst_reply(seg)
            return
        if f & T.RST:
            if f & T.ACK:
                self.stats.resets_received += 1
                self._fail(c, errno.ECONNREFUSED, now)
            return
        if not f & T.SYN:
            return
        c.peer_mac = seg.src_mac
        c.irs = seg.seq
        c.rcv_nxt = (seg.seq + 1) & M32
        c.rcv_adv = c.rcv_nxt
        opts = seg.options
        c.mss = self._send_mss(c, opts.mss or None)
        if opts.wscale is not None:
            c.snd_wscale = min(opts.wscale, WSCALE_MAX)   # RFC 7323 2.3: > 14 is used as 14
        else:
            c.rcv_wscale = 0
        if not f & T.ACK:
            # simultaneous open -> SYN-RECEIVED
            c.state = State.SYN_RCVD
            c.snd_wnd = seg.window
            self._send_synack(c, opts, now)
            return
        # SYN|ACK acking our SYN -> ESTABLISHED
        self._established(c, seg, now)
        self.send_ack(c)
        if c.sock is not None:
            c.sock.set_connected(c.mss)
            self.try_send(c, now)

    def _established(self, c: Ccb, seg: "Segment", now: float) -> None:
        """The handshake's ACK of our SYN arrived: take the peer's window, time the RTT.
        A SYN|ACK's window is never scaled (RFC 7323 2.2); the final ACK's is."""
        c.snd_una = seg.ack
        c.snd_wnd = seg.window if seg.flags & T.SYN else seg.window << c.snd_wscale
        c.snd_wl1, c.snd_wl2 = seg.seq, seg.ack
        self._rtt_sample(c, now - c.created if c.retries == 0 else None)   # Karn: not if resent
        c.state = State.ESTABLISHED
        c.retries = 0
        c.snd_sml = c.snd_una
        self._keepalive_arm(c, now)
        c.cwnd = INIT_CWND_SEGS * c.mss
        self._disarm(c)
        if c.sock is not None and c.sock.mapped:
            c.tx_head = c.sock.shm.tx_head

    # SYN-RECEIVED: the handshake's last ACK (RFC 9293 3.10.7.4, fifth check). An RST in
    # the window we offered ends the embryonic connection, as Linux's tcp_check_req does
    # (RFC 5961 would want an exact match); after a simultaneous open it is refused
    # (RFC 9293 3.10.7.4 second check). Out of the window it is dropped.
    def _in_syn_rcvd(self, c: Ccb, seg: "Segment", now: float) -> None:
        f = seg.flags
        if f & T.RST:
            wnd = max((c.rcv_adv - c.rcv_nxt) & M32, 1)
            if seq_le(c.rcv_nxt, seg.seq) and seq_lt(seg.seq, (c.rcv_nxt + wnd) & M32):
                self.stats.resets_received += 1
                if c.listener is None:
                    self._fail(c, errno.ECONNREFUSED, now)
                else:
                    self._free(c)
            return
        if f & T.SYN:
            if seg.seq == c.irs:             # retransmitted SYN: answer again
                self._send_synack(c, seg.options, now)
            else:
                self._challenge_ack(c)
            return
        if not f & T.ACK:
            return
        if not (seq_lt(c.snd_una, seg.ack) and seq_le(seg.ack, c.snd_nxt)):
            self.send_rst_reply(seg)
            return
        self._established(c, seg, now)
        lst = c.listener
        if lst is not None:
            lst.embryonic.discard(c)
            lst.queue.append(c)
            self._update_pending(lst)
            lst.sock.wake()
        if seg.payload_len or f & T.FIN:
            self._in_synchronized(c, seg, now)

    # TIME-WAIT: re-ACK a retransmitted FIN, restart 2MSL (RFC 9293 3.10.7.4). An RST
    # never ends TIME-WAIT early: RFC 1337's remedy for TIME-WAIT assassination (Linux with
    # net.ipv4.tcp_rfc1337=1; its default, 0, lets an in-window RST kill it).
    def _in_time_wait(self, c: Ccb, seg: "Segment", now: float) -> None:
        if seg.flags & T.RST:
            return
        if seg.flags & T.SYN and seq_gt(seg.seq, c.rcv_nxt):
            # a new incarnation: let it in (what Linux does with a higher ISN)
            self._free(c)
            self._no_connection(seg, now)
            return
        if seg.flags & T.FIN:
            self.send_ack(c)
            self._arm(c, "time_wait", self.cfg.time_wait_s, now)
        elif seg.payload_len or seg.seq != c.rcv_nxt:
            self.send_ack(c)                            # an old duplicate: re-ACK (Linux TCP_TW_ACK)

    # ESTABLISHED, FIN-WAIT-1/2, CLOSE-WAIT, CLOSING, LAST-ACK (RFC 9293 3.10.7.4)
    def _in_synchronized(self, c: Ccb, seg: "Segment", now: float) -> None:
        f = seg.flags
        n = seg.payload_len
        seq = seg.seq
        # first: sequence number acceptable?
        wnd = max((c.rcv_adv - c.rcv_nxt) & M32, self._rcv_space(c)) if c.rcv_adv else self._rcv_space(c)
        seg_len = n + (1 if f & T.FIN else 0)
        if seg_len == 0:
            ok = seq == c.rcv_nxt if wnd == 0 else (
                seq_le(c.rcv_nxt, seq) and seq_lt(seq, (c.rcv_nxt + wnd) & M32))
        elif wnd == 0:
            ok = False
        else:
            end = (seq + seg_len - 1) & M32
            ok = (seq_le(c.rcv_nxt, seq) and seq_lt(seq, (c.rcv_nxt + wnd) & M32)) or \
                 (seq_le(c.rcv_nxt, end) and seq_lt(end, (c.rcv_nxt + wnd) & M32))
        if not ok:
            if f & T.RST:
                return
            if seq_lt(seq, c.rcv_nxt) and seq_le((seq + seg_len) & M32, c.rcv_nxt) and seg_len:
                self.ackgen.dup_acks += 1           # old duplicate: re-ACK
            self.send_ack(c)
            if not (seq == c.rcv_nxt and f & T.ACK):
                return
            n = 0                                      # zero window: still take the ACK
            f &= ~T.FIN
        # second: RST (RFC 5961 3.2): exactly at rcv_nxt it resets, elsewhere in the
        # window it draws a challenge ACK. The error the application sees is Linux's
        # (tcp_reset): EPIPE in CLOSE-WAIT, ECONNRESET in every other state.
        if f & T.RST:
            if seq == c.rcv_nxt:
                self.stats.resets_received += 1
                self._fail(c, errno.EPIPE if c.state == State.CLOSE_WAIT else errno.ECONNRESET, now)
            else:
                self._challenge_ack(c)
            return
        # fourth: SYN in a synchronized state -> challenge ACK (RFC 5961 4.2)
        if f & T.SYN:
            self._challenge_ack(c)
            return
        # fifth: ACK
        if not f & T.ACK:
            return
        if not self._process_ack(c, seg, n, now):
            return
        # seventh: payload
        if n:
            off = seg.payload_off
            if seq_lt(seq, c.rcv_nxt):
                skip = (c.rcv_nxt - seq) & M32
                off += skip
                n -= skip
                seq = c.rcv_nxt
            if n > 0:
                self._data(c, seg, seq, off, n, f, now)
                return
        if f & T.FIN and seq == c.rcv_nxt:
            self._fin(c, now)

    def _challenge_ack(self, c: Ccb) -> None:
        self.ackgen.challenge_acks += 1
        self.send_ack(c)

    def _process_ack(self, c: Ccb, seg: "Segment", n: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check + RFC 5681/6582. False: drop the segment."""
        ack = seg.ack
        una = c.snd_una
        if seq_gt(ack, c.snd_max):
            self.send_ack(c)                           # acks something never sent
            return False
        window = seg.window << c.snd_wscale
        if seq_lt(una, ack):
            acked = (ack - una) & M32
            fin_acked = c.fin_seq_set and seq_gt(ack, c.fin_seq)
            data_acked = acked - (1 if fin_acked else 0)
            c.snd_una = ack
            if seq_lt(c.snd_nxt, ack):
                # data sent before an RTO rewound snd_nxt, acked after all
                c.snd_nxt = ack
            if fin_acked:
                c.fin_sent = True
            c.retries = 0
            s = c.sock
            if data_acked > 0 and s is not None and s.mapped:
                c.tx_head = (c.tx_head + data_acked) & M32
                s.tx_release(c.tx_head)
            ends = c.psh_ends
            while ends and seq_le(ends[0], ack):
                del ends[0]
            if c.rtt_seq is not None and seq_ge(ack, c.rtt_seq):
                self._rtt_sample(c, now - c.rtt_time)
                c.rtt_seq = None
            # congestion control
            if c.in_recovery:
                if seq_ge(ack, c.recover):
                    c.in_recovery = False
                    c.cwnd = c.ssthresh
                else:                                  # partial ACK (RFC 6582 3.2 step 5)
                    self._retransmit_one(c, now)
                    c.cwnd = max(c.cwnd - acked + c.mss, c.mss)
            elif c.cwnd < c.ssthresh:
                c.cwnd = min(c.cwnd + acked, CWND_MAX)      # slow start, per byte acked (RFC 3465)
            else:
                c.cwnd = min(c.cwnd + max(c.mss * acked // c.cwnd, 1), CWND_MAX)   # congestion avoidance
            c.dupacks = 0
            if c.snd_una == c.snd_nxt:
                self._disarm(c)
            else:
                self._arm(c, "rto", c.rto, now)
            if fin_acked:
                self._our_fin_acked(c, now)
                if c.state in (State.CLOSED, State.TIME_WAIT):
                    return c.state == State.TIME_WAIT
        elif ack == una and n == 0 and not seg.flags & T.FIN and c.snd_nxt != una \
                and window == c.snd_wnd:
            c.dupacks += 1
            if c.dupacks == 3 and not c.in_recovery:
                self.stats.fast_retransmits += 1
                flight = (c.snd_nxt - una) & M32
                c.ssthresh = max(flight // 2, 2 * c.mss)
                c.recover = c.snd_nxt
                c.in_recovery = True
                self._retransmit_one(c, now)
                c.cwnd = c.ssthresh + 3 * c.mss
            elif c.in_recovery:
                c.cwnd += c.mss
        # window update (RFC 9293 3.10.7.4: SND.WL1 < SEG.SEQ or (== and WL2 =< SEG.ACK))
        if seq_lt(c.snd_wl1, seg.seq) or (c.snd_wl1 == seg.seq and seq_le(c.snd_wl2, ack)):
            opened = window > c.snd_wnd
            c.snd_wnd = window
            c.snd_wl1, c.snd_wl2 = seg.seq, ack
            if opened and c.timer_kind == "persist":
                self._disarm(c)
        if c.state in SEND_STATES:
            self.try_send(c, now)
        return True

    def _our_fin_acked(self, c: Ccb, now: float) -> None:
        if c.state == State.FIN_WAIT_1:
            c.state = State.FIN_WAIT_2
            if c.orphan:
                self._arm(c, "fin_wait_2", FIN_TIMEOUT, now)
        elif c.state == State.CLOSING:
            self._time_wait(c, now)
        elif c.state == State.LAST_ACK:
            self._free(c)

    def _rtt_sample(self, c: Ccb, r: float | None) -> None:
        """RFC 6298 2.2-2.4."""
        if r is None or r < 0:
            return
        if c.srtt == 0.0:
            c.srtt = r
            c.rttvar = r / 2
        else:
            c.rttvar = 0.75 * c.rttvar + 0.25 * abs(c.srtt - r)
            c.srtt = 0.875 * c.srtt + 0.125 * r
        c.rto = min(max(c.srtt + max(0.001, 4 * c.rttvar), RTO_MIN), RTO_MAX)

    def _data(self, c: Ccb, seg: "Segment", seq: int, off: int, n: int, f: int, now: float) -> None:
        """In-window payload at seq (>= rcv_nxt)."""
        if c.orphan or (c.state not in (State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2)):
            if c.orphan:
                # data for a socket the application closed: abort (Linux tcp_rcv_state_process)
                self._send_rst_for(c, now)
                self._free(c)
            return
        space = self._rcv_space(c)
        if seq != c.rcv_nxt:
            # out of order: keep it (bounded by the window) and send a duplicate ACK now
            ahead = (seq - c.rcv_nxt) & M32
            if ahead + n <= space and c.ooo_bytes + n <= space:
                self._ooo_insert(c, seq, bytes(seg.buf[off:off + n]))
                self.stats.ooo_segments += 1
            self.ackgen.dup_acks += 1
            self.send_ack(c)
            return
        if n > space:
            n = space                                  # beyond the window: trimmed
            f &= ~T.FIN
        if n:
            self._deliver(c, seg.handle + off if seg.handle is not None
                          else ffi.from_buffer(seg.buf) + off, n, seg.buf, off)
        had_ooo = bool(c.ooo)
        if had_ooo:
            self._ooo_drain(c)
        self._ack_policy(c, n + (c.mss + 1 if had_ooo else 0), now)   # a filled hole: ACK at once
        if f & T.FIN and ((seq + n) & M32) == c.rcv_nxt:
            self._fin(c, now)

    def _deliver(self, c: Ccb, ptr, n: int, buf, off: int) -> None:
        s = c.sock
        if s is None or not s.mapped:
            c.pre_buf += buf[off:off + n]
        else:
            s.push(ptr, n, True)
        c.rcv_nxt = (c.rcv_nxt + n) & M32
        c.bytes_in += n

    def _ooo_insert(self, c: Ccb, seq: int, data: bytes) -> None:
        for s0, d0 in c.ooo:
            if s0 == seq and len(d0) >= len(data):
                return
        c.ooo.append((seq, data))
        c.ooo.sort(key=lambda e: (e[0] - c.rcv_nxt) & M32)
        c.ooo_bytes += len(data)

    def _ooo_drain(self, c: Ccb) -> None:
        while c.ooo:
            seq, data = c.ooo[0]
            d = (seq - c.rcv_nxt) & M32
            if d >= 0x80000000 or d == 0:
                c.ooo.pop(0)
                c.ooo_bytes -= len(data)
                if d:                                   # (partly) old: trim
                    skip = (c.rcv_nxt - seq) & M32
                    if skip >= len(data):
                        continue
                    data = data[skip:]
                space = self._rcv_space(c)
                data = data[:space]
                if data:
                    self._deliver(c, ffi.from_buffer(data), len(data), data, 0)
                continue
            break

    def _fin(self, c: Ccb, now: float) -> None:
        """The peer's FIN, in order (RFC 9293 3.10.7.4 eighth check)."""
        c.rcv_nxt = (c.rcv_nxt + 1) & M32
        c.rx_fin = True
        c.ack_pending = True
        self.timers.cancel(c.dack_timer)              # a FIN is acknowledged at once
        if c.sock is not None and c.sock.mapped and c.listener is None:
            c.sock.set_eof()
        st = c.state
        if st == State.ESTABLISHED:
            c.state = State.CLOSE_WAIT
        elif st == State.FIN_WAIT_1:
            # our FIN not yet acked (else we would be in FIN-WAIT-2)
            c.state = State.CLOSING
        elif st == State.FIN_WAIT_2:
            self.send_ack(c)
            self._time_wait(c, now)
