"""Fixtures of the conformance harness (see harness.py).

* `testbed` (per module, once with the adapter's offloads on and once in
  fidelity mode): an adapter made by `toe up --netns`, the remote address on
  the kernel side of its TAP with nftables dropping its TCP, a loopback-only
  namespace for the DUT, and the AF_PACKET wire.
* `dut`: a fresh program under `toe run` for each test.
* `peer`: the remote host; at the end of each test it resets every
  connection it still has, so the next test starts from an empty adapter.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator

import pytest

from offload_daemon import netns
from offload_daemon.client.inspection import api_request
from offload_daemon.config import AdapterConfig
from tests.conftest import Adapter, ClientNs, require_tools, run_toe, stop, teardown_adapter, unique, unique_port

from .harness import REMOTE_IP, Dut, Peer, Wire, agent_argv

NFT_RULES = f"""
table ip toe_conformance {{
  chain input {{ type filter hook input priority filter; policy accept;
    ip daddr {REMOTE_IP} ip protocol tcp counter drop; }}
}}
"""


@dataclasses.dataclass
class Testbed:
    adapter: Adapter
    client: ClientNs
    wire: Wire
    mode: str

    @property
    def dut_ip(self) -> str:
        return self.adapter.ip

    def connection(self, peer_port: int) -> dict | None:
        """The adapter's `toe stat` row of the connection to REMOTE_IP:peer_port."""
        stat = json.loads(api_request(self.adapter.tap, {"cmd": "stat"}))
        for row in stat["connections"]:
            if row["remote"] == f"{REMOTE_IP}:{peer_port}":
                return row
        return None

    def state(self, conn) -> str:
        """The adapter's state of `conn` (`toe stat`), or "GONE" when it has no CCB."""
        row = self.connection(conn.port)
        return row["state"] if row else "GONE"

    def kernel_tcp_dropped(self) -> int:
        out = self.adapter.run(["nft", "list", "table", "ip", "toe_conformance"], text=True).stdout
        return sum(int(line.split("packets")[1].split()[0]) for line in out.splitlines() if "packets" in line)


@pytest.fixture(scope="module", params=["offloads", "fidelity"])
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    from tests.conftest import integration_problem

    problem = integration_problem()
    if problem:
        pytest.skip(f"conformance tests {problem}")
    require_tools("nft")
    ns, tap = unique("toe-k"), unique("tk")
    extra = ["--no-offloads"] if request.param == "fidelity" else []
    res = run_toe("up", "--netns", ns, "--tap", tap, *extra)
    if res.returncode != 0:
        if netns.exists(ns):
            netns.delete(ns)
        pytest.fail(f"toe up failed: {res.stderr.strip()}")
    ad = Adapter(netns=ns, tap=tap, addr=AdapterConfig.addr, host_addr=AdapterConfig.host_addr)
    client = ClientNs(unique("toe-kc"))
    wire: Wire | None = None
    problems: list[str] = []
    try:
        r = ad.run(["ip", "addr", "add", f"{REMOTE_IP}/32", "dev", tap], text=True)
        assert r.returncode == 0, r.stderr
        r = ad.run(["nft", "-f", "-"], input=NFT_RULES, text=True, stdin=None)
        assert r.returncode == 0, r.stderr
        netns.create_loopback_only(client.name)
        wire = Wire(ns, tap, ad.stat()["adapter"]["mac"])
        yield Testbed(ad, client, wire, request.param)
        assert not wire.errors, "frames from the adapter the harness rejected: " + "; ".join(wire.errors[:5])
    finally:
        if wire is not None:
            wire.close()
        client.procs.stop_all()
        if netns.exists(client.name):
            netns.stop_pids(netns.pids(client.name))
            netns.delete(client.name)
        problems += teardown_adapter(ad)
    if problems:
        pytest.fail("testbed teardown: " + "; ".join(problems))


@pytest.fixture
def dut(testbed: Testbed) -> Iterator[Dut]:
    proc = testbed.client.toe_popen(testbed.adapter, agent_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        yield Dut(proc)
    finally:
        stop(proc)


@pytest.fixture
def peer(testbed: Testbed, dut: Dut) -> Iterator[Peer]:
    p = Peer(testbed.wire, testbed.dut_ip)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def port() -> int:
    """A fresh port for a DUT listener."""
    return unique_port()
