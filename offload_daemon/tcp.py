"""TCP: connection control blocks and the state machine (RFC 9293).

The software control path of the adapter: handshakes, teardown, timers and
retransmission (RFC 6298), congestion control (NewReno, RFC 5681/6582) and
flow control. Payload never passes through here as Python objects on the
send side: segments are gathered straight from the socket's TX ring by the
TX header generator; received payload is copied once, frame buffer -> RX
ring.

Sequence numbers are compared only through `seq.py`.

The engine imports neither the daemon nor the host interface: what it needs
from the adapter (TX unit, timers, ARP, configuration, ACK-generator counters)
comes in a `TcpEnv`, and it sees a host socket through the `Sock` protocol,
whose methods make every write to the socket's shared header.

The engine is four modules: tcp_ccb.py (constants, states, Ccb, Listener,
TcpEnv and the protocols, the counters, TcpStackBase), tcp_output.py (the
TcpOutput mixin: windows, emitting, try_send, retransmission, timers),
tcp_input.py (the TcpInput mixin, on top of TcpOutput: segment processing),
and this one: TcpStack, composed from the two mixins, with ids and timer arming, keepalive, ports, the
host's socket calls and the endings. Everything is importable from here.
"""

from __future__ import annotations

import array
import errno
import random
from collections import deque

from nic_model._fastpath import ffi as fp_ffi
from nic_model._fastpath import lib as fp_lib

from nic_model.wire import tcp as T

from .abi import ffi, lib
from .seq import M32, initial_seq, seq_gt
from .tcp_ccb import (
    CORK_MAX_S,
    EPHEMERAL,
    FIN_TIMEOUT,
    INIT_CWND_SEGS,
    KEEPCNT,
    KEEPIDLE_S,
    KEEPINTVL_S,
    LINUX_STATE,
    PRE_ACCEPT_WINDOW,
    PSH_ENDS_MAX,
    RCV_WSCALE,
    RTO_INITIAL,
    RTO_MAX,
    RTO_MIN,
    SEND_STATES,
    SOMAXCONN,
    SYNACK_RETRIES,
    TCP_RETRIES2,
    WND_POLL_S,
    WSCALE_MAX,
    Ccb,
    LazyCcb,
    Listener,
    Resolver,
    Sock,
    State,
    TcpCounters,
    TcpEnv,
    TcpStackBase,
    TxPort,
    fill_ccb,
    ip_str,
    no_timer,
)
from .tcp_input import TcpInput
from .tcp_output import TcpOutput
from .timers import Timer

__all__ = [  # what `from .tcp import X` finds (most of it lives in tcp_ccb.py)
    "RTO_INITIAL", "RTO_MIN", "RTO_MAX", "TCP_RETRIES2", "SYNACK_RETRIES", "FIN_TIMEOUT",
    "RCV_WSCALE", "PRE_ACCEPT_WINDOW", "INIT_CWND_SEGS", "EPHEMERAL", "KEEPIDLE_S", "KEEPINTVL_S",
    "KEEPCNT", "CORK_MAX_S", "WSCALE_MAX", "PSH_ENDS_MAX", "WND_POLL_S", "State", "LINUX_STATE",
    "SEND_STATES", "TxPort", "Resolver", "TcpEnv", "Sock", "TcpCounters", "ip_str", "Listener",
    "SOMAXCONN", "Ccb", "TcpStackBase", "TcpStack",
]


class TcpStack(TcpInput, TcpOutput):
    def __init__(self, env: TcpEnv):
        self.env = env
        self.cfg = env.cfg
        self.my_ip = env.my_ip
        self.timers = env.timers
        self.tx = env.tx
        self.arp = env.arp
        self.ackgen = env.ackgen
        self.offloads = env.offloads
        self.tx_max_payload = env.tx_max_payload
        self.conns: dict[tuple[int, int, int], Ccb] = {}
        self.listeners: dict[int, list[Listener]] = {}
        self.bound: dict[int, list[Sock]] = {}
        # RFC 6056's secret and counter and the connection ids, and a use count per local
        # port (bound sockets and connections): shared with the units' command unit
        # (nic_model/hw/host_cmd.c), which makes connections of its own with them
        self.ids = fp_ffi.new("struct fp_ids *")
        self.ids.eph_secret = random.getrandbits(64)
        self.port_users = fp_ffi.new("uint32_t[65536]")
        self.our_mss = self.cfg.mtu - 40
        self.dirty: set[Ccb] = set()
        self.closed: deque[tuple[Ccb, int | None, str]] = deque(maxlen=64)   # recently closed, newest last
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.closed_count = 0
        self.time_waits: set[Ccb] = set()  # in TIME-WAIT now: at most cfg.max_time_wait
        self.closed_data_fast = 0          # data segments of closed connections, by path
        self.closed_data_sw = 0
        # connections waiting to advertise freed RX space; the app's window doorbell can be
        # lost while its A end is stuffed (TX ring full), so these are also polled
        self.wnd_watch: set[Ccb] = set()
        self._wnd_timer = Timer(self._poll_windows)
        self.stats = TcpCounters()
        self.fast = env.fast

    # ==================================================================
    # helpers: ids, timers, ports
    # ==================================================================

    def _new_ccb(self, lip: int, lport: int, rip: int, rport: int, now: float) -> Ccb:
        ids = self.ids
        ids.conn_id += 1
        c = Ccb(ids.conn_id, lip, lport, rip, rport, now)
        self._bind_timers(c)
        return c

    def complete(self, c: Ccb, some_set: bool = False) -> None:
        """A LazyCcb (FastPath.push_new) made a whole Ccb, in place, before software reads it
        (`some_set`: fill_ccb's)."""
        if type(c) is LazyCcb:
            fill_ccb(c, some_set)
            self._bind_timers(c)

    def _bind_timers(self, c: Ccb) -> None:
        def fire(t: float) -> None:
            self._on_timer(c, t)

        def keepalive(t: float) -> None:
            self._on_keepalive(c, t)

        def delayed_ack(t: float) -> None:
            self._on_delayed_ack(c, t)

        c.timer.callback = fire              # (Ccb made the timers; _free drops these again)
        c.ka_timer.callback = keepalive
        c.dack_timer.callback = delayed_ack

    def own(self, c: Ccb) -> None:
        """Take a connection back from the fast path's units (if they have it) before the
        software path reads or changes it."""
        if self.fast is not None:
            self.fast.own(c)

    def _arm(self, c: Ccb, kind: str, delay: float, now: float) -> None:
        c.timer_kind = kind
        self.timers.arm(c.timer, now + delay)

    def _disarm(self, c: Ccb) -> None:
        self.timers.cancel(c.timer)
        c.timer_kind = ""

    # ---- keepalive (RFC 9293 3.8.4; Linux's SO_KEEPALIVE / TCP_KEEPIDLE / INTVL / CNT)

    @staticmethod
    def _ka_params(c: Ccb) -> tuple[bool, float, float, int]:
        s = c.sock
        if s is None or not s.mapped:
            return False, 0.0, 0.0, 0
        shm = s.shm
        return (bool(shm.opt_flags & lib.TOE_OF_KEEPALIVE), float(shm.keepidle_s or KEEPIDLE_S),
                float(shm.keepintvl_s or KEEPINTVL_S), shm.keepcnt or KEEPCNT)

    def _keepalive_arm(self, c: Ccb, now: float) -> None:
        on, idle, _intvl, _cnt = self._ka_params(c)
        if not on or c.state not in SEND_STATES + (State.FIN_WAIT_2,):
            self.timers.cancel(c.ka_timer)
            return
        self.timers.arm(c.ka_timer, c.last_rx + idle)

    def _on_keepalive(self, c: Ccb, now: float) -> None:
        self.own(c)
        on, idle, intvl, cnt = self._ka_params(c)
        if not on or self.conns.get(c.key) is not c:
            return
        if now < c.last_rx + idle and c.ka_probes == 0:
            self.timers.arm(c.ka_timer, c.last_rx + idle)
            return
        if c.ka_probes >= cnt:
            self.stats.keepalive_timeouts += 1
            self._fail(c, errno.ETIMEDOUT, now)
            return
        c.ka_probes += 1
        self.stats.keepalive_probes += 1
        self._emit(c, (c.snd_una - 1) & M32, T.ACK)    # an old sequence number: the peer must ACK
        self.timers.arm(c.ka_timer, now + intvl)

    def _port_free(self, port: int, sock: Sock) -> bool:
        users = [s for s in self.bound.get(port, ()) if s is not sock]
        if not users:
            return True
        mine = sock.mapped and sock.shm.opt_flags & lib.TOE_OF_REUSEPORT
        return bool(mine) and all(s.mapped and s.shm.opt_flags & lib.TOE_OF_REUSEPORT for s in users)

    def _ephemeral(self, sock: Sock, rip: int = 0, rport: int = 0) -> int:
        """A free local port: RFC 6056 algorithm 3, as Linux does it. The search starts at a
        per-destination offset plus a counter that moves past every port handed out, so a
        port comes back to the same destination only after the whole range was used (its
        old incarnation's TIME-WAIT at the peer has then most likely ended)."""
        lo, hi = EPHEMERAL
        n = hi - lo + 1
        start = fp_lib.fp_eph_start(self.ids, rip, rport)      # (host_cmd.c's search starts there too)
        for i in range(n):
            p = lo + (start + i) % n
            if p in self.bound or p in self.listeners:
                continue
            if rip and self._tuple_used((rip, rport, p)):
                continue
            self.ids.eph_next += i + 1
            return p
        raise OSError(errno.EADDRNOTAVAIL, "no free ephemeral port")

    def _tuple_used(self, key: tuple[int, int, int]) -> bool:
        """A connection (remote ip, remote port, local port) exists: software's, or a
        TIME-WAIT record of the units'."""
        return key in self.conns or (self.fast is not None and self.fast.tw_kept(key))

    def ports_in_use(self) -> int:
        """Local ports with a user (port_users: bound sockets, connections, TIME-WAIT records)."""
        a = array.array("I")
        a.frombytes(fp_ffi.buffer(self.port_users))
        return len(a) - a.count(0)

    def time_wait_count(self) -> int:
        """Connections in TIME-WAIT: software's and the units' records (one limit for both)."""
        n = len(self.time_waits)
        return n + (self.fast.tw_count(n) if self.fast is not None else 0)

    def _bind_port(self, sock: Sock, ip: int, port: int, counted: bool = False) -> None:
        """`counted`: port_users has the use already (the command unit counted it)."""
        sock.bound = (ip, port)
        self.bound.setdefault(port, []).append(sock)
        if not counted:
            self.port_users[port] += 1

    def _add_conn(self, c: Ccb, counted: bool = False) -> None:
        old = self.conns.get(c.key)
        self.conns[c.key] = c
        if old is None and not counted:
            self.port_users[c.local_port] += 1

    def _port_unused(self, port: int) -> None:
        """One use of a local port less (never below 0)."""
        if self.port_users[port]:
            self.port_users[port] -= 1

    def unbind(self, sock: Sock) -> None:
        if sock.bound is None:
            return
        port = sock.bound[1]
        users = self.bound.get(port, [])
        if sock in users:
            users.remove(sock)
        if not users:
            self.bound.pop(port, None)
        sock.bound = None
        self._port_unused(port)

    # ==================================================================
    # host commands
    # ==================================================================

    def bind(self, sock: Sock, ip: int, port: int) -> int:
        if sock.bound is not None or sock.ccb is not None or sock.listener is not None:
            return -errno.EINVAL
        if ip not in (0, self.my_ip):
            return -errno.EADDRNOTAVAIL
        if port == 0:
            try:
                port = self._ephemeral(sock)
            except OSError as e:
                return -(e.errno or errno.EADDRNOTAVAIL)
        elif not self._port_free(port, sock):
            return -errno.EADDRINUSE
        self._bind_port(sock, ip, port)
        sock.set_addresses(ip, port, 0, 0)
        sock.set_state(lib.TOE_SS_BOUND)
        return 0

    def listen(self, sock: Sock, backlog: int) -> int:
        if sock.ccb is not None:
            return -errno.EINVAL
        # Linux: an unsigned comparison against somaxconn (4096); a negative backlog is the maximum
        backlog = max(1, backlog if 0 <= backlog <= SOMAXCONN else SOMAXCONN)
        if sock.listener is not None:
            sock.listener.backlog = backlog
            return 0
        if sock.bound is None:
            r = self.bind(sock, 0, 0)
            if r:
                return r
        ip, port = sock.bound  # type: ignore[misc]
        others = self.listeners.get(port, [])
        for other in others:
            if not (sock.shm.opt_flags & lib.TOE_OF_REUSEPORT
                    and other.sock.mapped and other.sock.shm.opt_flags & lib.TOE_OF_REUSEPORT):
                return -errno.EADDRINUSE
        lst = Listener(sock, ip, port, backlog)
        self.listeners.setdefault(port, []).append(lst)
        sock.listener = lst
        sock.set_state(lib.TOE_SS_LISTEN)
        return 0

    def connect(self, sock: Sock, rip: int, rport: int, now: float) -> int:
        if sock.listener is not None:
            return -errno.EISCONN if False else -errno.EINVAL
        if sock.ccb is not None:
            self.own(sock.ccb)                 # (the units' state, not what software last saw)
            st = sock.ccb.state
            return -errno.EALREADY if st == State.SYN_SENT else -errno.EISCONN
        if rport == 0:
            return -errno.ECONNREFUSED
        if sock.bound is None:
            try:
                port = self._ephemeral(sock, rip, rport)       # (a port no connection to rip:rport has)
            except OSError as e:
                return -(e.errno or errno.EADDRNOTAVAIL)
            self._bind_port(sock, self.my_ip, port)
        elif self._tuple_used((rip, rport, sock.bound[1])):
            return -errno.EADDRNOTAVAIL
        lport = sock.bound[1]  # type: ignore[index]
        mac = self.arp.lookup(rip, now) if self.fast is not None else None
        if mac is not None:
            # the units take it from its SYN on: a LazyCcb (made whole if software ever
            # needs it), no Ccb and no timers now
            ids = self.ids
            ids.conn_id += 1
            lz = self._lazy(sock, ids.conn_id, lport, rip, rport, now,
                            initial_seq(self.my_ip, lport, rip, rport, now), self._adv_mss(sock), mac)
            if self.fast.push_new(lz, now):  # type: ignore[union-attr]
                self._add_conn(lz)
                sock.ccb = lz
                sock.set_addresses(self.my_ip, lport, rip, rport)
                sock.set_state(lib.TOE_SS_CONNECTING)
                self.stats.active_opens += 1
                return -errno.EINPROGRESS
            ids.conn_id -= 1
        c = self._new_ccb(self.my_ip, lport, rip, rport, now)
        c.sock = sock
        c.uid = sock.uid
        sock.ccb = c
        c.state = State.SYN_SENT
        c.adv_mss = self._adv_mss(sock)
        c.mss = c.adv_mss
        c.snd_nxt = c.snd_max = (c.iss + 1) & M32
        self._add_conn(c)
        sock.set_addresses(self.my_ip, lport, rip, rport)
        sock.set_state(lib.TOE_SS_CONNECTING)
        self.stats.active_opens += 1

        def resolved(mac: bytes | None, t: float) -> None:
            self._syn_resolved(c, mac, t)

        self.arp.resolve(rip, now, resolved)
        return -errno.EINPROGRESS

    def _lazy(self, sock: Sock, cid: int, lport: int, rip: int, rport: int, now: float, iss: int, adv: int,
              mac: bytes) -> LazyCcb:
        lz = LazyCcb(cid, self.my_ip, lport, rip, rport, now, iss, adv)
        lz.sock, lz.uid, lz.peer_mac = sock, sock.uid, mac
        return lz

    def units_connected(self, sock: Sock, r, now: float) -> None:
        """A connect() the units' command unit made (nic_model/hw/host_cmd.c: record r): the
        LazyCcb and the tables connect() would have (its port and connection already counted
        in port_users, the socket's header written, the CCB in the units at r.slot)."""
        rip = r.remote_ip
        mac = self.arp.lookup(rip, now) or bytes(fp_ffi.buffer(r.peer_mac, 6))   # (the same: the unit's is a copy)
        lz = self._lazy(sock, r.conn_id, r.local_port, rip, r.remote_port, r.now, r.iss, r.adv_mss, mac)
        self._bind_port(sock, self.my_ip, r.local_port, counted=True)
        self._add_conn(lz, counted=True)
        sock.ccb = lz
        self.stats.active_opens += 1
        self.fast.took(lz, r.slot)  # type: ignore[union-attr]

    def _syn_resolved(self, c: Ccb, mac: bytes | None, now: float) -> None:
        if c.state != State.SYN_SENT or self.conns.get(c.key) is not c:
            return
        if mac is None:
            self._fail(c, errno.EHOSTUNREACH, now)
            return
        c.peer_mac = mac
        if self.fast is not None and self.fast.send_syn(c, now):
            return                                 # the units send the SYN and take the SYN|ACK
        self._send_syn(c, now)
        if self.fast is not None:
            self.fast.offer(c)                     # the SYN|ACK can be the units' (FastPath.eligible)

    def accept(self, lsock: Sock, child_sock: Sock, now: float) -> Ccb | None:
        lst = lsock.listener
        if lst is None:
            return None
        while lst.queue:
            c = lst.queue.popleft()
            self._update_pending(lst)
            if self.conns.get(c.key) is not c and c.state != State.TIME_WAIT:
                continue          # reset while waiting in the queue
            self.own(c)
            c.listener = None
            c.sock = child_sock
            c.uid = child_sock.uid
            child_sock.ccb = c
            child_sock.set_addresses(c.local_ip, c.local_port, c.remote_ip, c.remote_port)
            child_sock.set_connected(c.mss)
            if c.pre_buf:
                data = bytes(c.pre_buf)
                c.pre_buf = bytearray()
                child_sock.push(ffi.from_buffer(data), len(data))
            if c.rx_fin:
                child_sock.set_eof()
            # No window update: the ring's larger window rides on the next segment, as
            # Linux's does after the SYN|ACK's unscaled 64 KB; only a peer that filled
            # the pre-accept window (and now waits for it) is told at once.
            if c.state in SEND_STATES + (State.FIN_WAIT_2,) and ((c.rcv_adv - c.rcv_nxt) & M32) < c.mss:
                self._maybe_window_update(c, now, force=True)
            self._keepalive_arm(c, now)
            # Data the server writes right after accept() (a banner) must go out without
            # waiting for the peer: arm the doorbell (try_send does, once idle).
            self.try_send(c, now)
            return c
        return None

    def _update_pending(self, lst: Listener) -> None:
        s = lst.sock
        if s.mapped:
            s.set_accept_pending(len(lst.queue))

    def shutdown(self, sock: Sock, how: int, now: float) -> int:
        c = sock.ccb
        if c is not None:
            self.own(c)
        if c is None or c.state in (State.SYN_SENT, State.SYN_RCVD, State.CLOSED):
            return -errno.ENOTCONN
        if how in (0, 2):       # SHUT_RD / SHUT_RDWR: a blocked reader wakes up at EOF
            sock.shut_rd()
        if how in (1, 2):       # SHUT_WR / SHUT_RDWR
            self._close_tx(c, now)
        return 0

    def doorbell(self, sock: Sock, now: float) -> None:
        """Something changed in the socket's rings (data to send, space freed)."""
        c = sock.ccb
        if c is not None:
            self.own(c)
        if c is None:
            if sock.listener is not None and (sock.listener.queue or sock.kernel_pending()):
                sock.wake()
            return
        if c.state in SEND_STATES:
            self.try_send(c, now)
        if c.wnd_wait:
            self._maybe_window_update(c, now)
        if sock.mapped:
            # the shim may have kicked: make sure a readable socket has a token
            s = sock.shm
            if s.rx_tail != s.rx_head or s.flags & (lib.TOE_SF_RX_EOF | lib.TOE_SF_RESET):
                sock.wake()

    def app_closed(self, sock: Sock, now: float) -> None:
        """The last descriptor of A closed (close(), exit or crash)."""
        sock.app_closed = True
        lst = sock.listener
        if lst is not None:
            ports = self.listeners.get(lst.port, [])
            if lst in ports:
                ports.remove(lst)
            if not ports:
                self.listeners.pop(lst.port, None)
            for child in list(lst.queue) + list(lst.embryonic):
                self._send_rst_for(child, now)
                self._free(child)
            lst.queue.clear()
            lst.embryonic.clear()
            sock.listener = None
            self.unbind(sock)
            sock.retire()
            return
        c = sock.ccb
        if c is None:
            self.unbind(sock)
            sock.retire()
            return
        self.own(c)
        c.orphan = True
        if c.state == State.SYN_SENT:
            self._free(c)
            return
        unread = sock.mapped and sock.shm.rx_tail != sock.shm.rx_head
        linger0 = sock.mapped and sock.shm.opt_flags & lib.TOE_OF_LINGER and sock.shm.linger_s == 0
        if linger0 and c.state not in (State.TIME_WAIT, State.CLOSED):
            # SO_LINGER {on, 0}: close() aborts with RST, no TIME-WAIT
            self.stats.aborts_on_linger += 1
            self._send_rst_for(c, now)
            self._free(c)
            return
        if unread and c.state in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1,
                                  State.FIN_WAIT_2):
            # RFC 9293 3.10.4 / Linux: close with unread data aborts the connection
            self._send_rst_for(c, now)
            self._free(c)
            return
        if c.state in (State.ESTABLISHED, State.CLOSE_WAIT):
            self._close_tx(c, now)
        elif c.state == State.FIN_WAIT_2:
            self._arm(c, "fin_wait_2", FIN_TIMEOUT, now)
        if c.state in (State.TIME_WAIT, State.CLOSED):
            self._detach(c)

    def setsockopt(self, sock: Sock, level: int, name: int, now: float) -> None:
        """The shim recorded an option in the header; act on it (keepalive, NODELAY, CORK;
        SO_SNDBUF / TCP_NOTSENT_LOWAT may have made a waiting writer's socket writable)."""
        if sock.mapped:
            sock.tx_wake()
        c = sock.ccb
        if c is None:
            return
        self.own(c)
        self._keepalive_arm(c, now)
        if c.state in SEND_STATES:
            self.try_send(c, now)

    def _close_tx(self, c: Ccb, now: float) -> None:
        if c.fin_wanted:
            return
        c.fin_wanted = True
        self.try_send(c, now)

    # ==================================================================
    # endings
    # ==================================================================

    def units_ended(self, c: Ccb, now: float) -> None:
        """The fast path's units acknowledged the end of a close they took
        (nic_model/hw/conn_fsm.c): LAST-ACK with our FIN acked is over; an orphan in
        FIN-WAIT-2 waits for the peer's FIN at most FIN_TIMEOUT (tcp_fin_timeout); the
        peer's FIN with the ACK of ours gave TIME-WAIT (the units sent its ACK): the units
        keep it as a record of theirs (nic_model/hw/time_wait.c) if their table had room,
        and the connection is over here; else software's timer."""
        if c.state == State.LAST_ACK and c.fin_sent and seq_gt(c.snd_una, c.fin_seq):
            self._free(c)
        elif c.state == State.FIN_WAIT_2 and c.orphan:
            self._arm(c, "fin_wait_2", FIN_TIMEOUT, now)
        elif c.state == State.TIME_WAIT and c.rx_fin:
            if self.fast is not None and self.fast.tw_kept(c.key):
                self.stats.time_wait += 1       # a record of the units' waits: the connection is over
                self._free(c)
            else:
                self._time_wait(c, now)

    def _time_wait(self, c: Ccb, now: float) -> None:
        """TIME-WAIT for 2 MSL (--time-wait). Like Linux's tcp_max_tw_buckets, at most
        max_time_wait connections wait at once: past it one ends at once (its last ACK is
        sent), so a server that closes first at a high rate holds bounded memory."""
        tw = self.time_waits
        s = c.sock
        if c not in tw and (s is None or s.app_closed) and self.fast is not None:
            # an orphan's TIME-WAIT needs no socket and no CCB: a record of the units'
            if c.ack_pending:
                self.send_ack(c)
            if self.fast.tw_take(c, now):
                self.stats.time_wait += 1
                c.state = State.TIME_WAIT
                self._free(c)
                return
        if c not in tw and self.time_wait_count() >= self.cfg.max_time_wait:
            self.stats.time_wait_overflow += 1
            c.state = State.TIME_WAIT
            self._free(c)
            return
        tw.add(c)
        self.time_wait_count()                  # (tells the units: the limit is shared)
        c.state = State.TIME_WAIT
        self.stats.time_wait += 1
        self._arm(c, "time_wait", self.cfg.time_wait_s, now)
        self._detach(c)

    def _fail(self, c: Ccb, err: int, now: float) -> None:
        """The connection is gone with an error the application must see."""
        s = c.sock
        if s is not None and s.mapped and not s.app_closed:
            s.set_error(err)
        self._free(c)

    def _detach(self, c: Ccb) -> None:
        """The connection no longer needs the rings; release them if the app is gone."""
        s = c.sock
        if s is not None and s.app_closed:
            self.unbind(s)
            s.retire()
            s.ccb = None
            c.sock = None

    def _free(self, c: Ccb) -> None:
        self.own(c)
        self._disarm(c)
        self.timers.cancel(c.ka_timer)
        self.timers.cancel(c.dack_timer)
        # its timers' callbacks hold it: without them, refcounting frees it (no cycle left
        # for the collector; nothing arms a closed connection's timers)
        c.timer.callback = c.ka_timer.callback = c.dack_timer.callback = no_timer
        self._release(c)

    def _release(self, c: Ccb) -> None:
        """The connection is over (its timers, if it has any, are _free's): out of the
        tables, its socket's part done. A LazyCcb the units ended comes here as it is."""
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
            self._port_unused(c.local_port)
            if c.state not in (State.SYN_SENT, State.SYN_RCVD) or c.bytes_in or c.bytes_out:
                # the record is made when `toe stat` asks (closed_info): a dict per connection
                # here would cost more than the rest of its release
                self.closed.append((c, c.sock.pid if c.sock is not None else None, c.state.name))
                self.closed_count += 1
                self.closed_bytes_in += c.bytes_in
                self.closed_bytes_out += c.bytes_out
                self.closed_data_fast += c.fast_data
                self.closed_data_sw += c.sw_data
        prev = c.state
        c.state = State.CLOSED
        if prev == State.TIME_WAIT:
            self.time_waits.discard(c)
        self.tx.invalidate(c.key)
        self.dirty.discard(c)
        self.wnd_watch.discard(c)
        if c.listener is not None:
            c.listener.embryonic.discard(c)
            if c in c.listener.queue:
                c.listener.queue.remove(c)
                self._update_pending(c.listener)
        s = c.sock
        if s is not None:
            if s.app_closed:
                self.unbind(s)
                s.retire()
                s.ccb = None
            elif s.mapped and prev not in (State.TIME_WAIT,):
                s.closed_if_reset()
        c.sock = None if (s is None or s.app_closed) else s

    def closed_info(self) -> list[dict]:
        """The recently closed connections as `toe stat` shows them, oldest first."""
        out = []
        for c, pid, closed_from in self.closed:
            self.complete(c, some_set=True)             # (a LazyCcb the units ended)
            info = c.info()
            info.update(pid=pid, closed_from=closed_from, state="CLOSED")
            out.append(info)
        return out

    def _poll_windows(self, now: float) -> None:
        for c in list(self.wnd_watch):
            if not c.wnd_wait or c.state == State.CLOSED or c.sock is None or not c.sock.mapped:
                self.wnd_watch.discard(c)
            else:
                self._maybe_window_update(c, now)
                if not c.wnd_wait:
                    self.wnd_watch.discard(c)

    def flush(self, now: float) -> None:
        """End of a loop pass: one ACK per connection that still owes one."""
        if self.wnd_watch and not self._wnd_timer.armed:
            self.timers.arm(self._wnd_timer, now + WND_POLL_S)
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        for c in dirty:
            if c.ack_pending and c.state != State.CLOSED:
                self.send_ack(c)
