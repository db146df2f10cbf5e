"""INADDR_ANY listeners under toe run accept on both paths, as Onload does.

Connections through the adapter are offloaded; connections that arrive
through the kernel (here: from loopback in the program's own namespace) are
accepted too, as kernel sockets, and `toe stat` says so per process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line, wait_until

pytestmark = pytest.mark.integration

SERVER = r"""
import selectors, socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(16)
ls.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ)
print("listening", flush=True)
served = 0
while served < int(sys.argv[2]):
    for key, _ in sel.select():
        if key.fileobj is ls:
            try:
                c, _ = ls.accept()
            except BlockingIOError:
                continue
            c.setblocking(True)
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            c.sendall(data)
            c.close()
            served += 1
print("served", served, flush=True)
"""

CLIENT = r"""
import hashlib, socket, sys
data = bytes.fromhex(sys.argv[3]) * 4096
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print("echo", "ok" if got == data else "BAD", len(got), flush=True)
"""


def test_inaddr_any_accepts_through_adapter_and_kernel(adapter, client_ns):
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", SERVER, str(port), "2"],
                                 stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    pattern = hashlib.sha256(os.urandom(8)).hexdigest()
    # through the adapter: a kernel-side client in the adapter's namespace
    via_adapter = adapter.run([sys.executable, "-c", CLIENT, adapter.ip, str(port), pattern], text=True)
    assert via_adapter.stdout.split()[:2] == ["echo", "ok"], via_adapter
    # through the kernel: a plain client (no toe run) on loopback in the server's namespace
    via_kernel = client_ns.run([sys.executable, "-c", CLIENT, "127.0.0.1", str(port), pattern], text=True)
    assert via_kernel.stdout.split()[:2] == ["echo", "ok"], via_kernel
    assert wait_for_line(server, "served").split() == ["served", "2"]

    def proc_row():
        for p in adapter.stat().get("processes", []):
            if p.get("pid") == server.pid:
                return p
        return None

    row = wait_until(proc_row, "the server in toe stat's processes")
    assert row["handover_reasons"].get("accepted through the kernel") == 1, row
    assert row["offloaded"] >= 2, row          # the listener and the connection through the adapter
