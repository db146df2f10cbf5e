"""Isolation between users of one adapter (issue 9).

A root program under `toe run` downloads 20 MB through the adapter while an
unprivileged user (nobody, allowed to use the adapter) attacks its sockets with
every command that names a socket: by guessed ids (its own id ± 1..1000, random
u32s, and the victim's real ids as root sees them), and ADOPT by guessed and
real cookies. All of it must be refused (-EBADF / -ENOENT / -EINVAL), no
descriptor may come back, and the victim's download must end byte-exact with a
pending connection still in its accept queue. A user who is not allowed
(uid 1, "daemon") cannot connect at all, and its programs use the kernel.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import toe_cmd, unique_port
from tests.security import hostile, transfer
from tests.security.hostile import (
    DAEMON_GID,
    DAEMON_UID,
    NOBODY_GID,
    NOBODY_UID,
    OP,
    Channel,
    ChannelClosed,
)
from tests.security.transfer import Lines

pytestmark = pytest.mark.integration

ALLOW_NOBODY = ("--allow-users", "nobody")
TOTAL = 20 << 20
GATE = 2 << 20
REPO = str(Path(__file__).resolve().parents[2])
EBADF, ENOENT, EINVAL = -errno.EBADF, -errno.ENOENT, -errno.EINVAL


def be32(ip: str) -> int:
    return struct.unpack("=I", socket.inet_aton(ip))[0]


# ---------------------------------------------------------------- the attacker (runs as nobody)


class Tally:
    """Answers to attack commands: counted per (op, answer); the unexpected ones listed."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self.unexpected = 0
        self.bad: dict[str, int] = {}

    def check(self, what: str, rsp: hostile.Rsp, allowed: set[int]) -> None:
        key = f"{what.split()[0]} {rsp.err}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if rsp.result not in allowed or rsp.nfds:
            self.unexpected += 1
            per_op = self.bad.setdefault(what.split()[0], 0)
            self.bad[what.split()[0]] = per_op + 1
            if per_op < 4:                       # a few examples of each kind of failure
                self.problems.append(f"{what}: answered {rsp.err} with {rsp.nfds} descriptor(s), "
                                     f"expected {'/'.join(hostile.errname(a) for a in sorted(allowed))}")

    def report(self) -> dict[str, Any]:
        return {"counts": self.counts, "problems": self.problems, "unexpected": self.unexpected,
                "bad": self.bad}


def id_commands(sid: int, host_ip: str, port: int) -> list[tuple[str, int, dict[str, Any]]]:
    """Every command that names a socket, aimed at `sid` (harmful if obeyed; WAKE only makes
    the daemon work for another's socket, but is refused all the same). HANDOVER
    is not one: it is a statistic of the sender about itself and ignores sock_id
    (docs/abi.md), so nothing of another's socket can change through it."""
    return [
        ("SHUTDOWN", OP.SHUTDOWN, {"sock_id": sid, "arg0": socket.SHUT_RDWR}),
        ("SETSOCKOPT", OP.SETSOCKOPT, {"sock_id": sid, "arg0": socket.SOL_SOCKET, "arg1": socket.SO_LINGER,
                                       "opt": struct.pack("=ii", 1, 0), "optlen": 8}),
        ("BIND", OP.BIND, {"sock_id": sid, "addr_be32": 0, "port_be16": socket.htons(port)}),
        ("CONNECT", OP.CONNECT, {"sock_id": sid, "addr_be32": be32(host_ip), "port_be16": socket.htons(port)}),
        ("LISTEN", OP.LISTEN, {"sock_id": sid, "arg0": 16}),
        ("WAKE", OP.WAKE, {"sock_id": sid}),
    ]


def attack(ctl: str, known_ids: list[int], cookies: list[int], host_ip: str, port: int,
           wide: bool) -> dict[str, Any]:
    """Everything a local user can try against other channels' sockets. `known_ids`: the
    victim's real sock_ids (as root sees them); `cookies`: the victim's real SO_COOKIEs."""
    tally = Tally()
    rng = random.Random(0x70E)
    ch = Channel(ctl)
    hello = ch.hello()
    if hello.result != 0:
        return {"hello": hello.err}
    rsp, own = ch.socket()
    own_id = rsp.sock_id if rsp.result == 0 else 0
    if not own_id:
        tally.problems.append(f"the attacker's own SOCKET answered {rsp.err} (id {rsp.sock_id})")
    own_cookie = hostile.so_cookie(own.a)
    guesses = set(known_ids)
    if wide:
        guesses |= {(own_id + d) & 0xFFFF_FFFF for d in range(-1000, 1001)}
        guesses |= {rng.getrandbits(32) for _ in range(300)}
        guesses |= set(range(0, 200))
    guesses.discard(own_id)
    for sid in sorted(guesses):
        for name, op, fields in id_commands(sid, host_ip, port):
            tally.check(f"{name} sock_id={sid}", ch.call_nofds(op, **fields), {EBADF})
    # ACCEPT on someone else's listener, carrying a well-formed child [B, memfd, A]
    accept_ids = set(known_ids)
    if wide:
        accept_ids |= {(own_id + d) & 0xFFFF_FFFF for d in range(-50, 51)}
        accept_ids |= {rng.getrandbits(32) for _ in range(50)}
    accept_ids.discard(own_id)
    tx, rx = ch.ring_sizes()
    for sid in sorted(accept_ids):
        child = hostile.make_socket_fds(tx, rx)
        try:
            r = ch.call_nofds(OP.ACCEPT, child.fds, sock_id=sid, shm_bytes=child.shm_bytes)
        finally:
            child.close()
        tally.check(f"ACCEPT sock_id={sid}", r, {EBADF})
    # ADOPT: the cookie field is ignored; only a held A end counts
    unrelated_a, unrelated_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    adopt_cookies = list(cookies)
    if wide:
        adopt_cookies += [own_cookie + d for d in range(-1000, 1001) if d]
    for cookie in adopt_cookies:
        tally.check(f"ADOPT [unrelated A] cookie={cookie}",
                    ch.call_nofds(OP.ADOPT, [unrelated_a.fileno()], cookie=cookie & (2**64 - 1)), {ENOENT})
    for cookie in cookies:
        tally.check(f"ADOPT [] cookie={cookie}", ch.call_nofds(OP.ADOPT, cookie=cookie), {EINVAL})
        f = hostile.make_fd("file")
        try:
            tally.check(f"ADOPT [file] cookie={cookie}", ch.call_nofds(OP.ADOPT, [f.fd], cookie=cookie), {EINVAL})
        finally:
            f.close()
    unrelated_a.close()
    unrelated_b.close()
    own.close()
    ch.close()
    out = tally.report()
    out["own_id"] = own_id
    out["ids_tried"] = len(guesses)
    return out


# ---------------------------------------------------------------- the victim (root, under toe run)


def start_victim(adapter, client_ns, total: int = TOTAL, gate: int = GATE, pace: float = 0.002,
                 listen_port: int | None = None) -> tuple[subprocess.Popen, Lines, dict[str, Any]]:
    """A pattern server on the kernel side and a root PACED_CLIENT under toe run, paused at
    `gate` bytes (with a listener holding one pending connection if listen_port)."""
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", transfer.PATTERN_SERVER, adapter.host_ip, str(port),
                            str(total), "1"], stdout=subprocess.PIPE)
    Lines(server).wait("listening")
    argv = [sys.executable, "-u", "-c", transfer.PACED_CLIENT, adapter.host_ip, str(port), str(total), str(gate),
            str(pace)]
    if listen_port:
        argv += [adapter.ip, str(listen_port)]
    victim = client_ns.toe_popen(adapter, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines = Lines(victim, f"the victim (pid {victim.pid})")
    info: dict[str, Any] = {"port": port}
    if listen_port:
        info["listen_fd"] = int(lines.wait("listening").split()[1])
        conn = adapter.popen([sys.executable, "-u", "-c", transfer.KERNEL_CONNECTOR, adapter.ip, str(listen_port),
                              "hello-listener", "hold"], stdout=subprocess.PIPE)
        Lines(conn).wait("connected")
    words = lines.wait("connected ").split()
    info["pid"], info["fd"] = int(words[1]), int(words[2])
    lines.wait("midway")
    return victim, lines, info


def release(victim: subprocess.Popen) -> None:
    assert victim.stdin is not None
    victim.stdin.write(b"go\n")
    victim.stdin.flush()


def victim_cookies(info: dict[str, Any]) -> list[int]:
    """The SO_COOKIEs of the victim's A ends (root reads them with pidfd_getfd)."""
    out = []
    for key in ("fd", "listen_fd"):
        if key in info:
            fd = hostile.steal_fd(info["pid"], info[key])
            try:
                out.append(hostile.so_cookie(fd))
            finally:
                os.close(fd)
    return out


def finish_victim(victim: subprocess.Popen, lines: Lines, total: int, with_listener: bool) -> list[str]:
    problems = []
    try:
        words = lines.wait("done", timeout=180).split()
        n, digest, extra = int(words[1]), words[2], int(words[3])
        if n != total or extra:
            problems.append(f"the victim received {n} bytes (+{extra} after the end), not {total}")
        elif digest != transfer.pattern_digest(total):
            problems.append(f"the victim's {n} bytes are not the pattern (sha256 {digest})")
        if with_listener:
            got = lines.wait("accepted", timeout=90).split(maxsplit=1)[1]
            if got != "hello-listener":
                problems.append(f"the victim's pending connection was not there for it: accepted {got!r}")
    except AssertionError as e:
        problems.append(f"the victim did not finish: {e}")
    try:
        code = victim.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        problems.append(f"the victim exited with {code}")
    return problems


# ---------------------------------------------------------------- tests


def test_foreign_commands_are_refused_mid_transfer(adapter_factory, client_ns):
    """nobody's SHUTDOWN/SETSOCKOPT/BIND/CONNECT/LISTEN/ACCEPT by guessed and real ids,
    and ADOPT by guessed and real cookies, against a root download in flight: all refused,
    the download byte-exact, the victim's pending connection still its own."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    dpid = hostile.daemon_pid(adapter.tap)
    ctl = hostile.ctl_path(adapter.tap)
    victim, lines, info = start_victim(adapter, client_ns, listen_port=unique_port())
    try:
        shm_ids = {h["sock_id"] for h in hostile.shm_headers(info["pid"])}
        stat_ids = hostile.ids_in_stat(adapter.stat())
        known = sorted(shm_ids | stat_ids)
        cookies = victim_cookies(info)
        print(f"\nvictim pid {info['pid']}: sock_ids in its mappings {sorted(shm_ids)}, "
              f"ids in root's stat {sorted(stat_ids)}, cookies {cookies}")
        # phase 1: the victim has stopped reading, the rest of its 20 MB is in flight
        first = hostile.as_user(NOBODY_UID, NOBODY_GID, attack, ctl, known, cookies, adapter.host_ip,
                                info["port"], True)
        release(victim)
        # phase 2: the same against the real ids while the data flows again
        second = hostile.as_user(NOBODY_UID, NOBODY_GID, attack, ctl, known, cookies, adapter.host_ip,
                                 info["port"], False)
    except BaseException:
        release(victim)
        raise
    problems = finish_victim(victim, lines, TOTAL, with_listener=True)
    print(f"attack answers (mid-transfer, paused reader): {first.get('counts')}")
    print(f"attack answers (mid-transfer, reading): {second.get('counts')}")
    assert shm_ids, "could not read the victim's sock_ids from its mappings (test harness)"
    if not (hostile.alive(dpid) and hostile.daemon_pid(adapter.tap) == dpid):
        problems.append("the daemon died or was replaced")
    for name, rep in (("paused", first), ("reading", second)):
        if "hello" in rep:
            problems.append(f"nobody's HELLO answered {rep['hello']}: --allow-users nobody not honoured")
        elif rep["problems"] or rep["unexpected"]:
            problems.append(f"{rep['unexpected']} attack command(s) ({name} reader) not refused, per op "
                            f"{rep['bad']}; examples:\n  " + "\n  ".join(rep["problems"]))
    assert not problems, "\n".join(problems)
    adapter.stat()


def fork_channel_model(ctl: str) -> dict[str, Any]:
    """Which channels may name a socket: its creator, a FORK of it, an adopter holding A;
    not another channel of the same user and process."""
    out: dict[str, Any] = {}
    keepalive = {"arg0": socket.SOL_SOCKET, "arg1": socket.SO_KEEPALIVE, "opt": struct.pack("=i", 1), "optlen": 4}
    ch1 = Channel(ctl)
    out["hello"] = ch1.hello().result
    rsp, sf = ch1.socket()
    out["socket"], sid = rsp.result, rsp.sock_id
    out["creator"] = ch1.call_nofds(OP.SETSOCKOPT, sock_id=sid, **keepalive).result
    frsp, ffds = ch1.call(OP.FORK)
    out["fork"], out["fork_fds"] = frsp.result, [hostile.fd_kind(fd) for fd in ffds]
    if frsp.result == 0 and len(ffds) == 1:
        ch2 = Channel.from_fd(ffds[0])
        out["forked"] = ch2.call_nofds(OP.SETSOCKOPT, sock_id=sid, **keepalive).result
        ch2.close()
    else:
        hostile.close_all(ffds)
    ch3 = Channel(ctl)
    ch3.hello()
    out["other_channel"] = ch3.call_nofds(OP.SETSOCKOPT, sock_id=sid, **keepalive).result
    arsp, afds = ch3.call(OP.ADOPT, [sf.a])
    out["adopt"], out["adopt_fds"], out["adopt_id"] = arsp.result, [hostile.fd_kind(fd) for fd in afds], arsp.sock_id
    hostile.close_all(afds)
    out["adopter"] = ch3.call_nofds(OP.SETSOCKOPT, sock_id=sid, **keepalive).result
    out["sid"] = sid
    sf.close()
    ch1.close()
    ch3.close()
    return out


def test_only_holders_may_name_a_socket(adapter_factory):
    """The capability is the channel, not the user: a second channel of the same process is
    refused until it proves possession (ADOPT with A); a FORK channel holds the same sockets."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, fork_channel_model, hostile.ctl_path(adapter.tap))
    print(f"\n{got}")
    assert got["hello"] == 0 and got["socket"] == 0 and got["creator"] == 0, got
    assert got["fork"] == 0 and got["fork_fds"] == ["seqpacket"], f"FORK: {got}"
    assert got.get("forked") == 0, f"a FORK channel may not name its parent's socket: {got}"
    assert got["other_channel"] == EBADF, f"another channel of the same user named the socket: {got}"
    assert got["adopt"] == 0 and got["adopt_fds"] == ["memfd"] and got["adopt_id"] == got["sid"], f"ADOPT: {got}"
    assert got["adopter"] == 0, f"the adopter may not name the socket it adopted: {got}"


def try_connect(ctl: str, api: str) -> dict[str, str]:
    out = {}
    for name, path, kind in (("ctl", ctl, socket.SOCK_SEQPACKET), ("api", api, socket.SOCK_STREAM)):
        s = socket.socket(socket.AF_UNIX, kind)
        s.settimeout(10)
        try:
            s.connect(path)
            out[name] = "connected"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno or 0, str(e))
        finally:
            s.close()
    return out


def test_users_not_allowed_cannot_connect(adapter_factory):
    """Both sockets are 0660 root-owned; uid 1 gets EACCES, nobody (allowed) and root connect."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    ctl, api = hostile.paths(adapter.tap)
    for path in (ctl, api):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0, \
            f"{path}: mode {stat.S_IMODE(st.st_mode):o} owner {st.st_uid}, want 0660 root"
    assert hostile.as_user(DAEMON_UID, DAEMON_GID, try_connect, ctl, api) == {"ctl": "EACCES", "api": "EACCES"}
    assert hostile.as_user(NOBODY_UID, NOBODY_GID, try_connect, ctl, api) == {"ctl": "connected", "api": "connected"}
    assert try_connect(ctl, api) == {"ctl": "connected", "api": "connected"}


def hello_after_connect(ctl: str, api: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        ch = Channel(ctl, timeout=10)
    except OSError as e:
        return {"ctl_connect": errno.errorcode.get(e.errno or 0, str(e))}
    try:
        out["hello"] = ch.hello().err
        try:
            out["second"] = ch.call_nofds(OP.HELLO).err
        except ChannelClosed:
            out["second"] = "closed"
    except ChannelClosed:
        out["hello"] = "closed"
    finally:
        ch.close()
    try:
        answer = hostile.api_request(api, {"cmd": "stat"}, timeout=10)
        out["api"] = "answered" if answer.get("ok") else f"refused: {answer}"
        out["api_shows"] = {k: len(answer.get(k) or []) for k in ("connections", "listeners", "processes")}
    except (ChannelClosed, OSError) as e:
        out["api"] = f"closed ({e})"
    return out


def test_peer_credentials_checked_even_if_the_file_lets_one_in(adapter_factory):
    """The second lock: with the socket files opened to everyone (a mistake), uid 1 connects
    but its HELLO answers -EACCES and the channel closes; the API shows it nothing of root's
    (root holds a socket and a channel meanwhile)."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    root_ch = Channel(hostile.ctl_path(adapter.tap))
    root_ch.hello()
    _rsp, root_sock = root_ch.socket()
    ctl, api = hostile.paths(adapter.tap)
    saved = []
    for path in (ctl, api):
        try:
            acl = os.getxattr(path, "system.posix_acl_access")
        except OSError:
            acl = None
        saved.append((path, os.stat(path).st_mode, acl))
    try:
        for path in (ctl, api):
            os.chmod(path, 0o666)
        got = hostile.as_user(DAEMON_UID, DAEMON_GID, hello_after_connect, ctl, api)
    finally:
        for path, mode, acl in saved:
            os.chmod(path, stat.S_IMODE(mode))
            if acl is not None:
                os.setxattr(path, "system.posix_acl_access", acl)
        root_sock.close()
        root_ch.close()
    print(f"\n{got}")
    assert got.get("hello") in ("EACCES", "closed"), f"uid 1 got through the credentials check: {got}"
    assert got.get("second") in (None, "closed") or got.get("hello") == "closed", \
        f"the channel stayed open after -EACCES: {got}"
    # the API's answer to a user who is not allowed is not specified beyond "only that user's
    # things": a refusal, a closed connection, or a stat showing nothing (uid 1 has nothing)
    if got.get("api") == "answered":
        assert not any(got["api_shows"].values()), f"uid 1 read others' things through the API: {got}"
    else:
        assert got.get("api", "").startswith(("closed", "refused")), got


def _can_run(paths: list[str]) -> bool:
    return all(os.access(p, os.R_OK | os.X_OK) for p in paths)


def toe_for_user(uid: int, gid: int) -> list[str]:
    """argv of `toe` that uid can run: toe_cmd() when its interpreter and library are
    accessible to uid (a venv on the system's Python, as in CI); otherwise the same CLI
    code on /usr/bin/python3 with this checkout and the venv's site-packages on its path
    (a venv on root's private interpreter, e.g. pyenv under /root)."""
    cmd = toe_cmd()
    mine = [os.path.realpath(sys.executable), os.path.dirname(os.__file__), os.path.realpath(cmd[0])]
    if hostile.as_user(uid, gid, _can_run, mine):
        return cmd
    site = [p for p in sys.path if p.endswith("site-packages")]
    boot = (f"import sys; sys.path[:0] = [{REPO!r}]; sys.path += {site!r}; "
            "from offload_daemon.cli import main; sys.argv[0] = 'toe'; sys.exit(main(sys.argv[1:]))")
    return ["/usr/bin/python3", "-c", boot]


CLIENT_ERRNO = r"""
import socket, sys
s = socket.socket()
s.settimeout(30)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", flush=True)
except OSError as e:
    print("errno", e.errno, flush=True)
"""


def test_refused_user_under_toe_run_uses_the_kernel(adapter_factory, client_ns):
    """`toe run` as uid 1 (not allowed): one line on stderr about the adapter, then the kernel:
    in the loopback-only namespace a connect to the adapter's subnet is ENETUNREACH."""
    if not os.path.exists("/usr/bin/python3") or not os.path.exists("/usr/bin/setpriv"):
        pytest.fail("needs /usr/bin/python3 and setpriv (util-linux): a toe and a python uid 1 can run")
    adapter = adapter_factory(*ALLOW_NOBODY)
    argv = ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_GID}", "--clear-groups", "--",
            *toe_for_user(DAEMON_UID, DAEMON_GID), "run", "--tap", adapter.tap, "--",
            "/usr/bin/python3", "-c", CLIENT_ERRNO, adapter.host_ip, str(unique_port())]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME="/")
    res = client_ns.run(argv, text=True, timeout=120, env=env)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    print(f"\nstdout {res.stdout!r} stderr {err!r}")
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr.strip()}"
    assert res.stdout.split() == ["errno", str(errno.ENETUNREACH)], \
        f"uid 1's connect did not go to the kernel (ENETUNREACH expected): {res.stdout!r}"
    assert len(err) == 1 and ("adapter" in err[0] or adapter.tap in err[0]), \
        f"want one stderr line about the adapter, got {err}"


def stat_as_user(ctl: str, api: str) -> dict[str, Any]:
    ch = Channel(ctl)
    ch.hello()
    _rsp, sf = ch.socket()
    answer = hostile.api_request(api, {"cmd": "stat"})
    sf.close()
    ch.close()
    return {"me": os.getpid(), "ok": answer.get("ok"),
            "connections": [c.get("pid") for c in answer.get("connections") or []],
            "listeners": [x.get("pid") for x in answer.get("listeners") or []],
            "processes": [p.get("pid") for p in answer.get("processes") or []]}


def test_stat_shows_a_user_only_their_own(adapter_factory, client_ns):
    """nobody's stat (through the API socket) lists none of root's connections, listeners or
    processes, but its own process; root's stat lists the root program's."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    victim, lines, info = start_victim(adapter, client_ns, total=4 << 20, gate=1 << 20,
                                       listen_port=unique_port())
    try:
        vpid = info["pid"]
        root = adapter.stat()
        mine = hostile.as_user(NOBODY_UID, NOBODY_GID, stat_as_user, *hostile.paths(adapter.tap))
    finally:
        release(victim)
    problems = finish_victim(victim, lines, 4 << 20, with_listener=True)
    print(f"\nnobody sees {mine}")
    assert any(c.get("pid") == vpid for c in root.get("connections", [])), "root's stat lacks root's connection"
    assert any(x.get("pid") == vpid for x in root.get("listeners", [])), "root's stat lacks root's listener"
    assert mine["ok"] is not False, mine
    for key in ("connections", "listeners", "processes"):
        assert vpid not in mine[key], f"nobody's stat shows root's {key}: {mine}"
    assert mine["me"] in mine["processes"], f"nobody's stat does not show its own process: {mine}"
    assert not problems, problems
