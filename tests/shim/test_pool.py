"""The shim's pool of ready sockets (shim/pool.c), against the fake adapter: socket() takes
a socket made and registered in a batch, at the descriptor number the kernel's socket()
would give, and the pool stays out of the application's way."""

from __future__ import annotations

from .fake_adapter import PEER_ADDR
from .helpers import run_py, wait_until

ECHO_PORT = 7

MANY = r"""
import errno, fcntl, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(40):
    s = socket.socket()
    # the lowest free descriptor, as the kernel's socket() gives
    probe = os.open("/dev/null", os.O_RDONLY); os.close(probe)
    assert s.fileno() < probe, (s.fileno(), probe)
    socks.append(s)
for s in socks[:20]:
    s.connect((host, port))
    s.sendall(b"x%d" % s.fileno())
for s in socks[:20]:
    assert s.recv(10) == b"x%d" % s.fileno()
# a hole: the next socket() fills it
hole = socks[5].fileno()
socks[5].close()
s = socket.socket()
assert s.fileno() == hole, (s.fileno(), hole)
# the flags of the type, and defaults, on a pooled socket
b = socket.socket()
assert not fcntl.fcntl(b.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
assert fcntl.fcntl(b.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC          # Python's SOCK_CLOEXEC
nb = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
assert fcntl.fcntl(nb.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
raw = socket.socket()
fd = os.dup(raw.fileno())                                                 # lowest free again
assert b.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
assert b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
assert b.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0] == 7      # TCP_CLOSE
# the pool's descriptors are not the application's: close() of one is EBADF
open_fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
mine = {s.fileno() for s in socks} | {b.fileno(), nb.fileno(), raw.fileno(), fd}
pooled = [x for x in open_fds if x >= 500 and x not in mine]
assert pooled, open_fds
try:
    os.close(pooled[-1])
    raise AssertionError("close() of a pooled descriptor succeeded")
except OSError as e:
    assert e.errno == errno.EBADF, e
print("ok", len(pooled))
"""


def test_sockets_come_from_batches_at_the_lowest_descriptor(env, fake):
    r = run_py(MANY, env, PEER_ADDR, ECHO_PORT)
    assert r.stdout.startswith("ok"), r.stdout
    st = fake.stats()
    # batches grow 1, 2, 4, 8, 16: 45 sockets asked for take six batches, no single SOCKET
    assert st["batches"][:5] == [1, 2, 4, 8, 16], st["batches"]
    assert st["ops"].get(2, 0) == 0 and st["sockets_made"] >= 45, st
    assert len(st["batches"]) <= 7, st["batches"]
    assert wait_until(lambda: fake.stats()["live"] == 0)   # pooled ones too, at exit


CLOSE_ALL = r"""
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])

def pooled(mine):
    # the pool's A ends: unnamed socketpair ends, high up (the control channel has a peer)
    out = []
    for x in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        if x < 500 or x in mine:
            continue
        try:
            d = os.dup(x)
        except OSError:
            continue
        with socket.socket(fileno=d) as t:
            if t.family == socket.AF_UNIX and not t.getpeername():
                out.append(x)
    return out

def echo(msg):
    s = socket.socket(); s.connect((host, port)); s.sendall(msg); assert s.recv(len(msg)) == msg
    s.close()

keep = [socket.socket() for _ in range(4)]    # batches 1, 2, 4: three left in the pool
old = pooled({k.fileno() for k in keep})
assert len(old) >= 2, old
os.closerange(3, 65536)                        # the application closes everything
r, w = os.pipe()
os.dup2(r, old[0]); os.dup2(w, old[-1])        # and reuses the pool's old numbers
echo(b"after")                                 # sockets still work ...
os.write(old[-1], b"p"); assert os.read(old[0], 1) == b"p"   # ... and its pipe is its own
for _ in range(3):
    echo(b"again")                             # a new pool behind it
now = pooled({old[0], old[-1]})
assert now, now
os.dup2(r, now[0])                             # dup2 onto a pooled descriptor
for _ in range(20):
    echo(b"dup2")
os.write(w, b"q"); assert os.read(now[0], 1) == b"q"
print("ok")
"""


def test_close_range_and_dup2_over_the_pool(env, fake):
    """closerange() over the pool's descriptors and dup2() onto one take them out of the
    pool (the application may close and reuse any number): the numbers are the
    application's again, and sockets made after still work."""
    r = run_py(CLOSE_ALL, env, PEER_ADDR, ECHO_PORT)
    assert r.stdout.strip() == "ok", r.stdout
    assert wait_until(lambda: fake.stats()["live"] == 0)


FORKED = r"""
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for _ in range(3):
    socket.socket()                            # the parent's pool: batches 1, 2
pid = os.fork()
if pid == 0:
    s = socket.socket()                        # the child's own pool, from a batch of one
    s.connect((host, port)); s.sendall(b"child"); ok = s.recv(5) == b"child"
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert status == 0, status
s = socket.socket(); s.connect((host, port)); s.sendall(b"parent"); assert s.recv(6) == b"parent"
print("ok")
"""


def test_a_forked_child_makes_its_own_pool(env, fake):
    r = run_py(FORKED, env, PEER_ADDR, ECHO_PORT)
    assert r.stdout.strip() == "ok", r.stdout
    st = fake.stats()
    # parent 1, 2; child 1 (it inherits no pooled socket); parent again from what it had
    assert st["batches"][:3] == [1, 2, 1], st["batches"]
    assert wait_until(lambda: fake.stats()["live"] == 0)


SERVER = r"""
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
l.bind(("0.0.0.0", 8090)); l.listen(64)
print("ready", flush=True)
for i in range(20):
    c, peer = l.accept()
    assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1, i   # the listener's
    assert c.getsockname()[1] == 8090 and peer[1] == 6000 + i, (c.getsockname(), peer)
    c.sendall(b"%d" % i)
    assert c.recv(10) == b"%d" % i, i
    c.close()
print("served", flush=True)
"""


def test_accepted_connections_go_into_pooled_sockets(env, fake):
    """accept() names a pooled socket in ACCEPT instead of passing a new one: one round trip,
    no socket made on the way; the child inherits the listener's options, not the pool's."""
    from .helpers import Interactive

    p = Interactive(SERVER, env)
    p.expect("ready")
    for i in range(20):
        fake.inject_connection(8090, ("198.18.0.60", 6000 + i))
    p.expect("served")
    p.finish()
    st = fake.stats()
    assert st["pooled_accepts"] == 20 and st["ops"].get(6) == 20, st     # ACCEPT
    assert st["ops"].get(2, 0) == 0, st                                   # no SOCKET
    assert wait_until(lambda: fake.stats()["live"] == 0)
