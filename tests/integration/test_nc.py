"""netcat (netcat-openbsd) under toe run, as client and as listener, both directions.

`nc -N` turns stdin EOF into shutdown(SHUT_WR); the peer's nc sees EOF and
exits, so every transfer ends by itself: EOF crossing the adapter is part of
what is tested. The side that only receives gets /dev/null as stdin and no -N
(it must not half-close before the data has arrived).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require_tools, sha256_file, unique_port

pytestmark = pytest.mark.integration

NC_BYTES = 4 * 1024 * 1024 + 123  # a few MB, not a multiple of any segment or ring size


@pytest.fixture
def payload(tmp_path):
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(NC_BYTES))
    return path, sha256_file(path)


def _finish(proc, name):
    rc = proc.wait(240)
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    assert rc == 0, f"{name} exited {rc}: {err}"


@pytest.mark.parametrize("direction", ["toe_sends", "toe_receives"])
def test_nc_client_under_toe_run(adapter, client_ns, payload, tmp_path, direction):
    require_tools("nc")
    data, want = payload
    port = unique_port()
    out = tmp_path / "received"
    with open(data, "rb") as src, open(out, "wb") as dst:
        if direction == "toe_sends":
            kernel = adapter.popen(["nc", "-l", adapter.host_ip, str(port)], stdout=dst, stderr=subprocess.PIPE)
            adapter.wait_kernel_listener(port)
            toe = client_ns.toe_popen(adapter, ["nc", "-N", adapter.host_ip, str(port)], stdin=src,
                                      stderr=subprocess.PIPE)
        else:
            kernel = adapter.popen(["nc", "-N", "-l", adapter.host_ip, str(port)], stdin=src,
                                   stderr=subprocess.PIPE)
            adapter.wait_kernel_listener(port)
            toe = client_ns.toe_popen(adapter, ["nc", adapter.host_ip, str(port)], stdout=dst,
                                      stderr=subprocess.PIPE)
        _finish(toe, "nc under toe run")
        _finish(kernel, "kernel-side nc")
    assert out.stat().st_size == NC_BYTES
    assert sha256_file(out) == want


@pytest.mark.parametrize("direction", ["toe_sends", "toe_receives"])
def test_nc_listener_under_toe_run(adapter, client_ns, payload, tmp_path, direction):
    require_tools("nc")
    data, want = payload
    port = unique_port()
    out = tmp_path / "received"
    with open(data, "rb") as src, open(out, "wb") as dst:
        if direction == "toe_sends":
            toe = client_ns.toe_popen(adapter, ["nc", "-N", "-l", adapter.ip, str(port)], stdin=src,
                                      stderr=subprocess.PIPE)
            adapter.wait_toe_listener(port)
            kernel = adapter.popen(["nc", adapter.ip, str(port)], stdout=dst, stderr=subprocess.PIPE)
        else:
            toe = client_ns.toe_popen(adapter, ["nc", "-l", adapter.ip, str(port)], stdout=dst,
                                      stderr=subprocess.PIPE)
            adapter.wait_toe_listener(port)
            kernel = adapter.popen(["nc", "-N", adapter.ip, str(port)], stdin=src, stderr=subprocess.PIPE)
        _finish(kernel, "kernel-side nc")
        _finish(toe, "nc under toe run")
    assert out.stat().st_size == NC_BYTES
    assert sha256_file(out) == want
