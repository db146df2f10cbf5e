"""Host interface: the adapter's side of docs/abi.md.

* `ControlServer` accepts one SOCK_SEQPACKET connection per application
  process and turns each `struct toe_cmd` into a call on the adapter.
* `HostSocket` is one offloaded socket as the host sees it: end B of the
  socket pair (readiness and lifetime) and the shared mapping (header and
  rings). It knows the protocol's hand-offs (tokens, drain, EOF), nothing
  about TCP.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import termios
from typing import TYPE_CHECKING

from .abi import ffi, lib

if TYPE_CHECKING:  # pragma: no cover
    from .tcp import Ccb, Listener

_TOKEN = b"\x01"
SS_NEW, SS_BOUND, SS_LISTEN, SS_CONNECTING, SS_CONNECTED, SS_CLOSED = range(6)


class HostSocket:
    """One offloaded socket: B end + shared mapping."""

    def __init__(self, sid: int, proc: "ProcessCtx", b_fd: int, memfd: int, shm_bytes: int,
                 cookie: int = 0):
        self.id = sid
        self.proc = proc
        self.pid = proc.pid
        self.b_fd = b_fd
        self.cookie = cookie          # SO_COOKIE of A: how an exec'd program finds its socket again
        self.shm_bytes = shm_bytes
        self.memfd = -1               # kept open to hand to an adopting process
        self.mm: mmap.mmap | None = None
        try:
            st = os.fstat(memfd)
            if st.st_size != shm_bytes or shm_bytes < lib.TOE_SHM_HDR_SIZE + 8192:
                raise ValueError(f"memfd of {st.st_size} bytes, command says {shm_bytes}")
            self.mm = mmap.mmap(memfd, shm_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(memfd)
            raise
        self.memfd = memfd
        self._ptr = ffi.from_buffer(self.mm)
        self.shm = ffi.cast("struct toe_sock_shm *", self._ptr)
        s = self.shm
        if s.magic != lib.TOE_SHM_MAGIC or s.abi_version != lib.TOE_ABI_VERSION:
            self.release()
            raise ValueError("shared mapping has a bad magic or ABI version")
        tx, rx = s.tx_size, s.rx_size
        if tx & (tx - 1) or rx & (rx - 1) or lib.TOE_SHM_HDR_SIZE + tx + rx != shm_bytes:
            self.release()
            raise ValueError(f"bad ring sizes {tx}/{rx} for a {shm_bytes}-byte mapping")
        s.sock_id = sid
        self.tx_size = tx
        self.rx_size = rx
        self.view = memoryview(self.mm)
        self.tx_ring = self.view[lib.TOE_SHM_HDR_SIZE:lib.TOE_SHM_HDR_SIZE + tx]
        self.ccb: Ccb | None = None
        self.listener: Listener | None = None
        self.bound: tuple[int, int] | None = None     # (ip, port) in host order
        self.app_closed = False
        self.b_shut = False
        # INADDR_ANY listener: the app's kernel listening socket on the same port (a dup),
        # watched so that A is readable when a connection waits on either path
        self.kernel_listener = -1

    # ---- readiness hand-offs -------------------------------------------

    def _token(self) -> None:
        # count first, then write: the shim may then find a token counted but not yet
        # in A (it reads what is there); the reverse order could leave a byte in A that
        # nobody counted, and the next token would be suppressed (a lost edge)
        lib.toe_rx_token_sent(self.shm)
        try:
            os.write(self.b_fd, _TOKEN)
        except OSError:
            pass

    def push(self, src_ptr, n: int) -> None:
        """Append n bytes (the caller checked the space) and make A readable."""
        if lib.toe_rx_push(self.shm, src_ptr, n) and self.b_fd >= 0 and not self.b_shut:
            self._token()

    def wake(self) -> None:
        """Readability changed without data (EOF, accept queue, error)."""
        if self.b_fd >= 0 and not self.b_shut and lib.toe_rx_push(self.shm, ffi.NULL, 0):
            self._token()

    def queued(self) -> int:
        """Bytes waiting in B (doorbells, and filler that stuffs A)."""
        if self.b_fd < 0:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self.b_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def drain(self, limit: int | None = None) -> bool:
        """Read out of B (A becomes writable): everything, or the first `limit` bytes.
        True if A is gone.

        A caller that decides to drain from what it reads in the shared header
        counts B's bytes (`queued`) first and drains only those: filler the shim
        writes after that decision (it declares tx_full_wait before stuffing)
        stays, and A stays unwritable."""
        if self.b_fd < 0:
            return True
        left = limit
        while left is None or left > 0:
            try:
                data = os.read(self.b_fd, 65536 if left is None else min(left, 65536))
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            if left is not None:
                left -= len(data)
        return False

    def shut_b(self) -> None:
        """shutdown(B, SHUT_WR): A reads EOF after its tokens and shows POLLRDHUP."""
        if self.b_fd >= 0 and not self.b_shut:
            self.b_shut = True
            try:
                _shutdown_wr(self.b_fd)
            except OSError:
                pass

    def set_connected(self, mss: int) -> None:
        s = self.shm
        s.mss = mss
        s.state = SS_CONNECTED
        self.drain()

    def set_eof(self) -> None:
        # no token: shutdown(B) alone makes A readable, with POLLIN and POLLRDHUP raised in one
        # wake-up as the kernel does on FIN (a token first would give an edge without RDHUP)
        self.shm.flags |= lib.TOE_SF_RX_EOF
        self.shut_b()

    def set_error(self, err: int) -> None:
        """Connection failed or was reset: SO_ERROR, readable (EOF), writable."""
        s = self.shm
        s.so_error = err
        s.flags |= lib.TOE_SF_RESET
        s.state = SS_CLOSED
        self.drain()
        self.shut_b()

    def set_addresses(self, lip: int, lport: int, rip: int, rport: int) -> None:
        s = self.shm
        s.local_addr_be32 = _be32(lip)
        s.local_port_be16 = _be16(lport)
        s.remote_addr_be32 = _be32(rip)
        s.remote_port_be16 = _be16(rport)

    # ---- lifetime ---------------------------------------------------------

    def close_b(self) -> None:
        if self.b_fd >= 0:
            os.close(self.b_fd)
            self.b_fd = -1

    def kernel_pending(self) -> bool:
        """A connection waits in the kernel listening socket's accept queue."""
        if self.kernel_listener < 0:
            return False
        p = select.poll()
        p.register(self.kernel_listener, select.POLLIN)
        return bool(p.poll(0))

    def release(self) -> None:
        """Unmap the shared memory (the connection no longer needs the rings)."""
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        self.tx_ring = None  # type: ignore[assignment]
        if hasattr(self, "view") and self.view is not None:
            self.view.release()
            self.view = None  # type: ignore[assignment]
        self.shm = None  # type: ignore[assignment]
        self._ptr = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None

    @property
    def mapped(self) -> bool:
        return self.mm is not None


def _shutdown_wr(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.detach()


def _be32(x: int) -> int:
    return struct.unpack("=I", struct.pack("!I", x))[0]


def _be16(x: int) -> int:
    return struct.unpack("=H", struct.pack("!H", x))[0]


def from_be32(x: int) -> int:
    return struct.unpack("!I", struct.pack("=I", x))[0]


def from_be16(x: int) -> int:
    return struct.unpack("!H", struct.pack("=H", x))[0]


def unix_listener(path: str, kind: int, backlog: int) -> socket.socket:
    """A nonblocking listening Unix socket at `path` (a stale one is replaced), open to all users."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(backlog)
    return sock


class ProcessCtx:
    """One application process's control channel."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                self.comm = f.read().strip()
        except OSError:
            self.comm = "?"
        self.sockets = 0              # offloaded sockets open now
        self.offloaded = 0            # offloaded sockets ever (created, accepted, adopted)
        self.handovers = 0            # sockets handed over to the kernel
        self.refused = 0              # would-be handovers refused in strict mode
        self.handover_reasons: dict[str, int] = {}
        self.alive = True


class ControlServer:
    """Accepts control channels and answers commands through `adapter`."""

    def __init__(self, path: str, adapter):
        self.path = path
        self.adapter = adapter
        self.sock = unix_listener(path, socket.SOCK_SEQPACKET, 128)
        self.procs: dict[int, ProcessCtx] = {}
        self._rsp = ffi.new("struct toe_rsp *")
        self._rsp_buf = ffi.buffer(self._rsp)
        self.rsp_fds: list[int] = []     # descriptors to send with the current response

    def accept(self) -> ProcessCtx | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(False)
        ctx = ProcessCtx(conn)
        self.procs[conn.fileno()] = ctx
        return ctx

    def serve(self, ctx: ProcessCtx, now: float) -> bool:
        """Handle every command waiting on ctx; False when the process went away."""
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctx.conn, lib.TOE_CMD_SIZE * 2, 4)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not msg:
                for fd in fds:
                    os.close(fd)
                return False
            rsp = self._rsp
            ffi.memmove(rsp, b"\0" * lib.TOE_RSP_SIZE, lib.TOE_RSP_SIZE)
            if len(msg) != lib.TOE_CMD_SIZE:
                for fd in fds:
                    os.close(fd)
                rsp.result = -errno.EPROTO
                self.adapter.counters_host["bad_commands"] += 1
            else:
                cmd = ffi.from_buffer("struct toe_cmd *", msg)
                self.adapter.command(ctx, cmd, fds, rsp, now)
            try:
                if self.rsp_fds:
                    socket.send_fds(ctx.conn, [bytes(self._rsp_buf)], self.rsp_fds)
                else:
                    ctx.conn.send(self._rsp_buf)
            except OSError:
                return False
            finally:
                self.rsp_fds = []

    def close(self) -> None:
        for ctx in self.procs.values():
            ctx.conn.close()
        self.procs.clear()
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
