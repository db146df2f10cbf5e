"""The adapter's modes: the compiled fast path (default), the software path alone
(--fastpath off), and seed 002's comparison (--no-buffer-reuse), each with real
programs and the kernel as the peer.

A transfer must be byte-exact in every mode; the counters must say which path carried
it: with the fast path on, a loss-free bulk transfer is all but entirely the units'
(issue: >= 99 % of its data segments), and with it off nothing is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from offload_daemon.config import state_path
from tests.conftest import BIG_BYTES, require_tools, sha256_file, unique_port, wait_for_line

pytestmark = pytest.mark.integration



def _download(adapter, client_ns, blob, want, tmp_path) -> dict:
    port = unique_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc = adapter.popen([sys.executable, "-u", "-m", "http.server", "--bind", adapter.host_ip,
                              "--directory", str(blob.parent), str(port)], stdout=subprocess.PIPE, stderr=log)
        wait_for_line(proc, "Serving HTTP")
    out = tmp_path / "downloaded"
    res = client_ns.toe_run(adapter, ["curl", "-sS", "-o", str(out), f"http://{adapter.host_ip}:{port}/blob"],
                            text=True)
    assert res.returncode == 0, f"curl under toe run failed: {res.stderr.strip()}"
    assert out.stat().st_size == BIG_BYTES
    assert sha256_file(out) == want
    return adapter.stat()


def test_a_bulk_download_runs_in_the_compiled_units(adapter, client_ns, big_blob, tmp_path):
    require_tools("curl")
    blob, want = big_blob
    stat = _download(adapter, client_ns, blob, want, tmp_path)
    tot, fp = stat["totals"], stat["units"]["fast_path"]
    assert tot["fastpath"] is True
    assert tot["fast_share"] is not None and tot["fast_share"] >= 0.99, tot
    assert fp["rx_payload_bytes"] >= 0.99 * BIG_BYTES, fp
    assert fp["pushes"] >= 1 and fp.get("punts.syn", 0) == 0, fp     # the adapter connected: no SYN came in
    # the RX checker's counts are the units' plus the software's, never twice the frames
    classified = sum(v for k, v in stat["units"]["rx_checker"].items() if k.startswith("classified."))
    assert classified <= stat["units"]["tap_port"]["rx_frames"], stat["units"]


def test_fastpath_off_carries_everything_in_software(adapter_factory, client_ns, big_blob, tmp_path):
    require_tools("curl")
    adapter = adapter_factory("--fastpath", "off")
    blob, want = big_blob
    stat = _download(adapter, client_ns, blob, want, tmp_path)
    tot = stat["totals"]
    assert tot["fastpath"] is False
    assert tot["data_segments_fast"] == 0 and tot["data_segments_software"] > 0, tot
    assert "fast_path" not in stat["units"]


@pytest.mark.parametrize("fastpath", ["on", "off"])
def test_no_buffer_reuse_maps_a_buffer_per_packet(adapter_factory, client_ns, big_blob, tmp_path, fastpath):
    require_tools("curl")
    adapter = adapter_factory("--fastpath", fastpath, "--no-buffer-reuse")
    blob, want = big_blob
    stat = _download(adapter, client_ns, blob, want, tmp_path)
    pool, tap = stat["units"]["buffer_pool"], stat["units"]["tap_port"]
    # every received frame came in a buffer mapped for it alone (and, in the units, every sent one)
    assert pool["dma_mappings"] - pool["buffers"] >= tap["rx_frames"], (pool, tap)
    assert pool["dma_unmaps"] >= tap["rx_frames"], (pool, tap)


def test_buffer_reuse_maps_nothing_per_packet(adapter, client_ns, big_blob, tmp_path):
    require_tools("curl")
    blob, want = big_blob
    stat = _download(adapter, client_ns, blob, want, tmp_path)
    pool = stat["units"]["buffer_pool"]
    assert pool["dma_mappings"] == pool["buffers"] and pool["dma_unmaps"] == 0, pool


def test_two_processors_carry_both_directions(adapter_factory, client_ns, big_blob, tmp_path):
    """--fastpath-procs 2: the TX processor (a thread of its own) takes the doorbells while
    the RX processor takes the TAP: downloads, a server's upload to a kernel client and a
    ping-pong stay byte-exact, and the TX processor did the sending."""
    require_tools("curl")
    adapter = adapter_factory("--fastpath-procs", "2")
    with open(state_path(adapter.tap)) as f:
        assert json.load(f)["fastpath_procs"] == 2
    blob, want = big_blob
    stat = _download(adapter, client_ns, blob, want, tmp_path)
    fp = stat["units"]["fast_path"]
    assert fp["processors"] == 2 and stat["totals"]["fast_share"] >= 0.99, fp
    # a server under toe run sends 100 MB: its segments leave from the TX processor
    port = unique_port()
    with open(tmp_path / "server2.log", "wb") as log:
        server = client_ns.toe_popen(
            adapter, [sys.executable, "-u", "-m", "http.server", "--bind", adapter.ip, "--directory",
                      str(blob.parent), str(port)], stdout=subprocess.PIPE, stderr=log)
    wait_for_line(server, "Serving HTTP")
    out = tmp_path / "uploaded"
    res = adapter.run(["curl", "-sS", "-o", str(out), f"http://{adapter.ip}:{port}/blob"], text=True)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == want
    res = _pingpong(adapter, client_ns, 2000)
    assert res.returncode == 0 and res.stdout.strip() == "ok 2000", res.stderr
    fp = adapter.stat()["units"]["fast_path"]
    assert fp["tx_processor.doorbells"] > 0, fp
    assert fp["tx_processor.tx_data_segments"] >= 0.5 * fp["tx_data_segments"], fp


def _pingpong(adapter, client_ns, n: int):
    """n one-byte exchanges: a kernel echo server (+1 per byte), the client under toe run."""
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", ECHO, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    return client_ns.toe_run(adapter, [sys.executable, "-c", PINGPONG, adapter.host_ip, str(port), str(n)],
                             text=True)


def _polls(adapter, client_ns) -> tuple[tuple[int, int], str]:
    """The adapter's (poll_us, app_poll_us) as its state file says, and the TOE_POLL_US a
    program under toe run gets ("unset" without one)."""
    with open(state_path(adapter.tap)) as f:
        state = json.load(f)
    res = client_ns.toe_run(adapter, ["sh", "-c", "echo ${TOE_POLL_US-unset}"], text=True)
    assert res.returncode == 0, res.stderr
    return (state["poll_us"], state["app_poll_us"]), res.stdout.strip()


def test_poll_us_reaches_the_adapter_and_the_programs_under_toe_run(adapter_factory, client_ns):
    adapter = adapter_factory("--poll-us", "20")
    assert _polls(adapter, client_ns) == ((20, 20), "20")
    # and a transfer still works while the adapter and the program spin
    res = _pingpong(adapter, client_ns, 500)
    assert res.returncode == 0 and res.stdout.strip() == "ok 500", res.stderr
    assert adapter.stat()["units"]["fast_path"]["spins"] > 0


def test_by_default_the_units_poll_and_programs_do_not_spin(adapter_factory, client_ns):
    adapter = adapter_factory()
    assert _polls(adapter, client_ns) == ((20, 0), "unset")
    res = _pingpong(adapter, client_ns, 200)
    assert res.returncode == 0 and res.stdout.strip() == "ok 200", res.stderr
    fp = adapter.stat()["units"]["fast_path"]
    assert fp["spins"] > 0 and fp["waits"] > 0          # it polled, and still slept when idle


def test_request_response_rides_acks_on_replies(adapter, client_ns, tmp_path):
    """A 1-byte ping-pong through the units: one frame each way per exchange, no pure ACKs
    in between (they ride on the replies), and the byte stream exact both ways."""
    res = _pingpong(adapter, client_ns, 2000)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok 2000"
    stat = adapter.stat()
    ack, fp = stat["units"]["ack_gen"], stat["units"]["fast_path"]
    assert fp["rx_data_segments"] >= 1900 and fp["tx_data_segments"] >= 1900, fp
    assert ack["piggybacked"] >= 1900, ack
    assert ack["pure_acks"] < 100, ack


ECHO = r"""
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    b = c.recv(1)
    if not b:
        break
    c.sendall(bytes([(b[0] + 1) % 256]))
"""

PINGPONG = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[3])
for i in range(n):
    s.sendall(bytes([i % 256]))
    r = s.recv(1)
    assert r == bytes([(i + 1) % 256]), (i, r)
s.close()
print("ok", n)
"""
