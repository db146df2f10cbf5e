"""iperf3, unmodified, through the adapter: as client (-c, -R, -P 4) and as server (-s).

Both ends print JSON (-J); the test parses both and cross-checks them.

What the two JSON documents can be expected to agree on: iperf3 ends a test
by a message on its control connection, and the receiving side then closes
its data sockets without draining them (kernel to kernel as well). So the
receiver's count is at most the sender's, short by at most what the buffers
between the two programs can hold (sender's socket buffer or TX ring, what is
in flight, receiver's socket buffer or RX ring): a bound from sysctls and
ring sizes, not from timing. What must be byte-exact is the results exchange:
the client's JSON carries the server's own count (it arrives over the
adapter on the control connection) and it must equal the server's JSON.

Throughput is printed (`pytest -s` shows it), never asserted.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from offload_daemon.config import AdapterConfig
from tests.conftest import require_tools, unique_port

pytestmark = pytest.mark.integration

SECONDS = "3"


def buffer_slack(adapter) -> int:
    """Most bytes a sender can count as sent that the receiver never reads (see the module doc)."""
    res = adapter.run(["sysctl", "-n", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"], text=True)
    assert res.returncode == 0, res.stderr
    rmem, wmem = (int(line.split()[2]) for line in res.stdout.splitlines()[:2])
    return rmem + wmem + AdapterConfig.tx_ring_bytes + AdapterConfig.rx_ring_bytes + (4 << 20)


def load(path, who: str) -> dict:
    text = path.read_text()
    try:
        doc = json.loads(text)
    except ValueError:
        pytest.fail(f"{who} did not print JSON: {text[-2000:]!r}")
    assert "error" not in doc, f"{who} reported an error: {doc['error']}"
    return doc


def ports(doc: dict) -> dict[int, tuple[str, int, str, int]]:
    """socket fd -> (local_host, local_port, remote_host, remote_port) of each data stream."""
    return {c["socket"]: (c["local_host"], c["local_port"], c["remote_host"], c["remote_port"])
            for c in doc["start"]["connected"]}


def check(client: dict, server: dict, *, toe_is_client: bool, reverse: bool, streams: int, slack: int,
          label: str) -> None:
    toe_ip = AdapterConfig.addr.split("/")[0]
    sender, receiver = (server, client) if reverse else (client, server)
    sent = sender["end"]["sum_sent"]["bytes"]
    received = receiver["end"]["sum_received"]["bytes"]
    gbps = receiver["end"]["sum_received"]["bits_per_second"] / 1e9
    print(f"\niperf3 {label}: sent {sent} B, received {received} B, {gbps:.2f} Gbit/s (receiver)")
    assert sent > 0 and received > 0, (sent, received)
    assert received <= sent, f"received {received} > sent {sent}"
    assert sent - received <= slack, f"receiver short by {sent - received} B (> {slack} B of buffers)"
    # the results exchange, carried by the adapter on the control connection: byte-exact
    if reverse:
        assert client["end"]["sum_sent"]["bytes"] == server["end"]["sum_sent"]["bytes"]
    else:
        assert client["end"]["sum_received"]["bytes"] == server["end"]["sum_received"]["bytes"]

    # per stream, matched by the client's port (the server sees it as the remote port)
    cports, sports = ports(client), ports(server)
    assert len(cports) == len(sports) == streams, (cports, sports)
    for host in (c[0] for c in cports.values()) if toe_is_client else (s[0] for s in sports.values()):
        assert host == toe_ip, f"a stream of the program under toe run is not on the adapter: {host}"
    by_port = {}
    for st in server["end"]["streams"]:
        by_port[sports[st["sender" if reverse else "receiver"]["socket"]][3]] = st
    assert len(client["end"]["streams"]) == streams
    for cst in client["end"]["streams"]:
        side = "receiver" if reverse else "sender"
        port = cports[cst[side]["socket"]][1]
        assert port in by_port, f"client stream from port {port} unknown to the server: {sorted(by_port)}"
        sst = by_port[port]
        s_sent = (sst if reverse else cst)["sender"]["bytes"]
        s_recv = (cst if reverse else sst)["receiver"]["bytes"]
        assert 0 < s_recv <= s_sent and s_sent - s_recv <= slack, (port, s_sent, s_recv)


@pytest.mark.parametrize("extra", [[], ["-R"], ["-P", "4"]], ids=["send", "reverse", "parallel4"])
def test_iperf3_client_under_toe_run(adapter, client_ns, tmp_path, extra):
    require_tools("iperf3")
    port = unique_port()
    sjson = tmp_path / "server.json"
    with open(sjson, "w") as out:
        server = adapter.popen(["iperf3", "-s", "-1", "-J", "-B", adapter.host_ip, "-p", str(port)],
                               stdout=out, stderr=subprocess.STDOUT)
    adapter.wait_kernel_listener(port)
    res = client_ns.toe_run(adapter, ["iperf3", "-c", adapter.host_ip, "-p", str(port), "-t", SECONDS, "-J",
                                      *extra], text=True, timeout=120)
    assert res.returncode == 0, f"iperf3 -c under toe run exited {res.returncode}: {res.stdout[-2000:]} {res.stderr}"
    cjson = tmp_path / "client.json"
    cjson.write_text(res.stdout)
    assert server.wait(60) == 0, sjson.read_text()[-2000:]
    streams = int(extra[1]) if extra[:1] == ["-P"] else 1
    check(load(cjson, "iperf3 -c (toe run)"), load(sjson, "iperf3 -s (kernel)"), toe_is_client=True,
          reverse="-R" in extra, streams=streams, slack=buffer_slack(adapter),
          label=f"toe client {' '.join(extra) or '(send)'}")


@pytest.mark.parametrize("extra", [[], ["-R"]], ids=["toe_receives", "toe_sends"])
def test_iperf3_server_under_toe_run(adapter, client_ns, tmp_path, extra):
    require_tools("iperf3")
    port = unique_port()
    sjson = tmp_path / "server.json"
    with open(sjson, "w") as out:
        server = client_ns.toe_popen(adapter, ["iperf3", "-s", "-1", "-J", "-B", adapter.ip, "-p", str(port)],
                                     stdout=out, stderr=subprocess.STDOUT)
    adapter.wait_toe_listener(port)
    res = adapter.run(["iperf3", "-c", adapter.ip, "-p", str(port), "-t", SECONDS, "-J", *extra], text=True,
                      timeout=120)
    assert res.returncode == 0, f"kernel iperf3 -c exited {res.returncode}: {res.stdout[-2000:]} {res.stderr}"
    cjson = tmp_path / "client.json"
    cjson.write_text(res.stdout)
    assert server.wait(60) == 0, sjson.read_text()[-2000:]
    check(load(cjson, "iperf3 -c (kernel)"), load(sjson, "iperf3 -s (toe run)"), toe_is_client=False,
          reverse="-R" in extra, streams=1, slack=buffer_slack(adapter),
          label=f"toe server, kernel client {' '.join(extra) or '(send)'}")
