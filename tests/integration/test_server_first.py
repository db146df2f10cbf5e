"""Servers that speak first, under toe run, with kernel clients that only read.

SMTP, FTP, POP3/IMAP, SSH and MySQL servers write a banner as soon as they
accept; their clients say nothing until they have read it. A kernel client
reads a toe-run server's banner 1,000 times in a row (each read guarded by a
2 s timeout, never measured against a threshold: the latencies are printed for
the record), and netcat-openbsd as a listener sends its stdin first.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import require_tools, unique_port, wait_for_line

pytestmark = pytest.mark.integration

ROUNDS = 1000

BANNER_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(128)
print("listening", flush=True)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    c.sendall(b"220 banner %d ready\r\n" % n)
    while c.recv(100):                   # then wait for the client, as a server waits for commands
        pass
    c.close()
"""

READ_ONLY_CLIENTS = r"""
import json, socket, sys, time
host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fixed = open(sys.argv[4], "rb").read() if len(sys.argv) > 4 else None     # else numbered banners
lat = []
for i in range(1, rounds + 1):
    c = socket.create_connection((host, port), timeout=2.0)
    t0 = time.perf_counter()
    want = fixed or b"220 banner %d ready\r\n" % i
    got = b""
    while len(got) < len(want):
        chunk = c.recv(100)
        if not chunk:
            break
        got += chunk
    lat.append(time.perf_counter() - t0)
    if got != want:
        sys.exit(f"round {i}: read {got!r}, expected {want!r}")
    c.close()
lat.sort()
print(json.dumps({"rounds": rounds, "p50_ms": lat[len(lat) // 2] * 1e3,
                  "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "max_ms": lat[-1] * 1e3}))
"""


def test_kernel_client_reads_the_banner_1000_times(adapter, client_ns):
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-c", BANNER_SERVER, adapter.ip, str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(server, "listening")
    res = adapter.run([sys.executable, "-c", READ_ONLY_CLIENTS, adapter.ip, str(port), str(ROUNDS)],
                      text=True, timeout=600)
    assert res.returncode == 0, f"kernel client: {res.stderr.strip()[-500:]}"
    summary = json.loads(res.stdout)
    assert summary["rounds"] == ROUNDS
    print(f"banner read after connect: p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
          f"max {summary['max_ms']:.2f} ms over {ROUNDS} connections")
    assert server.poll() is None, "the banner server died"


def test_netcat_listener_sends_its_stdin_first(adapter, client_ns, tmp_path):
    """nc -l (no -N: it keeps the connection open) writes its stdin as soon as it accepts;
    the kernel client reads it all before it closes."""
    require_tools("nc")
    banner = b"SSH-2.0-toe_test\r\n" + bytes(range(256)) * 40
    src = tmp_path / "banner"
    src.write_bytes(banner)
    port = unique_port()
    with open(src, "rb") as stdin:
        server = client_ns.toe_popen(adapter, ["nc", "-l", adapter.ip, str(port)], stdin=stdin,
                                     stderr=subprocess.PIPE)
        adapter.wait_toe_listener(port)
        res = adapter.run([sys.executable, "-c", READ_ONLY_CLIENTS, adapter.ip, str(port), "1", str(src)],
                          text=True, timeout=60)
    assert res.returncode == 0, f"kernel client: {res.stderr.strip()[-500:]}"
    assert server.wait(60) == 0
