"""A user's mistake gets one readable line on stderr, exit status 1, no traceback.

These need neither root nor an adapter: every case fails before touching the system.
"""

from __future__ import annotations

import os

import pytest

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
        (["frobnicate"], "frobnicate"),
        ([], "missing command"),
    ],
)
def test_bad_arguments(args, fragment):
    one_line_error(run_toe(*args), fragment)


def test_stat_of_an_adapter_that_is_not_up():
    tap = unique("nope")
    one_line_error(run_toe("stat", "--tap", tap), tap, "not up")
    one_line_error(run_toe("stat", "--tap", tap, "--json"), tap, "not up")


def test_down_of_an_adapter_that_is_not_up():
    tap = unique("nope")
    one_line_error(run_toe("down", "--tap", tap), tap, "not up")


@pytest.mark.parametrize("args", [["run"], ["run", "--"], ["run", "--tap", "x", "--"]])
def test_run_without_a_command(args):
    one_line_error(run_toe(*args), "needs a command")


def test_debug_shows_the_traceback():
    res = run_toe("stat", "--tap", unique("nope"), env={**os.environ, "TOE_DEBUG": "1"})
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("toe: ")
