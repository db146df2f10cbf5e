"""The shim is a plain shared object that loads into any binary.

No adapter needed: these check the built library itself (LD_BIND_NOW=1 load,
no Python symbols, only libc/libdl/libpthread symbols undefined).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from offload_daemon.client.env import shim_path
from offload_daemon.client.errors import CLIError
from tests.conftest import require_tools


@pytest.fixture(scope="module")
def shim():
    try:
        return shim_path()
    except CLIError as e:
        pytest.fail(str(e))


def test_shim_loads_with_bind_now(shim):
    env = dict(os.environ, LD_BIND_NOW="1", LD_PRELOAD=shim, TOE_SOCK="/nonexistent/toe.sock")
    res = subprocess.run(["cat", "/proc/self/maps"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ld.so" not in res.stderr and "cannot be preloaded" not in res.stderr, res.stderr
    assert shim in res.stdout, "the shim is not mapped into the process"


def test_shim_has_no_python_symbols(shim):
    require_tools("nm")
    res = subprocess.run(["nm", "-D", "--undefined-only", shim], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    undefined = [line.split()[-1] for line in res.stdout.splitlines() if line.strip()]
    assert not [s for s in undefined if s.startswith("Py") or s.startswith("_Py")], undefined
    strong = [line.split()[-1] for line in res.stdout.splitlines() if line.split()[:1] == ["U"]]
    foreign = [s for s in strong if "@GLIBC_" not in s]
    assert not foreign, f"undefined symbols not from glibc (libc/libdl/libpthread): {foreign}"
