"""toe_perf (bench/toe_perf.c): results, errors and server robustness, through the kernel.

Behaviour only, no speed thresholds. Server and clients run in a loopback-only
namespace of this module's own (never in the root namespace); the server is
stopped by pid at the end. `parse_client_output` is checked without root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench import perf
from bench.perf import REQUIRED_KEYS, parse_client_output, perf_path
from offload_daemon import netns
from tests.conftest import stop, unique_port, wait_for_line

integration = pytest.mark.integration

TESTS = ["stream-send", "stream-recv", "rr", "crr", "calls-send", "calls-recv"]
DURATION_S = "0.2"


@dataclass
class PerfServer:
    ns: str
    port: int
    proc: subprocess.Popen
    exe: str

    def client(self, *args: str, port: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """`toe_perf client --host 127.0.0.1 --port <port> args...`, in the namespace."""
        argv = [self.exe, "client", "--host", "127.0.0.1", "--port", str(port or self.port), *args]
        return self.run(argv, timeout=timeout)

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return netns.run(self.ns, argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, argv: list[str]) -> subprocess.Popen:
        return _popen(self.ns, argv)


def _popen(ns: str, argv: list[str]) -> subprocess.Popen:
    return netns.popen(ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def server() -> Iterator[PerfServer]:
    try:
        exe = perf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    with netns.namespace(f"tpf{os.getpid()}") as ns:
        port = unique_port()
        proc = _popen(ns, [exe, "server", "--bind", "127.0.0.1", "--port", str(port)])
        try:
            assert wait_for_line(proc, "ready", timeout=30).strip() == f"ready {port}"
            yield PerfServer(ns, port, proc, exe)
        finally:
            stop(proc)


def _ok(res: subprocess.CompletedProcess) -> dict[str, Any]:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr.strip()}"
    assert res.stderr == ""
    assert len(res.stdout.splitlines()) == 1, res.stdout
    return parse_client_output(res.stdout)


def _check_lat(lat: dict[str, Any]) -> None:
    assert set(lat) == {"min", "p50", "p90", "p99", "mean", "max"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]


def _one_stderr_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("toe_perf: "), res.stderr
    assert res.stdout == "", "a failed run must print no result"
    return lines[0]


@integration
@pytest.mark.parametrize("size", [1, 65536])
@pytest.mark.parametrize("test", TESTS)
def test_every_test_gives_a_result(server: PerfServer, test: str, size: int) -> None:
    r = _ok(server.client("--test", test, "--size", str(size), "--duration", DURATION_S, "--verify"))
    assert set(r) == REQUIRED_KEYS
    assert (r["test"], r["size"], r["duration_s"]) == (test, size, float(DURATION_S))
    assert r["transactions"] > 0 and r["bytes"] > 0 and r["elapsed_s"] > 0
    assert r["short_calls"] >= 0 and r["cpu_user_s"] >= 0 and r["cpu_sys_s"] >= 0
    has_response = test in ("rr", "crr", "calls-recv")
    assert r["rsize"] == (size if has_response else 0)
    if test.startswith("stream"):
        assert r["lat_ns"] is None
    else:
        _check_lat(r["lat_ns"])
    per_transaction = {
        "stream-send": size,  # every message written whole, counted by the server too
        "rr": size + size,
        "crr": size + size,
        "calls-send": size,
        "calls-recv": size,
    }
    if test in per_transaction:
        assert r["bytes"] == r["transactions"] * per_transaction[test]


@integration
@pytest.mark.parametrize("test", ["rr", "crr", "calls-recv"])
def test_response_size(server: PerfServer, test: str) -> None:
    r = _ok(server.client("--test", test, "--size", "3", "--rsize", "65536", "--duration", DURATION_S, "--verify"))
    assert (r["size"], r["rsize"]) == (3, 65536)
    want = 65536 if test == "calls-recv" else 3 + 65536
    assert r["bytes"] == r["transactions"] * want
    _check_lat(r["lat_ns"])


@integration
@pytest.mark.parametrize(
    "args",
    [
        ["--test", "bogus", "--size", "1"],
        ["--test", "rr", "--size", "0"],
        ["--test", "rr", "--size", "1048577"],
        ["--test", "rr", "--size", "1", "--duration", "0"],
        ["--test", "stream-send", "--size", "1", "--rsize", "5"],
        ["--test", "rr", "--size", "1", "--frobnicate"],
        ["--test", "rr"],
    ],
)
def test_bad_client_arguments(server: PerfServer, args: list[str]) -> None:
    res = server.client(*args)
    assert res.returncode == 2, res
    _one_stderr_line(res)


@integration
@pytest.mark.parametrize(
    "argv",
    [
        ["client", "--host", "127.0.0.1", "--test", "rr", "--size", "1"],  # no --port
        ["server"],
        ["server", "--port", "1", "--test", "rr"],
        ["sideways"],
        [],
    ],
)
def test_bad_arguments(server: PerfServer, argv: list[str]) -> None:
    res = server.run([server.exe, *argv])
    assert res.returncode == 2, res
    _one_stderr_line(res)


@integration
def test_connection_refused(server: PerfServer) -> None:
    free_port = unique_port()
    assert free_port != server.port
    res = server.client("--test", "rr", "--size", "1", "--duration", DURATION_S, port=free_port)
    assert res.returncode == 1, res
    assert "refused" in _one_stderr_line(res).lower()


@integration
@pytest.mark.parametrize("test", ["stream-send", "stream-recv", "rr", "calls-recv"])
def test_server_survives_killed_client(server: PerfServer, test: str) -> None:
    argv = [server.exe, "client", "--host", "127.0.0.1", "--port", str(server.port),
            "--test", test, "--size", "65536", "--duration", "60"]
    victim = server.popen(argv)
    try:
        time.sleep(0.5)  # let it get going; not a measurement
        assert victim.poll() is None, f"client ended early: {victim.communicate()}"
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        stop(victim)
    assert server.proc.poll() is None, "the server died with its client"
    r = _ok(server.client("--test", test, "--size", "1000", "--duration", DURATION_S, "--verify"))
    assert r["transactions"] > 0


@integration
def test_server_port_zero_and_sigterm(server: PerfServer) -> None:
    proc = server.popen([server.exe, "server", "--bind", "127.0.0.1", "--port", "0"])
    try:
        port = int(wait_for_line(proc, "ready", timeout=30).split()[1])
        assert 0 < port < 65536
        _ok(server.client("--test", "crr", "--size", "10", "--duration", DURATION_S, port=port))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello\n",
        "{not json\n",
        '{"test": "rr"}\n',  # lacks keys
        '["test"]\n',
        "{}\nnoise after it\n{",
    ],
)
def test_parse_client_output_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_client_output(text)
    assert "\n" not in str(info.value)


def test_parse_client_output_takes_last_object() -> None:
    line = '{"test":"rr","size":1,"rsize":1,"duration_s":0.2,"elapsed_s":0.2,"bytes":2,"transactions":1,' \
           '"short_calls":0,"lat_ns":null,"cpu_user_s":0,"cpu_sys_s":0}'
    assert parse_client_output("starting\n{\"old\": 1}\n" + line + "\n")["bytes"] == 2


def test_perf_path_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(perf.importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
        perf_path()
