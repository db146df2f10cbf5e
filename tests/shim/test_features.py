"""sendfile/splice, recvmmsg/sendmmsg, exec adoption, close_range/closefrom,
SHUT_RD, strict mode, recorded socket options, fork safety and kernel-exact
corner cases, against the fake adapter.

Every program runs in its own loopback-only network namespace (helpers.run).
Where a test must know that a thread is blocked it reads the thread's
/proc/.../syscall (a state, not a delay).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .fake_adapter import ADAPTER_ADDR, HANDOVER_PORT, HOLD_PORT, PEER_ADDR, REFUSED_PORT, SLOW_PORT
from .helpers import Interactive, isolated, kill_group, lines, run, run_py, wait_until

ECHO_PORT = 7
HERE = Path(__file__).resolve().parent
ENOENT = -errno.ENOENT

# Python snippet: wait until thread `tid` is blocked in recvfrom() on fd (or has finished).
WAIT_BLOCKED = r"""
import time
def wait_blocked(tid, fd, thread):
    while thread.is_alive():
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                parts = f.read().split()
        except OSError:
            parts = []
        if len(parts) > 1 and parts[0] == "45" and int(parts[1], 16) == fd:
            return
        time.sleep(0.002)
"""


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(300_000))
    return p


def probe_ok(probe, env, cmd: str, *args: object) -> dict:
    r = run([str(probe), cmd, *map(str, args)], env)
    assert r.returncode == 0, r.stderr
    out = lines(r)
    assert out.get(cmd) == "ok", r.stdout
    return out


# ---------------- sendfile / splice ----------------

def test_sendfile_offsets_file_position_eof_and_errors(env, probe, blob, fake):
    probe_ok(probe, env, "sendfile", PEER_ADDR, ECHO_PORT, blob)
    assert fake.stats()["ops"].get(5) == 1  # the socket stayed offloaded throughout


def test_sendfile_nonblocking_fills_the_ring_then_eagain(env, probe, blob, fake):
    r = lines(run([str(probe), "sendfile_nb", PEER_ADDR, str(HOLD_PORT), str(blob)], env))
    ring = fake.ring_bytes
    assert r["first"] == f"{ring} off={ring}"                       # a partial count
    assert r["second"] == f"-1 errno={errno.EAGAIN} off={ring}"      # offset untouched
    assert r["writable"] == "0"                                      # A stuffed: no POLLOUT


def test_sendfile_after_shutdown_is_epipe_with_sigpipe(env, probe, blob):
    r = lines(run([str(probe), "sendfile_epipe", PEER_ADDR, str(ECHO_PORT), str(blob)], env))
    assert r["sendfile"] == f"-1 errno={errno.EPIPE} off=0 sigpipe=1"


SOCKET_SENDFILE = r"""
import os, socket, sys, threading
data = os.urandom(2_000_000)
path = sys.argv[3]
with open(path, "wb") as f:
    f.write(data)
calls = []
real = os.sendfile
def counted(*a):
    calls.append(a[3])
    return real(*a)
os.sendfile = counted
def no_fallback(*a, **k):
    raise AssertionError("socket.sendfile() gave up on os.sendfile()")
socket.socket._sendfile_use_send = no_fallback

def recv_exact(s, n):
    got = bytearray()
    while len(got) < n:
        b = s.recv(n - len(got))
        assert b
        got += b
    return bytes(got)

for timeout in (None, 10.0):   # blocking, and CPython's O_NONBLOCK + poll() mode
    s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2]))); s.settimeout(timeout)
    box = []
    t = threading.Thread(target=lambda: box.append(recv_exact(s, len(data)))); t.start()
    with open(path, "rb") as f:
        assert s.sendfile(f) == len(data)
        assert f.tell() == len(data)
    t.join()
    assert box[0] == data
    with open(path, "rb") as f:
        assert s.sendfile(f, 1000, 5000) == 5000
        assert f.tell() == 6000
    assert recv_exact(s, 5000) == data[1000:6000]
    s.close()
assert calls
print("ok")
"""


def test_python_socket_sendfile(env, tmp_path):
    assert run_py(SOCKET_SENDFILE, env, PEER_ADDR, ECHO_PORT, tmp_path / "f").stdout.strip() == "ok"


def test_splice_pipe_and_file_to_socket_and_socket_to_pipe(env, probe, blob):
    probe_ok(probe, env, "splice", PEER_ADDR, ECHO_PORT, blob)


NGINX_CONF = """
daemon off; master_process on; worker_processes 1; user root;
error_log {d}/error.log info; pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    sendfile on; tcp_nopush on; access_log off; default_type application/octet-stream;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
    uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
    server {{ listen {addr}:8080; root {d}/www; }}
}}
"""


def http_response(raw: bytes) -> tuple[str, bytes] | None:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    for ln in head.split(b"\r\n"):
        if ln.lower().startswith(b"content-length:") and len(body) >= int(ln.split(b":")[1]):
            return head.decode(), body
    return None


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed")
def test_nginx_sendfile_on(env, fake, tmp_path):
    """nginx (master + worker, epoll, sendfile on, tcp_nopush) serves a file and a
    byte range of it through sendfile64() on offloaded sockets."""
    (tmp_path / "www").mkdir()
    body = os.urandom(3_000_000)
    (tmp_path / "www" / "big.bin").write_bytes(body)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=tmp_path, addr=ADAPTER_ADDR))
    argv, e = isolated(["nginx", "-p", str(tmp_path), "-c", str(conf)], env)
    p = subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        assert wait_until(lambda: fake.stats()["ops"].get(4, 0) >= 1, 10), "nginx did not listen"
        fake.inject_connection(8080, ("198.18.0.50", 40001), mode="sink",
                               data=b"GET /big.bin HTTP/1.0\r\nHost: t\r\n\r\n")
        fake.inject_connection(8080, ("198.18.0.51", 40002), mode="sink",
                               data=b"GET /big.bin HTTP/1.0\r\nHost: t\r\nRange: bytes=100000-1099999\r\n\r\n")
        for port in (40001, 40002):
            if not wait_until(lambda p=port: http_response(fake.sunk(p)) is not None, 20):
                log = (tmp_path / "error.log").read_text()[-2000:]
                pytest.fail(f"no whole response to {port}: {len(fake.sunk(port))} bytes; "
                            f"{fake.describe(port)}; errors {fake.stats()['errors']}; log:\n{log}")
        head, got = http_response(fake.sunk(40001))
        assert head.startswith("HTTP/1.1 200 ") and got == body
        head, got = http_response(fake.sunk(40002))
        assert head.startswith("HTTP/1.1 206 ") and got == body[100000:1100000]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            kill_group(p)
    assert p.returncode == 0
    log = (tmp_path / "error.log").read_text()
    assert "[alert]" not in log and "[crit]" not in log and "failed" not in log, log


# ---------------- recvmmsg / sendmmsg ----------------

def test_recvmmsg_sendmmsg(env, probe):
    probe_ok(probe, env, "mmsg", PEER_ADDR, ECHO_PORT)


# ---------------- close_range / closefrom ----------------

def test_close_range_and_closefrom(env, probe, fake):
    probe_ok(probe, env, "closerange", PEER_ADDR, ECHO_PORT)
    # closefrom() spared the control channel: no second HELLO for the last socket
    assert len(fake.stats()["hellos"]) == 1
    assert wait_until(lambda: fake.stats()["live"] == 0)


# ---------------- exec: adoption of inherited sockets ----------------

def test_exec_keeps_using_an_inherited_socket(env, probe, fake):
    out = probe_ok(probe, env, "exec", PEER_ADDR, ECHO_PORT)
    assert out["before"] == "ok" and out["after"] == "ok"
    st = fake.stats()
    assert [res for _, res in st["adopts"]] == [0]
    assert st["adopts"][0][0] in st["cookies"]          # SOCKET carried A's SO_COOKIE
    assert st["sockets_made"] == 1                      # the new image made no socket
    assert len(st["hellos"]) == 2                       # same pid, new image, new channel


EXEC_LISTENER = r"""
import os, socket, sys
l = socket.socket()
l.bind(("0.0.0.0", 8081)); l.listen()
cookie = l.getsockopt(socket.SOL_SOCKET, 57, 8)          # SO_COOKIE
print("cookie", int.from_bytes(cookie, "little"), flush=True)
l.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], str(l.fileno())])
"""

EXEC_SERVER = r"""
import socket, sys
l = socket.socket(fileno=int(sys.argv[1]))
assert l.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
print("server", l.getsockname(), flush=True)
c, peer = l.accept()
print("peer", peer, flush=True)
c.sendall(b"served by the new image")
got = b""
while len(got) < 23:
    got += c.recv(100)
assert got == b"served by the new image", got
print("echo ok", flush=True)
"""


def test_exec_server_gets_a_listening_socket(env, fake):
    p = Interactive(EXEC_LISTENER, env, EXEC_SERVER)
    cookie = int(p.expect("cookie "))
    assert p.expect("server ") == f"('{ADAPTER_ADDR}', 8081)"
    fake.inject_connection(8081, ("198.18.0.77", 5555))
    assert p.expect("peer ") == "('198.18.0.77', 5555)"
    p.expect("echo ok")
    p.finish()
    st = fake.stats()
    assert st["adopts"] == [(cookie, 0)]


EXEC_MIXED = r"""
import os, socket, sys
if sys.argv[2] == "child":
    a, b, t = (socket.socket(fileno=int(x)) for x in sys.argv[3:6])
    a.sendall(b"plain unix")                 # not offloaded: left alone
    assert b.recv(100) == b"plain unix"
    t.sendall(b"tcp")
    assert t.recv(3, socket.MSG_WAITALL) == b"tcp"
    print("ok")
    sys.exit(0)
a, b = socket.socketpair()
t = socket.socket(); t.connect((sys.argv[3], int(sys.argv[4])))
for s in (a, b, t):
    s.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], sys.argv[1], "child",
                          str(a.fileno()), str(b.fileno()), str(t.fileno())])
"""


def test_exec_leaves_unix_sockets_that_are_not_offloaded(env, fake):
    r = run_py(EXEC_MIXED, env, EXEC_MIXED, "parent", PEER_ADDR, ECHO_PORT)
    assert r.stdout.strip() == "ok"
    assert sorted(res for _, res in fake.stats()["adopts"]) == [ENOENT, ENOENT, 0]


PASS_FDS = r"""
import os, socket, subprocess, sys
if sys.argv[2] == "child":
    u = socket.socket(fileno=int(sys.argv[3]))
    _, fds, _, _ = socket.recv_fds(u, 10, 1)
    t = socket.socket(fileno=fds[0])
    assert t.getpeername() == (sys.argv[4], int(sys.argv[5]))
    t.sendall(b"passed")
    assert t.recv(6, socket.MSG_WAITALL) == b"passed"
    print("ok", flush=True)
    sys.exit(0)
u1, u2 = socket.socketpair()
t = socket.socket(); t.connect((sys.argv[3], int(sys.argv[4])))
c = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[1], "child", str(u2.fileno()),
                      sys.argv[3], sys.argv[4]], pass_fds=[u2.fileno()])
socket.send_fds(u1, [b"x"], [t.fileno()])
t.close()
assert c.wait(20) == 0
"""


def test_socket_passed_with_scm_rights_is_adopted(env, fake):
    r = run_py(PASS_FDS, env, PASS_FDS, "parent", PEER_ADDR, ECHO_PORT)
    assert r.stdout.strip() == "ok"
    # the child's inherited end of the unix pair is not ours; the passed socket is
    assert [res for _, res in fake.stats()["adopts"]] == [ENOENT, 0]


EXEC_PLAIN = r"""
import os, socket, sys
a, b = socket.socketpair()
a.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-c", "print('child')"])
"""


def test_adoption_scan_only_with_toe_sock_and_quiet(shim_so, ctl_dir):
    """No scan at all without TOE_SOCK; with it, an unreachable daemon during the
    scan prints nothing (the program may never make a TCP socket)."""
    base = dict(os.environ, LD_PRELOAD=str(shim_so), TOE_DEBUG="1")
    base.pop("TOE_SOCK", None)
    r = run_py(EXEC_PLAIN, base)
    assert "adoption" not in r.stderr, r.stderr
    r = run_py(EXEC_PLAIN, dict(base, TOE_SOCK=os.path.join(ctl_dir, "nobody.sock")))
    assert "adoption: 0 inherited socket(s)" in r.stderr, r.stderr
    assert "no adapter" not in r.stderr, r.stderr


# ---------------- vfork children share the table's memory ----------------

def test_vfork_child_dup2_close_range_exec_sh(env, probe, fake):
    """inetd/CGI style: the vfork child's dup2/close/close_range leave the parent's
    table alone; /bin/sh adopts the socket as stdin/stdout and answers over it."""
    probe_ok(probe, env, "spawn", PEER_ADDR, ECHO_PORT)
    assert [res for _, res in fake.stats()["adopts"]] == [0]   # fds 0 and 1: one socket


def test_python_subprocess_keeps_the_parents_sockets(env):
    """CPython's subprocess vforks and calls close_range() in the child."""
    code = r"""
import socket, subprocess, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
for i in range(3):
    subprocess.run(["/bin/true"], check=True)
    s.sendall(b"%d" % i)
    assert s.recv(1) == b"%d" % i
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


# ---------------- shutdown(SHUT_RD) ----------------

SHUT_RD = WAIT_BLOCKED + r"""
import select, socket, sys, threading
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
box = []
def reader():
    box.append(threading.get_native_id())
    box.append(s.recv(100))
t = threading.Thread(target=reader); t.start()
while not box:
    time.sleep(0.002)
wait_blocked(box[0], s.fileno(), t)
s.shutdown(socket.SHUT_RD)
t.join(10)
assert not t.is_alive() and box[1] == b"", box
p = select.poll(); p.register(s, select.POLLIN | select.POLLRDHUP)
ev = dict(p.poll(0)).get(s.fileno(), 0)
assert ev & select.POLLIN and ev & select.POLLRDHUP, ev
assert s.recv(10) == b""
s.sendall(b"sending still works")
print("ok")
"""


def test_shutdown_rd_wakes_a_blocked_recv(env, fake):
    assert run_py(SHUT_RD, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"
    assert fake.stats()["ops"].get(7) == 1


# ---------------- MSG_PEEK | MSG_WAITALL ----------------

PEEK_WAITALL = WAIT_BLOCKED + r"""
import select, socket, sys, threading
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"abc")
assert s.recv(3, socket.MSG_PEEK | socket.MSG_WAITALL) == b"abc"
box = []
def peeker():
    box.append(threading.get_native_id())
    box.append(s.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL))
t = threading.Thread(target=peeker); t.start()
while not box:
    time.sleep(0.002)
wait_blocked(box[0], s.fileno(), t)       # it waits although 3 bytes are there
s.sendall(b"def")
t.join(10)
assert box[1:] == [b"abcdef"], box
assert select.select([s], [], [], 10)[0]  # still readable: nothing was consumed
assert s.recv(100) == b"abcdef"
s.setblocking(False)
try:
    s.recv(1)
    raise AssertionError("data after the ring was emptied")
except BlockingIOError:
    pass
print("ok")
"""


def test_peek_waitall_waits_for_the_whole_length(env):
    assert run_py(PEEK_WAITALL, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


# ---------------- connect outcomes, EAGAIN where the kernel gives it ----------------

def test_connecting_nonblocking_socket_send_recv_eagain(env, probe):
    probe_ok(probe, env, "connecting", PEER_ADDR, SLOW_PORT)


def test_after_a_reported_refusal_recv_is_enotconn(env, probe):
    probe_ok(probe, env, "refused", PEER_ADDR, REFUSED_PORT)


def test_sendto_msg_fastopen_connects(env):
    code = r"""
import socket, sys
s = socket.socket()
assert s.sendto(b"tfo", socket.MSG_FASTOPEN, (sys.argv[1], int(sys.argv[2]))) == 3
assert s.recv(3, socket.MSG_WAITALL) == b"tfo"
assert s.getpeername() == (sys.argv[1], int(sys.argv[2]))
print("ok")
"""
    assert run_py(code, env, PEER_ADDR, ECHO_PORT).stdout.strip() == "ok"


# ---------------- strict mode ----------------

STRICT = r"""
import errno, socket, sys
peer, echo, far, ho = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket()
for addr in (("127.0.0.1", 6379), (far, 80), (peer, ho)):
    try:
        s.connect(addr)
        raise AssertionError(f"connected to {addr}")
    except OSError as e:
        assert e.errno == errno.ENETUNREACH, e
b = socket.socket()
try:
    b.bind(("127.0.0.1", 0))
    raise AssertionError("bound")
except OSError as e:
    assert e.errno == errno.EADDRNOTAVAIL, e
b.bind(("0.0.0.0", 0))                   # still an offloaded socket
s.connect((peer, echo))                  # so is the refused one: it connects
s.sendall(b"strict")
assert s.recv(6, socket.MSG_WAITALL) == b"strict"
print("ok")
"""


def test_strict_mode_refuses_handovers(env, fake):
    r = run_py(STRICT, dict(env, TOE_STRICT="1"), PEER_ADDR, ECHO_PORT, "10.1.2.3", HANDOVER_PORT)
    assert r.stdout.strip() == "ok"
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("toe:")] == [
        "toe: strict: connect to 127.0.0.1:6379 would use the kernel (loopback)",
        "toe: strict: connect to 10.1.2.3:80 would use the kernel (outside the adapter's subnet)",
        f"toe: strict: connect to {PEER_ADDR}:{HANDOVER_PORT} would use the kernel "
        "(the daemon does not serve it)",
        "toe: strict: bind to 127.0.0.1:0 would use the kernel (not the adapter's address)",
    ]
    handovers = fake.stats()["handovers"]
    assert [(reason, refused) for _, reason, refused in handovers] == [(1, 1), (2, 1), (4, 1), (3, 1)]


def test_strict_mode_without_a_daemon_tcp_sockets_fail(shim_so, ctl_dir):
    path = os.path.join(ctl_dir, "nobody.sock")
    env = dict(os.environ, LD_PRELOAD=str(shim_so), TOE_SOCK=path, TOE_STRICT="1")
    code = r"""
import errno, socket
for _ in range(2):
    try:
        socket.socket()
        raise AssertionError("a kernel TCP socket in strict mode")
    except OSError as e:
        assert e.errno == errno.ENETDOWN, e
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.close()   # not TCP: untouched
a, b = socket.socketpair(); a.close(); b.close()
print("ok")
"""
    r = run_py(code, env)
    assert r.stdout.strip() == "ok"
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("toe:")] == [
        f"toe: strict: no adapter at {path} (No such file or directory); TCP sockets fail"]


# ---------------- socket options ----------------

def test_recorded_options_answer_like_the_kernel(env, fake):
    """tests/shim/sockopts.py sets and gets ~120 option/value/length cases; the shim's
    answers (errors, normalised values, lengths) must be the kernel's, byte for byte."""
    script = [sys.executable, str(HERE / "sockopts.py")]
    kernel = run(script, {k: v for k, v in os.environ.items() if not k.startswith("LD_")})
    assert kernel.returncode == 0, kernel.stderr
    shim = run(script, env)
    assert shim.returncode == 0, shim.stderr
    k, s = kernel.stdout.splitlines(), shim.stdout.splitlines()
    assert len(k) == len(s) > 100
    assert [(a, b) for a, b in zip(k, s, strict=True) if a != b] == []


# ---------------- fork ----------------

def test_fork_while_threads_are_inside_the_shim(env, probe):
    """100 forks while two threads create, configure (a channel command) and dup
    sockets: every child must be able to use the shim at once."""
    probe_ok(probe, env, "forkstress", PEER_ADDR, ECHO_PORT)
