"""The software side of seed 003's split: which connections the compiled units own.

A connection is the units' from `push` (its CCB copied into their table) to `own`
(copied back); in between the software path leaves it alone — every entry of the
TCP engine calls `own` first (TcpStack.own), so a punted frame, a timer, a command or
a closing socket always meets the CCB the units left. At the end of each loop pass
`push_candidates` hands back to the units every connection the software path touched
that is in the units' domain (`eligible`): established, in order, nothing to recover,
no timer but the RTO; or connecting, its SYN sent (the units take the SYN|ACK, and the
connection's close: nic_model/hw/conn_fsm.c). A close the units took comes back with the
socket orphaned (`units_closed` does the host's part: B, the process's tables). The
field-by-field rules are in docs/fastpath.md and nic_model/hw/fp.h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from nic_model._fastpath import ffi as fp_ffi
from nic_model._fastpath import lib as fp_lib

from nic_model.fastpath import FastPathError, FastPathUnits

from .abi import ffi as abi_ffi
from .seq import M32, seq_gt
from .tcp_ccb import (
    CWND_MAX,
    EPHEMERAL,
    INIT_CWND_SEGS,
    PRE_ACCEPT_WINDOW,
    RCV_WSCALE,
    RTO_INITIAL,
    Ccb,
    LazyCcb,
    Sock,
    State,
    ip_str,
)

if TYPE_CHECKING:  # pragma: no cover
    from .tcp import TcpStack

_U32 = ("snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1", "snd_wl2", "tx_head", "snd_sml",
        "ssthresh", "retries", "rcv_nxt", "rcv_adv", "rcv_unacked")
_FLOAT = ("rtt_time", "srtt", "rttvar", "rto", "last_rx", "last_data_rx")
_COUNTS = ("bytes_in", "bytes_out", "segs_in", "segs_out")
_SAME = _U32 + _FLOAT + _COUNTS
_ZERO_CCB = bytes(fp_ffi.sizeof("struct fp_ccb"))
_STATES = {st.value: st for st in State}              # (an Enum call costs a microsecond)
NO_UID = 0xFFFFFFFF                               # fp_ccb.uid of a connection without an owner yet


def _make_copy(names: tuple[str, ...]):
    """copy(src, dst): the fields a Ccb and a struct fp_ccb share under the same name and
    meaning, one assignment each (a loop of getattr/setattr costs twice as much, and this
    runs twice per connection)."""
    body = "".join(f"    dst.{n} = src.{n}\n" for n in names)
    scope: dict = {}
    exec(f"def copy(src, dst):\n{body}", scope)   # names: the constant tuples above
    return scope["copy"]


_copy_same = _make_copy(_SAME)
# what a LazyCcb the units ended keeps for `toe stat`'s closed list (FastPath.finish_ended)
_copy_end = _make_copy(("snd_una", "snd_nxt", "snd_wnd", "rcv_nxt", "rcv_adv", "ssthresh", "srtt", "rto",
                        "cwnd", "mss") + _COUNTS)


class FastPath:
    def __init__(self, units: FastPathUnits, tcp: "TcpStack", offloads: bool, max_payload: int):
        self.units = units
        self.st = units.st
        self.tcp = tcp
        self.timers = tcp.timers
        self.offloads = offloads
        self.max_payload = max_payload
        self.by_slot: dict[int, Ccb] = {}
        self.base_data: dict[int, int] = {}       # fast_data of a connection when it was pushed
        self.candidates: set[Ccb] = set()
        self._f = fp_ffi.new("struct fp_ccb *")
        # the host's side of a close the units took (B hung up): set by the adapter
        self.units_closed: Callable[[Sock], None] = lambda s: None
        # connections whose end the units reported (`teardown`), released when the adapter
        # is idle (finish_ended): a short connection's release is then off the path of the
        # next one's connect(), as the kernel's deferred work is
        self.ended: dict[Ccb, None] = {}
        # an orphan's TIME-WAIT is a record of the units' (nic_model/hw/time_wait.c), with
        # software's limit and duration, answering with the window software's TIME-WAIT
        # gives (a connection without a socket: tcp_output.py _rcv_space)
        cfg = tcp.cfg
        units.tw_setup(cfg.max_time_wait, cfg.time_wait_s, min(PRE_ACCEPT_WINDOW, cfg.rx_ring_bytes))
        # a new connection's CCB as push() makes it from a new Ccb in SYN-SENT, but for what
        # names it (push_new): fp_push copies it
        t = self._syn = fp_ffi.new("struct fp_ccb *")
        t.state = State.SYN_SENT
        t.rcv_wscale = RCV_WSCALE
        t.cwnd = min(INIT_CWND_SEGS * 536, CWND_MAX)
        t.ssthresh = 1 << 30
        t.rto = RTO_INITIAL
        t.last_data_rx = -1.0
        t.rtt_valid = 1
        t.cflags = fp_lib.FP_CF_SEND_SYN
        # the command unit (nic_model/hw/host_cmd.c): CONNECTs of fresh sockets answered in
        # the units, from this template, with software's counters and port use counts
        if fp_lib.fp_hc_setup(self.st, cfg.iface.network.prefixlen, tcp.our_mss, EPHEMERAL[0], EPHEMERAL[1],
                              tcp.ids, tcp.port_users, t) < 0:
            raise FastPathError("cannot set up the fast path's command unit")
        self.hc_conns = fp_lib.fp_hc_conns(self.st)

    # ---- software takes a connection back --------------------------------

    def own(self, c: Ccb) -> None:
        self.candidates.add(c)
        slot = c.fast_slot
        if slot < 0:
            return
        f = self._f
        c.fast_slot = -1
        self.by_slot.pop(slot, None)
        base = self.base_data.pop(slot, c.fast_data)
        self.tcp.complete(c)                        # a LazyCcb: whole now (software reads it)
        if fp_lib.fp_pull(self.st, slot, f) != 0:
            return
        self._adopt(f, c, base)

    def _host_close(self, c: Ccb) -> None:
        """The units took the application's close: the host's part (once)."""
        s = c.sock
        if s is not None and not s.app_closed:
            s.app_closed = True
            self.units_closed(s)

    def _adopt(self, f, c: Ccb, base: int) -> None:
        """The rest of own(): the CCB the units had (f) is the connection's again."""
        self._copy_out(f, c, base)
        if f.punted and f.punt_reason == fp_lib.FP_PUNT_TEARDOWN:
            self.ended[c] = None                     # taken back before its turn: still owed
        if f.cflags & fp_lib.FP_CF_ORPHAN:
            self._host_close(c)
        timers = self.timers
        if f.rto_deadline:
            c.timer_kind = "syn" if c.state == State.SYN_SENT else "rto"
            timers.arm(c.timer, f.rto_deadline)
        if f.dack_deadline:
            timers.arm(c.dack_timer, f.dack_deadline)
        elif f.ack_pending:
            self.tcp.dirty.add(c)
        if f.wnd_wait:
            self.tcp.wnd_watch.add(c)

    def refresh(self, c: Ccb) -> None:
        """`toe stat`: the units' view of a connection they own (its fields in Python are a
        snapshot from now on; ownership does not change)."""
        if c.fast_slot >= 0 and fp_lib.fp_peek(self.st, c.fast_slot, self._f) == 0:
            self.tcp.complete(c)
            self._copy_out(self._f, c, self.base_data.get(c.fast_slot, 0))

    @staticmethod
    def _copy_out(f, c: Ccb, base: int) -> None:
        _copy_same(f, c)
        c.state = _STATES[f.state]
        c.irs, c.mss, c.snd_wscale, c.rcv_wscale = f.irs, f.mss, f.snd_wscale, f.rcv_wscale
        cf = f.cflags
        c.rx_fin = bool(cf & fp_lib.FP_CF_RX_FIN)
        c.fin_wanted = bool(cf & fp_lib.FP_CF_FIN_WANTED)
        if cf & fp_lib.FP_CF_FIN_SENT:
            c.fin_sent = c.fin_seq_set = True
            c.fin_seq = f.fin_seq
        c.orphan = bool(cf & fp_lib.FP_CF_ORPHAN)
        if cf & fp_lib.FP_CF_B_SHUT and c.sock is not None:
            c.sock.b_was_shut()
        c.cwnd = f.cwnd
        c.rtt_seq = f.rtt_seq if f.rtt_valid and c.state != State.SYN_SENT else None   # (the SYN's: `created`)
        c.psh_ends = list(f.psh_ends[0:f.psh_n])
        c.wnd_wait = bool(f.wnd_wait)
        c.ack_pending = bool(f.ack_pending)
        c.pingpong = bool(f.pingpong)
        c.fast_data = base + f.data_fast

    # ---- and hands it to the units ---------------------------------------

    @staticmethod
    def _servable(c: Ccb) -> bool:
        """A connection of an open socket the units can serve: mapped, B open and not shut,
        not a listener's child waiting for accept()."""
        s = c.sock
        return (s is not None and s.mapped and not s.app_closed and s.b_fd >= 0 and not s.b_shut
                and c.listener is None and not c.orphan)

    @classmethod
    def eligible(cls, c: Ccb) -> bool:
        if not cls._servable(c):
            return False
        if c.state == State.SYN_SENT:               # the SYN is out: the SYN|ACK is the units'
            return (c.snd_max == ((c.iss + 1) & M32) and c.timer.armed and c.timer_kind == "syn"
                    and c.adv_mss > 0)
        return (c.state == State.ESTABLISHED and not c.ooo and not c.in_recovery and c.dupacks == 0
                and not c.fin_wanted and not c.fin_sent and not c.rx_fin and c.snd_nxt == c.snd_max
                and c.cork_since is None and c.ka_probes == 0 and c.snd_wnd > 0 and c.mss > 0
                and (not c.timer.armed or c.timer_kind == "rto"))

    def offer(self, c: Ccb) -> None:
        """A connection software made goes to the units at the end of the pass if it can."""
        self.candidates.add(c)

    def push_candidates(self) -> None:
        """End of a loop pass: the connections software touched go back to the units if
        they can; the rest stay software's until something touches them again."""
        if not self.candidates:
            return
        cands, self.candidates = self.candidates, set()
        for c in cands:
            if c.fast_slot < 0 and self.tcp.conns.get(c.key) is c and self.eligible(c):
                self.push(c)

    def send_syn(self, c: Ccb, now: float) -> bool:
        """Software's connect() (port, ISN, peer MAC chosen), its SYN sent by the units:
        the connection goes to them in SYN-SENT at once (nic_model/hw/conn_fsm.c). False:
        software sends it (the table is full, or the socket is not one the units can serve)."""
        if not self._servable(c) or c.retries or c.fast_slot >= 0:
            return False
        c.rcv_wscale = RCV_WSCALE
        self.st.now = now                           # the SYN's RTO runs from software's clock
        return self.push(c, send_syn=True)

    def _named(self, c: Ccb, template) -> "fp_ffi.CData":
        """self._f from `template` (a CCB's bytes) with what names c: its id, owner, 4-tuple,
        peer MAC, and its socket's B, ring sizes and mapping (if it has one)."""
        f = self._f
        fp_ffi.memmove(f, template, len(_ZERO_CCB))
        f.conn_id = c.id
        f.uid = NO_UID if c.uid is None else c.uid
        f.local_ip, f.remote_ip = c.local_ip, c.remote_ip
        f.local_port, f.remote_port = c.local_port, c.remote_port
        f.peer_mac[0:6] = c.peer_mac
        s = c.sock
        if s is not None and s.mapped:
            f.b_fd = s.b_fd
            f.tx_size, f.rx_size = s.tx_size, s.rx_size
            f.shm_addr = int(abi_ffi.cast("uintptr_t", s.shm))
        return f

    def push_new(self, c: Ccb, now: float) -> bool:
        """connect()'s LazyCcb (port, ISN, peer MAC chosen) to the units in SYN-SENT, its SYN
        sent by them: the CCB push(send_syn=True) would make from a new Ccb, from the
        template and what names the connection. False: software's (as send_syn)."""
        if not self._servable(c):
            return False
        f = self._named(c, self._syn)
        mss = c.mss
        f.mss = f.adv_mss = mss
        f.max_seg = (self.max_payload // mss) * mss if self.offloads and self.max_payload >= mss else mss
        iss = c.iss
        f.snd_una = f.snd_sml = iss
        f.snd_nxt = f.snd_max = f.rtt_seq = c.snd_nxt
        f.rtt_time = f.last_rx = now                # the SYN's RTT sample (Karn: first send)
        self.st.now = now                           # the SYN's RTO runs from software's clock
        slot = fp_lib.fp_push(self.st, f)
        if slot < 0:
            return False
        self.took(c, slot)
        return True

    def took(self, c: Ccb, slot: int) -> None:
        """A new connection is the units' at `slot` (push_new's, or their command unit's)."""
        c.fast_slot = slot
        self.by_slot[slot] = c
        self.base_data[slot] = 0

    def push(self, c: Ccb, send_syn: bool = False) -> bool:
        assert c.sock is not None
        f = self._named(c, _ZERO_CCB)
        f.mss = c.mss
        f.adv_mss = c.adv_mss
        f.state = c.state
        f.irs = c.irs
        f.snd_wscale, f.rcv_wscale = c.snd_wscale, c.rcv_wscale
        f.max_seg = (self.max_payload // c.mss) * c.mss if self.offloads and self.max_payload >= c.mss else c.mss
        _copy_same(c, f)
        f.cwnd = min(c.cwnd, CWND_MAX)
        if c.rtt_seq is not None:
            f.rtt_valid, f.rtt_seq = 1, c.rtt_seq
        elif c.state == State.SYN_SENT and c.retries == 0:
            f.rtt_valid, f.rtt_seq, f.rtt_time = 1, (c.iss + 1) & M32, c.created   # the SYN's RTT (Karn)
        ends = c.psh_ends[-fp_lib.FP_PSH_MAX:]
        f.psh_n = len(ends)
        f.psh_ends[0:len(ends)] = ends
        f.wnd_wait = int(c.wnd_wait)
        f.ack_pending = int(c.ack_pending)
        f.pingpong = int(c.pingpong)
        timers = self.timers
        if c.timer.armed:                           # eligible: an RTO (or the SYN's), nothing else
            f.rto_deadline = c.timer.deadline
        if c.dack_timer.armed:
            f.dack_deadline = c.dack_timer.deadline
        if send_syn:
            f.cflags = fp_lib.FP_CF_SEND_SYN
        slot = fp_lib.fp_push(self.st, f)
        if slot < 0:
            return False                            # the table is full: software keeps it
        timers.cancel(c.timer)
        c.timer_kind = ""
        timers.cancel(c.dack_timer)
        self.tcp.dirty.discard(c)
        self.tcp.wnd_watch.discard(c)
        c.fast_slot = slot
        self.by_slot[slot] = c
        self.base_data[slot] = c.fast_data
        return True

    # ---- what the units hand back ----------------------------------------

    def conn_event(self, slot: int, reason: int, now: float) -> None:
        """A connection the units punted: take it back; the software path does what the
        units could not (the persist timer, a held partial segment; an expired RTO fires
        in this pass's timer poll, its deadline now past)."""
        c = self.by_slot.get(slot)
        if c is None:
            return
        if reason == fp_lib.FP_PUNT_TEARDOWN:
            self.ended[c] = None                     # released when idle (finish_ended)
            return
        self.tcp.own(c)
        if reason in (fp_lib.FP_PUNT_ZERO_WINDOW, fp_lib.FP_PUNT_CORK):
            self.tcp.try_send(c, now)

    def finish_ended(self, now: float) -> None:
        """Release the connections the units ended (TcpStack.units_ended). A LazyCcb whose
        end is plain (LAST-ACK over, or a TIME-WAIT record of the units', its socket closed,
        nothing owed) is released as it is: software never needed it whole."""
        ended, self.ended = self.ended, {}
        tcp = self.tcp
        for c in ended:
            if tcp.conns.get(c.key) is not c:
                continue
            if type(c) is LazyCcb and self._end_lazy(c, now):
                continue
            tcp.own(c)
            self.ended.pop(c, None)             # (own() owes it again: it is being paid)
            tcp.units_ended(c, now)

    def _end_lazy(self, c: Ccb, now: float) -> bool:
        slot = c.fast_slot
        f = self._f
        if slot < 0 or fp_lib.fp_pull(self.st, slot, f) != 0:
            return False
        c.fast_slot = -1
        self.by_slot.pop(slot, None)
        base = self.base_data.pop(slot, 0)
        cf = f.cflags
        plain = (f.punted and f.punt_reason == fp_lib.FP_PUNT_TEARDOWN and cf & fp_lib.FP_CF_ORPHAN
                 and not f.rto_deadline and not f.dack_deadline and not f.ack_pending and not f.wnd_wait
                 and ((f.state == State.LAST_ACK and cf & fp_lib.FP_CF_FIN_SENT and seq_gt(f.snd_una, f.fin_seq))
                      or (f.state == State.TIME_WAIT and cf & fp_lib.FP_CF_TW)))
        if not plain:                               # the rest is software's, as for any other
            self.tcp.complete(c)
            self._adopt(f, c, base)
            self.ended.pop(c, None)
            self.tcp.units_ended(c, now)
            return True
        _copy_end(f, c)
        c.fast_data = base + f.data_fast
        c.orphan = True
        self._host_close(c)
        if f.state == State.TIME_WAIT:
            self.tcp.stats.time_wait += 1
        c.state = _STATES[f.state]
        self.tcp._release(c)
        return True

    def tw_take(self, c: Ccb, now: float) -> bool:
        """Software's connection in TIME-WAIT (its last ACK sent) becomes a record of the
        units' (nic_model/hw/time_wait.c); False: their table is full (software keeps it)."""
        f = self._named(c, _ZERO_CCB)
        f.snd_nxt, f.rcv_nxt, f.rcv_adv = c.snd_nxt, c.rcv_nxt, c.rcv_adv
        f.rcv_wscale, f.mss = c.rcv_wscale, c.mss
        f.bytes_in, f.bytes_out = c.bytes_in, c.bytes_out
        return fp_lib.fp_tw_enter(self.st, f, now) == 0

    def tw_kept(self, key: tuple[int, int, int]) -> bool:
        return self.units.tw_has(*key)

    def tw_count(self, software: int) -> int:
        """The units' TIME-WAIT records; `software`: software's own (they share the limit)."""
        fp_lib.fp_tw_set_sw(self.st, software)
        return fp_lib.fp_tw_count(self.st)

    def tw_info(self) -> list[dict]:
        """The units' TIME-WAIT records as `toe stat` shows connections (their bytes are in
        the closed connections' totals already: adapter_stat does not add them again)."""
        out = []
        for w in self.units.tw_records():
            out.append({"id": w.conn_id, "local": f"{ip_str(w.local_ip)}:{w.local_port}",
                        "remote": f"{ip_str(w.remote_ip)}:{w.remote_port}", "state": "TIME_WAIT",
                        "bytes_in": w.bytes_in, "bytes_out": w.bytes_out, "segs_in": 0, "segs_out": 0,
                        "snd_una": w.snd_nxt, "snd_nxt": w.snd_nxt, "rcv_nxt": w.rcv_nxt,
                        "snd_wnd": 0, "rcv_wnd": (w.rcv_adv - w.rcv_nxt) & M32, "cwnd": 0, "ssthresh": 0,
                        "mss": w.mss, "srtt_us": 0, "rto_ms": 0, "retransmits": 0, "pid": None,
                        "uid": None if w.uid == NO_UID else w.uid, "orphan": True, "timer": "time_wait",
                        "path": "fast", "data_fast": 0, "data_software": 0})
        return out

    def conn_of_slot(self, slot: int) -> Ccb | None:
        return self.by_slot.get(slot)

    def close(self) -> None:
        for c in list(self.by_slot.values()):
            self.own(c)
