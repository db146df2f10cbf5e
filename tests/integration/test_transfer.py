"""Bulk transfers through the adapter with unmodified programs (curl, python -m http.server).

The program under `toe run` lives in a loopback-only namespace: it reaches
198.18.0.0/24 only through the adapter, so a byte-exact transfer proves the
adapter carried it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import BIG_BYTES, require_tools, sha256_file, unique_port, wait_for_line, wait_until

pytestmark = pytest.mark.integration


def kernel_http_server(adapter, directory, port, log):
    """`python3 -m http.server` on the kernel side of the TAP, serving `directory`."""
    proc = adapter.popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", adapter.host_ip, "--directory", str(directory),
         str(port)],
        stdout=subprocess.PIPE, stderr=log,
    )
    wait_for_line(proc, "Serving HTTP")
    return proc


def test_curl_downloads_100mb_through_the_adapter(adapter, client_ns, big_blob, tmp_path):
    require_tools("curl")
    blob, want = big_blob
    port = unique_port()
    with open(tmp_path / "server.log", "wb") as log:
        kernel_http_server(adapter, blob.parent, port, log)
    url = f"http://{adapter.host_ip}:{port}/blob"

    # without the adapter the client namespace cannot reach the server at all
    plain = client_ns.run(["curl", "-sS", "--connect-timeout", "20", "-o", str(tmp_path / "plain"), url], text=True)
    assert plain.returncode != 0, "curl reached 198.18.0.1 without toe run: the client namespace is not isolated"

    out = tmp_path / "downloaded"
    res = client_ns.toe_run(adapter, ["curl", "-sS", "-o", str(out), url], text=True)
    assert res.returncode == 0, f"curl under toe run failed ({res.returncode}): {res.stderr.strip()}"
    assert out.stat().st_size == BIG_BYTES
    assert sha256_file(out) == want

    stat = adapter.stat()
    totals = stat.get("totals", {})
    # connections: open now; closed_connections: since start (the download's is closed by now)
    assert totals.get("connections", 0) + totals.get("closed_connections", 0) >= 1, totals
    assert totals.get("bytes_in", 0) >= BIG_BYTES, totals
    # the connection itself: still open (e.g. TIME-WAIT) or in the recently-closed history
    listed = [c for c in stat.get("connections", []) + stat.get("closed", [])
              if c.get("remote") == f"{adapter.host_ip}:{port}"]
    if "closed" in stat:
        assert listed, "the download's connection is neither open nor in the closed history"
    for conn in listed:
        assert conn.get("local", "").startswith(f"{adapter.ip}:"), conn
        assert conn.get("bytes_in", 0) >= BIG_BYTES, conn


def test_stat_shows_an_open_connection(adapter, client_ns, tmp_path):
    """A connection held open by a program under toe run is listed with its 4-tuple, state and pid."""
    port = unique_port()
    with open(tmp_path / "server.log", "wb") as log:
        kernel_http_server(adapter, tmp_path, port, log)
    hold = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n')\n"  # an unfinished request keeps the server waiting
        "print('connected', s.getsockname()[0], s.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = client_ns.toe_popen(adapter, [sys.executable, "-c", hold, adapter.host_ip, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = wait_for_line(proc, "connected ")
    words = line.split()
    assert len(words) == 3 and words[0] == "connected", line
    _, local_ip, local_port = words
    assert local_ip == adapter.ip

    def listed_with_request_sent():
        for conn in adapter.stat().get("connections", []):
            if conn.get("remote") == f"{adapter.host_ip}:{port}" and conn.get("local") == f"{local_ip}:{local_port}":
                return conn if conn.get("bytes_out", 0) >= len("GET / HTTP/1.0\r\n") else None
        return None

    conn = wait_until(listed_with_request_sent, "the connection, with its request sent, in toe stat")
    assert conn.get("state") == "ESTABLISHED", conn
    assert conn.get("pid") == proc.pid, conn
    proc.stdin.close()
    assert proc.wait(60) == 0


def test_kernel_curl_downloads_100mb_from_a_server_under_toe_run(adapter, client_ns, big_blob, tmp_path):
    require_tools("curl")
    blob, want = big_blob
    port = unique_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = client_ns.toe_popen(
            adapter,
            [sys.executable, "-u", "-m", "http.server", "--bind", adapter.ip, "--directory", str(blob.parent),
             str(port)],
            stdout=subprocess.PIPE, stderr=log,
        )
    wait_for_line(server, "Serving HTTP")
    out = tmp_path / "downloaded"
    res = adapter.run(["curl", "-sS", "-o", str(out), f"http://{adapter.ip}:{port}/blob"], text=True)
    assert res.returncode == 0, f"kernel-side curl failed ({res.returncode}): {res.stderr.strip()}"
    assert out.stat().st_size == BIG_BYTES
    assert sha256_file(out) == want
    totals = adapter.stat().get("totals", {})
    assert totals.get("bytes_out", 0) >= BIG_BYTES, totals


def test_fidelity_mode_without_offloads(adapter_factory, client_ns, tmp_path):
    """--no-offloads: MTU-sized frames with full checksums, computed and verified by the adapter."""
    require_tools("curl")
    adapter = adapter_factory("--no-offloads")
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "blob").write_bytes(os.urandom(8 << 20))
    want = sha256_file(srv / "blob")
    port = unique_port()
    with open(tmp_path / "server.log", "wb") as log:
        kernel_http_server(adapter, srv, port, log)
    out = tmp_path / "got"
    res = client_ns.toe_run(adapter, ["curl", "-sS", "-o", str(out), f"http://{adapter.host_ip}:{port}/blob"],
                            text=True)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == want
    units = adapter.stat()["units"]
    assert units["tap_port"]["rx_gso_frames"] == 0 and units["tap_port"]["tx_gso_frames"] == 0
    assert units["rx_checker"]["csum_verified"] > (8 << 20) // 1460
    assert units["rx_checker"].get("dropped.tcp_checksum", 0) == 0
    assert units["tx_hdrgen"]["sw_checksums"] > 0
