"""Readiness edges from the real adapter, and strict mode.

* Edge-triggered epoll: a nonblocking sender fills its send ring (the peer
  does not read) until EAGAIN; when the kernel peer starts reading, the
  drained ring must raise an EPOLLOUT edge (nginx and redis wait for it).
* `toe run --strict`: a socket that would silently go to the kernel is an
  error with one line on stderr, counted as refused in `toe stat`; without
  --strict it is handed over and counted with its reason.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_toe, unique_port, wait_for_line, wait_until

pytestmark = pytest.mark.integration

ET_SENDER = r"""
import select, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLET)
ep.poll(5)                                  # the first edge: writable after connect
chunk = b"e" * 65536
sent = 0
while True:
    try:
        sent += s.send(chunk)
    except BlockingIOError:
        break
print("full", sent, flush=True)             # the peer is not reading: the ring is full
sys.stdin.readline()                        # the test lets the peer read now
events = ep.poll(60)
print("edge", "EPOLLOUT" if any(e & select.EPOLLOUT for _, e in events) else "none", flush=True)
n = s.send(chunk)
print("sent_after_edge", n, flush=True)
s.close()
"""

PEER = r"""
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
sys.stdin.readline()                        # do not read until told
total = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    total += len(d)
print("received", total, flush=True)
"""


def test_drained_send_ring_raises_an_epollout_edge(adapter, client_ns):
    port = unique_port()
    peer = adapter.popen([sys.executable, "-u", "-c", PEER, adapter.host_ip, str(port)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_for_line(peer, "listening")
    sender = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", ET_SENDER, adapter.host_ip, str(port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    full = wait_for_line(sender, "full").split()
    assert int(full[1]) > 0
    peer.stdin.write("go\n")
    peer.stdin.flush()
    out, _ = sender.communicate("go\n", timeout=60)
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines.get("edge") == ["EPOLLOUT"], out
    assert int(lines["sent_after_edge"][0]) > 0, out
    assert sender.returncode == 0
    received = int(wait_for_line(peer, "received").split()[1])
    assert received >= int(full[1]), (received, full)


CONNECT = r"""
import errno, socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("result connected", flush=True)
except OSError as e:
    print("result", errno.errorcode[e.errno], flush=True)
"""


def _proc(adapter, pid):
    for p in adapter.stat().get("processes", []):
        if p.get("pid") == pid:
            return p
    return None


@pytest.mark.parametrize("strict", [False, True])
def test_strict_mode_refuses_a_silent_handover(adapter, client_ns, strict):
    port = unique_port()
    argv = client_ns.argv([sys.executable, "-u", "-c", CONNECT, str(port)], adapter)
    if strict:
        argv.insert(argv.index("run") + 1, "--strict")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    result = out.split()
    row = wait_until(lambda: _proc(adapter, proc.pid), "the program in toe stat's processes")
    if strict:
        assert result == ["result", "ENETUNREACH"], (out, err)
        assert [line for line in err.splitlines() if line.startswith("toe: strict:")], err
        assert "loopback" in err
        assert row["refused"] == 1 and row["handovers"] == 0, row
    else:
        # handed to the kernel: nothing listens on that loopback port in the namespace
        assert result == ["result", "ECONNREFUSED"], (out, err)
        assert "toe:" not in err
        assert row["handovers"] == 1 and row["handover_reasons"] == {"loopback": 1}, row


def test_run_strict_is_in_help():
    res = run_toe("run", "--help")
    assert "--strict" in res.stdout
