"""`toe demo` end to end, and its cleanup when interrupted."""

from __future__ import annotations

import glob
import os
import signal
import subprocess

import pytest

from offload_daemon import netns
from tests.conftest import require_tools, stop, toe_cmd, unique_port, wait_for_line

pytestmark = pytest.mark.integration


def demo_leftovers(pid: int) -> list[str]:
    left = [n for n in netns.names() if n == f"toe-demo-{pid}" or n.startswith(f"toe-demo-{pid}-")]
    left += glob.glob(f"/run/toe/toed{pid}.*")
    return left


def test_demo(tmp_path):
    require_tools("curl")
    proc = subprocess.Popen([*toe_cmd(), "demo", "--port", str(unique_port())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        stop(proc)
    assert proc.returncode == 0, f"toe demo failed: {err.strip()}\n{out}"
    assert "sha256 ok" in out, out
    assert "cleaned up" in out, out
    assert not demo_leftovers(proc.pid)


def test_demo_cleans_up_when_interrupted():
    """Ctrl-C while the demo's adapter and namespaces exist: everything goes, exit status 130."""
    proc = subprocess.Popen([*toe_cmd(), "demo", "--port", str(unique_port())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "client netns", timeout=120)
        assert any(n.startswith(f"toe-demo-{proc.pid}") for n in netns.names())
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(120)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    finally:
        stop(proc)
    assert rc == 130, (rc, err)
    assert "interrupted" in err and "Traceback" not in err, err
    assert not demo_leftovers(proc.pid)
