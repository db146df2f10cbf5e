"""`toe up` / `toe down` lifecycle: state, refusals, stale adapters, who may use an adapter,
its limits, the stat schema."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator

import pytest

from offload_daemon import netns
from offload_daemon.access import ACL_XATTR, acl_xattr, secure_socket
from offload_daemon.cli import app as cli
from offload_daemon.cli.stat_view import limits_line, render_stat
from offload_daemon.client.adapter import daemon_alive
from offload_daemon.client.env import shim_path
from offload_daemon.config import AdapterConfig, api_path, ctl_path, log_path, state_path
from tests.conftest import run_toe, unique, wait_until

NOBODY = 65534

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


@contextlib.contextmanager
def crashed_adapter(*extra: str, wait: bool = True) -> Iterator[tuple[str, str, int]]:
    """`toe up --netns NS --tap TAP` whose daemon is then SIGKILLed: yields (ns, tap, pid).
    wait=False: right after the kill, the daemon may still be exiting. Always cleans up."""
    ns, tap = unique("toe-t"), unique("tt")
    res = run_toe("up", "--netns", ns, "--tap", tap, *extra)
    assert res.returncode == 0, res.stderr
    try:
        with open(state_path(tap)) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGKILL)
        if wait:
            wait_until(lambda: not daemon_alive(pid), f"daemon pid {pid} to die")
        yield ns, tap, pid
    finally:
        if os.path.exists(state_path(tap)):
            run_toe("down", "--tap", tap)
        if netns.exists(ns):
            netns.stop_pids(netns.pids(ns))
            netns.delete(ns)
        for path in (state_path(tap), ctl_path(tap), api_path(tap), log_path(tap)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@pytest.mark.parametrize("wait", [True, False], ids=["dead", "dying"])
def test_down_after_the_daemon_died(wait):
    """A SIGKILLed daemon leaves its files; `toe down` removes them and the namespace, and says so."""
    with crashed_adapter(wait=wait) as (ns, tap, pid):
        res = run_toe("down", "--tap", tap)
        assert res.returncode == 0, res.stderr
        assert not netns.exists(ns)
        for path in (state_path(tap), ctl_path(tap), api_path(tap)):
            assert not os.path.exists(path), path
        out = res.stdout.strip()
        if wait:  # (dying: `toe down` may still find it running, and stop it)
            assert f"daemon pid {pid} was already gone" in out, out
            for name in (f"{tap}.json", f"{tap}.sock", f"{tap}.api"):
                assert name in out, out
        assert f"netns {ns} deleted" in out, out
        assert "alive" not in out, out        # nothing keeps the namespace
        assert res.stderr == ""


def test_up_again_after_the_daemon_died():
    """`toe up` on the TAP and namespace of a crashed adapter clears its files, reuses the
    namespace, starts normally; `toe down` then deletes the namespace as its own."""
    with crashed_adapter() as (ns, tap, pid):
        res = run_toe("up", "--netns", ns, "--tap", tap)
        assert res.returncode == 0, res.stderr
        assert f"daemon pid {pid} of adapter {tap} was gone" in res.stderr, res.stderr
        assert f"reusing its netns {ns}" in res.stderr, res.stderr
        with open(state_path(tap)) as f:
            state = json.load(f)
        assert state["pid"] != pid and daemon_alive(state["pid"])
        assert state["netns_created"] is True
        assert run_toe("stat", "--tap", tap).returncode == 0
        res = run_toe("down", "--tap", tap)
        assert res.returncode == 0, res.stderr
        assert f"netns {ns} deleted" in res.stdout
        assert not netns.exists(ns)


def test_run_on_a_dead_adapter_is_an_error():
    """Not a silent fallback to the kernel: one line, exit status 1, the program not run."""
    with crashed_adapter() as (_ns, tap, pid):
        res = run_toe("run", "--tap", tap, "--", sys.executable, "-c", "print('ran')")
        assert res.returncode == 1, res
        assert res.stdout == ""
        assert res.stderr.splitlines() == [
            f"toe: adapter {tap} is not answering (daemon pid {pid} is gone); "
            f"'toe down --tap {tap}' cleans up, 'toe up --tap {tap}' starts it again"]


def test_run_on_a_socket_nobody_listens_on_is_an_error():
    tap = unique("tt")
    path = ctl_path(tap)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.bind(path)      # and closed: the file stays, nothing accepts
        res = run_toe("run", "--tap", tap, "--", "true")
        assert res.returncode == 1, res
        assert res.stderr.splitlines() == [
            f"toe: adapter {tap} is not answering (nothing accepts on {path}); "
            f"'toe down --tap {tap}' cleans up, 'toe up --tap {tap}' starts it again"]
    finally:
        os.unlink(path)


@contextlib.contextmanager
def fake_control_socket(cfg: AdapterConfig) -> Iterator[str]:
    """A listening control socket at ctl_path(cfg.tap), secured for cfg, never accepting."""
    path = ctl_path(cfg.tap)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.bind(path)
        secure_socket(path, cfg)
        s.listen(1)
        yield path
    finally:
        s.close()
        os.unlink(path)


def toe_as(uid: int, *args: str) -> tuple[int, str, str]:
    """(status, stdout, stderr) of `toe ARGS` run as uid/gid `uid` without supplementary groups.

    In a forked child of this process, not through exec: the interpreter may live where
    another user cannot reach it (e.g. under /root). What the command imports is imported
    here first, for the same reason; `toe run` then execs its program as that user.
    """
    from rich import columns, console, table  # noqa: F401 (render_stat's imports, loaded as root)

    cli.build_parser()
    shim_path()
    outs = [os.pipe(), os.pipe()]
    pid = os.fork()
    if pid == 0:  # never return into pytest
        status = 255
        try:
            for fd, (_r, w) in zip((1, 2), outs, strict=True):
                os.dup2(w, fd)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            os.chdir("/")
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            status = cli.main(list(args))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    texts = []
    for _r, w in outs:
        os.close(w)
    for r, _w in outs:
        with os.fdopen(r, "rb") as f:
            texts.append(f.read().decode())
    _, wstatus = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wstatus), texts[0], texts[1]


@pytest.mark.parametrize("listed", [False, True], ids=["not-listed", "listed"])
def test_run_by_a_user_the_adapter_does_not_allow(listed):
    """Refused or not, the program runs; `toe run` itself says nothing (the shim's one
    line comes with the first TCP socket: tests/security/test_isolation.py)."""
    cfg = AdapterConfig(tap=unique("tt"), allow_users=(NOBODY,) if listed else ())
    with fake_control_socket(cfg):
        status, out, err = toe_as(NOBODY, "run", "--tap", cfg.tap, "--", "/bin/echo", "ran")
    assert (status, out, err) == (0, "ran\n", "")


def test_up_opens_the_adapter_to_the_users_and_group_given():
    ns, tap = unique("toe-t"), unique("tt")
    group = 64999
    res = run_toe("up", "--netns", ns, "--tap", tap, "--allow-users", f"nobody,{NOBODY - 1}",
                  "--allow-group", str(group), "--max-sockets", "64", "--max-process-sockets", "8",
                  "--max-ring-mb", "256", "--max-time-wait", "100")
    try:
        assert res.returncode == 0, res.stderr
        assert f"for root, uid {NOBODY - 1}, nobody ({NOBODY}), group gid {group};" in res.stdout, res.stdout
        for path in (ctl_path(tap), api_path(tap)):
            st = os.stat(path)
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, group), path
            assert os.getxattr(path, ACL_XATTR) == acl_xattr([NOBODY - 1, NOBODY]), path
        lim = json.loads(run_toe("stat", "--tap", tap, "--json").stdout).get("limits", {})
        assert (lim.get("max_sockets"), lim.get("max_process_sockets"), lim.get("max_ring_bytes"),
                lim.get("max_time_wait")) == (64, 8, 256 << 20, 100), lim
        status, out, err = toe_as(NOBODY, "stat", "--tap", tap)          # listed: may ask
        assert status == 0, err
        assert "limits  sockets 0 / 64  per process 8  ring memory 0.0 MiB / 256.0 MiB  time-wait 0 / 100" \
            in out, out
        status, out, err = toe_as(NOBODY - 2, "stat", "--tap", tap)
        assert status == 1 and err.splitlines() == [
            f"toe: you (uid {NOBODY - 2}) are not allowed to use adapter {tap} ({api_path(tap)}); "
            "ask its admin for 'toe up --allow-users'"], err
    finally:
        run_toe("down", "--tap", tap)
        if netns.exists(ns):
            netns.stop_pids(netns.pids(ns))
            netns.delete(ns)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path(tap))


def test_up_defaults_to_root_and_the_sudo_user():
    ns, tap = unique("toe-t"), unique("tt")
    res = run_toe("up", "--netns", ns, "--tap", tap, env={**os.environ, "SUDO_UID": str(NOBODY)})
    try:
        assert res.returncode == 0, res.stderr
        assert f"for root, nobody ({NOBODY})" in res.stdout, res.stdout
        assert os.getxattr(ctl_path(tap), ACL_XATTR) == acl_xattr([NOBODY])
        again = run_toe("down", "--tap", tap)
        assert again.returncode == 0, again.stderr
    finally:
        if netns.exists(ns):
            netns.stop_pids(netns.pids(ns))
            netns.delete(ns)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path(tap))


def test_limits_render_whatever_the_daemon_sends():
    from rich.console import Console

    for limits in ({}, {"sockets": 3}, {"max_ring_bytes": 1 << 20, "refused": 2, "odd": None}):
        console = Console(file=io.StringIO(), width=200)
        render_stat({"limits": limits}, console=console)
        assert "limits" in console.file.getvalue()
    assert limits_line({"sockets": 3, "max_sockets": 10, "ring_bytes": 0, "max_ring_bytes": 1 << 20,
                        "refused_sockets": 1}) == \
        "[bold]limits[/]  sockets 3 / 10  ring memory 0.0 MiB / 1.0 MiB  refused sockets 1"


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
