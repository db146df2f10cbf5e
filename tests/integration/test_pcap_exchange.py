"""`toe up --pcap` of 1-byte request/response exchanges: the frames a short exchange costs.

Both directions (the adapter connecting, and accepting): the handshake is
followed directly by the first data, with no pure ACK in between (the adapter
used to send a window update right after every handshake). The side that
sends first waits 100 ms after connecting, so a stray ACK would be seen
before the data, not hidden behind it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from offload_daemon.config import AdapterConfig
from tests.conftest import Adapter, run_toe, stop, teardown_adapter, unique, unique_port, wait_for_line

pytestmark = pytest.mark.integration

ONE_BYTE_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("listening", flush=True)
c, _ = s.accept()
assert c.recv(1) == b"q"
c.sendall(b"r")
assert c.recv(1) == b""
c.close()
"""

ONE_BYTE_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
time.sleep(0.1)
c.sendall(b"q")
assert c.recv(1) == b"r"
c.close()
"""


def _exchange_frames(frames, port: int) -> list[tuple[str, str, int]]:
    """(sender, flags, payload length) of each TCP frame on `port`, in capture order."""
    out = []
    for f in frames:
        if TCP in f and port in (f[TCP].sport, f[TCP].dport):
            sender = "adapter" if f[IP].src == AdapterConfig().iface.ip.compressed else "kernel"
            payload = f[IP].len - f[IP].ihl * 4 - f[TCP].dataofs * 4
            out.append((sender, str(f[TCP].flags), payload))
    return out


def _between_handshake_and_data(flow: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    assert [f[1] for f in flow[:2]] == ["S", "SA"], flow
    assert flow[2][1] == "A" and flow[2][2] == 0, flow
    first_data = next(i for i, f in enumerate(flow) if f[2] > 0)
    return flow[3:first_data]


def test_no_pure_ack_between_handshake_and_first_data(tmp_path, client_ns):
    ns, tap = unique("toe-t"), unique("tt")
    pcap = tmp_path / "adapter.pcap"
    res = run_toe("up", "--netns", ns, "--tap", tap, "--pcap", str(pcap))
    assert res.returncode == 0, res.stderr
    ad = Adapter(netns=ns, tap=tap, addr=AdapterConfig.addr, host_addr=AdapterConfig.host_addr)
    client = client_ns
    active, passive = unique_port(), unique_port()
    try:
        # the adapter connects: its client under toe run, the kernel serves
        srv = ad.popen([sys.executable, "-c", ONE_BYTE_SERVER, ad.host_ip, str(active)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_line(srv, "listening")
            r = client.toe_run(ad, [sys.executable, "-c", ONE_BYTE_CLIENT, ad.host_ip, str(active)], timeout=60)
            assert r.returncode == 0, r.stderr
            assert srv.wait(30) == 0
        finally:
            stop(srv)
        # the adapter accepts: its server under toe run, the kernel connects
        srv = client.toe_popen(ad, [sys.executable, "-c", ONE_BYTE_SERVER, ad.ip, str(passive)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_line(srv, "listening")
        r = ad.run([sys.executable, "-c", ONE_BYTE_CLIENT, ad.ip, str(passive)], timeout=60)
        assert r.returncode == 0, r.stderr
        assert srv.wait(30) == 0
    finally:
        client.procs.stop_all()
        problems = teardown_adapter(ad)                 # toe down: the capture is complete
    assert not problems, problems
    frames = rdpcap(str(pcap))
    for port, first in ((active, "adapter"), (passive, "kernel")):
        flow = _exchange_frames(frames, port)
        assert _between_handshake_and_data(flow) == [], f"port {port}: {flow}"
        data = [f for f in flow if f[2]]
        assert [(f[0], f[2]) for f in data] == [(first, 1), ("kernel" if first == "adapter" else "adapter", 1)]

