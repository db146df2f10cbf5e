"""A user's mistake gets one readable line on stderr, exit status 1, no traceback.

These need neither root nor an adapter: every case fails before touching the system.
"""

from __future__ import annotations

import os

import pytest

from offload_daemon import netns
from offload_daemon.config import state_path
from tests.conftest import run_toe, unique


def one_line_error(res, *fragments):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("toe: "), lines[0]
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["up", "--addr", "nonsense"], "address"),
        (["up", "--addr", "198.18.0.1/24"], "198.18.0.1"),
        (["up", "--host-addr", "10.9.9.9/24"], "subnet"),
        (["up", "--mtu", "100"], "MTU"),
        (["up", "--mtu", "lots"], "--mtu"),
        (["up", "--ring-kb", "3"], "power of two"),
        (["up", "--tap", "a-name-much-too-long"], "TAP name"),
        (["up", "--syn-retries", "0"], "--syn-retries"),
        (["up", "--bogus"], "--bogus"),
        (["up", "--addr", "198.18.0.2/31", "--host-addr", "198.18.0.3/31"], "/30"),
        (["up", "--addr", "198.18.0.2"], "prefix"),
        (["up", "--host-addr", "198.18.0.0/24"], "--host-addr 198.18.0.0/24 is the subnet's network address"),
        (["up", "--host-addr", "198.18.0.255/24"], "broadcast address"),
        (["up", "--addr", "0.0.0.0/24", "--host-addr", "0.0.0.1/24"], "unspecified"),
        (["up", "--addr", "169.254.0.2/16", "--host-addr", "169.254.0.1/16"], "link-local"),
        (["up", "--addr", "224.0.0.2/24", "--host-addr", "224.0.0.1/24"], "multicast"),
        (["up", "--addr", "240.0.0.2/24", "--host-addr", "240.0.0.1/24"], "reserved"),
        (["up", "--addr", "255.255.255.255/24"], "limited broadcast"),
        (["up", "--allow-users", "root,no-such-user-toe"], "no user named 'no-such-user-toe'"),
        (["up", "--allow-users", "99999999999"], "out of range"),
        (["up", "--allow-group", "no-such-group-toe"], "no group named 'no-such-group-toe'"),
        (["up", "--max-sockets", "0"], "--max-sockets"),
        (["up", "--max-process-sockets", "lots"], "--max-process-sockets"),
        (["up", "--max-time-wait", "0"], "--max-time-wait"),
        (["up", "--max-sockets", "10", "--max-process-sockets", "20"], "--max-process-sockets 20 is more than"),
        (["up", "--max-ring-mb", "1"], "less than one socket's rings"),
        (["up", "--max-ring-mb", "-1"], "--max-ring-mb"),
        (["frobnicate"], "frobnicate"),
        ([], "missing command"),
    ],
)
def test_bad_arguments(args, fragment):
    one_line_error(run_toe(*args), fragment)


@pytest.mark.parametrize(
    "addr, why",
    [
        ("198.18.0.0/24", "--addr 198.18.0.0/24 is the subnet's network address"),
        ("198.18.0.255/24", "--addr 198.18.0.255/24 is the subnet's broadcast address"),
        ("127.0.0.5/8", "--addr 127.0.0.5/8 is a loopback address"),
    ],
)
def test_an_address_no_host_may_have_is_refused_before_anything_is_made(addr, why):
    ns, tap = unique("toe-t"), unique("tt")
    one_line_error(run_toe("up", "--netns", ns, "--tap", tap, "--addr", addr), why)
    assert not netns.exists(ns)
    assert not os.path.exists(state_path(tap))


def test_stat_of_an_adapter_that_is_not_up():
    tap = unique("nope")
    one_line_error(run_toe("stat", "--tap", tap), tap, "not up")
    one_line_error(run_toe("stat", "--tap", tap, "--json"), tap, "not up")


def test_down_of_an_adapter_that_is_not_up():
    tap = unique("nope")
    one_line_error(run_toe("down", "--tap", tap), tap, "not up")


def test_run_on_an_adapter_that_is_not_up():
    tap = unique("nope")
    one_line_error(run_toe("run", "--tap", tap, "--", "true"), tap, "not up", "toe up --tap")


@pytest.mark.parametrize("args", [["run"], ["run", "--"], ["run", "--tap", "x", "--"]])
def test_run_without_a_command(args):
    one_line_error(run_toe(*args), "needs a command")


def test_debug_shows_the_traceback():
    res = run_toe("stat", "--tap", unique("nope"), env={**os.environ, "TOE_DEBUG": "1"})
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("toe: ")
