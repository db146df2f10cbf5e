"""A hostile client of the adapter's control and inspection sockets (docs/abi.md, ABI 3).

Everything here is deliberately low level: the tests use it to send what a
misbehaving or malicious local user could send, byte for byte.

* `Channel(path)`: one SOCK_SEQPACKET control channel. `call(op, fds, **fields)`
  sends one `struct toe_cmd` (fields by name) with SCM_RIGHTS and returns
  `(Rsp, received_fds)`; `send_raw` / `call_raw` send arbitrary bytes.
* `make_socket_fds(tx, rx, ...)`: the `[B, memfd, A]` a SOCKET (or ACCEPT)
  carries, correct by default, wrong in any one way on request.
* `make_fd(kind)`: a descriptor of a given kind (regular file, pipe, eventfd,
  unix/UDP/TCP socket, memfd, epoll) to attach where it does not belong.
* `daemon_pid`, `fd_count`, `figures`: the daemon's descriptor count and memory
  (VmRSS / VmHWM) from /proc, read by root.
* `as_user(uid, gid, fn, *args)` / `UserProc`: run `fn` in a forked child that
  dropped to uid/gid (no supplementary groups), the result coming back as JSON.
  The child never imports anything (the venv may be unreadable for that user),
  so every module the attack code needs is imported here, at the top.
* `shm_headers(pid)`, `so_cookie`, `steal_fd`: root-only introspection used to
  learn what an attacker would love to know (a victim's real sock_id, cookie),
  so the tests can hand it to the attacker.
The victim's transfer (the scripts and the pattern) is in tests/security/transfer.py.
"""

from __future__ import annotations

# Every module the forked, unprivileged child may need is imported here: it cannot
# import anything itself (the interpreter's library may be unreadable for that user).
import array  # noqa: F401  (socket.send_fds / recv_fds use it)
import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from offload_daemon.abi import ffi, lib
from offload_daemon.config import api_path, ctl_path, state_path

NOBODY_UID = 65534
NOBODY_GID = 65534
DAEMON_UID = 1          # Debian's "daemon": a user the adapters of these tests never allow
DAEMON_GID = 1

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
SYS_PIDFD_GETFD = 438   # the same number on every architecture (new syscalls are unified)

# ---------------------------------------------------------------- the ABI


class OP:
    HELLO = lib.TOE_OP_HELLO
    SOCKET = lib.TOE_OP_SOCKET
    BIND = lib.TOE_OP_BIND
    LISTEN = lib.TOE_OP_LISTEN
    CONNECT = lib.TOE_OP_CONNECT
    ACCEPT = lib.TOE_OP_ACCEPT
    SHUTDOWN = lib.TOE_OP_SHUTDOWN
    SETSOCKOPT = lib.TOE_OP_SETSOCKOPT
    HANDOVER = lib.TOE_OP_HANDOVER
    ADOPT = lib.TOE_OP_ADOPT
    FORK = lib.TOE_OP_FORK
    WAKE = lib.TOE_OP_WAKE
    SOCKETS = lib.TOE_OP_SOCKETS
    REUSE = lib.TOE_OP_REUSE


OP_NAMES = {v: k for k, v in vars(OP).items() if not k.startswith("_")}
KNOWN_OPS = sorted(OP_NAMES)
UNKNOWN_OPS = [0, 15, 0xFFFF_FFFF]
CMD_SIZE = lib.TOE_CMD_SIZE
RSP_SIZE = lib.TOE_RSP_SIZE
HDR_SIZE = lib.TOE_SHM_HDR_SIZE
ABI_VERSION = lib.TOE_ABI_VERSION
SHM_MAGIC = lib.TOE_SHM_MAGIC
SS_CONNECTED = lib.TOE_SS_CONNECTED

_RSP_FIELDS = ("result", "flags", "sock_id", "addr_be32", "port_be16", "prefix_len", "netmask_be32",
               "tx_ring_bytes", "rx_ring_bytes", "daemon_pid", "abi_version")


def errname(result: int | None) -> str:
    """-EBADF -> 'EBADF'; 0 -> '0'; None -> 'None'."""
    if result is None or result >= 0:
        return str(result)
    return errno.errorcode.get(-result, f"errno{-result}")


def pack_cmd(op: int, **fields: Any) -> bytes:
    """One `struct toe_cmd` (64 bytes): op plus any fields by name (opt/reserved as bytes)."""
    cmd = ffi.new("struct toe_cmd *")
    cmd.op = op & 0xFFFF_FFFF
    for name, value in fields.items():
        if name in ("opt", "reserved"):
            data = bytes(value)
            ffi.memmove(getattr(cmd, name), data, min(len(data), ffi.sizeof(getattr(cmd, name))))
        else:
            setattr(cmd, name, value)
    return bytes(ffi.buffer(cmd))


def garbage_cmd(op: int, rng: random.Random) -> bytes:
    """A 64-byte command: `op`, then 60 random bytes."""
    return struct.pack("=I", op & 0xFFFF_FFFF) + rng.randbytes(CMD_SIZE - 4)


@dataclass
class Rsp:
    """One `struct toe_rsp` as received (`length` is what arrived, 64 when well formed)."""

    length: int
    result: int = 0
    flags: int = 0
    sock_id: int = 0
    addr_be32: int = 0
    port_be16: int = 0
    prefix_len: int = 0
    netmask_be32: int = 0
    tx_ring_bytes: int = 0
    rx_ring_bytes: int = 0
    daemon_pid: int = 0
    abi_version: int = 0
    nfds: int = 0           # descriptors that came with it (call_nofds closes them)

    @classmethod
    def parse(cls, msg: bytes) -> Rsp:
        p = ffi.new("struct toe_rsp *")
        ffi.memmove(p, bytes(msg[:RSP_SIZE]).ljust(RSP_SIZE, b"\0"), RSP_SIZE)
        return cls(len(msg), **{f: int(getattr(p, f)) for f in _RSP_FIELDS})

    @property
    def err(self) -> str:
        return errname(self.result)


class ChannelClosed(Exception):
    """The daemon closed the control channel (or it broke) instead of answering."""


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def fd_kind(fd: int) -> str:
    """What a descriptor is: 'seqpacket', 'stream', 'memfd', 'file', ... (for received fds)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "closed"
    if stat.S_ISSOCK(st.st_mode):
        s = socket.socket(fileno=os.dup(fd))
        try:
            return {socket.SOCK_SEQPACKET: "seqpacket", socket.SOCK_STREAM: "stream",
                    socket.SOCK_DGRAM: "dgram"}.get(s.type, f"socket{int(s.type)}")
        finally:
            s.close()
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link.startswith("/memfd:"):
        return "memfd"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISFIFO(st.st_mode):
        return "pipe"
    return link


class Channel:
    """One control channel (AF_UNIX/SOCK_SEQPACKET) to /run/toe/<tap>.sock."""

    def __init__(self, path: str | None = None, *, sock: socket.socket | None = None,
                 timeout: float = 20.0):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
        else:
            sock.settimeout(timeout)
        self.sock = sock
        self.hello_rsp: Rsp | None = None

    @classmethod
    def from_fd(cls, fd: int, timeout: float = 20.0) -> Channel:
        """A channel over a received descriptor (FORK's answer)."""
        return cls(sock=socket.socket(fileno=fd), timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                socket.send_fds(self.sock, [bytes(data)], list(fds))
            else:
                self.sock.send(bytes(data))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from None

    def recv(self) -> tuple[Rsp, list[int]]:
        """One answer and the descriptors it carried. ChannelClosed on EOF; TimeoutError
        (socket.timeout) when the daemon does not answer: a stall."""
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4 * RSP_SIZE, 16)
        except ConnectionResetError as e:
            raise ChannelClosed(str(e)) from None
        if not msg and not fds:
            raise ChannelClosed("EOF")
        return Rsp.parse(msg), list(fds)

    def call_raw(self, data: bytes, fds: Sequence[int] = ()) -> tuple[Rsp, list[int]]:
        self.send_raw(data, fds)
        return self.recv()

    def call(self, op: int, fds: Sequence[int] = (), **fields: Any) -> tuple[Rsp, list[int]]:
        return self.call_raw(pack_cmd(op, **fields), fds)

    def call_nofds(self, op: int, fds: Sequence[int] = (), **fields: Any) -> Rsp:
        """call(), closing whatever descriptors came back; their count is in rsp.nfds."""
        rsp, got = self.call(op, fds, **fields)
        rsp.nfds = len(got)
        close_all(got)
        return rsp

    def hello(self) -> Rsp:
        rsp = self.call_nofds(OP.HELLO, pid=os.getpid())
        if rsp.result == 0:
            self.hello_rsp = rsp
        return rsp

    def ring_sizes(self) -> tuple[int, int]:
        if self.hello_rsp is None:
            rsp = self.hello()
            if rsp.result != 0:
                raise AssertionError(f"HELLO answered {rsp.err}")
        assert self.hello_rsp is not None
        return self.hello_rsp.tx_ring_bytes, self.hello_rsp.rx_ring_bytes

    def socket(self, keep_map: bool = False, **kw: Any) -> tuple[Rsp, SockFds]:
        """SOCKET with make_socket_fds(**kw): the answer and the fds (A kept; B and the
        memfd closed after sending, the mapping kept in .mm if keep_map)."""
        tx, rx = self.ring_sizes()
        sf = make_socket_fds(tx, rx, **kw)
        if keep_map:
            sf.map()
        rsp = self.call_nofds(OP.SOCKET, sf.fds, shm_bytes=kw.get("shm_bytes", sf.shm_bytes))
        sf.close_sent()
        if rsp.result == 0:
            sf.sock_id = rsp.sock_id
        return rsp, sf

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- descriptors


@dataclass
class Fd:
    """A descriptor to send, and the other ends / helpers to close afterwards."""

    fd: int
    kind: str
    extra: list[int] = field(default_factory=list)

    def close(self) -> None:
        close_all([self.fd, *self.extra])
        self.fd = -1
        self.extra = []


FD_KINDS = ("file", "pipe", "eventfd", "unix", "udp", "dgram", "memfd", "epoll")


def make_fd(kind: str, port: int = 0) -> Fd:
    """A descriptor of `kind`; see FD_KINDS, plus tmpfile, tcp, tcp_listener, seqpacket."""
    if kind == "file":            # a regular file, read-only (readable by everyone)
        return Fd(os.open("/etc/passwd", os.O_RDONLY | os.O_CLOEXEC), kind)
    if kind == "tmpfile":         # a regular, writable, unlinked file
        return Fd(os.open("/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), kind)
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        return Fd(r, kind, [w])
    if kind == "eventfd":
        return Fd(os.eventfd(0, os.EFD_CLOEXEC), kind)
    if kind in ("unix", "dgram", "seqpacket"):
        typ = {"unix": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}[kind]
        x, y = socket.socketpair(socket.AF_UNIX, typ)
        return Fd(x.detach(), kind, [y.detach()])
    if kind == "udp":
        return Fd(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach(), kind)
    if kind == "tcp":
        return Fd(socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach(), kind)
    if kind == "tcp_listener":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        return Fd(s.detach(), kind)
    if kind == "memfd":
        fd = os.memfd_create("toe-hostile", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        return Fd(fd, kind)
    if kind == "epoll":
        ep = select.epoll()
        fd = os.dup(ep.fileno())
        ep.close()
        return Fd(fd, kind)
    raise ValueError(f"unknown descriptor kind {kind!r}")


@dataclass
class SockFds:
    """The [B, memfd, A] of one SOCKET/ACCEPT; the test keeps A (the application's end)."""

    b: int
    memfd: int
    a: int
    shm_bytes: int
    extra: list[int] = field(default_factory=list)
    order: tuple[str, ...] = ("b", "memfd", "a")
    sock_id: int = 0
    mm: mmap.mmap | None = None

    @property
    def fds(self) -> list[int]:
        return [getattr(self, name) for name in self.order]

    def map(self) -> mmap.mmap:
        """Map the memfd (read-write, shared) and keep the mapping."""
        if self.mm is None:
            self.mm = mmap.mmap(self.memfd, self.shm_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return self.mm

    def header(self) -> Any:
        """The mapping's `struct toe_sock_shm *` (map() first)."""
        return ffi.cast("struct toe_sock_shm *", ffi.from_buffer(self.map()))

    def close_sent(self) -> None:
        """Close our copies of what the daemon keeps (B, memfd) and the extras; keep A."""
        close_all([self.b, self.memfd, *self.extra])
        self.b = self.memfd = -1
        self.extra = []

    def close(self) -> None:
        self.close_sent()
        close_all([self.a])
        self.a = -1
        if self.mm is not None:
            with contextlib.suppress(BufferError):
                self.mm.close()
            self.mm = None


def make_memfd(size: int, *, seals: int | None = None, magic: int = SHM_MAGIC, abi: int = ABI_VERSION,
               hdr_tx: int = 0, hdr_rx: int = 0, kind: str = "memfd") -> int:
    """A memfd of `size` bytes with the shared header initialised (when size allows) and
    `seals` added (default SHRINK|GROW; 0: unsealed). kind='tmpfile': a regular file instead."""
    if kind == "tmpfile":
        fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    else:
        fd = os.memfd_create("toe-hostile-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if size >= HDR_SIZE:
            hdr = ffi.new("struct toe_sock_shm *")
            hdr.magic = magic
            hdr.abi_version = abi
            hdr.tx_size = hdr_tx
            hdr.rx_size = hdr_rx
            os.pwrite(fd, bytes(ffi.buffer(hdr)), 0)
        if seals is None:
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        if seals and kind == "memfd":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_socket_fds(tx: int, rx: int, seal: bool = True, *, seals: int | None = None,
                    size: int | None = None, magic: int = SHM_MAGIC, abi: int = ABI_VERSION,
                    hdr_tx: int | None = None, hdr_rx: int | None = None, b_kind: str = "socket",
                    a_kind: str = "socket", memfd_kind: str = "memfd",
                    order: tuple[str, ...] = ("b", "memfd", "a"), shm_bytes: int | None = None) -> SockFds:
    """[B, memfd, A] as SOCKET/ACCEPT want them (AF_UNIX stream pair; a sealed memfd of
    4096+tx+rx bytes, header magic/abi/tx_size/rx_size set), or wrong in the way asked:
    seal=False, other seals, another size, magic, ABI or ring sizes in the header, B or A
    replaced by a descriptor of another kind (make_fd), a regular file for the memfd
    (memfd_kind='tmpfile'), another order or subset (order=('b', 'memfd'))."""
    want = HDR_SIZE + tx + rx
    size = want if size is None else size
    if not seal:
        seals = 0
    memfd = make_memfd(size, seals=seals, magic=magic, abi=abi, hdr_tx=tx if hdr_tx is None else hdr_tx,
                       hdr_rx=rx if hdr_rx is None else hdr_rx, kind=memfd_kind)
    extra: list[int] = []
    pa, pb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = pa.detach(), pb.detach()
    if b_kind != "socket":
        other = make_fd(b_kind)
        extra += [b, *other.extra]
        b = other.fd
    if a_kind != "socket":
        other = make_fd(a_kind)
        extra += [a, *other.extra]
        a = other.fd
    return SockFds(b=b, memfd=memfd, a=a, shm_bytes=size if shm_bytes is None else shm_bytes,
                   extra=extra, order=order)


def so_cookie(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    finally:
        s.close()


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


# ---------------------------------------------------------------- root-only introspection


def steal_fd(pid: int, target_fd: int) -> int:
    """A duplicate of another process's descriptor (pidfd_getfd; root). Close it soon."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def shm_headers(pid: int) -> list[dict[str, int]]:
    """The toe shared headers mapped in process `pid` (root: /proc/<pid>/map_files):
    sock_id, state, ring sizes. What only root (or the socket's holder) may know."""
    out: dict[int, dict[str, int]] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/memfd:") or int(parts[2], 16) != 0:
            continue
        try:
            fd = os.open(f"/proc/{pid}/map_files/{parts[0]}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            data = os.pread(fd, HDR_SIZE, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        if len(data) < HDR_SIZE:
            continue
        hdr = ffi.new("struct toe_sock_shm *")
        ffi.memmove(hdr, data, HDR_SIZE)
        if hdr.magic == SHM_MAGIC and hdr.sock_id:
            out[int(hdr.sock_id)] = {"sock_id": int(hdr.sock_id), "state": int(hdr.state),
                                     "tx_size": int(hdr.tx_size), "rx_size": int(hdr.rx_size)}
    return list(out.values())


def ids_in_stat(answer: dict[str, Any]) -> set[int]:
    """Every integer a stat answer shows as an id or sock_id (connections, listeners, processes)."""
    ids: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("id", "sock_id", "sock") and isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    for key in ("connections", "listeners", "closed", "processes"):
        walk(answer.get(key))
    return {i for i in ids if 0 < i <= 0xFFFF_FFFF}


# ---------------------------------------------------------------- the daemon, from /proc


def daemon_pid(tap: str) -> int:
    with open(state_path(tap)) as f:
        return int(json.load(f)["pid"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def figures(pid: int) -> dict[str, int]:
    """The daemon's open descriptors, VmRSS and VmHWM (peak RSS), in kB."""
    return {"fds": fd_count(pid), "rss_kb": proc_status_kb(pid, "VmRSS"),
            "hwm_kb": proc_status_kb(pid, "VmHWM")}


def settle_fds(pid: int, baseline: int, timeout: float = 60.0) -> int:
    """Wait until the daemon holds no more descriptors than `baseline`; the last count."""
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def fd_links(pid: int) -> list[str]:
    """What the daemon's descriptors point at (for a leak's message)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return out


def summarize_links(links: Iterable[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for link in links:
        k = link.split(":", 1)[0] if ":" in link and not link.startswith("/") else link
        if link.startswith("/memfd:"):
            k = "memfd"
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


# ---------------------------------------------------------------- the inspection API


def api_connect(path: str, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def api_request(path: str, request: dict[str, Any] | bytes, timeout: float = 30.0) -> dict[str, Any]:
    """One request line, one answer line (parsed). bytes are sent as they are."""
    s = api_connect(path, timeout)
    try:
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        s.sendall(data)
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ChannelClosed(f"the API closed the connection after {len(buf)} bytes")
            buf += chunk
    finally:
        s.close()
    return json.loads(bytes(buf).split(b"\n", 1)[0])


# ---------------------------------------------------------------- running as another user


class UserProcError(AssertionError):
    pass


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getgroups():
        raise RuntimeError("privileges not dropped")


class Peer:
    """The child's end of a UserProc: JSON messages to and from the parent."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _write(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj, default=str).encode() + b"\n")

    def send(self, obj: Any) -> None:
        self._write({"msg": obj})

    def recv(self, timeout: float = 120.0) -> Any:
        return _read_line(self.sock, self.buf, timeout)["msg"]


def _read_line(sock: socket.socket, buf: bytearray, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not readable(sock.fileno(), left):
            raise TimeoutError(f"no message within {timeout:.0f} s")
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the other side closed")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


class UserProc:
    """fn(peer, *args) in a forked child running as uid/gid (no supplementary groups).

    The child keeps only stdin/stdout/stderr and its link to the parent (nothing of the
    test's root descriptors). `send`/`recv` exchange JSON messages with it; `result()`
    is fn's return value (JSON), or raises UserProcError with the child's traceback.
    """

    def __init__(self, uid: int, gid: int, fn: Callable[..., Any], *args: Any):
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                parent_sock.close()
                keep = child_sock.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 1 << 16)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _drop_privileges(uid, gid)
                peer = Peer(child_sock)
                try:
                    value = fn(peer, *args)
                    peer._write({"result": value})
                except BaseException:
                    peer._write({"error": traceback.format_exc()})
                    code = 1
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        child_sock.close()
        self.pid = pid
        self.sock = parent_sock
        self.buf = bytearray()
        self.uid = uid
        self._result: dict[str, Any] | None = None
        self.status: int | None = None

    def send(self, obj: Any) -> None:
        self.sock.sendall(json.dumps({"msg": obj}).encode() + b"\n")

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            return _read_line(self.sock, self.buf, timeout)
        except TimeoutError:
            self.kill()
            raise UserProcError(f"the child running as uid {self.uid} sent nothing within {timeout:.0f} s "
                                "(stuck: did the daemon stop answering?)") from None
        except EOFError:
            self.wait()
            raise UserProcError(f"the child running as uid {self.uid} died (status {self.status})") from None

    def recv(self, timeout: float = 120.0) -> Any:
        obj = self._next(timeout)
        if "msg" in obj:
            return obj["msg"]
        self._result = obj
        self._raise_if_error()
        raise UserProcError(f"the child finished instead of sending a message: {obj!r}")

    def _raise_if_error(self) -> None:
        if self._result is not None and "error" in self._result:
            raise UserProcError(f"code running as uid {self.uid} failed:\n{self._result['error']}")

    def result(self, timeout: float = 300.0) -> Any:
        while self._result is None:
            obj = self._next(timeout)
            if "msg" not in obj:
                self._result = obj
        self.wait()
        self._raise_if_error()
        return self._result["result"]

    def wait(self) -> None:
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
            self.sock.close()

    def kill(self) -> None:
        """Stop the child (by its pid) and reap it."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()


def as_user(uid: int, gid: int, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """fn(*args) run as uid/gid in a forked child; its (JSON) result."""
    proc = UserProc(uid, gid, lambda _peer, *a: fn(*a), *args)
    try:
        return proc.result(timeout)
    finally:
        proc.kill()


def paths(tap: str) -> tuple[str, str]:
    """(control socket, API socket) of adapter `tap`."""
    return ctl_path(tap), api_path(tap)
