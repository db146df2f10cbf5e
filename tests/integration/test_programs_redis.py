"""Redis through the adapter: redis-server under toe run, and redis-benchmark / redis-cli under toe run.

redis-benchmark (50 connections, pipelined event loop on epoll) must finish
every test it is given and report its requests per second; the server's own
command count must cover every request the benchmark made. A 1 MB binary
value written with SET and read back with GET (redis-cli) must be byte-exact.
The rates are printed (`pytest -s`), never asserted.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import require_tools, unique_port

pytestmark = pytest.mark.integration

REQUESTS = 20000
CLIENTS = 50
TESTS = "ping,set,get,incr,lrange_100"
# the result lines redis-benchmark prints for TESTS (lrange needs the LPUSH it reports too)
EXPECTED = ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "LPUSH (needed to benchmark LRANGE)",
            "LRANGE_100 (first 100 elements)"]
RESULT = re.compile(r"^(.+?): ([\d.]+) requests per second")
VALUE_BYTES = 1 << 20


def server_argv(ip: str, port: int, tmp_path) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", ip, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--dir", str(tmp_path)]


def benchmark_argv(ip: str, port: int) -> list[str]:
    return ["redis-benchmark", "-h", ip, "-p", str(port), "-q", "-n", str(REQUESTS), "-c", str(CLIENTS),
            "-t", TESTS]


def check_benchmark(res: subprocess.CompletedProcess, label: str) -> None:
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    assert res.returncode == 0, f"redis-benchmark exited {res.returncode}: {out[-3000:]}"
    lines = [line.strip() for line in re.split(r"[\r\n]", out) if line.strip()]
    results = {}
    for line in lines:
        m = RESULT.match(line)
        if m:
            results[m[1]] = float(m[2])
    print(f"\nredis-benchmark {label}: " + ", ".join(f"{k.split(' ')[0]} {v:.0f}" for k, v in results.items())
          + " requests/s")
    assert list(results) == EXPECTED, f"redis-benchmark results {list(results)}: {out[-3000:]}"
    assert all(v > 0 for v in results.values()), results
    assert not [line for line in lines if "rror" in line], out[-3000:]


def commands_processed(cli: list[str], run) -> int:
    res = run([*cli, "INFO", "stats"])
    assert res.returncode == 0, res.stderr
    m = re.search(rb"^total_commands_processed:(\d+)", res.stdout, re.M)
    assert m, res.stdout
    return int(m[1])


def set_get_1mb(cli: list[str], run, tmp_path) -> None:
    """SET a 1 MB binary value, GET it back: byte-exact both ways (GET's output ends with a newline)."""
    value = os.urandom(VALUE_BYTES)
    res = run([*cli, "-x", "SET", "big"], input=value, stdin=None)
    assert res.returncode == 0 and res.stdout.strip() == b"OK", (res.stdout[:200], res.stderr)
    res = run([*cli, "STRLEN", "big"])
    assert res.stdout.strip() == str(VALUE_BYTES).encode(), res.stdout[:200]
    res = run([*cli, "GET", "big"])
    assert res.returncode == 0, res.stderr
    assert len(res.stdout) == VALUE_BYTES + 1 and res.stdout == value + b"\n", \
        f"GET returned {len(res.stdout)} bytes, not the value"


def test_redis_server_under_toe_run(adapter, client_ns, tmp_path):
    require_tools("redis-server", "redis-benchmark", "redis-cli")
    port = unique_port()
    with open(tmp_path / "redis.log", "wb") as log:
        client_ns.toe_popen(adapter, server_argv(adapter.ip, port, tmp_path), stdout=log, stderr=subprocess.STDOUT)
    adapter.wait_toe_listener(port)
    cli = ["redis-cli", "-h", adapter.ip, "-p", str(port)]
    before = commands_processed(cli, adapter.run)
    check_benchmark(adapter.run(benchmark_argv(adapter.ip, port)), "(kernel) -> redis-server under toe run")
    after = commands_processed(cli, adapter.run)
    assert after - before >= len(EXPECTED) * REQUESTS, (before, after)
    set_get_1mb(cli, adapter.run, tmp_path)


def test_redis_clients_under_toe_run(adapter, client_ns, tmp_path):
    require_tools("redis-server", "redis-benchmark", "redis-cli")
    port = unique_port()
    with open(tmp_path / "redis.log", "wb") as log:
        adapter.popen(server_argv(adapter.host_ip, port, tmp_path), stdout=log, stderr=subprocess.STDOUT)
    adapter.wait_kernel_listener(port)
    cli = ["redis-cli", "-h", adapter.host_ip, "-p", str(port)]

    def toe_run(argv, **kw):
        return client_ns.toe_run(adapter, argv, **kw)

    before = commands_processed(cli, adapter.run)
    check_benchmark(toe_run(benchmark_argv(adapter.host_ip, port)), "under toe run -> redis-server (kernel)")
    after = commands_processed(cli, adapter.run)
    assert after - before >= len(EXPECTED) * REQUESTS, (before, after)
    set_get_1mb(cli, toe_run, tmp_path)
