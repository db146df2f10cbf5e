"""The connection state unit (nic_model/hw/conn_fsm.c) with the real kernel as the peer:
a short connection's handshake and close happen in the compiled units, software sees the
connection only at connect() and at its end, and every byte arrives."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line, wait_until

pytestmark = pytest.mark.integration

# the request is i's 3 bytes; the response 1,000 bytes derived from it
SERVER = r"""
import hashlib, socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(256)
first = sys.argv[3]
print("listening", flush=True)
while True:
    c, _ = ls.accept()
    req = b""
    while len(req) < 3:
        req += c.recv(3 - len(req))
    c.sendall(hashlib.sha256(req).digest() * 31 + req[:1] * 8)
    if first == "client":
        assert c.recv(1) == b""    # the client's FIN first
    c.close()
"""

CLIENT = r"""
import hashlib, socket, sys
host, port, n, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
total = hashlib.sha256()
for i in range(n):
    s = socket.socket()
    s.connect((host, port))
    req = i.to_bytes(3, "big")
    s.sendall(req)
    got = b""
    while len(got) < 1000:
        d = s.recv(1000 - len(got))
        assert d, (i, len(got))
        got += d
    assert got == hashlib.sha256(req).digest() * 31 + req[:1] * 8, i
    if first == "server":
        assert s.recv(1) == b"", i     # the server's FIN
    total.update(got)
    s.close()
print("ok", n, total.hexdigest())
"""


def expected_digest(n: int) -> str:
    total = hashlib.sha256()
    for i in range(n):
        req = i.to_bytes(3, "big")
        total.update(hashlib.sha256(req).digest() * 31 + req[:1] * 8)
    return total.hexdigest()


def run_loop(adapter, client_ns, n: int, first: str) -> None:
    """n connections of the client under toe run to a kernel server; `first`: which side closes first."""
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", SERVER, adapter.host_ip, str(port), first],
                           stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", CLIENT, adapter.host_ip, str(port), str(n), first],
                            text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", str(n), expected_digest(n)], res.stdout


def test_server_closes_first_the_whole_life_is_the_units(adapter, client_ns):
    """connect, request, response, the server's FIN, close: the SYN|ACK, the peer's FIN, the
    application's close, our FIN and its ACK are all taken by the units; software sends the
    SYN and releases the socket when the units hand the ended connection back."""
    n = 200
    run_loop(adapter, client_ns, n, "server")
    wait_until(lambda: adapter.stat()["totals"]["connections"] == 0, "every connection to end", timeout=30)
    stat = adapter.stat()
    fp, tcp = stat["units"]["fast_path"], stat["units"]["tcp"]
    assert (fp["syns"], fp["syn_acks"], fp["fins_in"], fp["app_closes"], fp["fins_out"], fp["closes"]) == \
        (n, n, n, n, n, n), fp
    assert fp["punts.teardown"] == n, fp
    # nothing of these connections went through the software path's segment handling
    for reason in ("handshake", "fin", "close", "rst", "follows", "no_ccb", "state", "flags"):
        assert f"punts.{reason}" not in fp, fp
    assert stat["totals"]["data_segments_software"] == 0, stat["totals"]
    assert tcp["time_wait"] == 0, tcp
    assert {c["closed_from"] for c in stat["closed"]} == {"LAST_ACK"}, stat["closed"][-3:]
    # every CONNECT but one that had to learn the server's MAC was the command unit's
    # (nic_model/hw/host_cmd.c), and none of it went back to software unanswered
    assert n - 1 <= fp["commands.connects"] <= n, fp
    assert fp["commands.not_fresh"] == fp["commands.no_port"] == fp["commands.no_room"] == 0, fp
    # the client's connect() blocks (TOE_CONNECT_WAIT): the kernel server's SYN|ACK is on the
    # TAP by the time the SYN is written, so the unit answers most of them connected (0)
    assert fp["commands.completed"] > n // 2 and fp["commands.lost_answers"] == 0, fp
    # the shim's pool was refilled in batches (posted REUSEs of the sockets that closed)
    host = stat["units"]["host_if"]
    assert host.get("by_op.reuse", 0) <= n // 4 and host["recycled"] >= n // 2, host
    # every socket was released: what is left is the client's pool, gone with the client;
    # and no local port is counted as used any more (the unit's and software's ports)
    wait_until(lambda: adapter.stat()["limits"]["sockets"] == 0, "the sockets to be released", timeout=20)
    assert adapter.stat()["limits"]["local_ports"] == 0


def test_client_closes_first_the_units_send_the_fin_and_keep_time_wait(adapter, client_ns):
    """The client closes first: the units send its FIN after the response was read. The
    server's FIN comes with the ACK of ours (the units send the last ACK and keep TIME-WAIT
    as a record of theirs: nic_model/hw/time_wait.c) or after it (the units hand back
    FIN-WAIT-2, software takes the FIN and hands TIME-WAIT to the units); either way the
    side that closes first holds TIME-WAIT, and `toe stat` shows every connection in it."""
    n = 100
    run_loop(adapter, client_ns, n, "client")
    wait_until(lambda: adapter.stat()["units"]["tcp"]["time_wait"] == n, "TIME-WAIT for each connection", timeout=30)
    stat = adapter.stat()
    fp = stat["units"]["fast_path"]
    assert (fp["syn_acks"], fp["app_closes"], fp["fins_out"]) == (n, n, n), fp
    assert fp["punts.teardown"] == n and "punts.fin" not in fp, fp
    assert fp["fins_in"] <= n and fp["closes"] == 0, fp
    # every one is a record of the units': software hands its own (the FIN after the ACK)
    # over as well, an orphan's TIME-WAIT needing no CCB
    assert fp["time_wait_entered"] == fp["time_wait"] == n, fp
    assert stat["limits"]["time_wait"] == n, stat["limits"]
    rows = [c for c in stat["connections"] if c["state"] == "TIME_WAIT"]
    assert len(rows) == len(stat["connections"]) == n, stat["connections"][:3]
    assert {c["path"] for c in rows} == {"fast"} and {c["uid"] for c in rows} == {0}, rows[:3]
    # each with its bytes (a request out, a response in); the totals count them once
    assert all(c["bytes_in"] > 0 and c["bytes_out"] > 0 for c in rows), rows[:3]
    assert stat["totals"]["bytes_in"] < 2 * sum(c["bytes_in"] for c in rows) + 1, stat["totals"]
    # every socket was released: TIME-WAIT needs no ring; each record still holds its port
    wait_until(lambda: adapter.stat()["limits"]["sockets"] == 0, "the sockets to be released", timeout=20)
    assert adapter.stat()["limits"]["local_ports"] == n


SINK = r"""
import hashlib, socket, sys
ls = socket.socket()
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
    n += len(d)
print(n, h.hexdigest(), flush=True)
"""

WRITE_AND_CLOSE = r"""
import hashlib, random, socket, sys
data = random.Random(7).randbytes(2 << 20)
s = socket.socket()
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(data)
s.close()                  # much of it is still in the TX ring: the units send it, then the FIN
print(len(data), hashlib.sha256(data).hexdigest())
"""


def test_close_with_data_in_the_ring_sends_all_of_it_then_the_fin(adapter, client_ns):
    port = unique_port()
    sink = adapter.popen([sys.executable, "-u", "-c", SINK, adapter.host_ip, str(port)],
                         stdout=subprocess.PIPE, text=True)
    wait_for_line(sink, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", WRITE_AND_CLOSE, adapter.host_ip, str(port)], text=True)
    assert res.returncode == 0, res.stderr
    out, _ = sink.communicate(timeout=60)
    assert out.split() == res.stdout.split(), (out, res.stdout)   # every byte, then EOF
    fp = adapter.stat()["units"]["fast_path"]
    # the close was taken once: by the units, or by software when the connection was already
    # software's (a slow sink closed its window: the persist timer is software's) ...
    assert fp["app_closes"] + fp.get("punts.close", 0) == 1, fp
    # ... and when the units took it, they sent the FIN after the ring, unless the connection
    # went to software on the way (a closed window, an RTO), which then sent it
    handed = [k for k in fp if k.startswith("punts.") and k not in ("punts.unparsed", "punts.teardown")]
    assert fp["app_closes"] == 0 or fp["fins_out"] == 1 or handed, fp


def test_with_two_processors_the_close_is_softwares(adapter_factory, client_ns):
    """--fastpath-procs 2: the handshake and the peer's FIN are still the units', but a B
    end may be in the TX processor's epoll set, so the application's close goes to
    software (`close`); every byte still arrives and every socket is released."""
    adapter = adapter_factory("--fastpath-procs", "2")
    n = 100
    run_loop(adapter, client_ns, n, "server")
    wait_until(lambda: adapter.stat()["totals"]["connections"] == 0, "every connection to end", timeout=30)
    fp = adapter.stat()["units"]["fast_path"]
    assert (fp["syns"], fp["syn_acks"], fp["fins_in"], fp["app_closes"]) == (n, n, n, 0), fp
    assert fp["punts.close"] == n, fp
    wait_until(lambda: adapter.stat()["limits"]["sockets"] == 0, "the sockets to be released", timeout=20)
