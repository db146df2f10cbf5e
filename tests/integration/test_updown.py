"""`toe up` / `toe down` lifecycle: state, refusals, stale adapters, the stat schema."""

from __future__ import annotations

import json
import os
import signal

import pytest

from offload_daemon import netns
from offload_daemon.cli import daemon_alive
from offload_daemon.config import api_path, ctl_path, log_path, state_path
from tests.conftest import run_toe, unique, wait_until

pytestmark = pytest.mark.integration


def test_up_writes_state_and_refuses_a_second_start(adapter):
    with open(state_path(adapter.tap)) as f:
        state = json.load(f)
    assert state["tap"] == adapter.tap
    assert state["netns"] == adapter.netns
    assert state["netns_created"] is True
    assert os.path.exists(ctl_path(adapter.tap)) and os.path.exists(api_path(adapter.tap))
    res = run_toe("up", "--netns", adapter.netns, "--tap", adapter.tap)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [res.stderr.strip()] and "already up" in res.stderr


def test_stat_json_schema(adapter):
    stat = adapter.stat()
    for key in ("adapter", "cpu", "totals", "connections", "listeners", "units", "processes"):
        assert key in stat, key
    assert stat["adapter"]["tap"] == adapter.tap
    assert stat["adapter"]["addr"] == adapter.addr
    assert stat["adapter"]["host_addr"] == adapter.host_addr
    assert isinstance(stat["units"], dict) and stat["units"], "no per-unit counters"
    for unit, counters in stat["units"].items():
        assert all(isinstance(v, int) for v in counters.values()), unit
    human = run_toe("stat", "--tap", adapter.tap)
    assert human.returncode == 0, human.stderr
    assert adapter.tap in human.stdout and "connections" in human.stdout


def test_kernel_side_of_the_tap_is_configured(adapter):
    res = adapter.run(["ip", "-o", "-4", "addr", "show", "dev", adapter.tap], text=True)
    assert res.returncode == 0, res.stderr
    assert adapter.host_addr in res.stdout


def test_run_of_a_missing_command_is_one_line(adapter):
    res = run_toe("run", "--tap", adapter.tap, "--", "no-such-command-toe-test")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["toe: command not found: no-such-command-toe-test"]


def test_up_refuses_a_name_taken_by_another_interface():
    from pyroute2 import IPRoute

    ns, tap = unique("toe-t"), unique("tt")
    netns.create(ns)
    try:
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname=tap, kind="veth", peer=f"{tap}p")
        res = run_toe("up", "--netns", ns, "--tap", tap)
        assert res.returncode == 1
        assert len(res.stderr.splitlines()) == 1 and "already exists" in res.stderr, res.stderr
        assert netns.exists(ns), "toe up deleted a namespace it did not create"
        assert not os.path.exists(state_path(tap))
    finally:
        netns.delete(ns)


def test_down_after_the_daemon_died():
    """A SIGKILLed daemon leaves its files; `toe down` still removes them and the namespace."""
    ns, tap = unique("toe-t"), unique("tt")
    res = run_toe("up", "--netns", ns, "--tap", tap)
    assert res.returncode == 0, res.stderr
    try:
        with open(state_path(tap)) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not daemon_alive(pid), f"daemon pid {pid} to die")
        res = run_toe("down", "--tap", tap)
        assert res.returncode == 0, res.stderr
        assert not netns.exists(ns)
        for path in (state_path(tap), ctl_path(tap), api_path(tap)):
            assert not os.path.exists(path), path
    finally:
        if os.path.exists(state_path(tap)):
            run_toe("down", "--tap", tap)
        if netns.exists(ns):
            netns.stop_pids(netns.pids(ns))
            netns.delete(ns)
        if os.path.exists(log_path(tap)):
            os.unlink(log_path(tap))


def test_ping_and_pcap_capture(tmp_path):
    """The adapter answers ARP and ping from the kernel side; --pcap records those frames."""
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP
    from scapy.utils import rdpcap

    ns, tap = unique("toe-t"), unique("tt")
    pcap = tmp_path / "adapter.pcap"
    res = run_toe("up", "--netns", ns, "--tap", tap, "--pcap", str(pcap))
    assert res.returncode == 0, res.stderr
    try:
        ping = netns.run(ns, ["ping", "-c", "3", "-i", "0.2", "-W", "5", "198.18.0.2"],
                         capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "3 received" in ping.stdout
    finally:
        run_toe("down", "--tap", tap)
        if netns.exists(ns):
            netns.stop_pids(netns.pids(ns))
            netns.delete(ns)
        if os.path.exists(log_path(tap)):
            os.unlink(log_path(tap))
    frames = rdpcap(str(pcap))
    assert any(ARP in f and f[ARP].op == 2 and f[ARP].psrc == "198.18.0.2" for f in frames)
    replies = [f for f in frames if ICMP in f and f[ICMP].type == 0 and f["IP"].src == "198.18.0.2"]
    assert len(replies) == 3
