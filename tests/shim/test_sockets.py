"""Offloaded sockets of unmodified programs, against the fake adapter.

No packets are sent: the fake adapter plays the far end through the rings.
Loopback traffic of handed-over sockets stays on this host.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket

from offload_daemon.abi import lib as fake_lib

from .fake_adapter import ADAPTER_ADDR, HANDOVER_PORT, HOLD_PORT, PEER_ADDR, REFUSED_PORT, SLOW_PORT, SLOW_REFUSED_PORT
from .helpers import Interactive, lines, run, run_py, wait_until

ECHO_PORT = 7


def all_closed(fake) -> bool:
    return wait_until(lambda: fake.stats()["live"] == 0)


# ---------------- payload ----------------

def test_blocking_echo_10mb_byte_exact(env, fake, probe, tmp_path):
    """Writer thread + reader thread, 64 KB rings: the full-ring path, filler,
    doorbells, tokens, every read/write variant (fortified ones included)."""
    data = os.urandom(10 * 1024 * 1024 + 12345)
    (tmp_path / "in").write_bytes(data)
    r = run([str(probe), "echo", PEER_ADDR, str(ECHO_PORT), str(tmp_path / "in"),
             str(tmp_path / "out")], env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert lines(r)["echoed"] == str(len(data))
    out = (tmp_path / "out").read_bytes()
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    st = fake.stats()
    assert st["sockets_made"] == 1 and st["ops"].get(5) == 1  # one socket, one CONNECT
    assert all_closed(fake)


def test_python_sendall_recv(env, fake):
    code = r"""
import socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(10)            # CPython: O_NONBLOCK + poll() inside
blob = bytes(range(256)) * 4000
import threading
t = threading.Thread(target=s.sendall, args=(blob,)); t.start()
got = bytearray()
while len(got) < len(blob):
    got += s.recv(100000)
t.join()
assert got == blob
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


# ---------------- connect ----------------

def test_nonblocking_connect_einprogress_pollout_so_error(env, probe):
    for port, second in ((ECHO_PORT, 0), (SLOW_PORT, errno.EALREADY)):
        r = lines(run([str(probe), "nbconnect", PEER_ADDR, str(port)], env))
        assert r["connect"] == str(errno.EINPROGRESS)
        assert r["second"] == str(second)
        assert r["revents_out"] == "1"
        assert r["so_error"] == "0"


def test_blocking_connect_waits_for_the_handshake(env, probe):
    for port in (ECHO_PORT, SLOW_PORT):
        r = lines(run([str(probe), "connect", PEER_ADDR, str(port)], env))
        assert r["connect"] == "0"
        assert r["again"] == str(errno.EISCONN)


def test_connection_refused_blocking_and_nonblocking(env, probe):
    refused = str(errno.ECONNREFUSED)
    for port in (REFUSED_PORT, SLOW_REFUSED_PORT):
        r = lines(run([str(probe), "connect", PEER_ADDR, str(port)], env))
        assert r["connect"] == refused
        r = lines(run([str(probe), "nbconnect", PEER_ADDR, str(port)], env))
        assert r["connect"] == str(errno.EINPROGRESS)
        assert r["revents_out"] == "1"
        if port == REFUSED_PORT:
            # already refused: the second connect() reports it (and clears SO_ERROR)
            assert (r["second"], r["so_error"]) == (refused, "0")
        else:
            assert (r["second"], r["so_error"]) == (str(errno.EALREADY), refused)
        assert r["so_error2"] == "0"


# ---------------- readiness ----------------

READINESS = r"""
import select, socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
fd = s.fileno()

def readable(t=0.0):
    return bool(select.select([s], [], [], t)[0])

def settled():
    # Not readable once the ring is empty.  A token still in flight when the
    # ring was emptied may arrive afterwards (a spurious wakeup, never a lost
    # one): the EAGAIN recv of a nonblocking reader takes it.
    if readable():
        s.setblocking(False)
        try:
            s.recv(1)
            raise AssertionError("data after the ring was emptied")
        except BlockingIOError:
            pass
        s.setblocking(True)
    return not readable()

assert not readable()
p = select.poll(); p.register(s, select.POLLIN | select.POLLOUT)
assert dict(p.poll(0)) == {fd: select.POLLOUT}
s.send(b"ping")
assert readable(10)
assert s.recv(100) == b"ping"
assert settled()
assert dict(p.poll(0)) == {fd: select.POLLOUT}

ep = select.epoll(); ep.register(fd, select.EPOLLIN)          # level-triggered
assert ep.poll(0) == []
s.send(b"x")
assert ep.poll(10) == [(fd, select.EPOLLIN)]
assert ep.poll(0) == [(fd, select.EPOLLIN)]                   # still readable
assert s.recv(10) == b"x"
assert settled() and ep.poll(0) == []
ep.close()

et = select.epoll(); et.register(fd, select.EPOLLIN | select.EPOLLET)
assert et.poll(0) == []
s.send(b"abc")
assert et.poll(10) == [(fd, select.EPOLLIN)]
assert et.poll(0) == []                                        # no new edge
s.setblocking(False)
got = b""
while True:
    try:
        got += s.recv(1)
    except BlockingIOError:
        break
assert got == b"abc"
s.send(b"d")
assert et.poll(10) == [(fd, select.EPOLLIN)]                  # a new edge
assert s.recv(10) == b"d"
print("ok")
"""


def test_poll_select_epoll_readability(env):
    assert run_py(READINESS, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


WRITABILITY = r"""
import fcntl, select, socket, struct, sys, termios
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2]))); s.setblocking(False)
fd = s.fileno()
total = 0
try:
    while True:
        total += s.send(b"w" * 10000)
except BlockingIOError:
    pass
print("queued", total, flush=True)
outq = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
print("outq", outq, flush=True)
p = select.poll(); p.register(fd, select.POLLOUT)
print("writable", bool(p.poll(0)), flush=True)
et = select.epoll(); et.register(fd, select.EPOLLOUT | select.EPOLLET)
print("edges", et.poll(0), flush=True)
print("ready", flush=True)
sys.stdin.readline()
print("edge", et.poll(10) == [(fd, select.EPOLLOUT)], flush=True)
print("sent", s.send(b"z" * 100), flush=True)
"""


def test_full_ring_not_writable_then_epollout_edge(env, fake):
    p = Interactive(WRITABILITY, env, PEER_ADDR, HOLD_PORT)
    assert p.expect("queued ") == str(fake.ring_bytes)
    assert p.expect("outq ") == str(fake.ring_bytes)
    assert p.expect("writable ") == "False"
    assert p.expect("edges ") == "[]"
    p.expect("ready")
    assert fake.release(HOLD_PORT) == fake.ring_bytes
    p.send()
    assert p.expect("edge ") == "True"
    assert p.expect("sent ") == "100"
    p.finish()


def test_eof_after_shutdown_write(env):
    code = r"""
import select, socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"hello")
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = s.recv(100)
    if not d:
        break
    got += d
assert got == b"hello", got
assert s.recv(100) == b""
p = select.poll(); p.register(s, select.POLLIN | select.POLLRDHUP)
ev = dict(p.poll(0))[s.fileno()]
assert ev & select.POLLIN and ev & select.POLLRDHUP, ev
try:
    s.send(b"x")
    raise AssertionError("send after SHUT_WR succeeded")
except BrokenPipeError:
    pass
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


def test_peer_reset_reported_once(env, fake):
    code = r"""
import socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.readline()
try:
    s.recv(10)
    print("recv no error")
except ConnectionResetError:
    print("reset", flush=True)
print("then", s.recv(10), flush=True)
try:
    s.send(b"x")
except BrokenPipeError:
    print("epipe", flush=True)
"""
    p = Interactive(code, env, PEER_ADDR, 7070)
    p.expect("connected")
    fake.peer_reset(7070)
    p.send()
    p.expect("reset")
    assert p.expect("then ") == "b''"
    p.expect("epipe")
    p.finish()


def test_recv_rcvtimeo_and_send_sndtimeo(env):
    code = r"""
import socket, struct, sys
tv = struct.pack("ll", 0, 100000)
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == tv
try:
    s.recv(10)
    raise AssertionError("recv returned")
except BlockingIOError:
    pass
h = socket.socket(); h.connect((sys.argv[1], int(sys.argv[3])))
h.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
n = h.send(b"q" * 100000)       # what fits, then the timeout: a partial count
assert n == int(sys.argv[4]), n
try:
    h.send(b"q")
    raise AssertionError("send returned")
except BlockingIOError:
    pass
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT, HOLD_PORT, 1 << 16).stdout.strip() == "ok"


# ---------------- accept ----------------

ACCEPT = r"""
import select, socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080)); l.listen(5)
print("name", l.getsockname(), flush=True)
assert l.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
l.setblocking(False)
try:
    l.accept(); raise AssertionError("accepted nothing")
except BlockingIOError:
    pass
p = select.poll(); p.register(l, select.POLLIN | select.POLLOUT)
assert p.poll(0) == [], "a listening socket is neither readable nor writable"
l.setblocking(True)
print("ready", flush=True)
assert select.select([l], [], [], 10)[0]
c, peer = l.accept()
print("peer", peer, flush=True)
assert not select.select([l], [], [], 0)[0], "stale readability"
assert c.getsockname() == ("198.18.0.2", 8080) and c.getpeername() == peer
assert c.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1   # inherited
c.sendall(b"hi there")
assert c.recv(100) == b"hi there"
print("ready2", flush=True)
c2, peer2 = l.accept()           # blocks until the next connection
print("peer2", peer2, flush=True)
c2.close(); c.close(); l.close()
"""


def test_listen_accept(env, fake):
    p = Interactive(ACCEPT, env)
    assert p.expect("name ") == f"('{ADAPTER_ADDR}', 8080)"
    p.expect("ready")
    fake.inject_connection(8080, ("198.18.0.77", 5555))
    assert p.expect("peer ") == "('198.18.0.77', 5555)"
    p.expect("ready2")
    fake.inject_connection(8080, ("198.18.0.78", 6666))
    assert p.expect("peer2 ") == "('198.18.0.78', 6666)"
    p.finish()
    assert all_closed(fake)


# ---------------- socket API surface ----------------

def test_socket_options(env, fake):
    code = r"""
import socket, struct, sys
s = socket.socket()
g = lambda lvl, opt: s.getsockopt(lvl, opt)
assert g(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
assert g(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET
assert g(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
assert g(socket.SOL_SOCKET, socket.SO_ERROR) == 0
assert g(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
assert g(socket.SOL_SOCKET, socket.SO_SNDBUF) == int(sys.argv[3])
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 10000)
assert g(socket.SOL_SOCKET, socket.SO_SNDBUF) == 20000
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
assert g(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2304
assert g(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
assert g(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
assert g(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
assert g(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7200
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
assert g(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
assert g(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 75
assert g(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
assert struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 5)
assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"reno"
assert g(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 536
assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0] == 7       # TCP_CLOSE
assert g(socket.IPPROTO_IP, socket.IP_TTL) == 64
s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)                       # recorded
assert g(socket.IPPROTO_IP, socket.IP_TOS) == 0x10
try:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 0)
    raise AssertionError("TCP_KEEPCNT 0 accepted")
except OSError as e:
    assert e.errno == 22
try:
    g(socket.IPPROTO_TCP, 99)
    raise AssertionError("unknown option answered")
except OSError as e:
    assert e.errno == 92
s.connect((sys.argv[1], int(sys.argv[2])))
assert g(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1460
assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0] == 1       # ESTABLISHED
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 40)                  # connected: the daemon hears
print("ok")
"""
    r = run_py(code, env, PEER_ADDR, ECHO_PORT, fake.ring_bytes)
    assert r.stdout.strip() == "ok"
    st = fake.stats()
    # set before connect: no command (no round trip); the daemon finds them in the header
    assert [(lvl, name, val) for _, lvl, name, val in st["setsockopts"]] == [
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, (40).to_bytes(4, "little"))], st["setsockopts"]
    (flags, keepidle, linger), = st["connect_opts"]
    assert flags & fake_lib.TOE_OF_NODELAY and flags & fake_lib.TOE_OF_KEEPALIVE and flags & fake_lib.TOE_OF_LINGER
    assert (keepidle, linger) == (30, 5)


def test_names(env):
    code = r"""
import errno, socket, sys
s = socket.socket()
assert s.getsockname() == ("0.0.0.0", 0)
try:
    s.getpeername(); raise AssertionError("peer before connect")
except OSError as e:
    assert e.errno == errno.ENOTCONN
s.connect((sys.argv[1], int(sys.argv[2])))
host, port = s.getsockname()
assert host == "198.18.0.2" and port >= 40000, (host, port)
assert s.getpeername() == (sys.argv[1], int(sys.argv[2]))
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


def test_errors_and_flags(env, probe):
    r = run([str(probe), "misc", PEER_ADDR, str(ECHO_PORT)], env)
    assert r.returncode == 0, r.stderr
    assert lines(r)["misc"] == "ok"


def test_dup_family(env, probe, fake):
    r = run([str(probe), "dup", PEER_ADDR, str(ECHO_PORT)], env)
    assert r.returncode == 0, r.stderr
    assert lines(r)["dup"] == "ok"
    assert all_closed(fake)


def test_fork_shares_sockets_child_has_own_channel(env, probe, fake):
    r = run([str(probe), "fork", PEER_ADDR, str(ECHO_PORT)], env)
    assert r.returncode == 0, r.stderr
    assert lines(r)["fork"] == "ok"
    st = fake.stats()
    # the parent says HELLO; its fork asks for the child's channel (FORK), which the
    # child uses without connecting or saying HELLO (a sandboxed child could not)
    assert len(set(st["hellos"])) == 1, st["hellos"]
    assert st["forks"] == 1 and st["channels_used"] == 2, st


def test_fork_without_a_fork_channel_reclaims_inherited_sockets(env, probe, fake):
    """If FORK fails, the child connects a channel of its own, which may name only what
    it proves it holds: it passes each inherited fd to ADOPT first."""
    fake.refuse_fork = True
    r = run([str(probe), "fork", PEER_ADDR, str(ECHO_PORT)], env)
    assert r.returncode == 0, r.stderr
    assert lines(r)["fork"] == "ok"
    st = fake.stats()
    assert len(set(st["hellos"])) == 2, st["hellos"]           # the child said HELLO itself
    assert [res for _, res in st["adopts"]] == [0], st["adopts"]   # and reclaimed its one socket


# ---------------- signals ----------------

def test_blocking_recv_eintr_without_sa_restart(env, probe):
    r = lines(run([str(probe), "eintr", PEER_ADDR, str(ECHO_PORT)], env))
    assert r["recv"] == f"-1 errno={errno.EINTR}"


def test_blocking_recv_restarted_with_sa_restart(env, probe):
    r = lines(run([str(probe), "restart", PEER_ADDR, str(ECHO_PORT)], env))
    assert r["recv"] == "4 errno=0"


def test_sigpipe(env, probe):
    r = run([str(probe), "sigpipe", PEER_ADDR, str(ECHO_PORT)], env)
    assert r.returncode == -signal.SIGPIPE
    r = lines(run([str(probe), "nosignal", PEER_ADDR, str(ECHO_PORT)], env))
    assert r["send"] == f"-1 errno={errno.EPIPE}"


# ---------------- what stays with the kernel ----------------

def test_unix_and_udp_pass_through(env, fake):
    code = r"""
import socket
a, b = socket.socketpair()
a.sendall(b"unix"); assert b.recv(10) == b"unix"
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); u.close()
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
w.sendto(b"udp", r.getsockname())
assert r.recvfrom(10)[0] == b"udp"
print("ok")
"""
    assert run_py(code, env).stdout.strip() == "ok"
    assert fake.stats()["ops"] == {}  # not even a HELLO: no TCP socket was made


def test_handover_to_kernel_keeps_fd_flags_and_options(env, fake):
    code = r"""
import fcntl, os, socket, struct
srv = socket.socket()
srv.bind(("127.0.0.1", 0))               # not the adapter's address: kernel
srv.listen()
c = socket.socket()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
fd = c.fileno()
twin = os.dup(fd)
c.connect(srv.getsockname())             # loopback: kernel, same fd
assert c.fileno() == fd
dup = socket.socket(fileno=twin)          # a dup made before follows the handover
assert dup.getsockname() == c.getsockname() and dup.getsockname()[0] == "127.0.0.1"
dup.close()
a, _ = srv.accept()
c.sendall(b"via kernel"); assert a.recv(100) == b"via kernel"
assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
assert c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
assert c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 16384   # the kernel doubled it
assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC              # Python's SOCK_CLOEXEC
nb = socket.socket(); nb.setblocking(False)
assert nb.connect_ex(srv.getsockname()) in (0, 115)
assert fcntl.fcntl(nb.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
h = socket.socket(); h.bind(("0.0.0.0", int(__import__("sys").argv[1])))   # daemon: HANDOVER
assert h.getsockname()[1] == int(__import__("sys").argv[1])
print("ok")
"""
    assert run_py(code, env, HANDOVER_PORT).stdout.strip() == "ok"
    handovers = fake.stats()["handovers"]
    reasons = sorted(r for _, r, _ in handovers)
    assert reasons == [1, 1, 3, 4], reasons  # loopback x2, bind address, daemon
    assert all(refused == 0 for _, _, refused in handovers)  # not strict: handed over
    assert all_closed(fake)


def test_lifetime_is_the_socket_pair(env, fake):
    """No CLOSE command: the daemon learns of the last close from B's EOF."""
    run_py(READINESS, env, PEER_ADDR, ECHO_PORT)
    assert all_closed(fake)
    assert set(fake.stats()["ops"]) == {1, 13, 5}  # HELLO, SOCKETS (a pool of one), CONNECT
