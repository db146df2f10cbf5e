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
import os
import select
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nic_model.counters import UnitCounters

from .abi import ffi, lib
from .byteorder import to_be16, to_be32

if TYPE_CHECKING:  # pragma: no cover
    from .tcp import Ccb, Listener

_TOKEN = b"\x01"


@dataclass
class HostIfCounters(UnitCounters):
    """The host interface: commands, sockets and channels."""

    commands: int = 0
    sockets: int = 0
    accepts: int = 0
    adoptions: int = 0
    handovers: int = 0
    handovers_refused: int = 0
    doorbells: int = 0
    wakes: int = 0                    # WAKE: kicks that could not go through a stuffed A
    pooled: int = 0                   # sockets registered in batches (SOCKETS) for shims' pools
    recycled: int = 0                 # ... of which a closed socket's mapping, reused (REUSE)
    app_closes: int = 0
    bad_commands: int = 0
    foreign_ids: int = 0
    limit_refusals: int = 0
    refused_channels: int = 0
    handler_errors: int = 0
    fork_channels: int = 0
    accept_errors: int = 0
    channels_dropped: int = 0
    by_op: dict[str, int] = field(default_factory=dict)   # commands by operation


class HostSocket:
    """One offloaded socket: B end + shared mapping."""

    mapped_bytes = 0                  # ring memory mapped over all sockets (the adapter's limit)
    spares = 0                        # of which kept for REUSE (Spare), over all processes
    spares_released = 0               # kept mappings released unused (evicted, FORK, exit)

    def __init__(self, sid: int, proc: "ProcessCtx", b_fd: int, memfd: int, tx_size: int,
                 rx_size: int, cookie: int, spare: "Spare | None" = None):
        """Takes ownership of memfd (closed on failure; b_fd stays the caller's until this
        returns). tx_size/rx_size are the adapter's ring sizes: the mapping must be exactly
        that big and its header must say so; from then on the daemon uses only its own copy
        (the header is writable by the application). With `spare`, the mapping is that of
        a closed socket of the same process, already checked and mapped (REUSE)."""
        self.id = sid
        self.proc = proc
        self.pid = proc.pid
        self.uid = proc.uid
        self.b_fd = b_fd
        self.cookie = cookie          # SO_COOKIE of A, read by the daemon: proof of possession (ADOPT)
        self.holders: set[ProcessCtx] = set()   # channels that may name this socket
        self.shm_bytes = shm_bytes = lib.TOE_SHM_HDR_SIZE + tx_size + rx_size
        self.memfd = -1               # kept open to hand to an adopting process
        self._base = ffi.NULL         # the mapping (toe_map: no descriptor of its own)
        self.shm: Any = None          # struct toe_sock_shm * while mapped
        # REUSE may give the mapping to the process's next socket when this one is over:
        # only if it made it (SOCKET, SOCKETS, ACCEPT, REUSE), has not forked since, and
        # nobody else was handed the memfd (ADOPT)
        self.recyclable = True
        self.fork_gen = proc.forks
        if spare is not None:
            memfd, base = spare.memfd, spare.base
            HostSocket.spares -= 1
        else:
            try:
                err = lib.toe_fd_memfd(memfd, shm_bytes)
                if err < 0:
                    raise OSError(-err, "not a sealed memfd of the announced size")
                base = lib.toe_map(memfd, shm_bytes)
                if base == ffi.NULL:
                    raise OSError(ffi.errno, "cannot map the socket's memory")
            except BaseException:
                os.close(memfd)
                raise
            HostSocket.mapped_bytes += shm_bytes
        self._base = base
        self.memfd = memfd
        self.shm = ffi.cast("struct toe_sock_shm *", base)
        if lib.toe_shm_init(self.shm, sid, tx_size, rx_size) != 0:
            self.release()
            raise OSError(errno.EINVAL, "shared header: bad magic, ABI version or ring sizes")
        self.tx_size = tx_size
        self.rx_size = rx_size
        self._tx_ring: memoryview | None = None  # made when software first sends from it (tx_ring)
        self.ccb: Ccb | None = None
        self.listener: Listener | None = None
        self.bound: tuple[int, int] | None = None     # (ip, port) in host order
        self.app_closed = False
        self.b_shut = False
        self.pooled = False           # registered in a batch (SOCKETS), not used yet
        self.hc = False               # ... and registered with the units' command unit (fresh)
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

    def push(self, src_ptr, n: int, count_in: bool = False) -> bool:
        """Append n bytes (the caller checked rx_space()) and make A readable. False when
        they did not fit after all (the application moved its RX index to a value that
        makes no sense): nothing is written, the daemon never writes outside the ring.
        `count_in`: the bytes are the connection's payload, counted in bytes_in."""
        shm = self.shm
        r = lib.toe_d_rx_push(shm, self.tx_size, self.rx_size, src_ptr, n)
        if r > 0 and self.b_fd >= 0 and not self.b_shut:
            self._token()
        if count_in:
            shm.bytes_in += n
        return r >= 0

    def wake(self) -> None:
        """Readability changed without data (EOF, accept queue, error)."""
        if self.b_fd >= 0 and not self.b_shut and \
                lib.toe_d_rx_push(self.shm, self.tx_size, self.rx_size, ffi.NULL, 0) > 0:
            self._token()

    def rx_space(self) -> int:
        """Free bytes in the RX ring, by the daemon's own ring size."""
        return lib.toe_d_rx_space(self.shm, self.rx_size)

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

    def b_was_shut(self) -> None:
        """The fast path's units shut B (the peer's FIN: EOF for the application)."""
        self.b_shut = True

    # ---- the shared header: every write the TCP engine makes -------------

    def set_state(self, state: int) -> None:
        """The socket's TOE_SS_* state as the shim sees it."""
        self.shm.state = state

    def set_accept_pending(self, n: int) -> None:
        self.shm.accept_pending = n

    def count_retransmit(self) -> None:
        self.shm.retransmits += 1

    def closed_if_reset(self) -> None:
        """The connection is gone: a socket that saw a reset reads TOE_SS_CLOSED."""
        shm = self.shm
        if shm.flags & lib.TOE_SF_RESET:
            shm.state = lib.TOE_SS_CLOSED

    def tx_release(self, head: int) -> None:
        """Acked TX ring bytes up to `head` are free; A is writable again if that woke a writer."""
        if lib.toe_tx_release(self.shm, head):
            self.drain()

    def tx_sent(self, seq: int) -> None:
        """Sent up to ring position `seq` (TCP_NOTSENT_LOWAT may make A writable)."""
        if lib.toe_tx_sent(self.shm, seq):
            self.drain()

    def tx_wake(self) -> None:
        """An option changed the writability rule (SO_SNDBUF, TCP_NOTSENT_LOWAT)."""
        if lib.toe_tx_wake(self.shm):
            self.drain()

    def arm_tx_doorbell(self) -> int:
        """Ask the shim to ring when it writes more; returns the TX tail seen after arming."""
        return lib.toe_tx_arm_doorbell(self.shm)

    def arm_rx_window(self, at: int | None = None) -> None:
        """Ask the shim to ring when the application frees RX space."""
        if at is None:
            lib.toe_rx_arm_window(self.shm)
        else:
            lib.toe_rx_arm_window_at(self.shm, at)

    def shut_rd(self) -> None:
        """shutdown(SHUT_RD): a blocked reader wakes up at EOF."""
        self.shm.flags |= lib.TOE_SF_RX_SHUT
        self.shut_b()

    def set_connected(self, mss: int) -> None:
        s = self.shm
        s.mss = mss
        s.state = lib.TOE_SS_CONNECTED
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
        s.state = lib.TOE_SS_CLOSED
        self.drain()
        self.shut_b()

    def set_addresses(self, lip: int, lport: int, rip: int, rport: int) -> None:
        s = self.shm
        s.local_addr_be32 = to_be32(lip)
        s.local_port_be16 = to_be16(lport)
        s.remote_addr_be32 = to_be32(rip)
        s.remote_port_be16 = to_be16(rport)

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

    def _unmap(self) -> tuple[int, Any]:
        """The mapping leaves this object: (memfd, base), the caller's now."""
        memfd, self.memfd = self.memfd, -1
        ring = getattr(self, "_tx_ring", None)
        if ring is not None:
            ring.release()            # a memoryview of the mapping: nothing may read it after this
            self._tx_ring = None
        self.shm = None  # type: ignore[assignment]
        base = getattr(self, "_base", ffi.NULL)
        self._base = ffi.NULL
        return memfd, base

    def release(self) -> None:
        """Unmap the shared memory (the connection no longer needs the rings): the mapping
        and the memfd go to the reaper thread (toe_reap), off the event loop."""
        memfd, base = self._unmap()
        if base != ffi.NULL:
            Spare(memfd, base, self.shm_bytes).release()
        elif memfd >= 0:
            os.close(memfd)

    def retire(self) -> None:
        """The socket is over for good (its A is gone, its connection needs no ring): its
        header is reset and its mapping kept for the process's next socket (REUSE), or
        released. The process keeps at most TOE_RECYCLE_MAX (its oldest goes), the
        adapter SPARES_MAX."""
        ctx = self.proc
        if not (self.recyclable and ctx.alive and ctx.forks == self.fork_gen and self.mapped
                and HostSocket.spares < SPARES_MAX):
            self.release()
            return
        lib.toe_shm_recycle(self.shm, self.tx_size, self.rx_size)
        memfd, base = self._unmap()
        spares = ctx.spares
        if len(spares) >= lib.TOE_RECYCLE_MAX:
            spares.pop(next(iter(spares))).drop()
        spares[self.id] = Spare(memfd, base, self.shm_bytes)
        HostSocket.spares += 1

    @property
    def mapped(self) -> bool:
        return self.shm is not None

    @property
    def tx_ring(self) -> memoryview:
        """The TX ring as bytes (software's sends; the units read it through the mapping)."""
        ring = self._tx_ring
        if ring is None:
            if self._base == ffi.NULL:
                raise ValueError("the socket's memory is unmapped")
            ring = self._tx_ring = memoryview(ffi.buffer(ffi.cast("uint8_t *", self._base) + lib.TOE_SHM_HDR_SIZE,
                                                         self.tx_size))
        return ring


SPARES_MAX = 1024                 # recycled mappings kept over all processes


class Spare:
    """A closed socket's mapping kept for its process's next socket (REUSE): the memfd
    (checked when the socket was made) and the daemon's mapping of it, counted in
    HostSocket.mapped_bytes."""

    __slots__ = ("memfd", "base", "size")

    def __init__(self, memfd: int, base: Any, size: int):
        self.memfd = memfd
        self.base = base
        self.size = size

    def release(self) -> None:
        """Unmapped and closed by the reaper thread (toe_reap), off the event loop."""
        HostSocket.mapped_bytes -= self.size
        lib.toe_reap(self.base, self.size, self.memfd, -1)
        self.base = ffi.NULL
        self.memfd = -1

    def drop(self) -> None:
        """A kept mapping released unused."""
        HostSocket.spares -= 1
        HostSocket.spares_released += 1
        self.release()


def _shutdown_wr(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.detach()


def unix_listener(path: str, kind: int, backlog: int) -> socket.socket:
    """A nonblocking listening Unix socket at `path` (a stale one is replaced). It is bound
    with a umask that leaves it owner-only; the caller opens it to whom it decides
    (access.secure_socket)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


class ProcessCtx:
    """One application process's control channel and the sockets it may name.

    `socks` holds the sockets this channel created, accepted or adopted, or
    inherited through FORK: a command naming any other id is refused (EBADF).
    Identity comes from the kernel: SO_PEERCRED for a channel a process
    connected, SCM_CREDENTIALS on the first message of a FORK channel (the
    daemon made that socket pair, so SO_PEERCRED would name the daemon)."""

    def __init__(self, conn: socket.socket, pid: int, uid: int, gid: int,
                 parent: "ProcessCtx | None" = None):
        self.conn = conn
        self.pid, self.uid, self.gid = pid, uid, gid
        self.allowed = True
        self.parent_pid = parent.pid if parent is not None else 0
        self.want_creds = parent is not None      # FORK channel: learn the child from its first message
        self.comm: str = parent.comm if parent is not None else _comm(pid)
        self.socks: dict[int, HostSocket] = {}
        self.commands = 0
        self.sockets = 0              # offloaded sockets open now that count for this process
        self.offloaded = 0            # offloaded sockets ever (created, accepted, adopted)
        self.pooled = 0               # of `sockets`: in the shim's pool, not used yet
        self.handovers = 0            # sockets handed over to the kernel
        self.refused = 0              # would-be handovers refused in strict mode
        self.handover_reasons: dict[str, int] = {}
        self.alive = True
        self.forks = 0                # FORK channels made for children: older mappings are shared
        self.spares: dict[int, Spare] = {}   # closed sockets' mappings by old id, oldest first
        self.hc_gen = 0               # the units' command unit reads this channel too (its generation)
        self.posted: tuple[bytes, list[int], float] | None = None   # a posted REUSE waiting (its time)

    def hold(self, s: HostSocket) -> None:
        self.socks[s.id] = s
        s.holders.add(self)

    def drop_all(self) -> None:
        for s in self.socks.values():
            s.holders.discard(self)
        self.socks.clear()

    def drop_spares(self) -> None:
        """The kept mappings are released (a FORK shares them with the child, or the
        process is gone)."""
        for sp in self.spares.values():
            sp.drop()
        self.spares.clear()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


MAX_CMD_FDS = 3 * lib.TOE_POOL_BATCH       # SOCKETS: [B, memfd, A] per socket of a batch
_ANC = socket.CMSG_SPACE(MAX_CMD_FDS * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
# socket's flags as plain ints: its enums cost an object per operation, and these run per command
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_CTRUNC = int(socket.MSG_CTRUNC)
_ZERO_RSP = bytes(lib.TOE_RSP_SIZE)
# a command, and REUSE's ids after it; one byte more shows a message too long
_MSG_MAX = lib.TOE_CMD_SIZE + 4 * lib.TOE_POOL_BATCH + 1
# commands of one channel per event-loop pass: one. A shim waits for each answer, so a
# second message is rarely there, and looking for it cost a failed recvmsg() per command;
# the channel is level-triggered, so what does wait comes on the next pass
SERVE_BUDGET = 1
POSTED_WAIT_S = 0.002      # the longest a posted REUSE waits for an idle adapter


class ControlServer:
    """Accepts control channels and answers commands through `adapter`.

    `accept_ok(conn) -> (pid, uid, gid, allowed)` judges a new channel;
    a refused one gets -EACCES for its first command and is closed."""

    def __init__(self, sock: socket.socket, adapter, accept_ok):
        self.sock = sock
        self.adapter = adapter
        self.accept_ok = accept_ok
        self.procs: dict[int, ProcessCtx] = {}
        self._rsp = ffi.new("struct toe_rsp *")
        self._rsp_buf = ffi.buffer(self._rsp)
        self.rsp_fds: list[int] = []     # descriptors to send with the current response
        self.rsp_close: list[int] = []   # ... of which the daemon's copies close once sent
        # posted REUSEs (the shims' pools refilled ahead of need) wait for an idle adapter,
        # so that the commands behind them (a CONNECT) are not held up (with the units only)
        self.defer = False
        self.waiting: dict[int, ProcessCtx] = {}

    def accept(self) -> ProcessCtx | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:                 # EMFILE and the like: counted, the loop goes on
            self.adapter.counters_host.accept_errors += 1
            return None
        conn.setblocking(False)
        try:
            pid, uid, gid, allowed = self.accept_ok(conn)
        except OSError:
            conn.close()
            return None
        ctx = ProcessCtx(conn, pid, uid, gid)
        ctx.allowed = allowed
        self.procs[conn.fileno()] = ctx
        return ctx

    def add_channel(self, conn: socket.socket, parent: ProcessCtx) -> ProcessCtx:
        """A FORK channel: the daemon's end of a pair it made; the child's creds arrive
        with its first message (SO_PASSCRED is on until then)."""
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ctx = ProcessCtx(conn, parent.pid, parent.uid, parent.gid, parent=parent)
        for s in parent.socks.values():
            ctx.hold(s)
        self.procs[conn.fileno()] = ctx
        return ctx

    def _recv(self, ctx: ProcessCtx) -> tuple[bytes, list[int], bool] | None:
        """One message: (bytes, descriptors, descriptors lost to MSG_CTRUNC); None when the
        channel has nothing more (BlockingIOError is the caller's)."""
        msg, anc, flags, _ = ctx.conn.recvmsg(_MSG_MAX, _ANC, _RECV_FLAGS)
        fds: list[int] = []
        creds = None
        for level, kind, data in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                n = len(data) // 4
                fds.extend(struct.unpack(f"{n}i", data[:4 * n]))
            elif kind == socket.SCM_CREDENTIALS and len(data) >= 12:
                creds = struct.unpack("3i", data[:12])
        if ctx.want_creds and creds is not None:
            ctx.want_creds = False
            ctx.pid, ctx.uid, ctx.gid = creds
            ctx.comm = _comm(ctx.pid)
            ctx.conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
        return msg, fds, bool(flags & _CTRUNC)

    def serve(self, ctx: ProcessCtx, now: float) -> bool:
        """Handle the commands waiting on ctx, at most SERVE_BUDGET (the channel is
        level-triggered: the rest comes on the next pass, after the other event
        sources had their turn); False when the channel must go (the process went
        away, or misbehaved)."""
        for _ in range(SERVE_BUDGET):
            try:
                got = self._recv(ctx)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            assert got is not None
            msg, fds, truncated = got
            if not msg and not fds:
                return False
            rsp = self._rsp
            ffi.memmove(rsp, _ZERO_RSP, lib.TOE_RSP_SIZE)
            keep = True
            ctx.commands += 1
            if not ctx.allowed:
                _close_all(fds)
                rsp.result = -errno.EACCES
                self.adapter.counters_host.refused_channels += 1
                keep = False
            elif not _framed(msg) or truncated or len(fds) > MAX_CMD_FDS:
                _close_all(fds)
                rsp.result = -errno.EPROTO if not _framed(msg) else -errno.EINVAL
                self.adapter.counters_host.bad_commands += 1
            else:
                if not ctx.hc_gen and not ctx.want_creds:
                    self.adapter.hc_channel(ctx, True)     # its peer is known: the units may answer too
                if ctx.posted is not None:                 # what came before is done first
                    if not self.answer_posted(ctx, now):
                        _close_all(fds)
                        return False
                    ffi.memmove(rsp, _ZERO_RSP, lib.TOE_RSP_SIZE)   # (the same buffer)
                cmd = ffi.from_buffer("struct toe_cmd *", msg)
                posted = cmd.op == lib.TOE_OP_REUSE and cmd.arg1 & lib.TOE_REUSE_POSTED
                if posted and self.defer:
                    ctx.posted = (msg, fds, now)           # answered when the adapter is idle
                    self.waiting[ctx.conn.fileno()] = ctx
                    continue
                keep = self.adapter.command(ctx, cmd, fds, rsp, now, msg)
                if posted:
                    rsp.flags |= lib.TOE_RF_POSTED
            if not self._answer(ctx) or not keep:
                return False
        return True

    def _answer(self, ctx: ProcessCtx) -> bool:
        """Send self._rsp (and rsp_fds) on ctx's channel; False: the channel must go."""
        try:
            if self.rsp_fds:
                socket.send_fds(ctx.conn, [bytes(self._rsp_buf)], self.rsp_fds, _SEND_FLAGS)
            else:
                ctx.conn.send(self._rsp_buf, _SEND_FLAGS)
        except OSError:
            # a channel whose answers do not fit (it sends and never reads): it goes
            return False
        finally:
            _close_all(self.rsp_close)
            self.rsp_fds = []
            self.rsp_close = []
        return True

    def answer_posted(self, ctx: ProcessCtx, now: float) -> bool:
        """ctx's posted REUSE (the shim's pool refilled ahead of need), done and answered
        now, its answer flagged TOE_RF_POSTED; False: the channel must go."""
        assert ctx.posted is not None
        msg, fds, _ = ctx.posted
        ctx.posted = None
        self.waiting.pop(ctx.conn.fileno(), None)
        rsp = self._rsp
        ffi.memmove(rsp, _ZERO_RSP, lib.TOE_RSP_SIZE)
        keep = self.adapter.command(ctx, ffi.from_buffer("struct toe_cmd *", msg), fds, rsp, now, msg)
        rsp.flags |= lib.TOE_RF_POSTED
        return self._answer(ctx) and keep

    def serve_posted(self, now: float, idle: bool) -> ProcessCtx | None:
        """One posted REUSE, when the adapter is idle or the oldest has waited POSTED_WAIT_S
        (a busy adapter still answers them); the channel to drop if it must go."""
        ctx = next(iter(self.waiting.values()))
        if not idle and now - ctx.posted[2] < POSTED_WAIT_S:  # type: ignore[index]
            return None
        return None if self.answer_posted(ctx, now) else ctx

    def drop_posted(self, ctx: ProcessCtx) -> None:
        if ctx.posted is not None:
            _close_all(ctx.posted[1])
            ctx.posted = None
        self.waiting.pop(ctx.conn.fileno(), None)

    def close(self) -> None:
        for ctx in self.procs.values():
            ctx.conn.close()
        self.procs.clear()
        self.sock.close()


def _framed(msg: bytes) -> bool:
    """One struct toe_cmd; for REUSE, followed by its arg0 ids."""
    n = len(msg)
    if n == lib.TOE_CMD_SIZE:
        return True
    if n < lib.TOE_CMD_SIZE:
        return False
    op, _, count = struct.unpack_from("=IIi", msg)
    return op == lib.TOE_OP_REUSE and 0 < count <= lib.TOE_POOL_BATCH and \
        n == lib.TOE_CMD_SIZE + 4 * count


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
