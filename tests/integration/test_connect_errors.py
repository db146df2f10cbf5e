"""A blocking connect() through the adapter fails the way the kernel's does, and never hangs.

The adapter runs with --syn-retries 2, so an unanswered SYN gives up after a
few retransmissions; pytest-timeout turns a hang into a failure.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import require_tools, unique_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONNECT = (
    "import errno, socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "except OSError as e:\n"
    "    print(errno.errorcode.get(e.errno, e.errno))\n"
    "else:\n"
    "    print('CONNECTED')\n"
)


def connect_result(client_ns, adapter, ip, port):
    res = client_ns.toe_run(adapter, [sys.executable, "-c", CONNECT, ip, str(port)], text=True, timeout=200)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture
def slow_adapter(adapter_factory):
    return adapter_factory("--syn-retries", "2")


def test_closed_port_is_refused(slow_adapter, client_ns):
    assert connect_result(client_ns, slow_adapter, slow_adapter.host_ip, unique_port()) == "ECONNREFUSED"


def test_silently_dropped_syn_times_out(slow_adapter, client_ns):
    require_tools("nft")
    port = unique_port()
    rules = (
        "table inet toetest {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {port} drop\n"
        "  }\n"
        "}\n"
    )
    res = slow_adapter.run(["nft", "-f", "-"], input=rules, text=True, stdin=None)
    assert res.returncode == 0, f"nft: {res.stderr.strip()}"
    assert connect_result(client_ns, slow_adapter, slow_adapter.host_ip, port) == "ETIMEDOUT"


def test_address_nobody_owns_is_unreachable(slow_adapter, client_ns):
    assert connect_result(client_ns, slow_adapter, "198.18.0.77", unique_port()) in ("EHOSTUNREACH", "ETIMEDOUT")
