"""The benchmark's network: a kernel peer, a plain-NIC path and an adapter path.

    ns <tag>-p   (peer)     the kernel TCP peer: the benchmark servers run here.
                            It holds the adapter's TAP (kernel side 198.18.0.1)
                            and one end of a veth pair (198.18.1.1).
    ns <tag>-k   (kernel)   the other veth end (198.18.1.2): the application
                            reaches the peer through the kernel's TCP over a
                            plain (virtual) NIC.
    ns <tag>-a   (adapter)  loopback only: the application reaches the peer
                            only through the adapter (LD_PRELOAD shim + daemon).

The application is started exactly as `toe run` starts it (the same
LD_PRELOAD/TOE_SOCK environment, `offload_daemon.client.adapter.preload_env`), but without
`toe run`'s Python start-up, which would otherwise be charged to the
application's CPU. Nothing runs in, or sends from, the root namespace.

`Testbed` creates all of it on entry and removes all of it on exit: processes
it started (by pid), the adapter (`toe down`), the namespaces.

Placement (`--pin`): `none` leaves the scheduler alone; `split` puts the
application on CPU 0 and the peer and the adapter's daemon on CPU 1 (the
adapter is a separate processor, as a card would be); `same` puts all three on
CPU 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from offload_daemon import netns
from offload_daemon.client import adapter, inspection
from offload_daemon.client.errors import CLIError
from offload_daemon.config import AdapterConfig, log_path

from .errors import BenchError

PEER_TAP_ADDR = "198.18.0.1"     # the kernel side of the adapter's TAP
ADAPTER_ADDR = "198.18.0.2"
PEER_VETH_ADDR = "198.18.1.1"
APP_VETH_ADDR = "198.18.1.2"
PATHS = ("kernel", "adapter")
PLACEMENTS = ("none", "split", "same")


@dataclasses.dataclass
class AppRun:
    """One finished application run: exit status, output, its own CPU (wait4), wall time."""

    returncode: int
    stdout: str
    stderr: str
    cpu_s: float
    wall_s: float


def placement(pin: str) -> dict[str, list[int] | None]:
    """CPU sets for app, peer and adapter under placement `pin`."""
    if pin == "none":
        return {"app": None, "peer": None, "adapter": None}
    ncpu = os.cpu_count() or 1
    if pin == "split":
        if ncpu < 2:
            raise BenchError("--pin split needs 2 CPUs; this machine has 1 (use --pin same)")
        return {"app": [0], "peer": [1], "adapter": [1]}
    if pin == "same":
        return {"app": [0], "peer": [0], "adapter": [0]}
    raise BenchError(f"unknown placement {pin!r} (choose {', '.join(PLACEMENTS)})")


def _taskset(cpus: list[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


class Testbed:
    """Namespaces, veth, adapter and peer processes for one benchmark run (a context manager)."""

    def __init__(self, pin: str = "none", offloads: bool = True, tag: str | None = None):
        self.pin = pin
        self.cpus = placement(pin)
        self.offloads = offloads
        self.tag = tag or f"tb{os.getpid() % 100000}"
        self.peer_ns, self.kernel_ns, self.adapter_ns = (f"{self.tag}-p", f"{self.tag}-k", f"{self.tag}-a")
        self.tap = f"{self.tag}t"
        self.daemon_pid: int | None = None
        self._procs: list[subprocess.Popen] = []
        self.servers: set[str] = set()  # the tools whose server runs on the peer (bench.runner)
        self._made: list[str] = []
        self._up = False

    # ------------------------------------------------------------ set-up

    def __enter__(self) -> Testbed:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _setup(self) -> None:
        cfg = AdapterConfig(tap=self.tap, netns=self.peer_ns, offloads=self.offloads)
        try:
            state = adapter.adapter_up(cfg, quiet=True)
        except CLIError as e:
            raise BenchError(f"cannot start the adapter: {e}") from None
        self._up = True
        self.daemon_pid = int(state["pid"])
        if self.cpus["adapter"]:
            os.sched_setaffinity(self.daemon_pid, self.cpus["adapter"])
        for ns in (self.kernel_ns, self.adapter_ns):
            netns.create_loopback_only(ns)
            self._made.append(ns)
        a, b = f"{self.tag}v0", f"{self.tag}v1"
        self._ip(["link", "add", a, "netns", self.peer_ns, "type", "veth", "peer", "name", b,
                  "netns", self.kernel_ns])
        for ns, dev, addr in ((self.peer_ns, a, PEER_VETH_ADDR), (self.kernel_ns, b, APP_VETH_ADDR)):
            self._ip(["-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            self._ip(["-n", ns, "link", "set", dev, "up"])

    @staticmethod
    def _ip(args: list[str]) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")

    def close(self) -> None:
        """Stop every process started here (by pid), the adapter, the namespaces."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        self.servers.clear()
        for ns in self._made:
            with contextlib.suppress(netns.NetnsError):
                netns.stop_pids(netns.pids(ns))
                netns.delete(ns)
        self._made.clear()
        if self._up:
            with contextlib.suppress(netns.NetnsError):
                netns.stop_pids([p for p in netns.pids(self.peer_ns) if p != self.daemon_pid])
            with contextlib.suppress(CLIError):
                adapter.adapter_down(self.tap, quiet=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_path(self.tap))  # the adapter was this run's own
            self._up = False

    # ------------------------------------------------------------ addresses and processes

    def peer_addr(self, path: str) -> str:
        """The peer's address as the application on `path` reaches it."""
        return PEER_VETH_ADDR if path == "kernel" else PEER_TAP_ADDR

    def app_argv(self, path: str, argv: Sequence[str]) -> list[str]:
        """argv that runs the application on `path`: its namespace, its CPU, and the shim for the adapter."""
        if path not in PATHS:
            raise BenchError(f"unknown path {path!r}")
        env: list[str] = []
        if path == "adapter":
            pre = adapter.preload_env(self.tap, {})
            env = ["env", *(f"{k}={v}" for k, v in sorted(pre.items()))]
        ns = self.kernel_ns if path == "kernel" else self.adapter_ns
        return netns.exec_argv(ns, [*_taskset(self.cpus["app"]), *env, *argv])

    def start_peer(self, argv: Sequence[str], ready: str | None = None, timeout: float = 10.0) -> subprocess.Popen:
        """Start a server in the peer namespace (pinned); wait for a line containing `ready`."""
        p = netns.popen(self.peer_ns, [*_taskset(self.cpus["peer"]), *argv], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, text=True)
        self._procs.append(p)
        if ready:
            assert p.stdout is not None
            deadline = time.monotonic() + timeout
            line = ""
            while ready not in line:
                line = p.stdout.readline()
                if not line and (p.poll() is not None or time.monotonic() > deadline):
                    raise BenchError(f"{argv[0]} did not start in the peer namespace (exit {p.poll()})")
            p.stdout.close()
        return p

    def wait_port(self, port: int, timeout: float = 10.0) -> None:
        """Wait until something listens on TCP `port` in the peer namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = netns.run(self.peer_ns, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"nothing listens on port {port} in the peer namespace after {timeout:.0f} s")

    def run_app(self, path: str, argv: Sequence[str], timeout: float) -> AppRun:
        """Run the application to completion on `path`; its CPU comes from wait4 (user + system)."""
        full = self.app_argv(path, argv)
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = _communicate_raw(p, timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            os.waitpid(p.pid, 0)
            p.returncode = -9
            raise BenchError(f"{argv[0]} on the {path} path did not finish within {timeout:.0f} s") from None
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        return AppRun(p.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                      ru.ru_utime + ru.ru_stime, wall)

    # ------------------------------------------------------------ the adapter's state

    def stat(self) -> dict[str, Any]:
        return inspection.api_call(self.tap, {"cmd": "stat"})

    def adapter_cpu_s(self) -> float:
        cpu = self.stat()["cpu"]
        return float(cpu["user_s"] + cpu["system_s"])

    def describe(self) -> dict[str, Any]:
        """Names of what this testbed made (every name starts with `tag`) and the daemon's pid."""
        return {"tag": self.tag, "peer_ns": self.peer_ns, "kernel_ns": self.kernel_ns,
                "adapter_ns": self.adapter_ns, "tap": self.tap, "daemon_pid": self.daemon_pid}


def _communicate_raw(p: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr to EOF without reaping the child (wait4 does that, for its rusage)."""
    assert p.stdout is not None and p.stderr is not None
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    bufs: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(p.args, timeout)
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    bufs[key.fd].append(chunk)
                else:
                    sel.unregister(key.fd)
    p.stdout.close()
    p.stderr.close()
    return b"".join(bufs[out_fd]), b"".join(bufs[err_fd])
