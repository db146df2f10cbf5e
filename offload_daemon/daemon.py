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
import json
import math
import os
import select
import signal
import socket
import sys
import time
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
from .commands import MAX_CHANNELS, CommandHandler, log_exception
from .config import RUN_DIR, AdapterConfig, log_path
from .fastpath import FastPath
from .host import ControlServer, HostIfCounters, HostSocket, ProcessCtx, unix_listener
from .host_setup import SetupError, configure_kernel_side, enter_netns, raise_fd_limit
from .tcp import SEND_STATES, TcpEnv, TcpStack
from .timers import Timers

RX_BATCH = 128
ENDED_BATCH = 64          # connections the units ended, released at once even when not idle
POOL_BUFFERS = 256
POOL_BUF_BYTES = 65536 + 256


class Adapter(CommandHandler):
    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg
        self.my_ip = int(cfg.iface.ip)
        self.network = cfg.iface.network
        self.net_ints = (int(self.network.network_address), int(self.network.netmask),
                         int(self.network.broadcast_address))
        self.my_mac = bytes([0x02]) + os.urandom(5)
        self.offloads = cfg.offloads
        self.timers = Timers()
        self.started = time.monotonic()
        self.counters_host = HostIfCounters()
        self.ackgen = AckGenCounters()
        self.socks: dict[int, HostSocket] = {}
        self._ids: list[int] = []
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
        self._hc_gens = 0

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
            try:
                self.fp = FastPath(units, self.tcp, cfg.offloads, self.tx_max_payload)
            except fpmod.FastPathError as e:
                raise SetupError(str(e)) from None
            self.tcp.fast = self.tcp.env.fast = self.fp
            self.fp.units_closed = self._app_gone  # type: ignore[assignment]
            st = units.st
            self.arp.on_learn = lambda ip, mac, until: fp_lib.fp_hc_neighbour(st, ip, mac, until)
        state = {"pid": os.getpid(), "tap": cfg.tap, "addr": cfg.addr, "host_addr": cfg.host_addr,
                 "netns": cfg.netns, "netns_created": cfg.netns_created, "ctl": cfg.ctl_path,
                 "api": cfg.api_path, "log": log_path(cfg.tap), "mac": ethernet.mac_str(self.my_mac),
                 "offloads": cfg.offloads, "fastpath": self.fp is not None,
                 "poll_us": cfg.poll_us if self.fp is not None else 0, "app_poll_us": cfg.app_poll_us,
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
                log_exception("timers")

    def _loop_fast(self) -> None:
        """The loop with the compiled fast path: fp_poll waits and handles, in C, the frames
        and doorbells of the connections the units own; what it hands back is handled here,
        in order, then timers, owed ACKs, and the hand-over of connections to the units."""
        fp = self.fp
        assert fp is not None
        st = fp.st
        events = fp.units.events
        timers = self.timers
        fd_ev, frame_ev, connect_ev = fp_lib.FP_EV_FD, fp_lib.FP_EV_FRAME, fp_lib.FP_EV_CONNECT
        poll = fp_lib.fp_poll
        ctl = self.ctl
        assert ctl is not None
        ctl.defer = True                   # posted REUSEs wait for an idle pass (serve_posted)
        waiting = ctl.waiting
        while self.running:
            d = timers.next_deadline()
            # ms, at most an hour (a deadline far away, e.g. a keepalive of 2^32 s, still fits)
            timeout = -1 if d is None else min(max(0, math.ceil((d - time.monotonic()) * 1000.0)), 3_600_000)
            if fp.ended or waiting:
                timeout = 0                # connections to release, REUSEs to answer: look, then do them if idle
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
                    elif kind == connect_ev:
                        self._units_connected(e.buf, now)
                    else:
                        fp.conn_event(e.slot, e.reason, now)
                except Exception:
                    self._event_failed(fd)
            try:
                timers.poll(now)
                self.tcp.flush(now)
                fp.push_candidates()
                if fp.ended and (n == 0 or len(fp.ended) >= ENDED_BATCH):
                    fp.finish_ended(now)
                if waiting:
                    gone = ctl.serve_posted(now, n == 0)
                    if gone is not None:
                        self._proc_gone(gone)
            except Exception:
                self.counters_host.handler_errors += 1
                log_exception("timers")

    def _units_connected(self, i: int, now: float) -> None:
        """A CONNECT the units' command unit answered (nic_model/hw/host_cmd.c): the command
        counted as software counts its own, the connection made software's LazyCcb."""
        r = self.fp.hc_conns[i]  # type: ignore[union-attr]
        s = self.by_b[r.b_fd]
        s.hc = False                               # (the unit forgot it as it used it)
        self._unpool(s)
        ctx = s.proc
        ctx.commands += 1
        self.count_command("connect")
        self.tcp.units_connected(s, r, now)
        if r.lost:
            self._proc_gone(ctx)                   # it did not take its answer

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
        log_exception(f"the handler of fd {fd}")
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
            log_exception("dropping a failed client")

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
            self._app_gone(s)
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

    def _app_gone(self, s: HostSocket) -> None:
        """The host's part of an application's close: B (already out of the epoll set)
        and the tables that let a process name the socket. The TCP part is the engine's,
        or was the fast path's units' (FastPath.units_closed)."""
        del self.by_b[s.b_fd]
        s.close_b()                    # (A is gone: a close of B is cheaper than waking the reaper)
        self.counters_host.app_closes += 1
        self._unregister(s)
        self._drop_kernel_listener(s)

    def _proc_gone(self, ctx: ProcessCtx) -> None:
        fd = ctx.conn.fileno()
        if self.ctl.procs.pop(fd, None) is None:  # type: ignore[union-attr]
            return
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        self.hc_channel(ctx, False)
        self.ctl.drop_posted(ctx)  # type: ignore[union-attr]
        ctx.conn.close()
        ctx.alive = False
        ctx.drop_all()               # its sockets live on in whoever still holds their A ends
        ctx.drop_spares()
        if ctx.commands and ctx.allowed:
            self.exited.append(ctx)  # `toe stat` after a short `toe run` still shows what it did

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
            for ctx in self.ctl.procs.values():
                ctx.drop_spares()
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
        lib.toe_reap_stop()            # its last work done and the thread joined: we exit as one thread
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
