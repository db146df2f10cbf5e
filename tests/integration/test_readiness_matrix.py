"""Every readiness API an event loop uses, on an offloaded socket with a kernel peer.

ppoll and pselect, EPOLLONESHOT re-arming, EPOLLRDHUP on the peer's FIN,
sets that mix the offloaded socket with a pipe and a timerfd, and an epoll
set shared by a parent and its forked child. The program prints one line
per check; the test requires every one to be "ok".
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line

pytestmark = pytest.mark.integration

PROGRAM = r"""
import ctypes, os, select, signal, socket, struct, sys, time

def check(name, cond):
    print(name, "ok" if cond else "FAIL", flush=True)

s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
fd = s.fileno()
libc = ctypes.CDLL(None, use_errno=True)

class pollfd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]

class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

def ppoll(fd, events, ms):
    p = pollfd(fd, events, 0)
    ts = timespec(ms // 1000, (ms % 1000) * 1000000)
    n = libc.ppoll(ctypes.byref(p), 1, ctypes.byref(ts), None)
    return n, p.revents

def pselect_readable(fd, ms):
    fds = (ctypes.c_ulong * 16)()
    fds[fd // 64] |= 1 << (fd % 64)
    ts = timespec(ms // 1000, (ms % 1000) * 1000000)
    n = libc.pselect(fd + 1, ctypes.byref(fds), None, None, ctypes.byref(ts), None)
    return n == 1 and bool(fds[fd // 64] & (1 << (fd % 64)))

# nothing sent yet: not readable, writable
n, rev = ppoll(fd, select.POLLIN, 50)
check("ppoll_not_readable", n == 0)
n, rev = ppoll(fd, select.POLLOUT, 1000)
check("ppoll_writable", n == 1 and rev & select.POLLOUT)
check("pselect_not_readable", not pselect_readable(fd, 50))

s.sendall(b"ping")                             # the peer answers "pong"
n, rev = ppoll(fd, select.POLLIN, 10000)
check("ppoll_readable", n == 1 and rev & select.POLLIN)
check("pselect_readable", pselect_readable(fd, 10000))
check("data", s.recv(4) == b"pong")

# a set mixing the socket with a pipe and a timerfd
r, w = os.pipe()
tfd = libc.timerfd_create(1, 0)                # CLOCK_MONOTONIC
libc.timerfd_settime(tfd, 0, ctypes.byref((timespec * 2)(timespec(0, 0), timespec(0, 20000000))), None)
ep = select.epoll()
ep.register(fd, select.EPOLLIN)
ep.register(r, select.EPOLLIN)
ep.register(tfd, select.EPOLLIN)
first = dict(ep.poll(5))
check("mixed_timer_only", first.keys() == {tfd})
os.read(tfd, 8)
os.write(w, b"x")
s.sendall(b"ping")
seen = set()
deadline = time.monotonic() + 10
while seen != {fd, r} and time.monotonic() < deadline:
    seen |= {f for f, _ in ep.poll(1)}
check("mixed_pipe_and_socket", seen == {fd, r})
check("data2", s.recv(4) == b"pong")
ep.close()

# EPOLLONESHOT: one event, then nothing until re-armed
ep = select.epoll()
ep.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
s.sendall(b"ping")
check("oneshot_first", len(ep.poll(10)) == 1)
time.sleep(0.05)
check("oneshot_silent", ep.poll(0.1) == [])
ep.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
check("oneshot_rearmed", len(ep.poll(10)) == 1)
check("data3", s.recv(4) == b"pong")
ep.close()

# an epoll set shared by parent and child across fork
ep = select.epoll()
ep.register(fd, select.EPOLLIN)
rd, wr = os.pipe()
pid = os.fork()
if pid == 0:
    ev = ep.poll(10)
    os.write(wr, b"1" if ev and ev[0][0] == fd else b"0")
    os._exit(0)
s.sendall(b"ping")
child_saw = os.read(rd, 1)
os.waitpid(pid, 0)
check("fork_shared_epoll", child_saw == b"1")
check("data4", s.recv(4) == b"pong")
ep.close()

# EPOLLRDHUP when the peer shuts down its side
ep = select.epoll()
ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
s.sendall(b"bye!")                             # the peer answers with FIN
events = ep.poll(10)
check("rdhup", bool(events) and bool(events[0][1] & select.EPOLLRDHUP))
check("eof", s.recv(4) == b"")
print("done", flush=True)
"""

PEER = r"""
import socket, sys
ls = socket.socket()
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
while True:
    msg = c.recv(4)
    if msg == b"ping":
        c.sendall(b"pong")
    elif msg == b"bye!" or not msg:
        c.shutdown(socket.SHUT_WR)
        break
c.recv(1)
"""


def test_readiness_apis_on_an_offloaded_socket(adapter, client_ns):
    port = unique_port()
    peer = adapter.popen([sys.executable, "-u", "-c", PEER, adapter.host_ip, str(port)],
                         stdout=subprocess.PIPE, text=True)
    wait_for_line(peer, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-u", "-c", PROGRAM, adapter.host_ip, str(port)],
                            text=True, timeout=120)
    lines = [line.split() for line in res.stdout.splitlines() if line.strip()]
    assert lines and lines[-1] == ["done"], res.stdout + res.stderr
    failed = [name for name, *verdict in lines[:-1] if verdict != ["ok"]]
    assert failed == [], res.stdout
    assert len(lines) >= 17
