"""Recycled sockets (issue 12) with real programs: a closed socket's memfd and mappings are
reused for the process's next socket (REUSE), and that socket starts its life as new as a
kernel socket does: options at their defaults, empty rings, nothing of the last connection."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line

pytestmark = pytest.mark.integration

# per connection: the client sends its number (4 bytes); the server answers 200,000 bytes
# derived from it, then waits for the client to close
SERVER = r"""
import hashlib, socket, sys, threading
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(64)
print("listening", flush=True)
def serve(c):
    try:
        req = c.recv(4, socket.MSG_WAITALL)
        seed = hashlib.sha256(req).digest()
        c.sendall(seed * 6250)
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Every connection's socket is checked before use against the first socket's options, and
# after connect for empty rings; odd connections change options and close with the response
# half read (an RST: the RX ring is not empty when the socket goes), even ones read it all.
CLIENT = r"""
import errno, fcntl, hashlib, json, socket, struct, sys, termios
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SIOCOUTQ = 0x5411
OPTS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        (socket.SOL_SOCKET, socket.SO_SNDBUF), (socket.SOL_SOCKET, socket.SO_RCVBUF),
        (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT), (socket.IPPROTO_TCP, socket.TCP_MAXSEG),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        (socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, socket.SO_ERROR)]
def opts(s):
    return [s.getsockopt(l, o) for l, o in OPTS] + [s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8),
            fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & 0o4000, fcntl.fcntl(s.fileno(), fcntl.F_GETFD)]
first = None
problems, total, ports = [], hashlib.sha256(), set()
for i in range(n):
    s = socket.socket()
    now = opts(s)
    if first is None:
        first = now
    elif now != first:
        problems.append((i, "options", now, first))
    s.connect((host, port))
    ports.add(s.getsockname()[1])
    avail = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    outq = struct.unpack("i", fcntl.ioctl(s.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    try:
        s.recv(1, socket.MSG_DONTWAIT)
        problems.append((i, "a byte before the request"))
    except BlockingIOError:
        pass
    if avail or outq:
        problems.append((i, "rings", avail, outq))
    want = hashlib.sha256(i.to_bytes(4, "big")).digest() * 6250
    if i % 2:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.setblocking(False)
        s.setblocking(True)
        fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fcntl.fcntl(s.fileno(), fcntl.F_GETFL) | 0o4000)
        fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & ~0o4000)
    s.sendall(i.to_bytes(4, "big"))
    got = b""
    limit = len(want) // 2 if i % 2 else len(want)
    while len(got) < limit:
        d = s.recv(limit - len(got))
        if not d:
            break
        got += d
    if got != want[:limit]:
        problems.append((i, "data", len(got)))
    total.update(got)
    s.close()
print(json.dumps({"problems": problems[:5], "digest": total.hexdigest(), "ports": len(ports)}))
"""


def expected_digest(n: int) -> str:
    total = hashlib.sha256()
    for i in range(n):
        want = hashlib.sha256(i.to_bytes(4, "big")).digest() * 6250
        total.update(want[:len(want) // 2] if i % 2 else want)
    return total.hexdigest()


def test_a_recycled_socket_starts_new(adapter, client_ns):
    n = 60
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    before = adapter.stat()["units"]["host_if"].get("recycled", 0)
    res = client_ns.toe_run(adapter, [sys.executable, "-c", CLIENT, adapter.host_ip, str(port), str(n)], text=True)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["problems"] == [], got["problems"]
    assert got["digest"] == expected_digest(n) and got["ports"] == n, got
    host = adapter.stat()["units"]["host_if"]
    # most sockets were a closed one's mapping; the first ones of each batch size cannot be
    # (their predecessors were still open or not yet released)
    assert host.get("recycled", 0) - before >= n // 2, host


# a parent with kept mappings forks: the child has none of them (and none of the pool's),
# only the mappings of the sockets it inherits
FORKER = r"""
import os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def toe_maps():
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "toe-sock" in line)
for _ in range(8):
    s = socket.socket()
    s.connect((host, port))
    s.sendall(b"\0\0\0\0")
    s.recv(1)
    s.close()
time.sleep(0.5)                     # the daemon has reset their headers: kept, ready for REUSE
live = socket.socket()
live.connect((host, port))
before = toe_maps()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, str(toe_maps()).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = int(os.read(r, 100))
print(before, child)
"""


def test_a_fork_child_has_no_kept_mapping(adapter, client_ns):
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", FORKER, adapter.host_ip, str(port)], text=True)
    assert res.returncode == 0, res.stderr
    before, child = map(int, res.stdout.split())
    assert before > 1, (before, child)         # the live socket, and kept or pooled ones
    assert child == 1, (before, child)         # the live socket only


# threads open, use and close connections at once: sockets are kept, reset and reused while
# other threads close theirs (the slots are lock-free) and refill the pool
THREADS = r"""
import hashlib, socket, sys, threading
host, port, nthreads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bad, digests = [], [None] * nthreads
def run(t):
    h = hashlib.sha256()
    for i in range(n):
        k = t * n + i
        s = socket.socket()
        s.connect((host, port))
        s.sendall(k.to_bytes(4, "big"))
        want = hashlib.sha256(k.to_bytes(4, "big")).digest() * 6250
        got = bytearray()
        while len(got) < len(want):
            d = s.recv(65536)
            if not d:
                break
            got += d
        if got != want:
            bad.append((k, len(got)))
        h.update(got)
        s.close()
    digests[t] = h.hexdigest()
ts = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(bad[:3], *digests)
"""


def test_threads_recycling_at_once_keep_every_byte(adapter, client_ns):
    nthreads, n = 6, 40
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    before = adapter.stat()["units"]["host_if"].get("recycled", 0)
    res = client_ns.toe_run(adapter, [sys.executable, "-c", THREADS, adapter.host_ip, str(port), str(nthreads),
                                      str(n)], text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    want = []
    for t in range(nthreads):
        h = hashlib.sha256()
        for i in range(n):
            h.update(hashlib.sha256((t * n + i).to_bytes(4, "big")).digest() * 6250)
        want.append(h.hexdigest())
    assert out[0] == "[]" and out[1:] == want, res.stdout[:500]
    assert adapter.stat()["units"]["host_if"].get("recycled", 0) - before >= nthreads * n // 2
