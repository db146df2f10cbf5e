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
"""

from __future__ import annotations

import errno
import random
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, Protocol

from nic_model.counters import AckGenCounters, UnitCounters
from nic_model.wire import tcp as T

from .abi import ffi, lib
from .config import AdapterConfig
from .seq import M32, initial_seq, seq_ge, seq_gt, seq_le, seq_lt
from .timers import Timer, Timers

if TYPE_CHECKING:  # pragma: no cover
    from nic_model.rx import Segment

RTO_INITIAL = 1.0
RTO_MIN = 0.2
RTO_MAX = 60.0
TCP_RETRIES2 = 15
SYNACK_RETRIES = 5
FIN_TIMEOUT = 60.0
RCV_WSCALE = 7
PRE_ACCEPT_WINDOW = 1 << 16
INIT_CWND_SEGS = 10
EPHEMERAL = (32768, 60999)
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT = 7200, 75, 9      # Linux defaults
CORK_MAX_S = 0.2                                      # Linux: corked data waits 200 ms at most
WSCALE_MAX = 14                                       # RFC 7323 2.3
PSH_ENDS_MAX = 64                                     # write ends remembered for resending PSH
WND_POLL_S = 0.005


class State(IntEnum):
    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RCVD = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10


# Linux's numbering for TCP_INFO / ss
LINUX_STATE = {State.ESTABLISHED: 1, State.SYN_SENT: 2, State.SYN_RCVD: 3, State.FIN_WAIT_1: 4,
               State.FIN_WAIT_2: 5, State.TIME_WAIT: 6, State.CLOSED: 7, State.CLOSE_WAIT: 8,
               State.LAST_ACK: 9, State.LISTEN: 10, State.CLOSING: 11}

SEND_STATES = (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.CLOSING, State.LAST_ACK)


# ---------------------------------------------------------------------------
# What the engine needs from the adapter around it (and nothing more): tests
# build a TcpEnv of fakes; the daemon builds it from its units.


class TxPort(Protocol):
    """The TX header generator (nic_model.tx.TxEngine)."""

    def segment(self, key, peer_mac: bytes, src: int, dst: int, sport: int, dport: int,
                seq: int, ack: int, flags: int, window: int, options: bytes = b"",
                payload=(), payload_len: int = 0, mss: int = 1460) -> None: ...

    def invalidate(self, key) -> None: ...


class Resolver(Protocol):
    """Next-hop resolution (arp.ArpTable): cb(mac or None on failure, now)."""

    def resolve(self, ip: int, now: float, cb: Callable[[bytes | None, float], None]) -> None: ...


@dataclass
class TcpEnv:
    cfg: AdapterConfig
    my_ip: int
    timers: Timers
    tx: TxPort
    arp: Resolver
    ackgen: AckGenCounters
    offloads: bool
    tx_max_payload: int                 # the most payload one (TSO) frame carries


class Sock(Protocol):
    """The host socket as the engine sees it (host.HostSocket): readiness events, ring
    geometry, and the shared header, read through `shm` and written only through these
    methods."""

    ccb: Ccb | None
    listener: Listener | None
    bound: tuple[int, int] | None
    app_closed: bool

    @property
    def id(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def shm(self) -> Any: ...
    @property
    def mapped(self) -> bool: ...
    @property
    def tx_size(self) -> int: ...
    @property
    def rx_size(self) -> int: ...
    @property
    def tx_ring(self) -> Any: ...

    def push(self, src_ptr, n: int, count_in: bool = False) -> bool: ...
    def wake(self) -> None: ...
    def rx_space(self) -> int: ...
    def drain(self, limit: int | None = None) -> bool: ...
    def shut_b(self) -> None: ...
    def shut_rd(self) -> None: ...
    def kernel_pending(self) -> bool: ...
    def release(self) -> None: ...
    def set_connected(self, mss: int) -> None: ...
    def set_eof(self) -> None: ...
    def set_error(self, err: int) -> None: ...
    def set_addresses(self, lip: int, lport: int, rip: int, rport: int) -> None: ...
    def set_state(self, state: int) -> None: ...
    def set_accept_pending(self, n: int) -> None: ...
    def count_retransmit(self) -> None: ...
    def closed_if_reset(self) -> None: ...
    def tx_release(self, head: int) -> None: ...
    def tx_sent(self, seq: int) -> None: ...
    def tx_wake(self) -> None: ...
    def arm_tx_doorbell(self) -> int: ...
    def arm_rx_window(self) -> None: ...


@dataclass
class TcpCounters(UnitCounters):
    active_opens: int = 0
    passive_opens: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    syn_dropped_backlog: int = 0
    retransmit_timeouts: int = 0
    fast_retransmits: int = 0
    ooo_segments: int = 0
    bad_segments: int = 0
    conn_timeouts: int = 0
    time_wait: int = 0
    keepalive_probes: int = 0
    keepalive_timeouts: int = 0
    aborts_on_linger: int = 0


def ip_str(ip: int) -> str:
    return f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"


class Listener:
    def __init__(self, sock: Sock, ip: int, port: int, backlog: int):
        self.sock = sock
        self.ip = ip
        self.port = port
        self.backlog = max(1, min(backlog, 4096))
        self.queue: deque[Ccb] = deque()       # established, waiting for accept()
        self.embryonic: set[Ccb] = set()       # SYN_RCVD

    @property
    def full(self) -> bool:
        return len(self.queue) + len(self.embryonic) >= self.backlog + 1


SOMAXCONN = 4096


class Ccb:
    """Connection control block: everything the adapter knows about one connection."""

    __slots__ = (
        "id", "state", "key", "local_ip", "local_port", "remote_ip", "remote_port", "peer_mac",
        "sock", "listener", "pre_buf", "orphan",
        "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1", "snd_wl2", "snd_wscale", "tx_head",
        "snd_sml", "adv_mss", "psh_ends",
        "irs", "rcv_nxt", "rcv_wscale", "rcv_adv", "wnd_wait", "ooo", "ooo_bytes",
        "mss", "cwnd", "ssthresh", "dupacks", "recover", "in_recovery",
        "srtt", "rttvar", "rto", "rtt_seq", "rtt_time", "retries",
        "fin_wanted", "fin_sent", "fin_seq", "fin_seq_set", "rx_fin", "ack_pending", "timer", "timer_kind",
        "ka_timer", "ka_probes", "last_rx", "cork_since",
        "bytes_in", "bytes_out", "segs_in", "segs_out", "retransmits", "created", "uid",
    )

    def __init__(self, cid: int, local_ip: int, local_port: int, remote_ip: int, remote_port: int,
                 now: float):
        self.id = cid
        self.state = State.CLOSED
        self.local_ip, self.local_port = local_ip, local_port
        self.remote_ip, self.remote_port = remote_ip, remote_port
        self.key = (remote_ip, remote_port, local_port)
        self.peer_mac = b"\0" * 6
        self.sock: Sock | None = None
        self.uid: int | None = None                # owner of the socket (who may see it in toe stat)
        self.listener: Listener | None = None
        self.pre_buf = bytearray()
        self.orphan = False
        self.iss = initial_seq(local_ip, local_port, remote_ip, remote_port, now)
        self.snd_una = self.iss
        self.snd_nxt = self.iss
        self.snd_max = self.iss          # highest sequence ever sent (snd_nxt rewinds on RTO)
        self.snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.snd_wscale = 0
        self.tx_head = 0
        self.snd_sml = self.iss          # end of the last sub-MSS segment sent (Minshall's Nagle)
        self.adv_mss = 536               # the MSS we announce: ours, or TCP_MAXSEG's if smaller
        self.psh_ends: list[int] = []    # ends of PSH segments not yet acked (a resend keeps PSH)
        self.irs = self.rcv_nxt = 0
        self.rcv_wscale = 0
        self.rcv_adv = 0
        self.wnd_wait = False
        self.ooo: list[tuple[int, bytes]] = []
        self.ooo_bytes = 0
        self.mss = 536
        self.cwnd = INIT_CWND_SEGS * 536
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.recover = 0
        self.in_recovery = False
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto = RTO_INITIAL
        self.rtt_seq: int | None = None
        self.rtt_time = 0.0
        self.retries = 0
        self.fin_wanted = False
        self.fin_sent = False
        self.fin_seq = 0
        self.fin_seq_set = False
        self.rx_fin = False
        self.ack_pending = False
        self.timer = Timer(_no_timer)
        self.timer_kind = ""
        self.ka_timer = Timer(_no_timer)     # keepalive, beside the retransmission timer
        self.ka_probes = 0
        self.last_rx = now
        self.cork_since: float | None = None
        self.bytes_in = self.bytes_out = self.segs_in = self.segs_out = self.retransmits = 0
        self.created = now

    def info(self) -> dict:
        return {
            "id": self.id, "local": f"{ip_str(self.local_ip)}:{self.local_port}",
            "remote": f"{ip_str(self.remote_ip)}:{self.remote_port}", "state": self.state.name,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "segs_in": self.segs_in, "segs_out": self.segs_out,
            "snd_una": self.snd_una, "snd_nxt": self.snd_nxt, "rcv_nxt": self.rcv_nxt,
            "snd_wnd": self.snd_wnd, "rcv_wnd": (self.rcv_adv - self.rcv_nxt) & M32,
            "cwnd": self.cwnd, "ssthresh": min(self.ssthresh, 1 << 30), "mss": self.mss,
            "srtt_us": int(self.srtt * 1e6), "rto_ms": int(self.rto * 1000),
            "retransmits": self.retransmits, "pid": self.sock.pid if self.sock else None,
            "uid": self.uid if self.uid is not None
            else (self.listener.sock.uid if self.listener is not None else None),
            "orphan": self.orphan, "timer": self.timer_kind if self.timer.armed else "",
            **self._ring_info(),
        }

    def _ring_info(self) -> dict:
        """How full the socket's rings are (the host-interface view of the connection)."""
        s = self.sock
        if s is None or not s.mapped:
            return {}
        m = s.shm
        return {"tx_queued": (m.tx_tail - m.tx_head) & M32, "tx_ring": s.tx_size,
                "rx_queued": (m.rx_tail - m.rx_head) & M32, "rx_ring": m.rx_size,
                "tx_doorbell_armed": bool(m.tx_doorbell_armed)}


def _no_timer(now: float) -> None:
    pass


class TcpStack:
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
        self._eph_secret = random.getrandbits(64)
        self._eph_next = 0
        self.our_mss = self.cfg.mtu - 40
        self._next_id = 0
        self.dirty: set[Ccb] = set()
        self.closed: deque[dict] = deque(maxlen=64)      # recently closed, newest last
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.closed_count = 0
        # connections waiting to advertise freed RX space; the app's window doorbell can be
        # lost while its A end is stuffed (TX ring full), so these are also polled
        self.wnd_watch: set[Ccb] = set()
        self._wnd_timer = Timer(self._poll_windows)
        self.stats = TcpCounters()

    # ==================================================================
    # helpers: ids, timers, ports
    # ==================================================================

    def _new_ccb(self, lip: int, lport: int, rip: int, rport: int, now: float) -> Ccb:
        self._next_id += 1
        c = Ccb(self._next_id, lip, lport, rip, rport, now)

        def fire(t: float) -> None:
            self._on_timer(c, t)

        def keepalive(t: float) -> None:
            self._on_keepalive(c, t)

        c.timer = Timer(fire)
        c.ka_timer = Timer(keepalive)
        return c

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
        start = hash((rip, rport, self._eph_secret)) + self._eph_next
        for i in range(n):
            p = lo + (start + i) % n
            if p in self.bound or p in self.listeners:
                continue
            if rip and (rip, rport, p) in self.conns:
                continue
            self._eph_next += i + 1
            return p
        raise OSError(errno.EADDRNOTAVAIL, "no free ephemeral port")

    def _bind_port(self, sock: Sock, ip: int, port: int) -> None:
        sock.bound = (ip, port)
        self.bound.setdefault(port, []).append(sock)

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
            st = sock.ccb.state
            return -errno.EALREADY if st == State.SYN_SENT else -errno.EISCONN
        if rport == 0:
            return -errno.ECONNREFUSED
        if sock.bound is None:
            try:
                port = self._ephemeral(sock, rip, rport)
            except OSError as e:
                return -(e.errno or errno.EADDRNOTAVAIL)
            self._bind_port(sock, self.my_ip, port)
        lport = sock.bound[1]  # type: ignore[index]
        if (rip, rport, lport) in self.conns:
            return -errno.EADDRNOTAVAIL
        c = self._new_ccb(self.my_ip, lport, rip, rport, now)
        c.sock = sock
        c.uid = sock.uid
        sock.ccb = c
        c.state = State.SYN_SENT
        c.adv_mss = self._adv_mss(sock)
        c.mss = c.adv_mss
        c.snd_nxt = c.snd_max = (c.iss + 1) & M32
        self.conns[c.key] = c
        sock.set_addresses(self.my_ip, lport, rip, rport)
        sock.set_state(lib.TOE_SS_CONNECTING)
        self.stats.active_opens += 1

        def resolved(mac: bytes | None, t: float) -> None:
            self._syn_resolved(c, mac, t)

        self.arp.resolve(rip, now, resolved)
        return -errno.EINPROGRESS

    def _syn_resolved(self, c: Ccb, mac: bytes | None, now: float) -> None:
        if c.state != State.SYN_SENT or self.conns.get(c.key) is not c:
            return
        if mac is None:
            self._fail(c, errno.EHOSTUNREACH, now)
            return
        c.peer_mac = mac
        self._send_syn(c, now)

    def accept(self, lsock: Sock, child_sock: Sock, now: float) -> Ccb | None:
        lst = lsock.listener
        if lst is None:
            return None
        while lst.queue:
            c = lst.queue.popleft()
            self._update_pending(lst)
            if self.conns.get(c.key) is not c and c.state != State.TIME_WAIT:
                continue          # reset while waiting in the queue
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
            sock.release()
            return
        c = sock.ccb
        if c is None:
            self.unbind(sock)
            sock.release()
            return
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
        self._keepalive_arm(c, now)
        if c.state in SEND_STATES:
            self.try_send(c, now)

    def _close_tx(self, c: Ccb, now: float) -> None:
        if c.fin_wanted:
            return
        c.fin_wanted = True
        self.try_send(c, now)

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
            c.wnd_wait = True
            self.wnd_watch.add(c)
            s.arm_rx_window()
        return w

    def _emit(self, c: Ccb, seq: int, flags: int, options: bytes = b"", payload=(), n: int = 0) -> None:
        if flags & T.ACK:
            ack = c.rcv_nxt
            window = self._window(c, bool(flags & T.SYN))
            c.ack_pending = False
        else:
            ack = 0
            window = self._window(c, True) if flags & T.SYN else 0
        self.tx.segment(c.key, c.peer_mac, c.local_ip, c.remote_ip, c.local_port, c.remote_port,
                           seq, ack, flags, window, options, payload, n, c.mss)
        c.segs_out += 1

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
        self._send_rst_for(c, now)
        self._free(c)

    def _send_rst_for(self, c: Ccb, now: float) -> None:
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

    def _on_timer(self, c: Ccb, now: float) -> None:
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

    # ==================================================================
    # input
    # ==================================================================

    def input(self, seg: "Segment", now: float) -> None:
        c = self.conns.get((seg.src, seg.sport, seg.dport))
        if c is None:
            self._no_connection(seg, now)
            return
        c.segs_in += 1
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
        if c.ack_pending:
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
        self.conns[c.key] = c
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
                c.cwnd += acked                        # slow start, per byte acked (RFC 3465)
            else:
                c.cwnd += max(c.mss * acked // c.cwnd, 1)   # congestion avoidance
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
        if c.ooo:
            self._ooo_drain(c)
        c.ack_pending = True
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

    def _maybe_window_update(self, c: Ccb, now: float, force: bool = False) -> None:
        """The application freed RX space: advertise it if it grew enough (RFC 9293 3.8.6.2.2)."""
        s = c.sock
        if s is None or not s.mapped:
            return
        space = self._rcv_space(c)
        buf = self._rcv_buf(s)
        adv = (c.rcv_adv - c.rcv_nxt) & M32
        c.wnd_wait = False
        if force or space - adv >= min(buf // 4, 8 * c.mss) or (adv < c.mss <= space):
            self.ackgen.window_updates += 1
            self.send_ack(c)
        elif space < buf // 2:
            c.wnd_wait = True
            self.wnd_watch.add(c)
            s.arm_rx_window()

    # ==================================================================
    # endings
    # ==================================================================

    def _time_wait(self, c: Ccb, now: float) -> None:
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
            s.release()
            s.ccb = None
            c.sock = None

    def _free(self, c: Ccb) -> None:
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
            if c.state not in (State.SYN_SENT, State.SYN_RCVD) or c.bytes_in or c.bytes_out:
                info = c.info()
                info["closed_from"] = info["state"]
                info["state"] = "CLOSED"
                self.closed.append(info)
                self.closed_count += 1
                self.closed_bytes_in += c.bytes_in
                self.closed_bytes_out += c.bytes_out
        self._disarm(c)
        self.timers.cancel(c.ka_timer)
        prev = c.state
        c.state = State.CLOSED
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
                s.release()
                s.ccb = None
            elif s.mapped and prev not in (State.TIME_WAIT,):
                s.closed_if_reset()
        c.sock = None if (s is None or s.app_closed) else s

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
