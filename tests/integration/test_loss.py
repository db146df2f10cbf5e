"""Transfers over a lossy link stay byte-exact: the adapter's and the kernel's recovery.

This machine's kernel has no netem, so nftables drops a random 1 in N TCP
frames on the kernel side of the TAP, both directions (as the architecture
guide suggests). With TSO on, one dropped frame is up to 64 KB: bursts of
loss that exercise RTO, go-back-N and cumulative ACKs past a rewound snd_nxt.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_tools, sha256_file, unique_port, wait_for_line

pytestmark = pytest.mark.integration

LOSS_ONE_IN = 40
SIZE = 20 << 20


def add_loss(adapter) -> None:
    rules = f"""
table inet toeloss {{
  chain inp {{ type filter hook input priority 0; policy accept;
    iifname "{adapter.tap}" meta l4proto tcp numgen random mod {LOSS_ONE_IN} == 0 counter drop; }}
  chain outp {{ type filter hook output priority 0; policy accept;
    oifname "{adapter.tap}" meta l4proto tcp numgen random mod {LOSS_ONE_IN} == 0 counter drop; }}
}}
"""
    res = adapter.run(["nft", "-f", "-"], input=rules, text=True, stdin=None)
    assert res.returncode == 0, res.stderr


def dropped(adapter) -> int:
    out = adapter.run(["nft", "list", "table", "inet", "toeloss"], text=True).stdout
    return sum(int(line.split("packets")[1].split()[0]) for line in out.splitlines() if "packets" in line)


@pytest.fixture
def blob(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    with open(d / "blob", "wb") as f:
        f.write(bytes(range(256)) * (SIZE // 256))
    return d, sha256_file(d / "blob")


def test_upload_survives_loss(adapter, client_ns, blob, tmp_path):
    """The adapter sends through loss: its retransmissions must repair the stream."""
    require_tools("curl", "nft")
    add_loss(adapter)
    srv_dir, want = blob
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-u", "-m", "http.server", "--bind", adapter.ip,
                                           "--directory", str(srv_dir), str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_line(server, "Serving HTTP")
    out = tmp_path / "got"
    for _ in range(3):
        res = adapter.run(["curl", "-sS", "--max-time", "120", "-o", str(out),
                           f"http://{adapter.ip}:{port}/blob"], text=True)
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == want
    assert dropped(adapter) > 0
    tcp = adapter.stat()["units"]["tcp"]
    assert tcp["retransmit_timeouts"] + tcp["fast_retransmits"] > 0, tcp


def test_download_survives_loss(adapter, client_ns, blob, tmp_path):
    """The kernel sends through loss: the adapter must reassemble and ACK correctly."""
    require_tools("curl", "nft")
    add_loss(adapter)
    srv_dir, want = blob
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-m", "http.server", "--bind", adapter.host_ip,
                            "--directory", str(srv_dir), str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_line(server, "Serving HTTP")
    out = tmp_path / "got"
    for _ in range(3):
        res = client_ns.toe_run(adapter, ["curl", "-sS", "--max-time", "120", "-o", str(out),
                                          f"http://{adapter.host_ip}:{port}/blob"], text=True)
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == want
    assert dropped(adapter) > 0
