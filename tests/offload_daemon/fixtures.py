"""Fixtures for driving the TCP engine without a network.

`Harness` builds a TcpStack (through its TcpEnv) around a fake TX unit that records every segment,
an ARP table that resolves at once, real timers on a fake clock, and real
HostSockets over real shared memory and socket pairs (the shim's side is
played by the test: it writes the TX ring and reads the RX ring with the
same cffi primitives the shim uses).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
from dataclasses import dataclass
from typing import Any

from nic_model.counters import AckGenCounters
from nic_model.rx import Segment
from nic_model.wire import tcp as T
from offload_daemon.abi import ffi, lib
from offload_daemon.config import AdapterConfig
from offload_daemon.host import HostSocket, ProcessCtx
from offload_daemon.tcp import TcpEnv, TcpStack
from offload_daemon.timers import Timers

ME = 0xC6120002        # 198.18.0.2
PEER = 0xC6120001      # 198.18.0.1
PEER_MAC = b"\x02\x00\x00\x00\x00\x01"


@dataclass
class Sent:
    seq: int
    ack: int
    flags: int
    window: int
    options: T.TcpOptions
    payload: bytes
    sport: int
    dport: int

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


class FakeTx:
    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def segment(self, key, peer_mac, src, dst, sport, dport, seq, ack, flags, window,
                options=b"", payload=(), payload_len=0, mss=1460):
        data = b"".join(bytes(p) for p in payload)
        assert len(data) == payload_len
        opts = T.TcpOptions.parse(options, 0, len(options)) if options else T.NO_OPTIONS
        self.sent.append(Sent(seq, ack, flags, window, opts, data, sport, dport))

    def invalidate(self, key) -> None:
        pass


class FakeArp:
    def resolve(self, ip, now, cb):
        cb(PEER_MAC, now)

    def lookup(self, ip, now):
        return PEER_MAC


class AppSide:
    """The application's view of one socket: A end and the mapping (what the shim holds)."""

    def __init__(self, a: socket.socket, mm: mmap.mmap):
        self.a = a
        self.mm = mm
        self.shm = ffi.cast("struct toe_sock_shm *", ffi.from_buffer(mm))

    def write(self, data: bytes, more: bool = False) -> int:
        """Copy into the TX ring like the shim's send (no doorbell bookkeeping): what the
        send buffer takes (toe_tx_room); `more` is send(..., MSG_MORE)."""
        s = self.shm
        base = ffi.cast("uint8_t *", s) + lib.TOE_SHM_HDR_SIZE
        n = min(lib.toe_tx_room(s), len(data))
        for i in range(n):
            base[(s.tx_tail + i) & (s.tx_size - 1)] = data[i]
        tail = (s.tx_tail + n) & 0xFFFFFFFF
        if not more:
            s.tx_push = tail
        s.tx_tail = tail
        return n

    def read(self) -> bytes:
        s = self.shm
        base = ffi.cast("uint8_t *", s) + lib.TOE_SHM_HDR_SIZE + s.tx_size
        n = (s.rx_tail - s.rx_head) & 0xFFFFFFFF
        out = bytes(base[(s.rx_head + i) & (s.rx_size - 1)] for i in range(n))
        s.rx_head = (s.rx_head + n) & 0xFFFFFFFF
        return out

    def readable(self) -> int:
        """poll() on A: what an application's event loop would see (POLLIN, POLLRDHUP...)."""
        p = select.poll()
        p.register(self.a.fileno(), select.POLLIN | select.POLLRDHUP)
        ev = p.poll(0)
        return ev[0][1] if ev else 0

    def readable_tokens(self) -> int:
        self.a.setblocking(False)
        try:
            return len(self.a.recv(64, socket.MSG_PEEK))
        except BlockingIOError:
            return 0


class Harness:
    live: list[Harness] = []          # closed by close_all (tests/offload_daemon/conftest.py)

    def __init__(self, ring: int = 1 << 16, offloads: bool = True, **cfg):
        self.cfg = AdapterConfig(tx_ring_bytes=ring, rx_ring_bytes=ring, **cfg)
        self.tx = FakeTx()
        self.ad = TcpEnv(cfg=self.cfg, my_ip=ME, timers=Timers(), tx=self.tx, arp=FakeArp(),
                         ackgen=AckGenCounters(), offloads=offloads, tx_max_payload=65000)
        self.tcp = TcpStack(self.ad)
        self.ring = ring
        self.now = 100.0
        self._ctl_a, self._ctl_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = ProcessCtx(self._ctl_b, os.getpid(), os.getuid(), os.getgid())
        self._sid = 0
        self.apps: list[AppSide] = []
        self.hosts: list[HostSocket] = []
        self.extra: list[Any] = []    # more things with a close() (a World's units' descriptors)
        Harness.live.append(self)

    def close(self) -> None:
        """Every descriptor and mapping this harness made (the daemon side's by release)."""
        self.proc.drop_spares()
        for hs in self.hosts:
            hs.close_b()
            hs.release()
        for app in self.apps:
            app.a.close()
            with contextlib.suppress(BufferError):
                app.mm.close()
        for x in self.extra:
            x.close()
        self._ctl_a.close()
        self._ctl_b.close()
        self.hosts, self.apps, self.extra = [], [], []

    @classmethod
    def close_all(cls) -> None:
        while cls.live:
            cls.live.pop().close()

    @property
    def sent(self) -> list[Sent]:
        return self.tx.sent

    def take(self) -> list[Sent]:
        out, self.tx.sent = self.tx.sent, []
        return out

    def socket(self) -> tuple[HostSocket, AppSide]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        size = lib.TOE_SHM_HDR_SIZE + 2 * self.ring
        fd = os.memfd_create("toe-test", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        mm = mmap.mmap(fd, size)
        s = ffi.cast("struct toe_sock_shm *", ffi.from_buffer(mm))
        s.magic = lib.TOE_SHM_MAGIC
        s.abi_version = lib.TOE_ABI_VERSION
        s.tx_size = s.rx_size = self.ring
        self._sid += 1
        b_fd = b.detach()
        os.set_blocking(b_fd, False)
        hs = HostSocket(self._sid, self.proc, b_fd, os.dup(fd), self.ring, self.ring, lib.toe_fd_cookie(a.fileno()))
        os.close(fd)
        app = AppSide(a, mm)
        self.apps.append(app)
        self.hosts.append(hs)
        return hs, app

    def send_cmd(self, op: int, sock_id: int, ip: int = 0, port: int = 0, fds: list[int] | None = None,
                 arg1: int = 0) -> bytes:
        """A command as the shim sends it on the harness's channel (the daemon's end: self.proc.conn)."""
        cmd = ffi.new("struct toe_cmd *")
        cmd.op, cmd.sock_id, cmd.arg1 = op, sock_id, arg1
        cmd.addr_be32, cmd.port_be16 = socket.htonl(ip), socket.htons(port)
        msg = bytes(ffi.buffer(cmd))
        if fds:
            socket.send_fds(self._ctl_a, [msg], fds)
        else:
            self._ctl_a.send(msg)
        return msg

    def answer(self):
        """The next answer the shim's end of the channel reads."""
        rsp = ffi.new("struct toe_rsp *")
        data = self._ctl_a.recv(lib.TOE_RSP_SIZE)
        ffi.memmove(rsp, data, len(data))
        return rsp

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.ad.timers.poll(self.now)

    def seg(self, flags: int, seq: int, ack: int = 0, payload: bytes = b"", window: int = 65535,
            options: T.TcpOptions = T.NO_OPTIONS, sport: int = 40000, dport: int = 80) -> Segment:
        s = Segment()
        s.src, s.dst, s.sport, s.dport = PEER, ME, sport, dport
        s.seq, s.ack, s.flags, s.window = seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window
        s.options = options
        s.buf = bytearray(payload)
        s.payload_off = 0
        s.payload_len = len(payload)
        s.src_mac = PEER_MAC
        s.handle = None
        return s

    def deliver(self, seg: Segment) -> None:
        self.tcp.input(seg, self.now)
        self.tcp.flush(self.now)

    # ---- ready-made states ----------------------------------------------

    def listening(self, port: int = 80):
        hs, app = self.socket()
        assert self.tcp.bind(hs, 0, port) == 0
        assert self.tcp.listen(hs, 16) == 0
        return hs, app

    def established_passive(self, irs: int = 1000, port: int = 80, wscale: int | None = 7):
        """A connection accepted by the app: returns (ccb, host socket, app side)."""
        lhs, lapp = self.listening(port)
        opts = T.TcpOptions(mss=1460, wscale=wscale)
        self.deliver(self.seg(T.SYN, irs, options=opts, dport=port))
        synack = self.take()[-1]
        self.deliver(self.seg(T.ACK, irs + 1, synack.seq + 1, dport=port))
        hs, app = self.socket()
        c = self.tcp.accept(lhs, hs, self.now)
        assert c is not None
        self.take()
        return c, hs, app

    def established_active(self, iss_peer: int = 5000, port: int = 8080):
        hs, app = self.socket()
        import errno as _e
        assert self.tcp.connect(hs, PEER, port, self.now) == -_e.EINPROGRESS
        syn = self.take()[-1]
        self.deliver(self.seg(T.SYN | T.ACK, iss_peer, syn.seq + 1, sport=port,
                              dport=syn.sport, options=T.TcpOptions(mss=1460, wscale=7)))
        self.take()
        return hs.ccb, hs, app, syn
