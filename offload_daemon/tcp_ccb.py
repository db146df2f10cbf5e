"""TCP engine: what its parts share (TcpStack itself is in tcp.py).

The constants, connection states, the connection control block (`Ccb`) and the
`Listener`; what the engine needs from the adapter around it (`TcpEnv`, `TxPort`,
`Resolver`) and from a host socket (`Sock`); the counters; and `TcpStackBase`, the
attributes `TcpStack.__init__` sets, which the output and input mixins
(tcp_output.py, tcp_input.py) work on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, Protocol

from nic_model.counters import AckGenCounters, UnitCounters

from .config import AdapterConfig
from .seq import M32, initial_seq
from .timers import Timer, Timers

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
DELACK_S = 0.040            # the longest an ACK waits for data to ride on (Linux: TCP_DELACK_MIN)
ATO_S = 0.040               # a reply within this of data received makes a connection interactive
CWND_MAX = 0x7FFFFFFF       # the fast path's CCB holds cwnd in 32 bits


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
    """Next-hop resolution (arp.ArpTable): cb(mac or None on failure, now); `lookup`: the
    cached address, if it is fresh (nothing sent, nothing queued)."""

    def resolve(self, ip: int, now: float, cb: Callable[[bytes | None, float], None]) -> None: ...
    def lookup(self, ip: int, now: float) -> bytes | None: ...


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
    fast: "FastOwner | None" = None     # the compiled fast path, when it is on


class FastOwner(Protocol):
    """The fast path as the engine sees it (offload_daemon.fastpath.FastPath): `own(c)` takes
    a connection back from the units before the software path touches it, and names it
    a candidate to hand back to them at the end of the loop pass; `offer(c)` names one the
    engine made (a connection whose SYN is out); `send_syn(c)` gives them a new connection
    to send the SYN of (False: the engine sends it). `tw_kept(key)`: the units keep
    that connection's TIME-WAIT (a record of theirs, nic_model/hw/time_wait.c);
    `tw_count(n)`: how many they keep, told that software keeps n; `tw_take(c)`: they take
    software's connection in TIME-WAIT as such a record (False: no room); `push_new(c)`:
    a LazyCcb connect() made goes to them at once, its SYN sent (False: software's);
    `took(c, slot)`: a LazyCcb of a connection the units made themselves (their command
    unit's connect()) is theirs at `slot`."""

    def own(self, c: "Ccb") -> None: ...
    def offer(self, c: "Ccb") -> None: ...
    def send_syn(self, c: "Ccb", now: float) -> bool: ...
    def tw_take(self, c: "Ccb", now: float) -> bool: ...
    def push_new(self, c: "Ccb", now: float) -> bool: ...
    def tw_kept(self, key: tuple[int, int, int]) -> bool: ...
    def tw_count(self, software: int) -> int: ...
    def took(self, c: "Ccb", slot: int) -> None: ...


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
    @property
    def b_fd(self) -> int: ...
    @property
    def b_shut(self) -> bool: ...

    def push(self, src_ptr, n: int, count_in: bool = False) -> bool: ...
    def b_was_shut(self) -> None: ...
    def wake(self) -> None: ...
    def rx_space(self) -> int: ...
    def drain(self, limit: int | None = None) -> bool: ...
    def shut_b(self) -> None: ...
    def shut_rd(self) -> None: ...
    def kernel_pending(self) -> bool: ...
    def release(self) -> None: ...
    def retire(self) -> None: ...
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
    def arm_rx_window(self, at: int | None = None) -> None: ...


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
    time_wait_overflow: int = 0      # closed without TIME-WAIT: --max-time-wait reached (Linux's
                                     # "time wait bucket table overflow")
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
        "rcv_unacked", "pingpong", "last_data_rx", "dack_timer", "fast_slot", "fast_data", "sw_data",
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
        self.timer = Timer(no_timer)
        self.timer_kind = ""
        self.ka_timer = Timer(no_timer)     # keepalive, beside the retransmission timer
        self.ka_probes = 0
        self.last_rx = now
        self.cork_since: float | None = None
        self.bytes_in = self.bytes_out = self.segs_in = self.segs_out = self.retransmits = 0
        self.created = now
        self.rcv_unacked = 0             # in-order bytes received since our last ACK
        self.pingpong = False            # interactive: ACKs wait (DELACK_S) for a reply to ride on
        self.last_data_rx = -1.0
        self.dack_timer = Timer(no_timer)
        self.fast_slot = -1              # the fast path's CCB slot while the units own it
        self.fast_data = 0               # data segments (in + out) the units handled
        self.sw_data = 0                 # ... the software path handled

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
            "path": "fast" if self.fast_slot >= 0 else "software",
            "data_fast": self.fast_data, "data_software": self.sw_data,
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


def no_timer(now: float) -> None:
    pass


class LazyCcb(Ccb):
    """A connection the units own from its SYN on (FastPath.push_new): only what names it
    is set here. It becomes a whole Ccb in place (the same object, its class switched:
    `fill_ccb`, by TcpStack.complete) when software first takes it (FastPath.own) or shows
    it (`toe stat`); one that ends in the units without software ever taking it is
    released as it is (FastPath.finish_ended). A connect() costs no Ccb of seventy fields
    and three timers, and its push no copy of them."""

    __slots__ = ()

    def __init__(self, cid: int, local_ip: int, local_port: int, remote_ip: int, remote_port: int,
                 now: float, iss: int, adv_mss: int):   # (no Ccb.__init__: that is the point)
        self.id = cid
        self.state = State.SYN_SENT
        self.local_ip, self.local_port = local_ip, local_port
        self.remote_ip, self.remote_port = remote_ip, remote_port
        self.key = (remote_ip, remote_port, local_port)
        self.listener = None
        self.orphan = False
        self.iss = iss
        self.snd_una = self.snd_sml = iss
        self.snd_nxt = self.snd_max = (iss + 1) & M32
        self.adv_mss = self.mss = adv_mss
        self.retries = 0
        self.created = now
        self.fast_slot = -1
        self.fast_data = self.sw_data = 0


# what LazyCcb.__init__ sets, and connect() after it: the rest is fill_ccb's
LAZY_SET = frozenset(("id", "state", "local_ip", "local_port", "remote_ip", "remote_port", "key", "listener",
                      "orphan", "iss", "snd_una", "snd_sml", "snd_nxt", "snd_max", "adv_mss", "mss", "retries",
                      "created", "fast_slot", "fast_data", "sw_data", "sock", "uid", "peer_mac"))


def _make_fill() -> Callable[[Ccb], None]:
    """fill(c): Ccb.__init__'s default for every field a LazyCcb does not have, one
    assignment each (generated from a Ccb made here; hasattr on ~50 empty slots costs ten
    times as much)."""
    t = Ccb(0, 0, 0, 0, 0, 0.0)
    scope: dict = {"Timer": Timer, "no_timer": no_timer}
    body = []
    for name in Ccb.__slots__:
        if name in LAZY_SET:
            continue
        v = getattr(t, name)
        if isinstance(v, Timer):
            body.append(f"    c.{name} = Timer(no_timer)")
        elif isinstance(v, (list, bytearray)):
            body.append(f"    c.{name} = {type(v).__name__}()")
        else:
            scope[f"_d_{name}"] = v
            body.append(f"    c.{name} = _d_{name}")
    exec("def fill(c):\n" + "\n".join(body) + "\n", scope)   # names: Ccb's own slots
    return scope["fill"]


_fill = _make_fill()


def fill_ccb(c: Ccb, some_set: bool = False) -> None:
    """A LazyCcb made whole: every field it does not have gets Ccb.__init__'s default (fresh
    lists, buffers and timers: the caller sets the timers' callbacks). `some_set`: fields
    beyond LAZY_SET were set meanwhile (FastPath.finish_ended's): keep those."""
    if some_set:
        keep = {n: getattr(c, n) for n in Ccb.__slots__ if n not in LAZY_SET and hasattr(c, n)}
        _fill(c)
        for n, v in keep.items():
            setattr(c, n, v)
    else:
        _fill(c)
    c.__class__ = Ccb



class TcpStackBase:
    """The attributes TcpStack.__init__ (tcp.py) sets, for the mixins that make up TcpStack
    (TcpOutput in tcp_output.py, TcpInput in tcp_input.py), and, for the type checker only,
    the methods of TcpStack's own that they call."""

    env: TcpEnv
    cfg: AdapterConfig
    my_ip: int
    timers: Timers
    tx: TxPort
    arp: Resolver
    ackgen: AckGenCounters
    offloads: bool
    tx_max_payload: int
    conns: dict[tuple[int, int, int], Ccb]
    listeners: dict[int, list[Listener]]
    bound: dict[int, list[Sock]]
    ids: Any                    # struct fp_ids * (nic_model/hw/fp.h)
    port_users: Any             # uint32_t[65536]
    our_mss: int
    dirty: set[Ccb]
    closed: "deque[tuple[Ccb, int | None, str]]"
    closed_bytes_in: int
    closed_bytes_out: int
    closed_count: int
    closed_data_fast: int
    closed_data_sw: int
    wnd_watch: set[Ccb]
    _wnd_timer: Timer
    stats: TcpCounters
    fast: FastOwner | None

    if TYPE_CHECKING:  # pragma: no cover
        # TcpStack's own (tcp.py), called from the output and input sides
        def _new_ccb(self, lip: int, lport: int, rip: int, rport: int, now: float) -> Ccb: ...
        def _add_conn(self, c: Ccb) -> None: ...
        def _arm(self, c: Ccb, kind: str, delay: float, now: float) -> None: ...
        def _disarm(self, c: Ccb) -> None: ...
        def _keepalive_arm(self, c: Ccb, now: float) -> None: ...
        def _update_pending(self, lst: Listener) -> None: ...
        def _time_wait(self, c: Ccb, now: float) -> None: ...
        def _fail(self, c: Ccb, err: int, now: float) -> None: ...
        def _free(self, c: Ccb) -> None: ...
        def own(self, c: Ccb) -> None: ...
