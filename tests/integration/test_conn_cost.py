"""What a connection costs the shim and the daemon (issue 12): control-channel round trips
per connection, counted by the daemon and shown in `toe stat`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import unique_port, wait_for_line, wait_until

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
    registered in batches (1, 2, 4, 8, 16, 16 ...: SOCKETS), later batches mostly of
    closed sockets the daemon reset (REUSE); options set before connect ride in the shared
    header (the daemon reads them there). So a short-lived client connection costs one
    round trip to the daemon, and its share of a batch."""
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", CLIENT, adapter.host_ip, str(port), "50"], text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok 50", res.stderr
    stat = adapter.stat()
    host_if, tot = stat["units"]["host_if"], stat["totals"]
    by_op = {k: v for k, v in host_if.items() if k.startswith("by_op.")}
    assert by_op["by_op.connect"] == 50 and set(by_op) == {"by_op.hello", "by_op.connect", "by_op.sockets",
                                                          "by_op.reuse"}, by_op
    # the first batch is new (nothing is closed yet); a later one reuses the closed sockets
    # the daemon has reset, and makes new ones (SOCKETS) only if fewer than half of it were
    batches = by_op["by_op.sockets"] + by_op["by_op.reuse"]
    assert by_op["by_op.sockets"] >= 1 and host_if["recycled"] >= 8, str({k: v for k, v in host_if.items() if v})
    assert host_if["pooled"] >= 50 and batches <= 12, str({k: v for k, v in host_if.items() if v})
    assert tot["round_trips_per_connection"] == round((50 + batches) / 50, 2), tot
    # the client's row: 50 sockets used (those left in its pool were never its own), none
    # pooled any more once the daemon has seen its exit close them
    def rows():
        return [(p["offloaded"], p["pooled"]) for p in adapter.stat()["processes"]
                if p["offloaded"] or p["pooled"]]
    wait_until(lambda: rows() == [(50, 0)], "the client's pooled sockets to be closed", timeout=20)
    assert rows() == [(50, 0)]


SERVER_CLOSES = r"""
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(256)
print("listening", flush=True)
while True:
    c, _ = ls.accept()
    b = c.recv(1)
    c.sendall(bytes([b[0] ^ 0xFF]))
    c.close()                      # the server closes first: TIME-WAIT stays on the kernel's side
"""

LOOP = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket()
    s.connect((host, port))
    s.sendall(bytes([i & 0xFF]))
    assert s.recv(1) == bytes([(i & 0xFF) ^ 0xFF]), i
    assert s.recv(1) == b"", i     # the server's FIN
    s.close()
    if i + 1 in (1000, n):
        print("done", i + 1, flush=True)
        sys.stdin.readline()       # the test reads the daemon's figures here
"""


FDS_PER_SOCKET = 2


def settled(adapter, pid: int) -> dict:
    """The daemon's figures once its last connection is released (the units' teardown is
    released when the adapter is idle, and the reaper thread gives back descriptors), with
    the sockets open then."""
    from tests.security.hostile import figures

    wait_until(lambda: adapter.stat()["totals"]["connections"] == 0, "the last connection's release", timeout=20)
    last = None
    while True:                     # two looks 0.2 s apart that agree
        now = figures(pid)
        limits = adapter.stat()["limits"]
        now["sockets"], now["spares"] = limits["sockets"], limits["spares"]
        if last is not None and (now["fds"], now["sockets"], now["spares"]) == \
                (last["fds"], last["sockets"], last["spares"]):
            return now
        last = now
        time.sleep(0.2)


def test_100k_connections_leave_the_daemon_as_they_found_it(adapter, client_ns):
    """100,000 connections opened and closed in a loop (pooled sockets, most of them recycled,
    a connection each): the daemon's descriptors and memory are where they were after the
    first 1,000."""
    from tests.security.hostile import daemon_pid

    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER_CLOSES, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    n = 100_000
    pid = daemon_pid(adapter.tap)
    client = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", LOOP, adapter.host_ip, str(port), str(n)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(client, "done 1000", timeout=120)
        start = settled(adapter, pid)
        client.stdin.write("\n")
        client.stdin.flush()
        wait_for_line(client, f"done {n}", timeout=600)
        end = settled(adapter, pid)
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.wait(60) == 0
    finally:
        if client.poll() is None:
            client.kill()
    stat = adapter.stat()
    print(f"\ndaemon after 1,000 connections {start}, after {n:,} {end}; "
          f"round trips per connection {stat['totals']['round_trips_per_connection']}")
    # the open sockets are the client's pool (its size differs between the two moments);
    # each costs the daemon two descriptors (B and the memfd: the mapping has none), and a
    # closed socket's mapping kept for REUSE one (the memfd); nothing else may grow
    assert end["sockets"] <= 2 * 16 and end["spares"] <= 32, end
    def rest(f):
        return f["fds"] - FDS_PER_SOCKET * f["sockets"] - f["spares"]
    assert rest(end) == rest(start), (start, end)
    assert stat["units"]["host_if"]["recycled"] >= n // 2, stat["units"]["host_if"]
    assert end["rss_kb"] <= start["rss_kb"] + 4 * 1024, (start, end)
    # the server closed first: TIME-WAIT is the kernel's, as with two kernels; the adapter
    # kept none (else 100,000 connections to one port would have run out of ports)
    tcp = stat["units"]["tcp"]
    assert tcp["active_opens"] >= n and tcp["time_wait"] == 0, tcp
