"""The control channel's commands (docs/abi.md "Commands"): what the daemon does for a
shim, and how it checks that a process names only its own sockets. A part of the
`Adapter` (daemon.py), kept apart from the event loop and the frame paths."""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import select
import socket
import struct
import sys
import traceback
from collections import deque
from typing import TYPE_CHECKING

from nic_model._fastpath import lib as fp_lib

from .abi import ffi, lib
from .byteorder import from_be16, from_be32, to_be16, to_be32
from .config import AdapterConfig
from .host import HostIfCounters, HostSocket, ProcessCtx

if TYPE_CHECKING:  # pragma: no cover
    from .fastpath import FastPath
    from .host import ControlServer
    from .tcp import TcpStack

HANDOVER_REASONS = {1: "loopback", 2: "outside the adapter's subnet", 3: "bind to another address",
                    4: "adapter said so", 5: "adapter unreachable", 6: "accepted through the kernel"}
EP_B = select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP
MAX_CHANNELS = 4096                 # control channels (processes) at once


class BadCommand(Exception):
    """A malformed command (counted in bad_commands), answered -errno."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


def log_exception(what: str) -> None:
    """One handler failed: the traceback goes to the log (stderr), the loop goes on."""
    print(f"toe: error in {what} (the event loop goes on):", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


_IDS_BATCH = 256


class CommandHandler:
    """The commands, as methods of the Adapter (whose state they use: declared here)."""

    cfg: AdapterConfig
    my_ip: int
    network: ipaddress.IPv4Network
    net_ints: tuple[int, int, int]    # the network's address, mask and broadcast as ints
    counters_host: HostIfCounters
    socks: dict[int, HostSocket]
    _ids: list[int]                   # random socket ids not handed out yet (_new_id)
    by_b: dict[int, HostSocket]
    by_kl: dict[int, HostSocket]
    by_cookie: dict[int, HostSocket]
    pid_sockets: dict[int, int]
    ring_limit: int
    exited: deque[ProcessCtx]
    ctl: ControlServer | None
    ep: select.epoll
    tcp: TcpStack
    fp: FastPath | None
    _hc_gens: int                     # the command unit's channel generations handed out

    # ------------------------------------------------------------------ commands

    def _limit_error(self, ctx: ProcessCtx, mapped: int = 0) -> int:
        """0, or the errno the kernel would give for the limit a new socket hits (`mapped`:
        its mapping is a spare, counted already). Kept mappings give way to new sockets."""
        cfg = self.cfg
        if self.pid_sockets.get(ctx.pid, 0) >= cfg.max_process_sockets:
            return errno.EMFILE                 # per process (all its channels), like RLIMIT_NOFILE
        if len(self.socks) >= cfg.max_sockets:
            return errno.ENFILE                 # adapter-wide, like the system file table
        shm = cfg.socket_bytes
        if HostSocket.mapped_bytes - mapped + shm > self.ring_limit:
            if HostSocket.spares > (1 if mapped else 0):
                for other in self.ctl.procs.values():  # type: ignore[union-attr]
                    other.drop_spares()
            if HostSocket.mapped_bytes - mapped + shm > self.ring_limit:
                return errno.ENOBUFS            # ring memory
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
        if len(fds) != 3 or shm_bytes != cfg.socket_bytes:
            raise OSError(errno.EINVAL, "expected [B, memfd, A] and the adapter's ring sizes")
        b_fd, memfd, a_fd = fds
        cookie = lib.toe_fd_pair(b_fd, a_fd)
        if not cookie or cookie in self.by_cookie:
            raise OSError(errno.EINVAL, "A and B must be a new pair of AF_UNIX stream sockets")
        sid = self._new_id()
        fds[1] = -1                              # HostSocket owns memfd from here, even on failure
        s = HostSocket(sid, ctx, b_fd, memfd, cfg.tx_ring_bytes, cfg.rx_ring_bytes, cookie)
        fds[0] = -1
        return s

    def _new_id(self) -> int:
        """Socket ids are random: a process cannot guess another's (and may name only its own).
        From the system's CSPRNG, 256 at a time (a getrandom() per socket was one system
        call in ~35 per short connection)."""
        ids = self._ids
        while True:
            if not ids:
                ids.extend(struct.unpack(f"{_IDS_BATCH}I", secrets.token_bytes(4 * _IDS_BATCH)))
            sid = ids.pop()
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
        fp = self.fp
        if pooled and fp is not None and s.proc.hc_gen:
            # fresh: the units' command unit may answer its CONNECT (nic_model/hw/host_cmd.c)
            s.hc = fp_lib.fp_hc_sock(fp.st, s.id, s.b_fd, s.proc.conn.fileno(), int(ffi.cast("uintptr_t", s.shm)),
                                     s.tx_size, s.rx_size, s.uid) == 0

    def _hc_forget(self, s: HostSocket) -> None:
        """Software acts on the socket: the command unit must not (from before B can close)."""
        if s.hc:
            s.hc = False
            fp_lib.fp_hc_unsock(self.fp.st, s.b_fd)  # type: ignore[union-attr]

    def hc_channel(self, ctx: ProcessCtx, on: bool) -> None:
        """A channel whose peer is known and allowed is the command unit's to look at too
        (a new generation number each time: a socket registered through an old channel on the
        same descriptor cannot be named through a new one); off before it closes."""
        fp = self.fp
        if fp is None or on == bool(ctx.hc_gen):
            return
        if on:
            self._hc_gens += 1
            if fp_lib.fp_hc_channel(fp.st, ctx.conn.fileno(), self._hc_gens) == 0:
                ctx.hc_gen = self._hc_gens
        else:
            fp_lib.fp_hc_channel(fp.st, ctx.conn.fileno(), 0)
            ctx.hc_gen = 0

    def _unpool(self, s: HostSocket) -> None:
        """A pooled socket is used (named by a command): the process's socket from now on."""
        self._hc_forget(s)
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
        self._hc_forget(s)
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
            lib.TOE_OP_ADOPT: (1,), lib.TOE_OP_SOCKETS: tuple(range(3, 3 * lib.TOE_POOL_BATCH + 1, 3)),
            lib.TOE_OP_REUSE: tuple(range(2, 2 * lib.TOE_POOL_BATCH + 1, 2))}

    def command(self, ctx: ProcessCtx, cmd, fds: list[int], rsp, now: float, msg: bytes = b"") -> bool:
        """Answer one command into rsp. Every descriptor in `fds` is either taken by the
        socket it belongs to or closed here, on every path. False: drop the channel."""
        op = cmd.op
        self.count_command(self._OP_NAMES.get(op, "unknown"))
        keep = True
        try:
            if len(fds) not in self._FDS.get(op, (0,)):
                raise BadCommand(errno.EINVAL)
            if op == lib.TOE_OP_REUSE:
                rsp.result = self._reuse(ctx, cmd, msg, fds)
            else:
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
            log_exception(f"command op {op} from pid {ctx.pid}")
            rsp.result = -errno.EIO
            keep = False
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        if rsp.result < 0:
            self.ctl.rsp_fds = []  # type: ignore[union-attr]
        return keep

    def count_command(self, name: str) -> None:
        """A command answered (by software, or by the units' command unit), by operation."""
        self.counters_host.commands += 1
        by_op = self.counters_host.by_op
        by_op[name] = by_op.get(name, 0) + 1

    def _command(self, ctx: ProcessCtx, op: int, cmd, fds: list[int], rsp, now: float) -> int:
        if op == lib.TOE_OP_HELLO:
            rsp.addr_be32 = to_be32(self.my_ip)
            rsp.prefix_len = self.network.prefixlen
            rsp.netmask_be32 = to_be32(int(self.network.netmask))
            rsp.tx_ring_bytes = self.cfg.tx_ring_bytes
            rsp.rx_ring_bytes = self.cfg.rx_ring_bytes
            rsp.daemon_pid = os.getpid()
            rsp.abi_version = lib.TOE_ABI_VERSION
            rsp.flags = lib.TOE_RF_POSTED      # posted commands are answered, flagged (docs/abi.md)
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
            net, mask, bcast = self.net_ints
            if ip == self.my_ip or ip & mask != net or ip in (net, bcast):
                rsp.flags = lib.TOE_RF_HANDOVER     # the adapter's own, off its subnet, not a host
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

    def _reuse(self, ctx: ProcessCtx, cmd, msg: bytes, fds: list[int]) -> int:
        """REUSE: closed sockets of this channel whose mappings the daemon kept (Spare),
        named by their old ids after the command, each with [B, A] of a new pair. Each is
        checked like SOCKETS' and registered under a new id, written into its header (reset
        when it was kept). The answer is the mask of the ids taken; a mapping not taken is
        released, as the shim then drops it."""
        n = cmd.arg0
        if not 0 < n <= lib.TOE_POOL_BATCH or len(msg) != lib.TOE_CMD_SIZE + 4 * n or len(fds) != 2 * n:
            raise BadCommand(errno.EINVAL)
        ids = struct.unpack_from(f"={n}I", msg, lib.TOE_CMD_SIZE)
        cfg = self.cfg
        size = cfg.socket_bytes
        mask = 0
        for i, old in enumerate(ids):
            spare = ctx.spares.pop(old, None)
            if spare is None:
                self.counters_host.foreign_ids += 1
                continue
            b_fd = fds[2 * i]
            cookie = lib.toe_fd_pair(b_fd, fds[2 * i + 1])
            if not cookie or cookie in self.by_cookie or self._limit_error(ctx, size):
                spare.drop()
                continue
            try:
                s = HostSocket(self._new_id(), ctx, b_fd, -1, cfg.tx_ring_bytes, cfg.rx_ring_bytes,
                               cookie, spare)
            except OSError:                      # the application wrote over the reset header
                continue
            fds[2 * i] = -1
            self._register(s, pooled=True)
            s.shm.state = lib.TOE_SS_NEW
            s.shm.sock_id = s.id
            self.counters_host.sockets += 1
            self.counters_host.pooled += 1
            self.counters_host.recycled += 1
            mask |= 1 << i
        return mask

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
        self._hc_forget(s)
        s.recyclable = False               # the adopter maps it too
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
        # the child will have every mapping the parent has now: none of them is recycled
        ctx.forks += 1
        ctx.drop_spares()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.ctl.add_channel(mine, ctx)  # type: ignore[union-attr]
        self.ep.register(mine.fileno(), select.EPOLLIN)
        fd = theirs.detach()
        self.ctl.rsp_fds = [fd]  # type: ignore[union-attr]
        self.ctl.rsp_close = [fd]  # type: ignore[union-attr]
        self.counters_host.fork_channels += 1
        return 0
