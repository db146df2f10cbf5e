"""Fixtures for tests that run real adapters in network namespaces.

* `adapter` / `adapter_factory`: a fresh namespace created by `toe up --netns`
  (so `toe down` deletes it), with the TAP's kernel side as the peer host.
* `client_ns`: a loopback-only namespace for programs under `toe run`; from
  there, only the adapter can reach 198.18.0.0/24.

Names (namespaces, TAPs) and ports carry this process's pid, so concurrent
runs do not collide. Every fixture stops what it started (processes by pid),
deletes its namespaces and checks that they are gone, also when a test fails.

Integration tests are marked `integration`: they need root and /dev/net/tun
and are skipped without them, except under CI (CI set), where a missing
prerequisite is a failure: CI must not pass by skipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from offload_daemon import netns
from offload_daemon.config import AdapterConfig, api_path, ctl_path, log_path, state_path

PID = os.getpid()
_seq = itertools.count(1)
BIG_BYTES = 100 * 1024 * 1024


def unique(prefix: str) -> str:
    """A name unique to this test process: prefix + pid + counter."""
    return f"{prefix}{PID}x{next(_seq)}"


def unique_port() -> int:
    """A port derived from the pid, different for each call (namespaces are per test anyway)."""
    return 20000 + (PID * 7 + next(_seq)) % 40000


def toe_cmd() -> list[str]:
    """How to invoke `toe`: $TOE_CMD, else the console script beside this Python, else -m."""
    if os.environ.get("TOE_CMD"):
        return shlex.split(os.environ["TOE_CMD"])
    script = Path(sys.executable).with_name("toe")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "offload_daemon.cli"]


def run_toe(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([*toe_cmd(), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until truthy; fail (not hang) after `timeout` s. A guard, not a measurement."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> str:
    """Read proc.stdout (a pipe) until a line contains `marker`; fail if the process ends first.

    Reads the pipe's fd directly, so use nothing else to read that stdout.
    """
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            complete = buf[: buf.rfind(b"\n") + 1]  # only whole lines: a write may arrive in pieces
            for line in complete.decode(errors="replace").splitlines():
                if marker in line:
                    return line
        elif proc.poll() is not None:
            break
    tail = buf.decode(errors="replace").splitlines()[-5:]
    pytest.fail(f"{proc.args!r} did not print {marker!r} (exit {proc.poll()}); last output: {tail}")


def stop(proc: subprocess.Popen) -> None:
    """Stop one process we started, by pid: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


# ---------------------------------------------------------------- prerequisites


def integration_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (TUN/TAP support)"
    if not shutil.which("ip"):
        return "needs the ip command (apt-get install iproute2)"
    return None


def require_tools(*names: str) -> None:
    """Skip (fail under CI) when a program the test drives is not installed."""
    missing = [n for n in names if not shutil.which(n)]
    if missing:
        msg = f"needs {', '.join(missing)} (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration"):
        problem = integration_problem()
        if problem:
            if os.environ.get("CI"):
                pytest.fail(f"integration test {problem}")
            pytest.skip(f"integration test {problem}")


# ---------------------------------------------------------------- namespaces


@dataclass
class _Procs:
    """Processes a fixture started; stopped (by pid) in reverse order at teardown."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()


@dataclass
class Adapter:
    """A running adapter in its own namespace (made by `toe up --netns`)."""

    netns: str
    tap: str
    addr: str
    host_addr: str
    procs: _Procs = field(default_factory=_Procs)

    @property
    def ip(self) -> str:
        """The adapter's own address (what programs under `toe run` use)."""
        return self.addr.split("/")[0]

    @property
    def host_ip(self) -> str:
        """The kernel side of the TAP: the peer host, in the adapter's namespace."""
        return self.host_addr.split("/")[0]

    def run(self, argv: Sequence[str], timeout: float = 240, **kw: Any) -> subprocess.CompletedProcess:
        """Run a program in the adapter's namespace (the kernel peer's side)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return netns.run(self.netns, argv, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a program in the adapter's namespace; stopped at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return self.procs.add(netns.popen(self.netns, argv, **kw))

    def stat(self) -> dict[str, Any]:
        """`toe stat --json` of this adapter."""
        res = run_toe("stat", "--tap", self.tap, "--json", timeout=60)
        assert res.returncode == 0, f"toe stat failed: {res.stderr.strip()}"
        return json.loads(res.stdout)

    def wait_kernel_listener(self, port: int) -> None:
        """Wait until a kernel socket listens on `port` in the adapter's namespace."""
        def listening() -> bool:
            out = self.run(["ss", "-Hltn", f"sport = :{port}"], text=True, timeout=30).stdout
            return bool(out.strip())
        wait_until(listening, f"a kernel listener on port {port} in {self.netns}")

    def wait_toe_listener(self, port: int) -> dict[str, Any]:
        """Wait until the adapter reports a listener on `port` (stat's `listeners`)."""
        def listener() -> dict[str, Any] | None:
            for row in self.stat().get("listeners") or []:
                if str(row.get("local", "")).endswith(f":{port}"):
                    return row
            return None
        return wait_until(listener, f"an adapter listener on port {port}")


def teardown_adapter(ad: Adapter) -> list[str]:
    """Stop everything of `ad`; return what went wrong (empty when clean)."""
    problems: list[str] = []
    ad.procs.stop_all()
    daemon_pid = None
    with contextlib.suppress(OSError, ValueError):
        with open(state_path(ad.tap)) as f:
            daemon_pid = json.load(f).get("pid")
    stragglers = [p for p in netns.pids(ad.netns) if p != daemon_pid]
    if stragglers:
        netns.stop_pids(stragglers)
    res = run_toe("down", "--tap", ad.tap, timeout=120)
    if res.returncode != 0:
        problems.append(f"toe down --tap {ad.tap}: {res.stderr.strip()}")
        if isinstance(daemon_pid, int):  # do it ourselves, by pid
            netns.stop_pids([daemon_pid])
    if netns.exists(ad.netns):
        problems.append(f"namespace {ad.netns} still exists after toe down")
        netns.stop_pids(netns.pids(ad.netns))
        netns.delete(ad.netns)
    left = [p for p in (state_path(ad.tap), ctl_path(ad.tap), api_path(ad.tap)) if os.path.exists(p)]
    if left:
        problems.append(f"files left after toe down: {', '.join(left)}")
        for p in left:
            with contextlib.suppress(OSError):
                os.unlink(p)
    with contextlib.suppress(OSError):
        os.unlink(log_path(ad.tap))
    return problems


@pytest.fixture
def adapter_factory() -> Iterator[Callable[..., Adapter]]:
    """make(*extra_toe_up_args) -> Adapter: `toe up --netns <unique>` with extra flags."""
    made: list[Adapter] = []

    def make(*extra: str) -> Adapter:
        ns, tap = unique("toe-t"), unique("tt")
        res = run_toe("up", "--netns", ns, "--tap", tap, *extra)
        if res.returncode != 0:
            if netns.exists(ns):  # toe up must clean up after a failed start; make sure anyway
                netns.delete(ns)
                pytest.fail(f"toe up failed and left namespace {ns}: {res.stderr.strip()}")
            pytest.fail(f"toe up failed: {res.stderr.strip()}")
        ad = Adapter(netns=ns, tap=tap, addr=AdapterConfig.addr, host_addr=AdapterConfig.host_addr)
        made.append(ad)
        assert netns.exists(ns), f"toe up did not create namespace {ns}"
        return ad

    problems: list[str] = []
    try:
        yield make
    finally:
        for ad in reversed(made):
            problems += teardown_adapter(ad)
    if problems:
        pytest.fail("adapter teardown: " + "; ".join(problems))


@pytest.fixture
def adapter(adapter_factory: Callable[..., Adapter]) -> Adapter:
    return adapter_factory()


@dataclass
class ClientNs:
    """A loopback-only namespace for the programs under test."""

    name: str
    procs: _Procs = field(default_factory=_Procs)

    def argv(self, argv: Sequence[str], adapter: Adapter | None = None) -> list[str]:
        inner = [*toe_cmd(), "run", "--tap", adapter.tap, "--", *argv] if adapter else list(argv)
        return netns.exec_argv(self.name, inner)

    def run(self, argv: Sequence[str], timeout: float = 240, **kw: Any) -> subprocess.CompletedProcess:
        """Run a program in this namespace, NOT under toe run."""
        kw.setdefault("capture_output", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(argv), timeout=timeout, **kw)

    def toe_run(self, adapter: Adapter, argv: Sequence[str], timeout: float = 240,
                **kw: Any) -> subprocess.CompletedProcess:
        """`toe run --tap <adapter> -- argv` in this namespace."""
        kw.setdefault("capture_output", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(argv, adapter), timeout=timeout, **kw)

    def toe_popen(self, adapter: Adapter, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start `toe run -- argv` in this namespace (same pid as the program); stopped at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return self.procs.add(subprocess.Popen(self.argv(argv, adapter), **kw))


@pytest.fixture
def client_ns() -> Iterator[ClientNs]:
    name = unique("toe-c")
    netns.create_loopback_only(name)
    client = ClientNs(name)
    try:
        yield client
    finally:
        client.procs.stop_all()
        netns.stop_pids(netns.pids(name))
        netns.delete(name)
    assert not netns.exists(name), f"namespace {name} still exists"


# ---------------------------------------------------------------- data


@pytest.fixture(scope="session")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 100 MB random file named `blob` (in a directory of its own) and its sha256."""
    d = tmp_path_factory.mktemp("srv")
    path = d / "blob"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG_BYTES >> 20):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return path, h.hexdigest()
