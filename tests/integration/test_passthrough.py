"""What the adapter does not serve still works under toe run: UDP, AF_UNIX, loopback TCP."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.integration

UDP_AND_UNIX = r"""
import os, socket, tempfile

# UDP on loopback inside the client namespace
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", 0))
cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cli.settimeout(30)
cli.sendto(b"ping", srv.getsockname())
data, peer = srv.recvfrom(100)
srv.sendto(data.upper(), peer)
assert cli.recv(100) == b"PING"
print("udp ok")

# AF_UNIX socketpair, both types
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        got += b.recv(1000 - len(got))
    assert got == b"x" * 1000
    a.close(); b.close()
print("socketpair ok")

# AF_UNIX stream socket on a path
path = os.path.join(tempfile.mkdtemp(), "s")
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(path); ls.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(path)
s, _ = ls.accept()
c.sendall(b"hello"); c.shutdown(socket.SHUT_WR)
assert s.recv(100) == b"hello" and s.recv(100) == b""
print("unix ok")
"""

LOOPBACK_TCP = r"""
import socket
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname(), timeout=30)
s, _ = ls.accept()
c.sendall(b"y" * 100000); c.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(65536):
    got += chunk
assert got == b"y" * 100000, len(got)
print("loopback tcp ok")
"""


def test_udp_and_unix_sockets_pass_through(adapter, client_ns):
    res = client_ns.toe_run(adapter, [sys.executable, "-c", UDP_AND_UNIX], text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["udp", "ok", "socketpair", "ok", "unix", "ok"]


def test_loopback_tcp_is_handed_to_the_kernel(adapter, client_ns):
    res = client_ns.toe_run(adapter, [sys.executable, "-c", LOOPBACK_TCP], text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "loopback tcp ok"
