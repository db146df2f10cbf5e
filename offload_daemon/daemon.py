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
import os
import resource
import select
import signal
import sys
import time
from collections import deque

from nic_model import rx as rxmod
from nic_model.counters import AckGenCounters
from nic_model.pools import BufferPool
from nic_model.tap import TapError, TapPort
from nic_model.tx import MAX_TSO_BYTES, TxEngine
from nic_model.wire import ethernet

from .abi import csum, ffi, lib
from .api import ApiServer
from .arp import ArpTable
from .config import RUN_DIR, AdapterConfig, log_path
from .host import ControlServer, HostSocket, ProcessCtx, from_be16, from_be32
from .tcp import SEND_STATES, TcpStack, ip_str
from .timers import Timers

RX_BATCH = 128
HANDOVER_REASONS = {1: "loopback", 2: "outside the adapter's subnet", 3: "bind to another address",
                    4: "adapter said so", 5: "adapter unreachable", 6: "accepted through the kernel"}
POOL_BUFFERS = 256
POOL_BUF_BYTES = 65536 + 256
EP_B = select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP


class SetupError(Exception):
    """A reason the adapter cannot start, as one readable line."""


class Adapter:
    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg
        self.my_ip = int(cfg.iface.ip)
        self.network = cfg.iface.network
        self.my_mac = bytes([0x02]) + os.urandom(5)
        self.offloads = cfg.offloads
        self.timers = Timers()
        self.started = time.monotonic()
        self.counters_host = {"commands": 0, "bad_commands": 0, "sockets": 0, "accepts": 0,
                              "adoptions": 0, "handovers": 0, "handovers_refused": 0, "doorbells": 0,
                              "app_closes": 0}
        self.ackgen = AckGenCounters()
        self.socks: dict[int, HostSocket] = {}
        self.by_b: dict[int, HostSocket] = {}
        self.by_kl: dict[int, HostSocket] = {}      # kernel listening sockets of INADDR_ANY listeners
        self.exited: deque[ProcessCtx] = deque(maxlen=32)
        self._next_sid = 0
        self.running = True
        self.tap: TapPort | None = None
        self.ctl: ControlServer | None = None
        self.api: ApiServer | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if os.geteuid() != 0:
            raise SetupError("the adapter needs root (CAP_NET_ADMIN) to create a TAP device")
        if cfg.netns:
            _enter_netns(cfg.netns)
        if not os.path.exists("/dev/net/tun"):
            raise SetupError("/dev/net/tun is missing (load the tun module: modprobe tun)")
        try:
            self.tap = TapPort(cfg.tap, cfg.offloads, pcap=cfg.pcap)
        except TapError as e:
            raise SetupError(str(e)) from None
        _configure_kernel_side(cfg)
        self.pool = BufferPool(POOL_BUFFERS, POOL_BUF_BYTES, mapper=ffi.from_buffer)
        self.rx = rxmod.RxChecker(self.my_mac, self.my_ip, csum)
        self.tx = TxEngine(self.tap, self.my_mac, cfg.offloads, csum)
        self.tx_max_payload = min(MAX_TSO_BYTES, 65535 - 40 - 40)
        self.arp = ArpTable(self.my_ip, self.my_mac, self.tx, self.timers)
        self.tcp = TcpStack(self)
        os.makedirs(RUN_DIR, exist_ok=True)
        self.ctl = ControlServer(cfg.ctl_path, self)
        self.api = ApiServer(cfg.api_path, self.handle_api)
        self.ep = select.epoll()
        self.handlers: dict[int, object] = {}
        self.ep.register(self.tap.fd, select.EPOLLIN)
        self.ep.register(self.ctl.sock.fileno(), select.EPOLLIN)
        self.ep.register(self.api.sock.fileno(), select.EPOLLIN)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.ep.register(self._sig_r, select.EPOLLIN)
        state = {"pid": os.getpid(), "tap": cfg.tap, "addr": cfg.addr, "host_addr": cfg.host_addr,
                 "netns": cfg.netns, "netns_created": cfg.netns_created, "ctl": cfg.ctl_path,
                 "api": cfg.api_path, "log": log_path(cfg.tap), "mac": ethernet.mac_str(self.my_mac),
                 "offloads": cfg.offloads}
        tmp = cfg.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, cfg.state_path)

    def _on_signal(self, signum, frame) -> None:
        self.running = False

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        tap_fd = self.tap.fd  # type: ignore[union-attr]
        ctl_fd = self.ctl.sock.fileno()  # type: ignore[union-attr]
        api_fd = self.api.sock.fileno()  # type: ignore[union-attr]
        procs = self.ctl.procs  # type: ignore[union-attr]
        api_clients = self.api.clients  # type: ignore[union-attr]
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
                    ctx = self.ctl.accept()  # type: ignore[union-attr]
                    while ctx is not None:
                        self.ep.register(ctx.conn.fileno(), select.EPOLLIN)
                        ctx = self.ctl.accept()  # type: ignore[union-attr]
                elif fd in api_clients:
                    self.api.serve(fd)  # type: ignore[union-attr]
                elif fd == api_fd:
                    self.api.accept()  # type: ignore[union-attr]
                    for cfd in list(api_clients):
                        try:
                            self.ep.register(cfd, select.EPOLLIN)
                        except FileExistsError:
                            pass
                elif fd == self._sig_r:
                    try:
                        os.read(self._sig_r, 64)
                    except OSError:
                        pass
            timers.poll(now)
            self.tcp.flush(now)

    def _tap_rx(self, now: float) -> None:
        pool = self.pool
        check = self.rx.check
        tcp_input = self.tcp.input
        for _ in range(RX_BATCH):
            i = pool.get()
            try:
                buf = pool.views[i]
                n = self.tap.recv_into(buf)  # type: ignore[union-attr]
                if n < 0:
                    return
                cls, obj = check(buf, n)
                if cls == rxmod.TCP_DATA or cls == rxmod.TCP_SYN:
                    obj.handle = pool.handles[i]
                    obj.buf = pool.bufs[i]
                    tcp_input(obj, now)
                elif cls == rxmod.ARP:
                    self.arp.input(obj, now)
                elif cls == rxmod.ICMP:
                    ip, msg = obj
                    self.arp.icmp_input(ip, msg, bytes(buf[vnet_len() + 6:vnet_len() + 12]))
            finally:
                pool.put(i)
        # more frames may be waiting: the TAP stays readable, epoll reports it again

    def _b_event(self, s: HostSocket, ev: int, now: float) -> None:
        if ev & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            # A's last reference is gone: the application closed the socket (or died)
            self.ep.unregister(s.b_fd)
            del self.by_b[s.b_fd]
            s.drain()
            s.close_b()
            self.counters_host["app_closes"] += 1
            s.proc.sockets -= 1
            self.socks.pop(s.id, None)
            self._drop_kernel_listener(s)
            self.tcp.app_closed(s, now)
            return
        self.counters_host["doorbells"] += 1
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
        self.ep.unregister(fd)
        del self.ctl.procs[fd]  # type: ignore[union-attr]
        ctx.conn.close()
        ctx.alive = False
        self.exited.append(ctx)      # `toe stat` after a short `toe run` still shows what it did

    # ------------------------------------------------------------------ commands

    def _new_sock(self, ctx: ProcessCtx, fds: list[int], shm_bytes: int, cookie: int = 0) -> HostSocket:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EINVAL, "expected [B, memfd]")
        b_fd, memfd = fds
        try:
            st = os.fstat(b_fd)
            if (st.st_mode & 0o170000) != 0o140000:
                raise OSError(errno.EINVAL, "B is not a socket")
            os.set_blocking(b_fd, False)
            self._next_sid += 1
            s = HostSocket(self._next_sid, ctx, b_fd, memfd, shm_bytes, cookie)
        except (OSError, ValueError) as e:
            os.close(b_fd)
            if isinstance(e, ValueError):
                raise OSError(errno.EINVAL, str(e)) from None
            raise
        return s

    def _register(self, s: HostSocket) -> None:
        self.socks[s.id] = s
        self.by_b[s.b_fd] = s
        s.proc.sockets += 1
        s.proc.offloaded += 1
        self.ep.register(s.b_fd, EP_B)

    def command(self, ctx: ProcessCtx, cmd, fds: list[int], rsp, now: float) -> None:
        self.counters_host["commands"] += 1
        op = cmd.op
        try:
            if op == lib.TOE_OP_HELLO:
                for fd in fds:
                    os.close(fd)
                rsp.addr_be32 = _be32(self.my_ip)
                rsp.prefix_len = self.network.prefixlen
                rsp.netmask_be32 = _be32(int(self.network.netmask))
                rsp.tx_ring_bytes = self.cfg.tx_ring_bytes
                rsp.rx_ring_bytes = self.cfg.rx_ring_bytes
                rsp.daemon_pid = os.getpid()
                rsp.abi_version = lib.TOE_ABI_VERSION
                rsp.result = 0
                return
            if op == lib.TOE_OP_SOCKET:
                s = self._new_sock(ctx, fds, cmd.shm_bytes, cmd.cookie)
                self._register(s)
                self.counters_host["sockets"] += 1
                rsp.sock_id = s.id
                rsp.result = 0
                return
            if op == lib.TOE_OP_ADOPT:
                for fd in fds:
                    os.close(fd)
                self._adopt(ctx, cmd.cookie, rsp)
                return
            if op == lib.TOE_OP_HANDOVER:
                # statistics only; the socket itself may already be gone (handing over replaced
                # A, and B's end-of-file can be seen before this command)
                for fd in fds:
                    os.close(fd)
                reason = HANDOVER_REASONS.get(cmd.arg0, f"reason {cmd.arg0}")
                ctx.handover_reasons[reason] = ctx.handover_reasons.get(reason, 0) + 1
                if cmd.arg1:                       # strict mode: the shim refused it
                    ctx.refused += 1
                    self.counters_host["handovers_refused"] += 1
                else:
                    ctx.handovers += 1
                    self.counters_host["handovers"] += 1
                rsp.result = 0
                return
            for fd in fds if op not in (lib.TOE_OP_ACCEPT, lib.TOE_OP_LISTEN) else ():
                os.close(fd)
            target = self.socks.get(cmd.sock_id)
            if target is None:
                for fd in fds:
                    os.close(fd)
                rsp.result = -errno.EBADF
                return
            s = target
            if op == lib.TOE_OP_BIND:
                ip, port = from_be32(cmd.addr_be32), from_be16(cmd.port_be16)
                if ip not in (0, self.my_ip):
                    rsp.flags = lib.TOE_RF_HANDOVER
                    rsp.result = 0
                    return
                rsp.result = self.tcp.bind(s, ip, port)
            elif op == lib.TOE_OP_LISTEN:
                rsp.result = self.tcp.listen(s, cmd.arg0)
                self._kernel_listener(s, fds if rsp.result == 0 else [], fds)
            elif op == lib.TOE_OP_CONNECT:
                ip, port = from_be32(cmd.addr_be32), from_be16(cmd.port_be16)
                if ip == self.my_ip or ipaddress.IPv4Address(ip) not in self.network \
                        or ip == int(self.network.broadcast_address) \
                        or ip == int(self.network.network_address):
                    rsp.flags = lib.TOE_RF_HANDOVER
                    rsp.result = 0
                    return
                rsp.result = self.tcp.connect(s, ip, port, now)
            elif op == lib.TOE_OP_ACCEPT:
                self._accept(ctx, s, cmd, fds, rsp, now)
            elif op == lib.TOE_OP_SHUTDOWN:
                rsp.result = self.tcp.shutdown(s, cmd.arg0, now)
            elif op == lib.TOE_OP_SETSOCKOPT:
                self.tcp.setsockopt(s, cmd.arg0, cmd.arg1, now)
                rsp.result = 0
            else:
                rsp.result = -errno.EOPNOTSUPP
                self.counters_host["bad_commands"] += 1
        except OSError as e:
            rsp.result = -(e.errno or errno.EINVAL)

    def _accept(self, ctx: ProcessCtx, ls: HostSocket, cmd, fds, rsp, now: float) -> None:
        if ls.listener is None:
            for fd in fds:
                os.close(fd)
            rsp.result = -errno.EINVAL
            return
        if not ls.listener.queue:
            for fd in fds:
                os.close(fd)
            rsp.result = -errno.EAGAIN
            return
        child = self._new_sock(ctx, fds, cmd.shm_bytes, cmd.cookie)
        c = self.tcp.accept(ls, child, now)
        if c is None:
            child.close_b()
            child.release()
            rsp.result = -errno.EAGAIN
            return
        self._register(child)
        self.counters_host["accepts"] += 1
        rsp.sock_id = child.id
        rsp.addr_be32 = _be32(c.remote_ip)
        rsp.port_be16 = _be16(c.remote_port)
        rsp.result = 0
        if ls.listener.queue:
            ls.wake()

    def _kernel_listener(self, s: HostSocket, take: list[int], fds: list[int]) -> None:
        """LISTEN on INADDR_ANY may carry the app's kernel listening socket on the same port:
        watch it, so A is readable when a connection waits there too (both paths accepted)."""
        for fd in fds:
            if take and fd == take[0] and s.kernel_listener < 0:
                os.set_blocking(fd, False)
                s.kernel_listener = fd
                self.by_kl[fd] = s
                self.ep.register(fd, select.EPOLLIN | select.EPOLLET)
            else:
                os.close(fd)

    def _drop_kernel_listener(self, s: HostSocket) -> None:
        fd = s.kernel_listener
        if fd >= 0:
            self.ep.unregister(fd)
            del self.by_kl[fd]
            os.close(fd)
            s.kernel_listener = -1

    def _adopt(self, ctx: ProcessCtx, cookie: int, rsp) -> None:
        """A program exec'd with an inherited A end asks for its socket by A's SO_COOKIE."""
        if cookie:
            for s in self.socks.values():
                if s.cookie == cookie and s.mapped and s.memfd >= 0:
                    self.ctl.rsp_fds = [s.memfd]  # type: ignore[union-attr]
                    rsp.sock_id = s.id
                    rsp.tx_ring_bytes = s.tx_size
                    rsp.rx_ring_bytes = s.rx_size
                    rsp.result = 0
                    s.proc.sockets -= 1            # the socket now counts for the adopter
                    s.proc = ctx
                    s.pid = ctx.pid
                    ctx.sockets += 1
                    ctx.offloaded += 1
                    self.counters_host["adoptions"] += 1
                    return
        rsp.result = -errno.ENOENT

    # ------------------------------------------------------------------ inspection

    def handle_api(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "tap": self.cfg.tap}
        if cmd == "stat":
            return self.stat()
        raise ValueError(f"unknown command {cmd!r}")

    def stat(self) -> dict:
        now = time.monotonic()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        conns = [c.info() for c in self.tcp.conns.values()]
        listeners = []
        for lsts in self.tcp.listeners.values():
            for lst in lsts:
                listeners.append({"id": lst.sock.id, "local": f"{ip_str(lst.ip)}:{lst.port}",
                                  "backlog": lst.backlog, "pending": len(lst.queue),
                                  "embryonic": len(lst.embryonic), "pid": lst.sock.pid})
        tapc = self.tap.counters  # type: ignore[union-attr]
        bytes_in = sum(c["bytes_in"] for c in conns) + self.tcp.closed_bytes_in
        bytes_out = sum(c["bytes_out"] for c in conns) + self.tcp.closed_bytes_out
        procs = [{"pid": p.pid, "comm": p.comm, "sockets": p.sockets, "offloaded": p.offloaded,
                  "handovers": p.handovers, "refused": p.refused,
                  "handover_reasons": dict(p.handover_reasons), "alive": p.alive}
                 for p in [*self.ctl.procs.values(), *self.exited]]  # type: ignore[union-attr]
        return {
            "ok": True,
            "adapter": {"tap": self.cfg.tap, "addr": self.cfg.addr, "host_addr": self.cfg.host_addr,
                        "mac": ethernet.mac_str(self.my_mac), "pid": os.getpid(),
                        "uptime_s": round(now - self.started, 3), "offloads": self.offloads,
                        "mtu": self.cfg.mtu, "netns": self.cfg.netns},
            "cpu": {"user_s": ru.ru_utime, "system_s": ru.ru_stime, "max_rss_kb": ru.ru_maxrss},
            "totals": {"connections": len(conns), "closed_connections": self.tcp.closed_count,
                       "bytes_in": bytes_in, "bytes_out": bytes_out,
                       "frames_in": tapc.rx_frames, "frames_out": tapc.tx_frames,
                       "handovers": self.counters_host["handovers"],
                       "sockets_open": len(self.socks)},
            "connections": conns,
            "closed": list(self.tcp.closed),
            "listeners": listeners,
            "units": {
                "tap_port": tapc.snapshot(),
                "rx_checker": self.rx.counters.snapshot(),
                "tx_hdrgen": self.tx.counters.snapshot(),
                "ack_gen": self.ackgen.snapshot(),
                "buffer_pool": self.pool.counters.snapshot(),
                "host_if": dict(self.counters_host),
                "tcp": dict(self.tcp.stats),
                "arp_icmp": dict(self.arp.counters),
            },
            "arp": self.arp.info(now),
            "processes": procs,
        }

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        now = time.monotonic()
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
        if self.tap is not None:
            self.tap.close()
        try:
            os.unlink(self.cfg.state_path)
        except FileNotFoundError:
            pass


def vnet_len() -> int:
    return 12


def _be32(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "big"), sys.byteorder)


def _be16(x: int) -> int:
    return int.from_bytes(x.to_bytes(2, "big"), sys.byteorder)


def _enter_netns(name: str) -> None:
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        raise SetupError(f"network namespace {name!r} does not exist")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:        # CLONE_NEWNET
            err = ctypes.get_errno()
            raise SetupError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _configure_kernel_side(cfg: AdapterConfig) -> None:
    """Give the kernel's end of the TAP its address and bring it (and lo) up."""
    from pyroute2 import IPRoute

    try:
        with open(f"/proc/sys/net/ipv6/conf/{cfg.tap}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    host = cfg.host_iface
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cfg.tap)
        if not idx:
            raise SetupError(f"TAP {cfg.tap} vanished during setup")
        ipr.link("set", index=idx[0], mtu=cfg.mtu)
        try:
            ipr.addr("add", index=idx[0], address=str(host.ip), prefixlen=host.network.prefixlen)
        except Exception as e:  # pyroute2 NetlinkError
            if getattr(e, "code", None) != errno.EEXIST:
                raise SetupError(f"cannot give {cfg.tap} address {host}: {e}") from None
        ipr.link("set", index=idx[0], state="up")
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")


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
