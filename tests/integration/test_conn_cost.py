"""What a connection costs the shim and the daemon (issue 12): control-channel round trips
per connection, counted by the daemon and shown in `toe stat`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line

pytestmark = pytest.mark.integration

SERVER = r"""
import socket, sys, threading
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(64)
print("listening", flush=True)
def serve(c):
    with c:
        b = c.recv(1)
        c.sendall(bytes([b[0] ^ 0xFF]))
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # before connect: no command
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.connect((host, port))
    s.sendall(bytes([i & 0xFF]))
    assert s.recv(1) == bytes([(i & 0xFF) ^ 0xFF]), i
    s.close()
print("ok", n)
"""


def test_a_connection_costs_one_round_trip(adapter, client_ns):
    """connect() is one command; socket() takes a socket from the shim's pool, made and
    registered in batches (1, 2, 4, 8, 16, 16 ...: seven for 50 sockets); options set
    before connect ride in the shared header (the daemon reads them there). So a
    short-lived client connection costs one round trip to the daemon, and the batches."""
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", CLIENT, adapter.host_ip, str(port), "50"], text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok 50", res.stderr
    stat = adapter.stat()
    host_if, tot = stat["units"]["host_if"], stat["totals"]
    assert host_if["by_op.connect"] == 50 and host_if["by_op.sockets"] == 7, host_if
    assert "by_op.setsockopt" not in host_if and "by_op.socket" not in host_if, host_if
    assert host_if["pooled"] == 1 + 2 + 4 + 8 + 16 + 16 + 16, host_if
    assert tot["round_trips_per_connection"] == 1.14, tot     # (50 + 7) / 50
