"""Malformed and hostile commands on the control channel (issue 9), sent by nobody.

* a table: every op (HELLO..FORK and the unknown 0, 12, 0xffffffff) × garbage
  fields, short / oversized / empty messages (with and without a descriptor),
  and 1..4 descriptors of random kinds where none (or others) belong;
* the wrong descriptor kinds for the ops that take descriptors (SOCKET, ACCEPT,
  LISTEN, ADOPT), with a well-formed positive control for each;
* each case: the answer is the errno the protocol fixes (or at least a negative
  one), nothing comes back that should not, the daemon serves on (a fresh
  HELLO, a stat) and every descriptor sent is closed (its descriptor count is
  back to what it was before the case);
* the bad-command loop (20,000 SOCKETs whose B is not a socket, 5,000 other bad
  commands) with the daemon's descriptors and memory before and after;
* the limits (per process, total, ring memory) and a shared header rewritten
  with garbage while data flows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import pytest

from tests.conftest import run_toe, unique_port
from tests.security import hostile, transfer
from tests.security.hostile import (
    FD_KINDS,
    KNOWN_OPS,
    NOBODY_GID,
    NOBODY_UID,
    OP,
    OP_NAMES,
    UNKNOWN_OPS,
    Channel,
    ChannelClosed,
)
from tests.security.transfer import Lines

pytestmark = pytest.mark.integration

ALLOW_NOBODY = ("--allow-users", "nobody")
E = {name: -getattr(errno, name) for name in ("EINVAL", "EBADF", "ENOENT", "EPROTO", "EOPNOTSUPP", "EMFILE",
                                                "ENFILE", "ENOBUFS", "EPERM", "EACCES", "EINPROGRESS")}
ID_OPS = (OP.BIND, OP.LISTEN, OP.CONNECT, OP.SHUTDOWN, OP.SETSOCKOPT, OP.HANDOVER, OP.ACCEPT, OP.WAKE)
ANY = None            # the protocol does not fix the answer (only: no crash, nothing back)


def be32(ip: str) -> int:
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def op_name(op: int) -> str:
    return OP_NAMES.get(op, f"op{op:#x}")


def seed_of(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def answer(ch: Channel, data: bytes, fds: list[int]) -> dict[str, Any]:
    """Send raw bytes (+fds), return what came back: result / closed / stalled, and the
    kinds of the descriptors that came with it (closed here)."""
    try:
        ch.send_raw(data, fds)
        rsp, got = ch.recv()
    except ChannelClosed:
        return {"result": "closed", "fds": []}
    except TimeoutError:
        return {"result": "stalled", "fds": []}
    kinds = [hostile.fd_kind(fd) for fd in got]
    out: dict[str, Any] = {"result": rsp.result, "fds": kinds, "length": rsp.length, "sock_id": rsp.sock_id}
    if kinds == ["seqpacket"]:                     # a FORK channel: does it answer?
        try:
            with Channel.from_fd(got[0], timeout=10) as fch:
                out["fork_hello"] = fch.hello().result
            got = []
        except (ChannelClosed, OSError) as e:
            out["fork_hello"] = str(e)
    hostile.close_all(got)
    return out


def own_socket_fields(ch: Channel, op: int, host_ip: str, port: int) -> tuple[dict[str, Any], Any]:
    """A socket of this channel, prepared so that `op` on it would be valid without the
    descriptors the case attaches; the command fields naming it."""
    rsp, sf = ch.socket()
    if rsp.result != 0:
        raise AssertionError(f"setup: a well-formed SOCKET answered {rsp.err}")
    sid = sf.sock_id
    fields: dict[str, Any] = {"sock_id": sid}
    if op == OP.LISTEN:
        r = ch.call_nofds(OP.BIND, sock_id=sid, addr_be32=0, port_be16=0)
        if r.result != 0:
            raise AssertionError(f"setup: BIND 0.0.0.0:0 answered {r.err}")
        fields["arg0"] = 8
    elif op == OP.BIND:
        fields.update(addr_be32=0, port_be16=0)
    elif op == OP.CONNECT:
        fields.update(addr_be32=be32(host_ip), port_be16=socket.htons(port))
    elif op == OP.SHUTDOWN:
        fields["arg0"] = socket.SHUT_WR
    elif op == OP.SETSOCKOPT:
        fields.update(arg0=socket.SOL_SOCKET, arg1=socket.SO_KEEPALIVE, opt=struct.pack("=i", 1), optlen=4)
    elif op == OP.HANDOVER:
        fields["arg0"] = 4
    elif op == OP.ACCEPT:
        fields["shm_bytes"] = sf.shm_bytes
    return fields, sf


VARIANTS = ("garbage", "short", "short+fd", "oversized", "empty", "empty+fd", "fds1", "fds2", "fds3", "fds4")


def generic_case(ctl: str, op: int, variant: str, seed: int, host_ip: str, port: int) -> dict[str, Any]:
    """Runs as nobody: one bad command of `variant` for `op`, then a HELLO on the same channel."""
    rng = random.Random(seed)
    ch = Channel(ctl)
    if ch.hello().result != 0:
        return {"setup": "HELLO refused"}
    held: list[Any] = []
    fields: dict[str, Any] = {}
    fds: list[hostile.Fd] = []
    if variant.startswith("fds"):
        if op in ID_OPS:
            fields, sf = own_socket_fields(ch, op, host_ip, port)
            held.append(sf)
        fds = [hostile.make_fd(rng.choice(FD_KINDS)) for _ in range(int(variant[3:]))]
    elif variant.endswith("+fd"):
        fds = [hostile.make_fd("pipe")]
    if variant == "garbage":
        data = hostile.garbage_cmd(op, rng)
    elif variant.startswith("short"):
        data = hostile.pack_cmd(op, **fields)[:10]
    elif variant == "oversized":            # a well-formed command, then 136 bytes more
        data = hostile.pack_cmd(op, pid=os.getpid(), **fields) + rng.randbytes(200 - hostile.CMD_SIZE)
    elif variant.startswith("empty"):
        data = b""
    else:
        data = hostile.pack_cmd(op, **fields)
    out = answer(ch, data, [f.fd for f in fds])
    out["sent_kinds"] = [f.kind for f in fds]
    for f in fds:
        f.close()
    if out["result"] != "closed":
        try:
            out["after"] = ch.hello().result
        except (ChannelClosed, TimeoutError) as e:
            out["after"] = f"{type(e).__name__}"
    for sf in held:
        sf.close()
    ch.close()
    return out


def expected(op: int, variant: str, sent_kinds: list[str]) -> tuple[set[int] | None, bool]:
    """(allowed results or ANY, whether the channel may be closed instead of an answer)."""
    if variant.startswith(("short", "oversized")):
        return {E["EPROTO"]}, False
    if variant.startswith("empty"):                 # a 0-byte SEQPACKET record reads like EOF
        return {E["EPROTO"]}, True
    unknown = op not in KNOWN_OPS
    if variant == "garbage":
        if unknown:
            return {E["EOPNOTSUPP"]}, False
        if op in (OP.HELLO, OP.FORK):
            return ANY, False
        if op in (OP.SOCKET, OP.SOCKETS, OP.REUSE, OP.ADOPT):
            return {E["EINVAL"]}, False             # without their descriptors (REUSE: its ids)
        # a random sock_id is not ours (EBADF), but random fields may be refused first (EINVAL):
        # either way nothing is done (test_isolation pins EBADF with well-formed fields)
        return {E["EBADF"], E["EINVAL"]}, False
    # descriptors where they do not belong
    if unknown:
        return {E["EOPNOTSUPP"], E["EINVAL"]}, False
    if op == OP.ADOPT:
        return ({E["ENOENT"]} if sent_kinds == ["unix"] else {E["EINVAL"]}), False
    return {E["EINVAL"]}, False


def check_daemon(adapter, pid: int, baseline_fds: int, what: str) -> list[str]:
    """The daemon is the same process, answers HELLO and stat, and is back to its descriptors."""
    problems = []
    if not hostile.alive(pid):
        return [f"{what}: the daemon (pid {pid}) died"]
    try:
        with Channel(hostile.ctl_path(adapter.tap), timeout=20) as ch:
            r = ch.hello()
            if r.result != 0:
                problems.append(f"{what}: a fresh HELLO answered {r.err}")
    except (OSError, ChannelClosed) as e:
        problems.append(f"{what}: a fresh HELLO failed: {e!r}")
    try:
        st = hostile.api_request(hostile.api_path(adapter.tap), {"cmd": "stat"}, timeout=20)
        if not st.get("ok", True) or "units" not in st:
            problems.append(f"{what}: stat answered {str(st)[:200]}")
    except (OSError, ChannelClosed, ValueError) as e:
        problems.append(f"{what}: stat failed: {e!r}")
    n = hostile.settle_fds(pid, baseline_fds)
    if n > baseline_fds:
        links = hostile.summarize_links(hostile.fd_links(pid))
        problems.append(f"{what}: the daemon holds {n} descriptors, {baseline_fds} before the case "
                        f"(descriptors sent were not all closed); it holds {links}")
    return problems


def before(adapter) -> tuple[int, int]:
    """The daemon's pid and descriptor count before a case, once the channels of the
    previous case are gone (the daemon sees their end asynchronously)."""
    pid = hostile.daemon_pid(adapter.tap)
    n, deadline = hostile.fd_count(pid), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        m = hostile.fd_count(pid)
        if m >= n:
            break
        n = m
    return pid, n


GENERIC = [(op, v) for op in [*KNOWN_OPS, *UNKNOWN_OPS] for v in VARIANTS]


@pytest.mark.parametrize(("op", "variant"), GENERIC, ids=[f"{op_name(o)}-{v}" for o, v in GENERIC])
def test_bad_command(ad, op, variant):
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, generic_case, hostile.ctl_path(ad.tap), op, variant,
                          seed_of(op, variant), ad.host_ip, unique_port(), timeout=120)
    problems = []
    if "setup" in got:
        problems.append(f"setup failed: {got['setup']}")
    else:
        allowed, may_close = expected(op, variant, got["sent_kinds"])
        res = got["result"]
        if res == "stalled":
            problems.append("the daemon did not answer (stalled)")
        elif res == "closed":
            if not may_close:
                problems.append("the daemon closed the channel instead of answering")
        elif allowed is ANY:
            if not isinstance(res, int):
                problems.append(f"answered {res!r}")
        elif res not in allowed:
            problems.append(f"answered {hostile.errname(res)}, expected "
                            f"{' or '.join(hostile.errname(a) for a in sorted(allowed))}")
        if got["fds"] and not (op == OP.FORK and res == 0 and got["fds"] == ["seqpacket"]):
            problems.append(f"descriptors came back: {got['fds']}")
        if op == OP.FORK and res == 0 and got.get("fork_hello") not in (0, None):
            problems.append(f"the FORK channel's HELLO answered {got.get('fork_hello')}")
        if res == 0 and op == OP.FORK and got["fds"] != ["seqpacket"]:
            problems.append(f"FORK answered 0 with {got['fds']} instead of one channel")
    problems += check_daemon(ad, pid, fds0, f"{op_name(op)} {variant}")
    res = got.get("result")
    shown = hostile.errname(res) if isinstance(res, int) else res
    print(f" {op_name(op)} {variant} sent {got.get('sent_kinds')}: {shown}, then HELLO {got.get('after')}")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------- wrong descriptor kinds


WRONG_SOCKET = {        # name: make_socket_fds arguments (plus "extra": one more descriptor)
    "b_pipe": {"b_kind": "pipe"},
    "b_file": {"b_kind": "file"},
    "b_eventfd": {"b_kind": "eventfd"},
    "b_udp": {"b_kind": "udp"},
    "b_unix_dgram": {"b_kind": "dgram"},
    "b_seqpacket": {"b_kind": "seqpacket"},
    "a_file": {"a_kind": "file"},
    "a_pipe": {"a_kind": "pipe"},
    "unsealed_memfd": {"seal": False},
    "memfd_shrink_seal_only": {"seals": fcntl.F_SEAL_SHRINK},
    "memfd_write_sealed": {"seals": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE},
    "memfd_page_too_big": {"size": "+4096"},
    "memfd_page_too_small": {"size": "-4096"},
    "memfd_smaller_than_header": {"size": 100},
    "shm_bytes_lies": {"shm_bytes": "+4096"},
    "shm_bytes_huge": {"shm_bytes": 0xFFFF_FFFF},
    "regular_file_as_memfd": {"memfd_kind": "tmpfile"},
    "bad_magic": {"magic": 0x12345678},
    "bad_abi_version": {"abi": hostile.ABI_VERSION + 1},
    "header_sizes_swapped": {"hdr_tx": "*2", "hdr_rx": "/2"},
    "header_sizes_zero": {"hdr_tx": 0, "hdr_rx": 0},
    "old_layout_b_memfd": {"order": ("b", "memfd")},
    "four_descriptors": {"extra": "file"},
    "order_memfd_b_a": {"order": ("memfd", "b", "a")},
    "b_only": {"order": ("b",)},
    "no_descriptors": {"order": ()},
    "good": {},
}
WRONG_SOCKET_ALLOWED = {"good": {0}, "memfd_write_sealed": {E["EINVAL"], E["EPERM"], E["EACCES"]}}


def resolve(kw: dict[str, Any], tx: int, rx: int) -> tuple[dict[str, Any], str | None]:
    """make_socket_fds arguments with the relative sizes ("+4096", "*2", ...) worked out."""
    want = hostile.HDR_SIZE + tx + rx
    out = dict(kw)
    extra = out.pop("extra", None)
    for key, base in (("size", want), ("shm_bytes", want), ("hdr_tx", tx), ("hdr_rx", rx)):
        v = out.get(key)
        if isinstance(v, str):
            n = int(v[1:])
            out[key] = {"+": base + n, "-": base - n, "*": base * n, "/": base // n}[v[0]]
    return out, extra


def child_fds(tx: int, rx: int, kw: dict[str, Any]) -> tuple[hostile.SockFds, list[int], int]:
    """The descriptors of a (bad) SOCKET/ACCEPT and the shm_bytes it claims."""
    args, extra = resolve(kw, tx, rx)
    shm_bytes = args.pop("shm_bytes", None)
    sf = hostile.make_socket_fds(tx, rx, **args)
    fds = sf.fds
    if extra:
        x = hostile.make_fd(extra)
        sf.extra += [x.fd, *x.extra]
        fds = [*fds, x.fd]
    return sf, fds, sf.shm_bytes if shm_bytes is None else shm_bytes


def socket_kind_case(ctl: str, name: str) -> dict[str, Any]:
    ch = Channel(ctl)
    tx, rx = ch.ring_sizes()
    sf, fds, shm_bytes = child_fds(tx, rx, WRONG_SOCKET[name])
    try:
        out = answer(ch, hostile.pack_cmd(OP.SOCKET, shm_bytes=shm_bytes), fds)
    finally:
        sf.close()
    ch.close()
    return out


def check_answer(got: dict[str, Any], allowed: set[int], fds_back: list[str] | None = None) -> list[str]:
    res = got.get("result")
    problems = []
    if res in ("closed", "stalled"):
        problems.append(f"the daemon {res} instead of answering")
    elif res not in allowed:
        problems.append(f"answered {hostile.errname(res)}, expected "
                        f"{' or '.join(hostile.errname(a) for a in sorted(allowed))}")
    if got.get("fds", []) != (fds_back or []):
        problems.append(f"descriptors came back: {got.get('fds')} (expected {fds_back or 'none'})")
    return problems


@pytest.mark.parametrize("name", list(WRONG_SOCKET))
def test_socket_descriptors(ad, name):
    """SOCKET wants exactly [B, memfd, A]: a unix stream pair, a memfd of 4096+tx+rx bytes
    sealed against shrinking and growing with its header initialised. Anything else: -EINVAL."""
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, socket_kind_case, hostile.ctl_path(ad.tap), name, timeout=120)
    problems = check_answer(got, WRONG_SOCKET_ALLOWED.get(name, {E["EINVAL"]}))
    if name == "good" and got.get("result") == 0 and not got.get("sock_id"):
        problems.append("a good SOCKET got sock_id 0")
    problems += check_daemon(ad, pid, fds0, f"SOCKET {name}")
    print(f" SOCKET {name}: {got}")
    assert not problems, "; ".join(problems)


def many_ids(ctl: str, n: int) -> list[int]:
    ch = Channel(ctl)
    ids, socks = [], []
    for _ in range(n):
        rsp, sf = ch.socket()
        ids.append(rsp.sock_id if rsp.result == 0 else -1)
        socks.append(sf)
    for sf in socks:
        sf.close()
    ch.close()
    return ids


def test_sock_ids_are_not_guessable(ad):
    """50 sockets: distinct nonzero ids spread over the u32 space, not a sequence."""
    pid, fds0 = before(ad)
    ids = hostile.as_user(NOBODY_UID, NOBODY_GID, many_ids, hostile.ctl_path(ad.tap), 50)
    print(f" ids: {ids[:8]}...")
    assert all(i > 0 for i in ids), f"SOCKET failed: {ids}"
    assert len(set(ids)) == len(ids), "an id was handed out twice"
    steps = {b - a for a, b in zip(ids, ids[1:], strict=False)}
    assert len(steps) > 1, f"ids follow a fixed step {steps}: guessable"
    assert max(ids) - min(ids) > 1 << 24, f"50 ids within {max(ids) - min(ids)}: not spread over the u32 space"
    assert not check_daemon(ad, pid, fds0, "after 50 sockets")


# ACCEPT: a listener of the channel with one connection waiting, then ACCEPT with bad child
# descriptors (refused, the connection stays queued), then a good ACCEPT (gets it).
WRONG_ACCEPT = {k: WRONG_SOCKET[k] for k in ("b_pipe", "b_file", "a_file", "unsealed_memfd", "memfd_page_too_big",
                                             "regular_file_as_memfd", "bad_magic", "old_layout_b_memfd",
                                             "four_descriptors", "order_memfd_b_a", "no_descriptors")}
WRONG_ACCEPT["good"] = {}


def accept_kind_case(ctl: str, name: str, ip: str, port: int) -> dict[str, Any]:
    ch = Channel(ctl)
    tx, rx = ch.ring_sizes()
    rsp, ls = ch.socket()
    out: dict[str, Any] = {}
    if rsp.result != 0:
        return {"setup": f"SOCKET {rsp.err}"}
    for what, op, fields in (("BIND", OP.BIND, {"addr_be32": be32(ip), "port_be16": socket.htons(port)}),
                             ("LISTEN", OP.LISTEN, {"arg0": 8})):
        r = ch.call_nofds(op, sock_id=ls.sock_id, **fields)
        if r.result != 0:
            return {"setup": f"{what} answered {r.err}"}
    if not hostile.readable(ls.a, 60):          # the kernel side's connection is queued
        return {"setup": "no connection arrived in 60 s"}
    if name != "good":
        sf, fds, shm_bytes = child_fds(tx, rx, WRONG_ACCEPT[name])
        try:
            out = answer(ch, hostile.pack_cmd(OP.ACCEPT, sock_id=ls.sock_id, shm_bytes=shm_bytes), fds)
        finally:
            sf.close()
    good = hostile.make_socket_fds(tx, rx)
    try:
        r2 = answer(ch, hostile.pack_cmd(OP.ACCEPT, sock_id=ls.sock_id, shm_bytes=good.shm_bytes), good.fds)
    finally:
        good.close()
    out["then_good"] = r2
    ls.close()
    ch.close()
    return out


@pytest.mark.parametrize("name", list(WRONG_ACCEPT))
def test_accept_descriptors(ad, name):
    pid, fds0 = before(ad)
    port = unique_port()
    conn = ad.popen([sys.executable, "-u", "-c", transfer.KERNEL_CONNECTOR, ad.ip, str(port), "hi", "close"],
                    stdout=subprocess.PIPE)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, accept_kind_case, hostile.ctl_path(ad.tap), name, ad.ip, port,
                          timeout=150)
    conn.wait(60)
    problems = []
    if "setup" in got:
        problems.append(f"setup: {got['setup']}")
    else:
        if name == "no_descriptors":
            # no descriptors is the pooled form, naming the child by arg1: 0 is no socket of
            # the channel's
            problems += check_answer(got, {E["EBADF"]})
        elif name != "good":
            problems += check_answer(got, {E["EINVAL"]})
        good = got["then_good"]
        if good.get("result") != 0 or not good.get("sock_id"):
            problems.append(f"the well-formed ACCEPT afterwards answered {good} (the connection was lost?)")
        elif good.get("fds"):
            problems.append(f"the good ACCEPT returned descriptors {good['fds']}")
    problems += check_daemon(ad, pid, fds0, f"ACCEPT {name}")
    print(f" ACCEPT {name}: {got}")
    assert not problems, "; ".join(problems)


# LISTEN on an INADDR_ANY socket may carry one kernel TCP listening socket; anything else: -EINVAL.
WRONG_LISTEN = ("file", "pipe", "eventfd", "memfd", "unix", "dgram", "udp", "tcp", "tcp_bound", "two_listeners",
                "good_kernel_listener")


def listen_kind_case(ctl: str, name: str, port: int) -> dict[str, Any]:
    ch = Channel(ctl)
    rsp, sf = ch.socket()
    if rsp.result != 0:
        return {"setup": f"SOCKET {rsp.err}"}
    r = ch.call_nofds(OP.BIND, sock_id=sf.sock_id, addr_be32=0, port_be16=socket.htons(port))
    if r.result != 0:
        return {"setup": f"BIND 0.0.0.0:{port} answered {r.err}"}
    fds: list[hostile.Fd] = []
    if name in ("good_kernel_listener", "two_listeners"):
        fds.append(hostile.make_fd("tcp_listener", port))
        if name == "two_listeners":
            fds.append(hostile.make_fd("tcp_listener"))
    elif name == "tcp_bound":
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        fds.append(hostile.Fd(s.detach(), "tcp_bound"))
    else:
        fds.append(hostile.make_fd(name))
    out = answer(ch, hostile.pack_cmd(OP.LISTEN, sock_id=sf.sock_id, arg0=8), [f.fd for f in fds])
    for f in fds:
        f.close()
    sf.close()                  # closing the socket: the daemon drops what it kept (the old crash)
    time.sleep(0.2)
    try:
        out["after_close"] = ch.hello().result
    except (ChannelClosed, TimeoutError) as e:
        out["after_close"] = repr(e)
    ch.close()
    return out


@pytest.mark.parametrize("name", WRONG_LISTEN)
def test_listen_descriptors(ad, name):
    """A regular file, pipe, eventfd, memfd, unix or UDP socket, an unbound or bound but not
    listening TCP socket, or two listeners as LISTEN's kernel listener: -EINVAL, the descriptor
    closed; closing the socket afterwards does not hurt the daemon."""
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, listen_kind_case, hostile.ctl_path(ad.tap), name, unique_port(),
                          timeout=120)
    problems = [f"setup: {got['setup']}"] if "setup" in got else \
        check_answer(got, {0} if name == "good_kernel_listener" else {E["EINVAL"]})
    if got.get("after_close") not in (0, None):
        problems.append(f"HELLO after closing the socket answered {got.get('after_close')}")
    problems += check_daemon(ad, pid, fds0, f"LISTEN {name}")
    print(f" LISTEN {name}: {got}")
    assert not problems, "; ".join(problems)


# ADOPT carries exactly one descriptor: the A end of one of the adapter's sockets.
WRONG_ADOPT = ("no_descriptors", "file", "pipe", "eventfd", "dgram", "seqpacket", "udp", "tcp", "unrelated_unix",
               "own_b_copy", "two_a_ends", "own_a")


def adopt_kind_case(ctl: str, name: str) -> dict[str, Any]:
    ch = Channel(ctl)
    tx, rx = ch.ring_sizes()
    sf = hostile.make_socket_fds(tx, rx)
    b_copy = os.dup(sf.b)
    rsp = ch.call_nofds(OP.SOCKET, sf.fds, shm_bytes=sf.shm_bytes)
    sf.close_sent()
    if rsp.result != 0:
        return {"setup": f"SOCKET {rsp.err}"}
    sid = rsp.sock_id
    cookie = hostile.so_cookie(sf.a)
    extra: list[hostile.Fd] = []
    if name == "no_descriptors":
        fds = []
    elif name == "own_b_copy":
        fds = [b_copy]
    elif name == "own_a":
        fds = [sf.a]
    elif name == "two_a_ends":
        fds = [sf.a, sf.a]
    else:
        extra.append(hostile.make_fd("unix" if name == "unrelated_unix" else name))
        fds = [extra[0].fd]
    out = answer(ch, hostile.pack_cmd(OP.ADOPT, cookie=cookie), fds)
    out["own_id"] = sid
    for f in extra:
        f.close()
    os.close(b_copy)
    sf.close()
    ch.close()
    return out


@pytest.mark.parametrize("name", WRONG_ADOPT)
def test_adopt_descriptors(ad, name):
    """ADOPT's cookie field is ignored (the cookie is always the caller's own here): without
    exactly one unix stream socket -EINVAL, with one that is not an adapter socket's A end
    -ENOENT (also its B end), with its A end: the memfd and the id."""
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, adopt_kind_case, hostile.ctl_path(ad.tap), name, timeout=120)
    if "setup" in got:
        problems = [f"setup: {got['setup']}"]
    elif name == "own_a":
        problems = check_answer(got, {0}, ["memfd"])
        if got.get("sock_id") != got.get("own_id"):
            problems.append(f"ADOPT of its own A gave sock_id {got.get('sock_id')}, not {got.get('own_id')}")
    else:
        problems = check_answer(got, {E["ENOENT"]} if name in ("unrelated_unix", "own_b_copy") else {E["EINVAL"]})
    problems += check_daemon(ad, pid, fds0, f"ADOPT {name}")
    print(f" ADOPT {name}: {got}")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------- the bad-command loop


def bad_loop(ctl: str, n_socket: int, n_other: int) -> dict[str, Any]:
    """Runs as nobody: n_socket SOCKETs whose B is a pipe / regular file / eventfd (in the
    3-descriptor and the old 2-descriptor layout), then n_other other bad commands."""
    ch = Channel(ctl)
    tx, rx = ch.ring_sizes()
    tally: dict[str, int] = {}
    wrong: list[str] = []
    reconnects = 0

    def note(what: str, res: Any, nfds: int = 0) -> None:
        key = f"{what} {hostile.errname(res) if isinstance(res, int) else res}"
        tally[key] = tally.get(key, 0) + 1
        if (not isinstance(res, int) or res >= 0 or nfds) and len(wrong) < 20:
            wrong.append(f"{key} ({nfds} fds back)")

    def send(what: str, data: bytes, fds: list[int]) -> None:
        nonlocal ch, reconnects
        got = answer(ch, data, fds)
        note(what, got["result"], len(got["fds"]))
        if got["result"] in ("closed", "stalled"):
            ch.close()
            ch = Channel(ctl)
            reconnects += 1

    kinds = ("pipe", "file", "eventfd")
    for i in range(n_socket):
        layout = ("b", "memfd", "a") if i % 2 == 0 else ("b", "memfd")
        sf = hostile.make_socket_fds(tx, rx, b_kind=kinds[i % 3], order=layout)
        try:
            send(f"SOCKET B={kinds[i % 3]} {len(layout)}fds", hostile.pack_cmd(OP.SOCKET, shm_bytes=sf.shm_bytes),
                 sf.fds)
        finally:
            sf.close()
    rsp, own = ch.socket()                      # a socket of ours, for the commands that need one
    own_ok = rsp.result == 0
    for i in range(n_other):
        k = i % 9
        if k == 0:
            sf = hostile.make_socket_fds(tx, rx, seal=False)
            send("SOCKET unsealed", hostile.pack_cmd(OP.SOCKET, shm_bytes=sf.shm_bytes), sf.fds)
            sf.close()
        elif k == 1:
            sf = hostile.make_socket_fds(tx, rx, size=hostile.HDR_SIZE + tx + rx + 4096)
            send("SOCKET size", hostile.pack_cmd(OP.SOCKET, shm_bytes=sf.shm_bytes), sf.fds)
            sf.close()
        elif k == 2 and own_ok:             # LISTEN with a regular file as the kernel listener, then close
            r, ls = ch.socket()
            if r.result == 0 and ch.call_nofds(OP.BIND, sock_id=ls.sock_id, addr_be32=0, port_be16=0).result == 0:
                f = hostile.make_fd("file")
                send("LISTEN [file]", hostile.pack_cmd(OP.LISTEN, sock_id=ls.sock_id, arg0=4), [f.fd])
                f.close()
            else:
                note("setup SOCKET/BIND", r.result)
            ls.close()
        elif k == 3:
            f = hostile.make_fd("file")
            send("ADOPT [file]", hostile.pack_cmd(OP.ADOPT), [f.fd])
            f.close()
        elif k == 4:
            p, e = hostile.make_fd("pipe"), hostile.make_fd("eventfd")
            send("HELLO [pipe, eventfd]", hostile.pack_cmd(OP.HELLO), [p.fd, e.fd])
            p.close()
            e.close()
        elif k == 5:
            f = hostile.make_fd("memfd")
            send("short [memfd]", hostile.pack_cmd(OP.SOCKET)[:10], [f.fd])
            f.close()
        elif k == 6:
            f = hostile.make_fd("unix")
            send("oversized [unix]", hostile.pack_cmd(OP.HELLO) + b"x" * 100, [f.fd])
            f.close()
        elif k == 7 and own_ok:             # ACCEPT on a socket that does not listen
            sf = hostile.make_socket_fds(tx, rx)
            send("ACCEPT not listening", hostile.pack_cmd(OP.ACCEPT, sock_id=own.sock_id, shm_bytes=sf.shm_bytes),
                 sf.fds)
            sf.close()
        else:
            f = hostile.make_fd("udp")
            send("op12 [udp]", hostile.pack_cmd(12), [f.fd])
            f.close()
    own.close()
    ch.close()
    return {"tally": tally, "wrong": wrong, "reconnects": reconnects}


def host_if(adapter) -> dict[str, Any]:
    return hostile.api_request(hostile.api_path(adapter.tap), {"cmd": "stat"})["units"]["host_if"]


def test_bad_command_loop_leaks_nothing(ad, client_ns):
    """20,000 SOCKETs with a B that is not a socket and 5,000 other bad commands (all with
    descriptors): each refused, and once the channel is closed the daemon holds exactly the
    descriptors it held before. Afterwards a root program's socket works (byte-exact)."""
    pid, _ = before(ad)
    counters0 = host_if(ad)
    base = hostile.figures(pid)
    t0 = time.monotonic()
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, bad_loop, hostile.ctl_path(ad.tap), 20_000, 5_000, timeout=600)
    took = time.monotonic() - t0
    during = hostile.figures(pid)
    n = hostile.settle_fds(pid, base["fds"], timeout=120)
    after = hostile.figures(pid)
    figures = (f"daemon pid {pid}: before fds={base['fds']} VmRSS={base['rss_kb']} kB VmHWM={base['hwm_kb']} kB; "
               f"right after the loop fds={during['fds']} VmRSS={during['rss_kb']} kB; settled fds={n} "
               f"VmRSS={after['rss_kb']} kB VmHWM={after['hwm_kb']} kB; 25,000 commands in {took:.1f} s")
    counters = host_if(ad) if hostile.alive(pid) else {}
    moved = {k: v - counters0.get(k, 0) for k, v in counters.items() if v != counters0.get(k, 0)}
    print(f"\nbad-command loop: {figures}\n answers: {got['tally']}\n host_if counters moved: {moved}")
    assert hostile.alive(pid), f"the daemon died during the loop. {figures}"
    assert not got["wrong"], f"bad commands not refused: {got['wrong']}. {figures}"
    assert n <= base["fds"], (f"the daemon keeps {n - base['fds']} descriptors more than before: "
                              f"{hostile.summarize_links(hostile.fd_links(pid))}. {figures}")
    # the adapter still serves a root program
    total = 1 << 20
    port = unique_port()
    server = ad.popen([sys.executable, "-u", "-c", transfer.PATTERN_SERVER, ad.host_ip, str(port), str(total), "1"],
                      stdout=subprocess.PIPE)
    Lines(server).wait("listening")
    res = client_ns.toe_run(ad, [sys.executable, "-c", transfer.PACED_CLIENT, ad.host_ip, str(port), str(total), "0",
                                 "0"], timeout=120)
    out = res.stdout.decode().split()
    assert res.returncode == 0, f"a root program under toe run failed after the loop: {res.stderr.decode()[-500:]}"
    assert out[-4:] == ["done", str(total), transfer.pattern_digest(total), "0"], out
    stat = run_toe("stat", "--tap", ad.tap, "--json")
    assert stat.returncode == 0, stat.stderr
    assert moved.get("bad_commands", 0) > 0, f"units.host_if.bad_commands did not count the loop: {moved}"


def hello_fields(ctl: str) -> dict[str, Any]:
    with Channel(ctl) as ch:
        rsp, fds = ch.call(OP.HELLO, pid=os.getpid())
        hostile.close_all(fds)
    return {**{k: getattr(rsp, k) for k in ("result", "tx_ring_bytes", "rx_ring_bytes", "abi_version",
                                            "daemon_pid", "addr_be32", "prefix_len")}, "nfds": len(fds)}


def test_hello_answers_adapter_info(ad):
    """HELLO (no descriptors): the adapter's address, ring sizes, daemon pid and ABI version."""
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, hello_fields, hostile.ctl_path(ad.tap))
    assert got["result"] == 0 and got["nfds"] == 0, got
    assert got["abi_version"] == hostile.ABI_VERSION == 6, got
    for key in ("tx_ring_bytes", "rx_ring_bytes"):
        n = got[key]
        assert n >= 4096 and n & (n - 1) == 0, f"{key} {n} is not a power of two >= 4096"
    assert got["daemon_pid"] == hostile.daemon_pid(ad.tap), got
    assert got["addr_be32"] == be32(ad.ip) and got["prefix_len"] == 24, got


def test_toe_stat_after_bad_commands(ad):
    """`toe stat` (JSON and the table) works after bad commands and counts them."""
    def few_bad(ctl: str) -> list[Any]:
        with Channel(ctl) as ch:
            f = hostile.make_fd("file")
            out = [ch.call_nofds(OP.HELLO, [f.fd]).result, answer(ch, b"short", [])["result"],
                   ch.call_nofds(0xFFFF_FFFF).result]
            f.close()
        return out
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, few_bad, hostile.ctl_path(ad.tap))
    assert got == [E["EINVAL"], E["EPROTO"], E["EOPNOTSUPP"]], [hostile.errname(r) for r in got]
    res = run_toe("stat", "--tap", ad.tap, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["units"]["host_if"].get("bad_commands", 0) >= 3, data["units"]["host_if"]
    assert {"max_sockets", "max_process_sockets", "max_ring_bytes", "sockets", "ring_bytes"} <= set(data["limits"])
    table = run_toe("stat", "--tap", ad.tap)
    assert table.returncode == 0 and table.stdout.strip(), table.stderr
