"""A minimal fake of the adapter daemon's side of docs/abi.md, for the shim's tests.

It runs in a thread of the test process, serves the control socket, and plays
the far end of every offloaded socket without any network:

* CONNECT to an address in the adapter's subnet reaches an "echo peer": the
  handshake completes at once, and whatever the application writes into the
  TX ring comes back in its RX ring.  A SHUT_WR makes the echo peer close its
  side after echoing everything (a FIN: RX_EOF).  Special ports change that:
  ``REFUSED_PORT`` (refused at once), ``SLOW_PORT`` / ``SLOW_REFUSED_PORT``
  (the outcome after ``SLOW_DELAY_S``), ``HOLD_PORT`` (connected, but the TX
  ring is only consumed when the test calls :meth:`FakeAdapter.release`),
  ``HANDOVER_PORT`` (the daemon answers HANDOVER).
* LISTEN + ACCEPT: :meth:`FakeAdapter.inject_connection` queues a child on a
  listening port; the child is connected to an echo peer, or (``mode="sink"``)
  to a peer that only collects what the application sends (:meth:`sunk`) and
  sends what the test :meth:`push`-es (an HTTP client, say).
* ADOPT: SOCKET and ACCEPT carry [B, memfd, A]; the fake reads A's SO_COOKIE
  as the daemon does. ADOPT carries an A end: a known one is answered with
  the socket's memfd (kept open for that), else -ENOENT.
* FORK: answered with a new channel (the fake keeps no per-channel rights).
* SHUTDOWN with SHUT_RD/SHUT_RDWR sets RX_SHUT and shuts B for writing (A
  reads end-of-file), as the daemon does.  HANDOVER with arg1 = 1 (strict
  mode refused it) is only counted: the socket stays offloaded.

The ring, token and doorbell hand-offs are the compiled cffi module's (the same
toe_ring.h code the shim runs), never re-implemented here.  The fake follows
the daemon rules of docs/abi.md: a token into B when the socket becomes
readable and none is outstanding; B drained when the socket becomes writable
(connect completion, toe_tx_release() == 1) and on every B edge while the
socket is writable; RX_EOF / RESET followed by shutdown(B, SHUT_WR).

Two deviations from docs/abi.md are deliberate (both are explained in the
shim's report as proposed protocol changes):

* tok_sent is bumped *before* the token byte is written, not after.  With the
  documented order a reader that empties the ring between the daemon's write
  and its bump leaves the byte in A uncounted; the daemon then suppresses the
  next token and an edge-triggered waiter is never woken.  Counting first makes
  the in-flight byte "outstanding" (the shim then reads fewer bytes than
  outstanding, which it tolerates) and its arrival is a fresh edge.
* A window doorbell cannot reach the daemon while A is stuffed (TX ring full),
  so while the fake waits for RX space on a socket whose TX side is
  full-waiting it re-reads rx_head on a short timer instead.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import mmap
import os
import select
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from offload_daemon.abi import ffi, lib

ADAPTER_ADDR = "198.18.0.2"
NETMASK = "255.255.255.0"
PEER_ADDR = "198.18.0.9"  # any address in the subnet reaches an echo peer

REFUSED_PORT = 7999
SLOW_PORT = 7001
SLOW_REFUSED_PORT = 7002
HOLD_PORT = 7003
HANDOVER_PORT = 7004
SLOW_DELAY_S = 0.2
WINDOW_RECHECK_S = 0.002
EPHEMERAL_BASE = 40000


def be32(dotted: str) -> int:
    """A dotted quad as the uint32 whose memory holds network byte order."""
    return struct.unpack("=I", socket.inet_aton(dotted))[0]


def be16(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def from_be16(v: int) -> int:
    return struct.unpack("!H", struct.pack("=H", v))[0]


def from_be32(v: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", v))


@dataclass
class FakeSock:
    """The daemon's view of one offloaded socket."""

    sid: int
    b: socket.socket
    mm: mmap.mmap
    buf: Any
    shm: Any
    mode: str = "new"  # new | listen | echo | hold | sink
    mfd: int = -1      # the memfd, kept for ADOPT
    cookie: int = 0    # SO_COOKIE of A
    fin_pending: bool = False
    wnd_waiting: bool = False
    gone: bool = False
    pending: list = field(default_factory=list)  # listen: queued (addr, port, mode)
    received: bytearray = field(default_factory=bytearray)  # hold/sink mode: TX bytes consumed

    # ---- B ----
    def queued_b(self) -> int:
        return struct.unpack("i", fcntl.ioctl(self.b.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]

    def drain_b(self, limit: int | None = None) -> bool:
        """Read everything in B, or its first `limit` bytes.  False when A is gone (EOF)."""
        if limit == 0:  # nothing to read: only look for A's end
            try:
                return self.b.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                return True
            except OSError:
                return False
        left = limit
        while left is None or left > 0:
            try:
                d = self.b.recv(65536 if left is None else min(left, 65536))
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not d:
                return False
            if left is not None:
                left -= len(d)
        return True

    def send_token(self) -> None:
        """Count the token, then write it (see the module docstring for the order)."""
        lib.toe_rx_token_sent(self.shm)
        try:
            self.b.send(b"T")
        except OSError:
            pass  # A is gone

    def token_if_needed(self) -> None:
        """Readable and no token outstanding: send one."""
        if lib.toe_rx_push(self.shm, ffi.NULL, 0):
            self.send_token()

    def readable(self) -> bool:
        s = self.shm
        return (
            lib.toe_ring_load(ffi.addressof(s, "rx_tail")) != s.rx_head
            or bool(s.flags & (lib.TOE_SF_RX_EOF | lib.TOE_SF_RESET))
            or s.accept_pending != 0
        )

    # ---- rings ----
    def tx_bytes(self, head: int, n: int) -> bytes:
        size = self.shm.tx_size
        base = lib.TOE_SHM_HDR_SIZE
        off = head & (size - 1)
        first = min(n, size - off)
        out = self.mm[base + off: base + off + first]
        if n > first:
            out += self.mm[base: base + n - first]
        return out

    def tx_avail(self) -> tuple[int, int]:
        tail = lib.toe_ring_load(ffi.addressof(self.shm, "tx_tail"))
        head = self.shm.tx_head
        return head, (tail - head) & 0xFFFFFFFF

    def release_tx(self, new_head: int) -> None:
        if lib.toe_tx_release(self.shm, new_head & 0xFFFFFFFF):
            self.drain_b()

    def push_rx(self, data: bytes) -> int:
        """Append what fits of data to the RX ring (token if needed)."""
        n = min(len(data), lib.toe_rx_space(self.shm))
        if n and lib.toe_rx_push(self.shm, data[:n], n):
            self.send_token()
        return n

    def pump(self) -> None:
        """Move TX to RX (echo), arm doorbells before going idle."""
        s = self.shm
        for _ in range(10000):
            head, avail = self.tx_avail()
            if avail and self.mode == "sink":
                self.received += self.tx_bytes(head, avail)
                self.release_tx(head + avail)
                continue
            if avail and self.mode == "echo":
                space = lib.toe_rx_space(s)
                n = min(avail, space)
                if n:
                    self.wnd_waiting = False
                    self.push_rx(self.tx_bytes(head, n))
                    self.release_tx(head + n)
                    continue
                lib.toe_rx_arm_window(s)
                if lib.toe_rx_space(s):
                    continue
                self.wnd_waiting = True
                break
            tail = lib.toe_tx_arm_doorbell(s)
            if avail == 0 and tail != head:
                continue
            break
        head, avail = self.tx_avail()
        if self.fin_pending and avail == 0:
            self.fin_pending = False
            self.fin()

    def fin(self) -> None:
        """The peer closed its side: EOF after the data already in the ring."""
        self.shm.flags |= lib.TOE_SF_RX_EOF
        self.token_if_needed()
        try:
            self.b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reset(self, err: int) -> None:
        s = self.shm
        s.so_error = err
        s.state = lib.TOE_SS_CLOSED
        s.flags |= lib.TOE_SF_RESET
        self.token_if_needed()
        self.drain_b()  # the socket is "writable" now: sends fail at once
        try:
            self.b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def connected(self, mode: str = "echo") -> None:
        self.mode = mode
        self.shm.mss = 1460
        self.shm.state = lib.TOE_SS_CONNECTED
        self.drain_b()
        self.process()

    def process(self) -> None:
        """A B edge, a timer, or a command: look at the socket again."""
        if self.gone:
            return
        s = self.shm
        if s.state == lib.TOE_SS_CONNECTED:
            queued = self.queued_b()  # before the flag: filler the shim writes later stays
            if not s.tx_full_wait and not self.drain_b(queued):
                return
            if self.mode in ("echo", "hold", "sink"):
                self.pump()
        elif s.state == lib.TOE_SS_LISTEN and not self.drain_b():
            return  # kicks: read them, or B fills and later kicks are lost
        if self.readable():
            self.token_if_needed()


class FakeAdapter:
    """The fake daemon.  Use as a context manager; ``path`` is TOE_SOCK."""

    def __init__(self, path: str, ring_bytes: int = 1 << 16) -> None:
        self.path = path
        self.ring_bytes = ring_bytes
        self.socks: dict[int, FakeSock] = {}
        self.by_bfd: dict[int, FakeSock] = {}
        self.ctl: dict[int, socket.socket] = {}
        self.ops: dict[int, int] = {}
        self.hello_pids: list[int] = []
        self.setsockopts: list[tuple[int, int, int, bytes]] = []
        self.handovers: list[tuple[int, int, int]] = []  # (sock_id, reason, refused)
        self.cookies: list[int] = []          # SO_COOKIEs seen in SOCKET/ACCEPT
        self.adopts: list[tuple[int, int]] = []  # (cookie, result)
        self.forks = 0                        # FORK channels handed out
        self.wakes = 0                        # WAKE commands (kicks from a stuffed A)
        self.connect_opts: list[tuple[int, int, int]] = []   # header options seen at CONNECT
        self.batches: list[int] = []                          # SOCKETS: sockets per batch
        self.pooled_accepts = 0                               # ACCEPTs into a pooled socket
        self.refuse_fork = False              # answer FORK -ENFILE (the child reconnects)
        self.channels_used: set[int] = set()  # channels that sent a command
        self._close_after: list[int] = []
        self.sunk_by_port: dict[int, bytearray] = {}  # sink peers' bytes, by remote port
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._ports = itertools.count(EPHEMERAL_BASE)
        self._timers: list = []
        self._tseq = itertools.count()
        self._calls: list = []
        self._lock = threading.Lock()
        self._stop = False
        self.ep = select.epoll()
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lsock.bind(path)
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self._wr, self._ww = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ep.register(self._wr, select.EPOLLIN)
        self.thread = threading.Thread(target=self._run, name="fake-adapter", daemon=True)

    # ---- lifecycle ----
    def __enter__(self) -> "FakeAdapter":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        os.write(self._ww, b"x")
        self.thread.join(5)
        for s in list(self.socks.values()):
            self._forget(s)
        for c in self.ctl.values():
            c.close()
        self.lsock.close()
        self.ep.close()
        os.close(self._wr)
        os.close(self._ww)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # ---- test hooks (run on the loop thread) ----
    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append(fn())
            except Exception as e:  # surfaced to the test
                box.append(e)
            done.set()

        with self._lock:
            self._calls.append(run)
        os.write(self._ww, b"x")
        if not done.wait(timeout):
            raise TimeoutError("fake adapter did not run the call")
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def find(self, *, local_port: int | None = None, remote_port: int | None = None,
             mode: str | None = None) -> FakeSock:
        for s in self.socks.values():
            if local_port is not None and from_be16(s.shm.local_port_be16) != local_port:
                continue
            if remote_port is not None and from_be16(s.shm.remote_port_be16) != remote_port:
                continue
            if mode is not None and s.mode != mode:
                continue
            return s
        raise KeyError(f"no socket local={local_port} remote={remote_port} mode={mode}")

    def describe(self, remote_port: int) -> str:
        """One line of a socket's shared state, for a failing test's message."""
        def run() -> str:
            try:
                s = self.find(remote_port=remote_port)
            except KeyError:
                listeners = [(x.shm.accept_pending, x.shm.tok_sent, x.shm.tok_taken)
                             for x in self.socks.values() if x.mode == "listen"]
                return f"no socket (listeners: pending, tok_sent, tok_taken = {listeners})"
            m = s.shm
            return (f"mode={s.mode} state={m.state} flags={m.flags:#x} tx head={m.tx_head} "
                    f"tail={m.tx_tail} full_wait={m.tx_full_wait} B queued={s.queued_b()} "
                    f"rx head={m.rx_head} tail={m.rx_tail} tok {m.tok_sent}/{m.tok_taken}")
        return str(self.call(run))

    def inject_connection(self, listen_port: int, peer: tuple[str, int], mode: str = "echo",
                          data: bytes = b"") -> None:
        """A connection from `peer` arrives on the listener at listen_port; the peer
        sends `data` once it is accepted."""
        def run() -> None:
            s = self.find(local_port=listen_port, mode="listen")
            s.pending.append((be32(peer[0]), be16(peer[1]), mode, data))
            s.shm.accept_pending += 1
            s.token_if_needed()
        self.call(run)

    def release(self, remote_port: int) -> int:
        """HOLD_PORT socket: the peer acknowledges everything queued so far."""
        def run() -> int:
            s = self.find(remote_port=remote_port, mode="hold")
            head, avail = s.tx_avail()
            s.received += s.tx_bytes(head, avail)
            s.release_tx(head + avail)
            return avail
        return int(self.call(run))

    def push(self, remote_port: int, data: bytes) -> int:
        return int(self.call(lambda: self.find(remote_port=remote_port).push_rx(data)))

    def sunk(self, remote_port: int) -> bytes:
        """What the application sent to the sink peer at remote_port (also after close)."""
        return bytes(self.call(lambda: bytes(self.sunk_by_port.get(remote_port, b""))))

    def peer_fin(self, remote_port: int) -> None:
        self.call(lambda: self.find(remote_port=remote_port).fin())

    def peer_reset(self, remote_port: int, err: int = errno.ECONNRESET) -> None:
        self.call(lambda: self.find(remote_port=remote_port).reset(err))

    def stats(self) -> dict:
        return self.call(lambda: {
            "ops": dict(self.ops), "hellos": list(self.hello_pids),
            "forks": self.forks, "wakes": self.wakes, "channels_used": len(self.channels_used),
            "handovers": list(self.handovers), "setsockopts": list(self.setsockopts),
            "connect_opts": list(self.connect_opts), "batches": list(self.batches),
            "sockets_made": self.ops.get(lib.TOE_OP_SOCKET, 0) + sum(self.batches),
            "pooled_accepts": self.pooled_accepts,
            "live": len(self.socks), "errors": list(self.errors), "cookies": list(self.cookies),
            "adopts": list(self.adopts),
        })

    # ---- loop ----
    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tseq), fn))

    def _run(self) -> None:
        while not self._stop:
            timeout = -1.0
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if any(s.wnd_waiting and s.shm.tx_full_wait for s in self.socks.values()):
                timeout = WINDOW_RECHECK_S if timeout < 0 else min(timeout, WINDOW_RECHECK_S)
            try:
                events = self.ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                try:
                    self._event(fd, ev)
                except Exception as e:  # keep serving; the test looks at .errors
                    self.errors.append(f"{type(e).__name__}: {e}")
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                fn()
            for s in list(self.socks.values()):
                if s.wnd_waiting and s.shm.tx_full_wait:
                    s.process()

    def _event(self, fd: int, ev: int) -> None:
        if fd == self.lsock.fileno():
            try:
                c, _ = self.lsock.accept()
            except BlockingIOError:
                return
            c.setblocking(False)
            self.ctl[c.fileno()] = c
            self.ep.register(c.fileno(), select.EPOLLIN)
        elif fd == self._wr:
            try:
                os.read(self._wr, 4096)
            except BlockingIOError:
                pass
            with self._lock:
                calls, self._calls = self._calls, []
            for run in calls:
                run()
        elif fd in self.ctl:
            self._command(self.ctl[fd])
        elif fd in self.by_bfd:
            s = self.by_bfd[fd]
            if ev & (select.EPOLLRDHUP | select.EPOLLHUP):
                if s.mode == "sink":
                    s.pump()  # what was queued before the close still reaches the peer
                self._forget(s)  # the last reference to A is gone
                return
            s.process()

    def _forget(self, s: FakeSock) -> None:
        if s.gone:
            return
        s.gone = True
        self.socks.pop(s.sid, None)
        self.by_bfd.pop(s.b.fileno(), None)
        try:
            self.ep.unregister(s.b.fileno())
        except (OSError, ValueError):
            pass
        s.b.close()
        if s.mfd >= 0:
            os.close(s.mfd)
            s.mfd = -1
        s.shm = None
        ffi.release(s.buf)
        s.mm.close()

    # ---- commands ----
    def _command(self, conn: socket.socket) -> None:
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 64, 3 * lib.TOE_POOL_BATCH)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        if not msg:
            for f in fds:
                os.close(f)
            self.ep.unregister(conn.fileno())
            del self.ctl[conn.fileno()]
            conn.close()
            return
        cmd = ffi.new("struct toe_cmd *")
        ffi.memmove(cmd, msg, len(msg))
        rsp = ffi.new("struct toe_rsp *")
        self.ops[cmd.op] = self.ops.get(cmd.op, 0) + 1
        self.channels_used.add(id(conn))
        handler = {
            lib.TOE_OP_HELLO: self._hello, lib.TOE_OP_SOCKET: self._socket,
            lib.TOE_OP_BIND: self._bind, lib.TOE_OP_LISTEN: self._listen,
            lib.TOE_OP_CONNECT: self._connect, lib.TOE_OP_ACCEPT: self._accept,
            lib.TOE_OP_SHUTDOWN: self._shutdown, lib.TOE_OP_SETSOCKOPT: self._setsockopt,
            lib.TOE_OP_HANDOVER: self._handover, lib.TOE_OP_ADOPT: self._adopt_op,
            lib.TOE_OP_FORK: self._fork, lib.TOE_OP_WAKE: self._wake, lib.TOE_OP_SOCKETS: self._sockets,
        }.get(cmd.op)
        out_fds: list[int] = []
        if handler is None:
            rsp.result = -errno.EINVAL
        else:
            out_fds = handler(cmd, fds, rsp) or []
        if out_fds:
            socket.send_fds(conn, [bytes(ffi.buffer(rsp))], out_fds)
            for f in self._close_after:
                os.close(f)
            self._close_after = []
        else:
            conn.send(bytes(ffi.buffer(rsp)))

    def _hello(self, cmd, fds, rsp) -> None:
        self.hello_pids.append(cmd.pid)
        rsp.addr_be32 = be32(ADAPTER_ADDR)
        rsp.netmask_be32 = be32(NETMASK)
        rsp.prefix_len = 24
        rsp.tx_ring_bytes = self.ring_bytes
        rsp.rx_ring_bytes = self.ring_bytes
        rsp.daemon_pid = os.getpid()
        rsp.abi_version = lib.TOE_ABI_VERSION

    def _take(self, cmd, fds) -> FakeSock | None:
        """[B, memfd, A] of a SOCKET/ACCEPT command -> a FakeSock (not registered)."""
        if len(fds) != 3:
            for f in fds:
                os.close(f)
            return None
        bfd, mfd, afd = fds
        cookie = lib.toe_fd_cookie(afd)
        os.close(afd)
        mm = mmap.mmap(mfd, cmd.shm_bytes)
        buf = ffi.from_buffer(mm)
        shm = ffi.cast("struct toe_sock_shm *", buf)
        sid = next(self._ids)
        if lib.toe_shm_init(shm, sid, self.ring_bytes, self.ring_bytes) != 0:
            self.errors.append(f"bad shm header for socket {sid}")
        b = socket.socket(fileno=bfd)
        b.setblocking(False)
        if cookie:
            self.cookies.append(cookie)
        return FakeSock(sid=sid, b=b, mm=mm, buf=buf, shm=shm, mfd=mfd, cookie=cookie)

    def _register(self, s: FakeSock) -> None:
        self.socks[s.sid] = s
        self.by_bfd[s.b.fileno()] = s
        self.ep.register(s.b.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def _sockets(self, cmd, fds, rsp) -> None:
        """A batch for the shim's pool: each socket's id goes into its own header."""
        n = cmd.arg0
        if n < 1 or len(fds) != 3 * n:
            for f in fds:
                os.close(f)
            rsp.result = -errno.EINVAL
            return
        self.batches.append(n)
        for i in range(n):
            s = self._take(cmd, fds[3 * i:3 * i + 3])
            assert s is not None
            self._register(s)
            s.shm.sock_id = s.sid
        rsp.result = n

    def _socket(self, cmd, fds, rsp) -> None:
        s = self._take(cmd, fds)
        if s is None:
            rsp.result = -errno.EINVAL
            return
        self._register(s)
        rsp.sock_id = s.sid

    def _bind(self, cmd, fds, rsp) -> None:
        s = self.socks[cmd.sock_id]
        port = from_be16(cmd.port_be16)
        if port == HANDOVER_PORT:
            rsp.flags = lib.TOE_RF_HANDOVER
            return
        s.shm.local_addr_be32 = be32(ADAPTER_ADDR)
        s.shm.local_port_be16 = be16(port or next(self._ports))
        s.shm.state = lib.TOE_SS_BOUND

    def _listen(self, cmd, fds, rsp) -> None:
        s = self.socks[cmd.sock_id]
        if not s.shm.local_port_be16:
            s.shm.local_addr_be32 = be32(ADAPTER_ADDR)
            s.shm.local_port_be16 = be16(next(self._ports))
        s.shm.state = lib.TOE_SS_LISTEN
        s.mode = "listen"

    def _connect(self, cmd, fds, rsp) -> None:
        s = self.socks[cmd.sock_id]
        port = from_be16(cmd.port_be16)
        if port == HANDOVER_PORT:
            rsp.flags = lib.TOE_RF_HANDOVER
            return
        shm = s.shm
        if not shm.local_port_be16:
            shm.local_addr_be32 = be32(ADAPTER_ADDR)
            shm.local_port_be16 = be16(next(self._ports))
        shm.remote_addr_be32 = cmd.addr_be32
        shm.remote_port_be16 = cmd.port_be16
        self.connect_opts.append((shm.opt_flags, shm.keepidle_s, shm.linger_s))
        shm.state = lib.TOE_SS_CONNECTING
        rsp.result = -errno.EINPROGRESS
        def refuse() -> None:
            if not s.gone:
                s.reset(errno.ECONNREFUSED)

        def complete() -> None:
            if not s.gone:
                s.connected()

        if port == REFUSED_PORT:
            refuse()
        elif port == SLOW_REFUSED_PORT:
            self._after(SLOW_DELAY_S, refuse)
        elif port == SLOW_PORT:
            self._after(SLOW_DELAY_S, complete)
        elif port == HOLD_PORT:
            s.connected("hold")
        else:
            s.connected("echo")

    def _accept(self, cmd, fds, rsp) -> None:
        lst = self.socks[cmd.sock_id]
        if not lst.pending:
            for f in fds:
                os.close(f)
            rsp.result = -errno.EAGAIN
            return
        if fds:
            c = self._take(cmd, fds)
        else:                                    # a pooled socket of the caller's, by id
            c = self.socks.get(cmd.arg1 & 0xFFFFFFFF)
            if c is not None and (c.mode != "new" or c.shm.state != lib.TOE_SS_NEW):
                c = None
            self.pooled_accepts += c is not None
        if c is None:
            rsp.result = -errno.EINVAL
            return
        addr, port, mode, data = lst.pending.pop(0)
        lst.shm.accept_pending -= 1
        if fds:
            self._register(c)
        c.shm.local_addr_be32 = lst.shm.local_addr_be32
        c.shm.local_port_be16 = lst.shm.local_port_be16
        c.shm.remote_addr_be32 = addr
        c.shm.remote_port_be16 = port
        if mode == "sink":
            c.received = self.sunk_by_port.setdefault(from_be16(port), bytearray())
        c.connected(mode)
        if data:
            c.push_rx(data)
        if lst.pending:
            lst.token_if_needed()
        rsp.sock_id = c.sid
        rsp.addr_be32 = addr
        rsp.port_be16 = port

    def _wake(self, cmd, fds, rsp) -> None:
        self.wakes += 1
        self.socks[cmd.sock_id].process()

    def _shutdown(self, cmd, fds, rsp) -> None:
        s = self.socks[cmd.sock_id]
        if cmd.arg0 in (socket.SHUT_WR, socket.SHUT_RDWR):
            s.shm.flags |= lib.TOE_SF_TX_SHUT
            s.fin_pending = s.mode == "echo"  # the echo peer closes in turn
        if cmd.arg0 in (socket.SHUT_RD, socket.SHUT_RDWR):
            s.shm.flags |= lib.TOE_SF_RX_SHUT
            try:
                s.b.shutdown(socket.SHUT_WR)  # A reads end-of-file: a blocked recv returns 0
            except OSError:
                pass
        s.process()

    def _setsockopt(self, cmd, fds, rsp) -> None:
        self.setsockopts.append((cmd.sock_id, cmd.arg0, cmd.arg1, bytes(cmd.opt)[: cmd.optlen]))

    def _handover(self, cmd, fds, rsp) -> None:
        self.handovers.append((cmd.sock_id, cmd.arg0, cmd.arg1))
        s = self.socks.get(cmd.sock_id)
        if s is not None and not cmd.arg1:  # refused (strict): the socket stays ours
            self._forget(s)

    def _adopt_op(self, cmd, fds, rsp) -> list[int]:
        """An exec'd program passes an A end it holds and asks for its socket."""
        cookie = lib.toe_fd_cookie(fds[0]) if len(fds) == 1 else 0
        for f in fds:
            os.close(f)
        for s in self.socks.values():
            if cookie and s.cookie == cookie and s.mfd >= 0:
                rsp.sock_id = s.sid
                rsp.tx_ring_bytes = s.shm.tx_size
                rsp.rx_ring_bytes = s.shm.rx_size
                self.adopts.append((cookie, 0))
                return [s.mfd]
        rsp.result = -errno.ENOENT
        self.adopts.append((cookie, -errno.ENOENT))
        return []

    def _fork(self, cmd, fds, rsp) -> list[int]:
        """A channel for a child about to be forked."""
        for f in fds:
            os.close(f)
        if self.refuse_fork:
            rsp.result = -errno.ENFILE
            return []
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        self.ctl[mine.fileno()] = mine
        self.ep.register(mine.fileno(), select.EPOLLIN)
        self.forks += 1
        fd = theirs.detach()
        self._close_after.append(fd)
        return [fd]
