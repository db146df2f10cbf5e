"""Out of descriptors under `toe run`: socket() fails with EMFILE, as the kernel's does.

An offloaded socket needs three descriptors for a moment (A, B and the memfd;
B and the memfd go once the daemon has them). When they cannot be had, the
call must fail the way the kernel's socket() fails when the process is out of
descriptors — not fall back to a kernel socket that, in a namespace with only
loopback, can reach nothing (the old symptom: connect() said ENETUNREACH).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXHAUST = r"""
import errno, resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
socks = []
try:
    while True:
        socks.append(socket.socket())
except OSError as e:
    print("socket", errno.errorcode.get(e.errno, e.errno), flush=True)
if len(sys.argv) > 1:
    # the last socket made before the limit: it must be the adapter's like the others
    c = socks[-1]
    c.settimeout(10)
    try:
        c.connect((sys.argv[1], int(sys.argv[2])))
    except OSError as e:
        sys.exit(f"connect of the last socket: {errno.errorcode.get(e.errno, e.errno)}")
    c.sendall(b"ping")
    print("reply", c.recv(4).decode(), flush=True)
"""

ECHO = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(4))
    c.close()
"""


def test_kernel_baseline_is_emfile(client_ns):
    res = client_ns.run([sys.executable, "-c", EXHAUST], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "socket EMFILE" in res.stdout, res.stdout


def test_socket_out_of_descriptors_is_emfile_and_the_adapter_still_serves(adapter, client_ns):
    port = unique_port()
    server = adapter.popen([sys.executable, "-c", ECHO, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", EXHAUST, adapter.host_ip, str(port)],
                            text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "socket EMFILE" in res.stdout, (res.stdout, res.stderr)
    # every socket made was the adapter's: the last one reaches the kernel peer
    assert "reply ping" in res.stdout, (res.stdout, res.stderr)
    assert "sockets use the kernel" not in res.stderr, res.stderr
