"""The offload daemon: one emulated TOE adapter on one TAP device.

`run(config)` sets the adapter up (namespace, TAP, kernel-side address,
control and inspection sockets), runs the event loop until SIGTERM/SIGINT,
and tears everything down. The loop is the only reader of the clock: it
passes `now` to every handler.

Event sources: the TAP (frames), the control socket (one channel per
application process), every offloaded socket's B end (doorbells, lifetime),
the inspection API, timers, and signals (through a wake-up pipe).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import os
import secrets
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque

from nic_model._fastpath import lib as fp_lib

from nic_model import fastpath as fpmod
from nic_model import rx as rxmod
from nic_model.counters import AckGenCounters
from nic_model.pools import BufferPool
from nic_model.tap import TapError, TapPort
from nic_model.tx import MAX_TSO_BYTES, TxEngine
from nic_model.wire import ethernet, vnet

from . import access, stat_answer
from .abi import csum, ffi, lib
from .api import ApiServer, Peer, RequestError
from .arp import ArpTable
from .byteorder import from_be16, from_be32, to_be16, to_be32
from .config import RUN_DIR, AdapterConfig, log_path
from .fastpath import FastPath
from .host import ControlServer, HostIfCounters, HostSocket, ProcessCtx, unix_listener
from .host_setup import SetupError, configure_kernel_side, enter_netns, raise_fd_limit
from .tcp import SEND_STATES, TcpEnv, TcpStack
from .timers import Timers

RX_BATCH = 128
HANDOVER_REASONS = {1: "loopback", 2: "outside the adapter's subnet", 3: "bind to another address",
                    4: "adapter said so", 5: "adapter unreachable", 6: "accepted through the kernel"}
POOL_BUFFERS = 256
POOL_BUF_BYTES = 65536 + 256
EP_B = select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP
MAX_CHANNELS = 4096                 # control channels (processes) at once


class BadCommand(Exception):
    """A malformed command (counted in bad_commands), answered -errno."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


def _log_exception(what: str) -> None:
    """One handler failed: the traceback goes to the log (stderr), the loop goes on."""
    print(f"toe: error in {what} (the event loop goes on):", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


class Adapter:
    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg
        self.my_ip = int(cfg.iface.ip)
        self.network = cfg.iface.network
        self.my_mac = bytes([0x02]) + os.urandom(5)
        self.offloads = cfg.offloads
        self.timers = Timers()
        self.started = time.monotonic()
        self.counters_host = HostIfCounters()
        self.ackgen = AckGenCounters()
        self.socks: dict[int, HostSocket] = {}
        self.by_b: dict[int, HostSocket] = {}
        self.by_kl: dict[int, HostSocket] = {}      # kernel listening sockets of INADDR_ANY listeners
        self.by_cookie: dict[int, HostSocket] = {}  # SO_COOKIE of A -> socket (ADOPT)
        self.pid_sockets: dict[int, int] = {}       # open sockets per process (the per-process limit)
        self.ring_limit = cfg.ring_limit_bytes()
        self.exited: deque[ProcessCtx] = deque(maxlen=32)
        self.running = True
        self.tap: TapPort | None = None
        self.ctl: ControlServer | None = None
        self.api: ApiServer | None = None
        self.fp: FastPath | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if os.geteuid() != 0:
            raise SetupError("the adapter needs root (CAP_NET_ADMIN) to create a TAP device")
        if cfg.netns:
            enter_netns(cfg.netns)
        if not os.path.exists("/dev/net/tun"):
            raise SetupError("/dev/net/tun is missing (load the tun module: modprobe tun)")
        try:
            self.tap = TapPort(cfg.tap, cfg.offloads, pcap=cfg.pcap)
        except TapError as e:
            raise SetupError(str(e)) from None
        configure_kernel_side(cfg)
        self.pool = BufferPool(POOL_BUFFERS, POOL_BUF_BYTES, mapper=ffi.from_buffer, reuse=cfg.buffer_reuse)
        self.rx = rxmod.RxChecker(self.my_mac, self.my_ip, csum)
        # frames the compiled RX checker classified (and counted) before punting them are
        # parsed again for the software path by this one, whose counters are not shown
        self.rx_again = rxmod.RxChecker(self.my_mac, self.my_ip, csum)
        self.tx = TxEngine(self.tap, self.my_mac, cfg.offloads, csum)
        self.tx_max_payload = min(MAX_TSO_BYTES, 65535 - 40 - 40)
        self.arp = ArpTable(self.my_ip, self.my_mac, self.tx, self.timers)
        self.tcp = TcpStack(TcpEnv(cfg=cfg, my_ip=self.my_ip, timers=self.timers, tx=self.tx,
                                   arp=self.arp, ackgen=self.ackgen, offloads=self.offloads,
                                   tx_max_payload=self.tx_max_payload))
        # per socket: B, the memfd (for ADOPT) and the dup CPython's mmap keeps of it
        raise_fd_limit(3 * cfg.max_sockets + MAX_CHANNELS + 1024)
        try:
            for note in access.ensure_run_dir(RUN_DIR):
                print(f"toe: {RUN_DIR}: {note}", file=sys.stderr)
        except OSError as e:
            raise SetupError(str(e)) from None
        self.ep = select.epoll()
        ctl_sock = unix_listener(cfg.ctl_path, socket.SOCK_SEQPACKET, 128)
        api_sock = unix_listener(cfg.api_path, socket.SOCK_STREAM, 16)
        for path in (cfg.ctl_path, cfg.api_path):
            try:
                access.secure_socket(path, cfg)
            except OSError as e:
                raise SetupError(f"cannot restrict {path} to the allowed users: {e}") from None
        self.ctl = ControlServer(ctl_sock, self, self._judge_channel)
        self.api = ApiServer(api_sock, self.handle_api, self.ep,
                             allowed=lambda p: access.peer_allowed(p.uid, p.gid, p.groups, cfg))
        self.ep.register(self.tap.fd, select.EPOLLIN)
        self.ep.register(ctl_sock.fileno(), select.EPOLLIN)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.ep.register(self._sig_r, select.EPOLLIN)
        if cfg.fastpath and not cfg.pcap:
            try:
                units = fpmod.FastPathUnits(cfg.max_sockets, self.tap.fd, self.ep.fileno(), self.my_ip,
                                            self.my_mac, cfg.offloads, self.tx_max_payload, self.pool.bufs)
            except fpmod.FastPathError as e:
                raise SetupError(str(e)) from None
            units.st.poll_us = cfg.poll_us
            units.st.no_reuse = int(not cfg.buffer_reuse)
            try:
                units.start_procs(cfg.fastpath_procs)
            except fpmod.FastPathError as e:
                raise SetupError(str(e)) from None
            self.fp = FastPath(units, self.tcp, cfg.offloads, self.tx_max_payload)
            self.tcp.fast = self.tcp.env.fast = self.fp
        state = {"pid": os.getpid(), "tap": cfg.tap, "addr": cfg.addr, "host_addr": cfg.host_addr,
                 "netns": cfg.netns, "netns_created": cfg.netns_created, "ctl": cfg.ctl_path,
                 "api": cfg.api_path, "log": log_path(cfg.tap), "mac": ethernet.mac_str(self.my_mac),
                 "offloads": cfg.offloads, "fastpath": self.fp is not None,
                 "poll_us": cfg.poll_us if self.fp is not None else 0,
                 "fastpath_procs": cfg.fastpath_procs if self.fp is not None else 0}
        tmp = cfg.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, cfg.state_path)

    def _on_signal(self, signum, frame) -> None:
        self.running = False

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        if self.fp is not None:
            self._loop_fast()
            return
        tap_fd = self.tap.fd  # type: ignore[union-attr]
        ctl_fd = self.ctl.sock.fileno()  # type: ignore[union-attr]
        procs = self.ctl.procs  # type: ignore[union-attr]
        api = self.api
        by_b = self.by_b
        timers = self.timers
        while self.running:
            now = time.monotonic()
            d = timers.next_deadline()
            timeout = -1.0 if d is None else max(0.0, d - now)
            try:
                events = self.ep.poll(timeout, 256)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, ev in events:
                try:
                    if fd == tap_fd:
                        self._tap_rx(now)
                    elif fd in by_b:
                        self._b_event(by_b[fd], ev, now)
                    elif fd in self.by_kl:
                        self.by_kl[fd].wake()          # a connection arrived through the kernel
                    elif fd in procs:
                        if not self.ctl.serve(procs[fd], now):  # type: ignore[union-attr]
                            self._proc_gone(procs[fd])
                    elif fd == ctl_fd:
                        self._accept_channels()
                    elif api is not None and api.owns(fd):
                        api.event(fd, ev)
                    elif fd == self._sig_r:
                        try:
                            os.read(self._sig_r, 64)
                        except OSError:
                            pass
                except Exception:
                    self._event_failed(fd)
            try:
                timers.poll(now)
                self.tcp.flush(now)
            except Exception:
                self.counters_host.handler_errors += 1
                _log_exception("timers")

    def _loop_fast(self) -> None:
        """The loop with the compiled fast path: fp_poll waits and handles, in C, the frames
        and doorbells of the connections the units own; what it hands back is handled here,
        in order, then timers, owed ACKs, and the hand-over of connections to the units."""
        fp = self.fp
        assert fp is not None
        st = fp.st
        events = fp.units.events
        timers = self.timers
        fd_ev, frame_ev = fp_lib.FP_EV_FD, fp_lib.FP_EV_FRAME
        poll = fp_lib.fp_poll
        while self.running:
            d = timers.next_deadline()
            # ms, at most an hour (a deadline far away, e.g. a keepalive of 2^32 s, still fits)
            timeout = -1 if d is None else min(max(0, math.ceil((d - time.monotonic()) * 1000.0)), 3_600_000)
            n = poll(st, timeout)
            now = time.monotonic()
            for i in range(n):
                e = events[i]
                kind = e.kind
                fd = e.fd
                try:
                    if kind == frame_ev:
                        self._sw_frame(e.buf, e.len, e.reason, now)
                    elif kind == fd_ev:
                        self._dispatch(fd, e.events, now)
                    else:
                        fp.conn_event(e.slot, e.reason, now)
                except Exception:
                    self._event_failed(fd)
            try:
                timers.poll(now)
                self.tcp.flush(now)
                fp.push_candidates()
            except Exception:
                self.counters_host.handler_errors += 1
                _log_exception("timers")

    def _dispatch(self, fd: int, ev: int, now: float) -> None:
        """An epoll event the fast path handed back."""
        procs = self.ctl.procs  # type: ignore[union-attr]
        if fd in self.by_b:
            self._b_event(self.by_b[fd], ev, now)
        elif fd in self.by_kl:
            self.by_kl[fd].wake()
        elif fd in procs:
            if not self.ctl.serve(procs[fd], now):  # type: ignore[union-attr]
                self._proc_gone(procs[fd])
        elif fd == self.ctl.sock.fileno():  # type: ignore[union-attr]
            self._accept_channels()
        elif fd == self.tap.fd:  # type: ignore[union-attr]
            self._tap_rx(now)
        elif self.api is not None and self.api.owns(fd):
            self.api.event(fd, ev)
        elif fd == self._sig_r:
            try:
                os.read(self._sig_r, 64)
            except OSError:
                pass

    def _sw_frame(self, i: int, n: int, reason: int, now: float) -> None:
        """A frame the compiled units handed to software, in the pool buffer they read it into."""
        buf = self.pool.views[i]
        check = self.rx.check if reason == fp_lib.FP_PUNT_UNPARSED else self.rx_again.check
        cls, obj = check(buf, n)
        self._rx_classified(cls, obj, i, now)

    def _event_failed(self, fd: int) -> None:
        """A handler raised: log and count it, and drop what it was serving (a channel, a
        socket: reset) so that the same input cannot fail again and again."""
        self.counters_host.handler_errors += 1
        _log_exception(f"the handler of fd {fd}")
        try:
            procs = self.ctl.procs  # type: ignore[union-attr]
            if fd in procs:
                self._proc_gone(procs[fd])
            elif fd in self.by_b:
                s = self.by_b[fd]
                if s.ccb is not None:
                    self.tcp.own(s.ccb)
                    self.tcp.abort(s.ccb, time.monotonic())
                s.set_error(errno.EIO)
        except Exception:
            _log_exception("dropping a failed client")

    def _accept_channels(self) -> None:
        ctl = self.ctl
        assert ctl is not None
        while True:
            ctx = ctl.accept()
            if ctx is None:
                return
            if len(ctl.procs) > MAX_CHANNELS:
                self.counters_host.refused_channels += 1
                del ctl.procs[ctx.conn.fileno()]
                ctx.conn.close()
                continue
            self.ep.register(ctx.conn.fileno(), select.EPOLLIN)

    def _judge_channel(self, conn: socket.socket) -> tuple[int, int, int, bool]:
        pid, uid, gid, groups = access.peer_creds(conn)
        return pid, uid, gid, access.peer_allowed(uid, gid, groups, self.cfg)

    def _tap_rx(self, now: float) -> None:
        pool = self.pool
        check = self.rx.check
        for _ in range(RX_BATCH):
            i = pool.get()
            try:
                buf = pool.views[i]
                n = self.tap.recv_into(buf)  # type: ignore[union-attr]
                if n < 0:
                    return
                cls, obj = check(buf, n)
                self._rx_classified(cls, obj, i, now)
            finally:
                pool.put(i)
        # more frames may be waiting: the TAP stays readable, epoll reports it again

    def _rx_classified(self, cls: int, obj, i: int, now: float) -> None:
        if cls == rxmod.TCP_DATA or cls == rxmod.TCP_SYN:
            obj.handle = self.pool.handles[i]
            obj.buf = self.pool.bufs[i]
            self.tcp.input(obj, now)
        elif cls == rxmod.ARP:
            self.arp.input(obj, now)
        elif cls == rxmod.ICMP:
            ip, msg = obj
            self.arp.icmp_input(ip, msg, bytes(self.pool.views[i][vnet.LEN + 6:vnet.LEN + 12]))

    def _b_event(self, s: HostSocket, ev: int, now: float) -> None:
        if s.ccb is not None:
            self.tcp.own(s.ccb)
        if ev & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            # A's last reference is gone: the application closed the socket (or died)
            self.ep.unregister(s.b_fd)
            del self.by_b[s.b_fd]
            s.drain()
            s.close_b()
            self.counters_host.app_closes += 1
            self._unregister(s)
            self._drop_kernel_listener(s)
            self.tcp.app_closed(s, now)
            return
        self.counters_host.doorbells += 1
        c = s.ccb
        # Drain B (A writable again) unless the shim waits with A stuffed for its socket
        # to become writable: then A stays stuffed until it is (toe_tx_wake). A shim
        # that stuffed A and found it writable after all is not waiting: its A is drained
        # here, or a later doorbell would find A stuffed and be lost. Only the bytes
        # counted before the header is read are drained: filler written after that
        # stays (see drain()).
        if c is not None and c.state in SEND_STATES and s.mapped:
            queued = s.queued()
            if not s.shm.tx_full_wait or lib.toe_tx_writable(s.shm):
                s.drain(queued)
        self.tcp.doorbell(s, now)

    def _proc_gone(self, ctx: ProcessCtx) -> None:
        fd = ctx.conn.fileno()
        if self.ctl.procs.pop(fd, None) is None:  # type: ignore[union-attr]
            return
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        ctx.conn.close()
        ctx.alive = False
        ctx.drop_all()               # its sockets live on in whoever still holds their A ends
        if ctx.commands and ctx.allowed:
            self.exited.append(ctx)  # `toe stat` after a short `toe run` still shows what it did

    # ------------------------------------------------------------------ commands

    def _limit_error(self, ctx: ProcessCtx) -> int:
        """0, or the errno the kernel would give for the limit a new socket hits."""
        cfg = self.cfg
        if self.pid_sockets.get(ctx.pid, 0) >= cfg.max_process_sockets:
            return errno.EMFILE                 # per process (all its channels), like RLIMIT_NOFILE
        if len(self.socks) >= cfg.max_sockets:
            return errno.ENFILE                 # adapter-wide, like the system file table
        shm = lib.TOE_SHM_HDR_SIZE + cfg.tx_ring_bytes + cfg.rx_ring_bytes
        if HostSocket.mapped_bytes + shm > self.ring_limit:
            return errno.ENOBUFS                # ring memory
        return 0

    def _new_sock(self, ctx: ProcessCtx, fds: list[int], shm_bytes: int) -> HostSocket:
        """A socket from [B, memfd, A] (SOCKET, ACCEPT). Takes B and memfd out of `fds`
        (set to -1) once they are the socket's; A, and everything on failure, stays for
        the caller to close."""
        cfg = self.cfg
        err = self._limit_error(ctx)
        if err:
            self.counters_host.limit_refusals += 1
            raise OSError(err, "limit")
        if len(fds) != 3 or shm_bytes != lib.TOE_SHM_HDR_SIZE + cfg.tx_ring_bytes + cfg.rx_ring_bytes:
            raise OSError(errno.EINVAL, "expected [B, memfd, A] and the adapter's ring sizes")
        b_fd, memfd, a_fd = fds
        if lib.toe_fd_unix_stream(b_fd) < 0 or lib.toe_fd_unix_stream(a_fd) < 0:
            raise OSError(errno.EINVAL, "A and B must be AF_UNIX stream sockets")
        cookie = lib.toe_fd_cookie(a_fd)
        if not cookie or cookie in self.by_cookie:
            raise OSError(errno.EINVAL, "A is not a new socket")
        os.set_blocking(b_fd, False)
        sid = self._new_id()
        fds[1] = -1                              # HostSocket owns memfd from here, even on failure
        s = HostSocket(sid, ctx, b_fd, memfd, cfg.tx_ring_bytes, cfg.rx_ring_bytes, cookie)
        fds[0] = -1
        return s

    def _new_id(self) -> int:
        """Socket ids are random: a process cannot guess another's (and may name only its own)."""
        while True:
            sid = secrets.randbits(32)
            if sid and sid not in self.socks:
                return sid

    def _register(self, s: HostSocket, pooled: bool = False) -> None:
        self.socks[s.id] = s
        self.by_b[s.b_fd] = s
        self.by_cookie[s.cookie] = s
        s.proc.hold(s)
        self._count(s.proc, 1)
        if pooled:                               # counted as offloaded when it is first used
            s.pooled = True
            s.proc.pooled += 1
        else:
            s.proc.offloaded += 1
        self.ep.register(s.b_fd, EP_B)

    @staticmethod
    def _unpool(s: HostSocket) -> None:
        """A pooled socket is used (named by a command): the process's socket from now on."""
        if s.pooled:
            s.pooled = False
            s.proc.pooled -= 1
            s.proc.offloaded += 1

    def _count(self, ctx: ProcessCtx, n: int) -> None:
        """Sockets that count for ctx's process: per channel (toe stat) and per pid (limit)."""
        ctx.sockets += n
        left = self.pid_sockets.get(ctx.pid, 0) + n
        if left > 0:
            self.pid_sockets[ctx.pid] = left
        else:
            self.pid_sockets.pop(ctx.pid, None)

    def _unregister(self, s: HostSocket) -> None:
        """A's last reference is gone: nobody may name the socket any more."""
        self.socks.pop(s.id, None)
        if s.pooled:                             # closed unused (the process exited, say)
            s.pooled = False
            s.proc.pooled -= 1
        if self.by_cookie.get(s.cookie) is s:
            del self.by_cookie[s.cookie]
        for h in s.holders:
            h.socks.pop(s.id, None)
        s.holders.clear()
        self._count(s.proc, -1)

    # the operations by name (toe stat counts commands by operation)
    _OP_NAMES = {getattr(lib, n): n[len("TOE_OP_"):].lower() for n in dir(lib) if n.startswith("TOE_OP_")}
    # per process, not per connection: left out of the round trips a connection costs
    _PROCESS_OPS = ("hello", "fork", "handover")

    # descriptors each operation takes (SCM_RIGHTS); anything else is refused
    _FDS = {lib.TOE_OP_SOCKET: (3,), lib.TOE_OP_ACCEPT: (0, 3), lib.TOE_OP_LISTEN: (0, 1),
            lib.TOE_OP_ADOPT: (1,), lib.TOE_OP_SOCKETS: tuple(range(3, 3 * lib.TOE_POOL_BATCH + 1, 3))}

    def command(self, ctx: ProcessCtx, cmd, fds: list[int], rsp, now: float) -> bool:
        """Answer one command into rsp. Every descriptor in `fds` is either taken by the
        socket it belongs to or closed here, on every path. False: drop the channel."""
        self.counters_host.commands += 1
        op = cmd.op
        name = self._OP_NAMES.get(op, "unknown")
        by_op = self.counters_host.by_op
        by_op[name] = by_op.get(name, 0) + 1
        keep = True
        try:
            if len(fds) not in self._FDS.get(op, (0,)):
                raise BadCommand(errno.EINVAL)
            rsp.result = self._command(ctx, op, cmd, fds, rsp, now)
        except BadCommand as e:
            rsp.result = -e.errno
            self.counters_host.bad_commands += 1
        except OSError as e:
            rsp.result = -(e.errno or errno.EINVAL)
            if rsp.result == -errno.EINVAL:     # a descriptor or size that is not what the op takes
                self.counters_host.bad_commands += 1
        except Exception:                       # a bug met by someone's input: log, count, drop
            self.counters_host.handler_errors += 1
            _log_exception(f"command op {op} from pid {ctx.pid}")
            rsp.result = -errno.EIO
            keep = False
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        if rsp.result < 0:
            self.ctl.rsp_fds = []  # type: ignore[union-attr]
        return keep

    def _command(self, ctx: ProcessCtx, op: int, cmd, fds: list[int], rsp, now: float) -> int:
        if op == lib.TOE_OP_HELLO:
            rsp.addr_be32 = to_be32(self.my_ip)
            rsp.prefix_len = self.network.prefixlen
            rsp.netmask_be32 = to_be32(int(self.network.netmask))
            rsp.tx_ring_bytes = self.cfg.tx_ring_bytes
            rsp.rx_ring_bytes = self.cfg.rx_ring_bytes
            rsp.daemon_pid = os.getpid()
            rsp.abi_version = lib.TOE_ABI_VERSION
            return 0
        if op == lib.TOE_OP_SOCKET:
            s = self._new_sock(ctx, fds, cmd.shm_bytes)
            self._register(s)
            self.counters_host.sockets += 1
            rsp.sock_id = s.id
            return 0
        if op == lib.TOE_OP_SOCKETS:
            return self._sockets(ctx, cmd, fds)
        if op == lib.TOE_OP_ADOPT:
            return self._adopt(ctx, fds, rsp)
        if op == lib.TOE_OP_FORK:
            return self._fork_channel(ctx)
        if op == lib.TOE_OP_HANDOVER:
            # statistics only; the socket itself may already be gone (handing over replaced
            # A, and B's end-of-file can be seen before this command)
            reason = HANDOVER_REASONS.get(cmd.arg0)
            if reason is None:
                raise BadCommand(errno.EINVAL)
            ctx.handover_reasons[reason] = ctx.handover_reasons.get(reason, 0) + 1
            if cmd.arg1:                       # strict mode: the shim refused it
                ctx.refused += 1
                self.counters_host.handovers_refused += 1
            else:
                ctx.handovers += 1
                self.counters_host.handovers += 1
            return 0
        if op not in (lib.TOE_OP_BIND, lib.TOE_OP_LISTEN, lib.TOE_OP_CONNECT, lib.TOE_OP_ACCEPT,
                      lib.TOE_OP_SHUTDOWN, lib.TOE_OP_SETSOCKOPT, lib.TOE_OP_WAKE):
            raise BadCommand(errno.EOPNOTSUPP)
        named = ctx.socks.get(cmd.sock_id)
        if named is None or not named.mapped:
            self.counters_host.foreign_ids += 1
            return -errno.EBADF                 # not a socket of this channel
        s = named
        self._unpool(s)
        if op == lib.TOE_OP_WAKE:
            # the kick of a shim whose A is stuffed: look at the socket as for a doorbell
            self.counters_host.wakes += 1
            self.tcp.doorbell(s, now)
            return 0
        if op == lib.TOE_OP_BIND:
            ip, port = from_be32(cmd.addr_be32), from_be16(cmd.port_be16)
            if ip not in (0, self.my_ip):
                rsp.flags = lib.TOE_RF_HANDOVER
                return 0
            return self.tcp.bind(s, ip, port)
        if op == lib.TOE_OP_LISTEN:
            if fds and (lib.toe_fd_tcp_listener(fds[0]) < 0 or s.kernel_listener >= 0):
                raise BadCommand(errno.EINVAL)
            r = self.tcp.listen(s, cmd.arg0)
            if r == 0 and fds:
                self._kernel_listener(s, fds[0])
                fds[0] = -1
            return r
        if op == lib.TOE_OP_CONNECT:
            ip, port = from_be32(cmd.addr_be32), from_be16(cmd.port_be16)
            if ip == self.my_ip or ipaddress.IPv4Address(ip) not in self.network \
                    or ip == int(self.network.broadcast_address) \
                    or ip == int(self.network.network_address):
                rsp.flags = lib.TOE_RF_HANDOVER
                return 0
            return self.tcp.connect(s, ip, port, now)
        if op == lib.TOE_OP_ACCEPT:
            return self._accept(ctx, s, cmd, fds, rsp, now)
        if op == lib.TOE_OP_SHUTDOWN:
            if cmd.arg0 not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
                return -errno.EINVAL
            return self.tcp.shutdown(s, cmd.arg0, now)
        self.tcp.setsockopt(s, cmd.arg0, cmd.arg1, now)
        return 0

    def _sockets(self, ctx: ProcessCtx, cmd, fds: list[int]) -> int:
        """SOCKETS: a batch of sockets for the shim's pool, [B, memfd, A] each (cmd.arg0 of
        them). Each is checked and registered as SOCKET's; its id goes into its own header.
        Registration stops at the first socket refused (a limit, a bad descriptor): the
        answer is how many were registered, or that socket's error if none was."""
        n = cmd.arg0
        if n * 3 != len(fds):
            raise BadCommand(errno.EINVAL)
        done = 0
        for i in range(n):
            part = fds[3 * i:3 * i + 3]
            try:
                s = self._new_sock(ctx, part, cmd.shm_bytes)
            except OSError:
                if done:
                    break
                raise
            finally:
                fds[3 * i:3 * i + 3] = part        # what the socket took is -1: not closed twice
            self._register(s, pooled=True)
            s.shm.sock_id = s.id
            self.counters_host.sockets += 1
            self.counters_host.pooled += 1
            done += 1
        return done

    def _accept(self, ctx: ProcessCtx, ls: HostSocket, cmd, fds: list[int], rsp, now: float) -> int:
        """ACCEPT into a socket passed with the command ([B, memfd, A]), or, without
        descriptors, into one of the channel's own unconnected sockets named by arg1 (a
        socket of the shim's pool)."""
        if ls.listener is None:
            return -errno.EINVAL
        pooled = None
        if not fds:
            pooled = ctx.socks.get(cmd.arg1 & 0xFFFFFFFF)
            if pooled is None or not pooled.mapped:
                self.counters_host.foreign_ids += 1
                return -errno.EBADF
            if pooled is ls or pooled.ccb is not None or pooled.listener is not None or pooled.bound:
                return -errno.EINVAL             # not a fresh socket
        if not ls.listener.queue:
            return -errno.EAGAIN
        child = pooled if pooled is not None else self._new_sock(ctx, fds, cmd.shm_bytes)
        if pooled is not None:
            self._unpool(pooled)
        c = self.tcp.accept(ls, child, now)
        if c is None:
            if pooled is None:
                child.close_b()
                child.release()
            return -errno.EAGAIN
        if pooled is None:
            self._register(child)
        self.counters_host.accepts += 1
        rsp.sock_id = child.id
        rsp.addr_be32 = to_be32(c.remote_ip)
        rsp.port_be16 = to_be16(c.remote_port)
        if ls.listener.queue:
            ls.wake()
        return 0

    def _kernel_listener(self, s: HostSocket, fd: int) -> None:
        """LISTEN on INADDR_ANY may carry the app's kernel listening socket on the same port:
        watch it, so A is readable when a connection waits there too (both paths accepted)."""
        os.set_blocking(fd, False)
        self.ep.register(fd, select.EPOLLIN | select.EPOLLET)
        s.kernel_listener = fd
        self.by_kl[fd] = s

    def _drop_kernel_listener(self, s: HostSocket) -> None:
        fd = s.kernel_listener
        if fd >= 0:
            s.kernel_listener = -1
            self.by_kl.pop(fd, None)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            os.close(fd)

    def _adopt(self, ctx: ProcessCtx, fds: list[int], rsp) -> int:
        """A process proves it holds a socket by passing its A end (inherited across exec,
        or received over a Unix socket); it gets the memfd and may name the socket."""
        a_fd = fds[0]
        if lib.toe_fd_unix_stream(a_fd) < 0:
            raise BadCommand(errno.EINVAL)
        s = self.by_cookie.get(lib.toe_fd_cookie(a_fd))
        if s is None or not s.mapped or s.memfd < 0:
            return -errno.ENOENT
        self.ctl.rsp_fds = [s.memfd]  # type: ignore[union-attr]
        rsp.sock_id = s.id
        rsp.tx_ring_bytes = s.tx_size
        rsp.rx_ring_bytes = s.rx_size
        ctx.hold(s)
        if s.proc is not ctx:
            self._count(s.proc, -1)        # the socket now counts for the adopter
            s.proc = ctx
            s.pid = ctx.pid
            s.uid = ctx.uid
            self._count(ctx, 1)
            ctx.offloaded += 1
        self.counters_host.adoptions += 1
        return 0

    def _fork_channel(self, ctx: ProcessCtx) -> int:
        """FORK: a new channel for a child about to be forked, holding the same sockets.
        Made now, while the parent can still reach the daemon: a child that chroots,
        changes user or enters a seccomp sandbox before its first call keeps working."""
        if len(self.ctl.procs) >= MAX_CHANNELS:  # type: ignore[union-attr]
            return -errno.ENFILE
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.ctl.add_channel(mine, ctx)  # type: ignore[union-attr]
        self.ep.register(mine.fileno(), select.EPOLLIN)
        fd = theirs.detach()
        self.ctl.rsp_fds = [fd]  # type: ignore[union-attr]
        self.ctl.rsp_close = [fd]  # type: ignore[union-attr]
        self.counters_host.fork_channels += 1
        return 0

    # ------------------------------------------------------------------ inspection

    def handle_api(self, req: dict, peer: Peer) -> dict:
        """The inspection API is read-only. Root sees everything; another user sees the
        adapter's totals and counters, and only its own connections and processes."""
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "tap": self.cfg.tap}
        if cmd == "stat":
            return self.stat(None if peer.uid == 0 else peer.uid)
        raise RequestError(f"unknown command {cmd!r}")

    def stat(self, uid: int | None = None) -> dict:
        """`toe stat`'s data; with `uid`, only what belongs to that user (stat_answer.py)."""
        return stat_answer.adapter_stat(self, uid)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        now = time.monotonic()
        if self.fp is not None:
            self.fp.close()
        tcp = getattr(self, "tcp", None)
        if tcp is not None:
            for c in list(tcp.conns.values()):
                tcp._send_rst_for(c, now)
        for s in list(self.socks.values()):
            if s.kernel_listener >= 0:
                os.close(s.kernel_listener)
                s.kernel_listener = -1
            s.close_b()
            s.release()
        if self.ctl is not None:
            self.ctl.close()
        if self.api is not None:
            self.api.close()
        for path in (self.cfg.ctl_path, self.cfg.api_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.tap is not None:
            self.tap.close()
        try:
            os.unlink(self.cfg.state_path)
        except FileNotFoundError:
            pass


def run(cfg: AdapterConfig) -> int:
    """Run the adapter until SIGTERM/SIGINT. Returns the exit status."""
    try:
        cfg.validate()
    except ValueError as e:
        print(f"toe: {e}", file=sys.stderr)
        return 1
    ad = Adapter(cfg)
    try:
        try:
            ad.setup()
        except SetupError as e:
            print(f"toe: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"toe: adapter setup failed: {e}", file=sys.stderr)
            return 1
        print(f"toe: adapter {cfg.tap} up: {cfg.addr} (mac {ethernet.mac_str(ad.my_mac)}), "
              f"kernel side {cfg.host_addr}, offloads {'on' if cfg.offloads else 'off'}",
              file=sys.stderr, flush=True)
        ad.loop()
        return 0
    finally:
        ad.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m offload_daemon",
                                description="Run one emulated TOE adapter (normally started by `toe up`).")
    p.add_argument("--config", required=True, help="AdapterConfig as JSON")
    a = p.parse_args(argv)
    try:
        fields = json.loads(a.config)
        cfg = AdapterConfig(**fields)
    except (ValueError, TypeError) as e:
        print(f"toe: bad --config: {e}", file=sys.stderr)
        return 1
    return run(cfg)
