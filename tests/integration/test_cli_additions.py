"""`toe --version`, the adapter chosen when --tap is left out, `toe stat --watch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from importlib import metadata

import pytest

from offload_daemon.cli.stat_view import rates, rates_line
from offload_daemon.client import adapter as adaptermod
from offload_daemon.client.errors import CLIError
from offload_daemon.config import ctl_path
from tests.conftest import run_toe, toe_cmd

integration = pytest.mark.integration


def test_version():
    res = run_toe("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"toe {metadata.version('toe')}"
    assert "--version" in run_toe("--help").stdout


def write_state(run_dir, tap, pid):
    (run_dir / f"{tap}.json").write_text(json.dumps({"pid": pid, "tap": tap}))


def test_choose_tap(tmp_path, monkeypatch):
    monkeypatch.setattr(adaptermod, "daemon_alive", lambda pid: pid in (101, 102))
    run_dir = tmp_path
    assert adaptermod.choose_tap(None, str(run_dir)) == adaptermod.DEFAULT_TAP   # none up: as before
    write_state(run_dir, "dead0", 999)
    (run_dir / "junk.json").write_text("{not json")
    (run_dir / "toeA.log").write_text("")
    assert adaptermod.choose_tap(None, str(run_dir)) == adaptermod.DEFAULT_TAP   # dead/unreadable: not up
    write_state(run_dir, "toeA", 101)
    assert adaptermod.choose_tap(None, str(run_dir)) == "toeA"                   # the one that is up
    assert adaptermod.choose_tap("other", str(run_dir)) == "other"               # --tap wins
    write_state(run_dir, "toeB", 102)
    with pytest.raises(CLIError) as e:
        adaptermod.choose_tap(None, str(run_dir))
    assert str(e.value) == "2 adapters are up: toeA, toeB; choose one with --tap NAME"
    assert adaptermod.choose_tap("toeB", str(run_dir)) == "toeB"


def test_rates():
    a = {"totals": {"bytes_in": 1000, "bytes_out": 0, "frames_in": 10, "connections": 3, "flag": True}}
    b = {"totals": {"bytes_in": 3000, "bytes_out": 0, "frames_in": 5, "connections": 4, "flag": True}}
    assert rates(a, b, 2.0) == {"bytes_in": 1000.0, "bytes_out": 0.0, "frames_in": None}
    assert rates_line(rates(a, b, 2.0)) == "[bold]rates[/]  bytes in 1.0 kB/s  bytes out 0 B/s  frames in -"
    assert "next refresh" in rates_line(None)


def test_json_and_watch_together_is_one_line_error():
    res = run_toe("stat", "--tap", "nonesuch0", "--json", "--watch")
    assert res.returncode == 1 and res.stderr.strip().startswith("toe: --json and --watch")
    assert "--watch-count" not in run_toe("stat", "--help").stdout


def one_or_listed(res, tap):
    """Without --tap: this adapter, or (other tests' adapters up too) the one line listing them."""
    if res.returncode == 0:
        return True
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapters are up:" in lines[0] and tap in lines[0], res.stderr
    return False


@integration
def test_stat_and_run_use_the_one_adapter_up(adapter):
    res = run_toe("stat", "--json")
    if one_or_listed(res, adapter.tap):
        assert json.loads(res.stdout)["adapter"]["tap"] == adapter.tap
    res = run_toe("run", "--", "sh", "-c", 'echo "$TOE_SOCK"')
    if one_or_listed(res, adapter.tap):
        assert res.stdout.strip() == ctl_path(adapter.tap)


@integration
def test_stat_watch_refreshes_with_rates(adapter):
    res = run_toe("stat", "--tap", adapter.tap, "--watch", "0.05", "--watch-count", "2")
    assert res.returncode == 0, res.stderr
    assert f"toe stat --tap {adapter.tap}" in res.stdout and "every 0.05 s" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("rates"))
    assert "bytes in" in line and "/s" in line                     # two answers: rates shown
    assert "connections (" in res.stdout and "totals" in res.stdout


@integration
def test_stat_watch_ends_cleanly_on_ctrl_c(adapter):
    proc = subprocess.Popen([*toe_cmd(), "stat", "--tap", adapter.tap, "--watch", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err.strip() == "" and "rates" in out
