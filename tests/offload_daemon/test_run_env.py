"""The environment `toe run` gives a program: the shim, the adapter's socket, strict mode,
and the adapter's busy-poll setting (TOE_POLL_US) unless the caller chose one."""

from __future__ import annotations

import pytest

from offload_daemon.client import adapter


@pytest.fixture
def fake_state(tmp_path, monkeypatch):
    """A state file of a made-up adapter (read_state is all preload_env asks)."""
    written = {}

    def write(tap: str, **state) -> None:
        written[tap] = state

    monkeypatch.setattr(adapter, "read_state", lambda tap: written.get(tap))
    return write


def test_the_adapters_poll_setting_reaches_the_program(fake_state):
    fake_state("tq1", poll_us=20, app_poll_us=20)
    env = adapter.preload_env("tq1", {"PATH": "/bin"})
    assert env["TOE_POLL_US"] == "20"
    assert env["LD_PRELOAD"].split()[0] == adapter.shim_path()
    assert env["TOE_SOCK"].endswith("/tq1.sock")


def test_the_callers_own_poll_setting_wins(fake_state):
    fake_state("tq2", poll_us=20, app_poll_us=20)
    assert adapter.preload_env("tq2", {"TOE_POLL_US": "0"})["TOE_POLL_US"] == "0"


@pytest.mark.parametrize("state", [{"app_poll_us": 0}, {"poll_us": 20}, {}, None, {"app_poll_us": "20"}])
def test_no_poll_setting_without_one(fake_state, state):
    if state is not None:
        fake_state("tq3", **state)
    assert "TOE_POLL_US" not in adapter.preload_env("tq3", {})

