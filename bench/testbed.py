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

Fastpath (`fastpath`): the adapter's `--fastpath` setting, one adapter per
setting asked for. ("on",) is the default; ("on", "off") runs two adapters side
by side in the peer namespace, the hybrid on TAP <tag>t (198.18.0.0/24) and the
software-only one on TAP <tag>u (198.18.2.0/24), so that one run interleaves
kernel, hybrid and software-only; ("off",) is one software-only adapter on
<tag>t. `poll_us`, when given, goes to every adapter (`toe up --poll-us`) and, as
TOE_POLL_US, to the application on the adapter path; None leaves the adapters'
default (the units poll AdapterConfig.poll_us, the application does not spin).
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
FASTPATHS = ("on", "off")
# the adapters' subnets, in the order of the fastpath settings asked for (198.18.1.0/24 is the veth)
ADAPTER_NETS = ("198.18.0", "198.18.2")


@dataclasses.dataclass
class AdapterInfo:
    """One adapter of the testbed: its --fastpath setting, TAP, addresses and daemon."""

    fastpath: str
    tap: str
    host_addr: str       # the kernel side of its TAP (the peer as the application reaches it)
    addr: str            # the adapter's own address
    daemon_pid: int | None = None
    fastpath_active: bool | None = None  # what the daemon says it runs (--pcap would turn it off)


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

    def __init__(self, pin: str = "none", offloads: bool = True, tag: str | None = None,
                 fastpath: Sequence[str] = ("on",), poll_us: int | None = None, buffer_reuse: bool = True,
                 procs: int = 1):
        self.pin = pin
        if procs not in (1, 2):
            raise BenchError(f"fastpath processors {procs}: choose 1 or 2")
        self.procs = procs
        self.buffer_reuse = buffer_reuse
        self.cpus = placement(pin)
        self.offloads = offloads
        fastpaths = tuple(dict.fromkeys(fastpath))
        bad = [f for f in fastpaths if f not in FASTPATHS]
        if bad or not fastpaths:
            raise BenchError(f"unknown fastpath setting {', '.join(bad) or '(none)'} (choose on, off)")
        if poll_us is not None and not 0 <= poll_us <= 1_000_000:
            raise BenchError(f"poll_us {poll_us} is out of range 0..1000000")
        self.fastpaths: tuple[str, ...] = fastpaths
        # the units' busy poll, and the application's spin in blocking receives
        self.poll_asked = poll_us
        self.poll_us = AdapterConfig.poll_us if poll_us is None else poll_us
        self.app_poll_us = AdapterConfig.app_poll_us if poll_us is None else poll_us
        self.tag = tag or f"tb{os.getpid() % 100000}"
        self.peer_ns, self.kernel_ns, self.adapter_ns = (f"{self.tag}-p", f"{self.tag}-k", f"{self.tag}-a")
        self.adapters: dict[str, AdapterInfo] = {
            fp: AdapterInfo(fp, f"{self.tag}{'tu'[i]}", f"{ADAPTER_NETS[i]}.1", f"{ADAPTER_NETS[i]}.2")
            for i, fp in enumerate(self.fastpaths)}
        self.tap = self.adapters[self.fastpaths[0]].tap  # the first adapter's (the only one by default)
        self.daemon_pid: int | None = None
        self._procs: list[subprocess.Popen] = []
        self.servers: set[str] = set()  # the tools whose server runs on the peer (bench.runner)
        self._made: list[str] = []
        self._up_taps: list[str] = []  # adapters started, in order (torn down in reverse)

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
        # the first adapter creates the peer namespace (its `toe down` deletes it); the second joins it
        for fp in self.fastpaths:
            a = self.adapters[fp]
            cfg = AdapterConfig(tap=a.tap, netns=self.peer_ns, offloads=self.offloads, addr=f"{a.addr}/24",
                                host_addr=f"{a.host_addr}/24", fastpath=fp == "on", poll_us=self.poll_us,
                                app_poll_us=self.app_poll_us,
                                buffer_reuse=self.buffer_reuse, fastpath_procs=self.procs)
            try:
                state = adapter.adapter_up(cfg, quiet=True)
            except CLIError as e:
                raise BenchError(f"cannot start the adapter (fastpath {fp}): {e}") from None
            self._up_taps.append(a.tap)
            a.daemon_pid = int(state["pid"])
            a.fastpath_active = bool(state.get("fastpath", fp == "on"))
            if a.fastpath_active != (fp == "on"):
                raise BenchError(f"adapter {a.tap} was asked for fastpath {fp} but runs it "
                                 f"{'on' if a.fastpath_active else 'off'}")
            if self.cpus["adapter"]:
                os.sched_setaffinity(a.daemon_pid, self.cpus["adapter"])
        self.daemon_pid = self.adapters[self.fastpaths[0]].daemon_pid
        for ns in (self.kernel_ns, self.adapter_ns):
            netns.create_loopback_only(ns)
            self._made.append(ns)
        v0, v1 = f"{self.tag}v0", f"{self.tag}v1"
        self._ip(["link", "add", v0, "netns", self.peer_ns, "type", "veth", "peer", "name", v1,
                  "netns", self.kernel_ns])
        for ns, dev, addr in ((self.peer_ns, v0, PEER_VETH_ADDR), (self.kernel_ns, v1, APP_VETH_ADDR)):
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
        if self._up_taps:
            daemons = {a.daemon_pid for a in self.adapters.values()}
            with contextlib.suppress(netns.NetnsError):
                netns.stop_pids([p for p in netns.pids(self.peer_ns) if p not in daemons])
            for tap in reversed(self._up_taps):  # the first one made the namespace: it goes last
                with contextlib.suppress(CLIError):
                    adapter.adapter_down(tap, quiet=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(log_path(tap))  # the adapter was this run's own
            self._up_taps.clear()

    # ------------------------------------------------------------ addresses and processes

    def adapter(self, fastpath: str | None = None) -> AdapterInfo:
        """The adapter with `fastpath` (None: the first one)."""
        fp = fastpath or self.fastpaths[0]
        if fp not in self.adapters:
            raise BenchError(f"this testbed has no adapter with fastpath {fp} "
                             f"(it has {', '.join(self.fastpaths)})")
        return self.adapters[fp]

    def app_addr(self, path: str, fastpath: str | None = None) -> str:
        """The application's address as the peer reaches it on `path` (the application as
        the server: its veth end, or the adapter's own address)."""
        return APP_VETH_ADDR if path == "kernel" else self.adapter(fastpath).addr

    def peer_addr(self, path: str, fastpath: str | None = None) -> str:
        """The peer's address as the application on `path` (and adapter `fastpath`) reaches it."""
        return PEER_VETH_ADDR if path == "kernel" else self.adapter(fastpath).host_addr

    def app_env(self, fastpath: str | None = None) -> dict[str, str]:
        """What the application on the adapter path gets: `toe run`'s LD_PRELOAD/TOE_SOCK, TOE_POLL_US."""
        env = adapter.preload_env(self.adapter(fastpath).tap, {})
        if self.app_poll_us:
            env["TOE_POLL_US"] = str(self.app_poll_us)
        return env

    def app_argv(self, path: str, argv: Sequence[str], fastpath: str | None = None) -> list[str]:
        """argv that runs the application on `path`: its namespace, its CPU, and the shim for the adapter."""
        if path not in PATHS:
            raise BenchError(f"unknown path {path!r}")
        env: list[str] = []
        if path == "adapter":
            env = ["env", *(f"{k}={v}" for k, v in sorted(self.app_env(fastpath).items()))]
        ns = self.kernel_ns if path == "kernel" else self.adapter_ns
        return netns.exec_argv(ns, [*_taskset(self.cpus["app"]), *env, *argv])

    def start_peer(self, argv: Sequence[str], ready: str | None = None, timeout: float = 10.0) -> subprocess.Popen:
        """Start a server in the peer namespace (pinned); wait for a line containing `ready`."""
        p = netns.popen(self.peer_ns, [*_taskset(self.cpus["peer"]), *argv], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, text=True)
        self._procs.append(p)
        if ready:
            _wait_ready(p, ready, timeout, f"{argv[0]} did not start in the peer namespace")
        return p

    def start_app(self, path: str, argv: Sequence[str], ready: str, fastpath: str | None = None,
                  timeout: float = 10.0) -> subprocess.Popen:
        """Start the application as a server on `path` (`app_argv`); wait for a line containing
        `ready` on its stdout. `stop_app` ends it and gives its CPU."""
        p = subprocess.Popen(self.app_argv(path, argv, fastpath), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._procs.append(p)
        _wait_ready(p, ready, timeout, f"{argv[0]} did not start on the {path} path")
        return p

    def stop_app(self, p: subprocess.Popen) -> float:
        """SIGTERM to a server `start_app` started; its CPU (user + system, wait4)."""
        p.terminate()
        try:
            _, _status, ru = os.wait4(p.pid, 0)
        except ChildProcessError:
            return 0.0
        p.returncode = 0
        self._procs.remove(p)
        return ru.ru_utime + ru.ru_stime

    def run_peer(self, argv: Sequence[str], timeout: float) -> AppRun:
        """Run a client in the peer namespace (pinned as the peer) to completion."""
        full = netns.exec_argv(self.peer_ns, [*_taskset(self.cpus["peer"]), *argv])
        return _run_to_end(full, argv[0], "the peer", timeout)

    def wait_port(self, port: int, timeout: float = 10.0) -> None:
        """Wait until something listens on TCP `port` in the peer namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = netns.run(self.peer_ns, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"nothing listens on port {port} in the peer namespace after {timeout:.0f} s")

    def run_app(self, path: str, argv: Sequence[str], timeout: float, fastpath: str | None = None) -> AppRun:
        """Run the application to completion on `path`; its CPU comes from wait4 (user + system)."""
        return _run_to_end(self.app_argv(path, argv, fastpath), argv[0], f"the {path} path", timeout)

    # ------------------------------------------------------------ the adapter's state

    def stat(self, fastpath: str | None = None) -> dict[str, Any]:
        return inspection.api_call(self.adapter(fastpath).tap, {"cmd": "stat"})

    def adapter_cpu_s(self, fastpath: str | None = None) -> float:
        cpu = self.stat(fastpath)["cpu"]
        return float(cpu["user_s"] + cpu["system_s"])

    def adapter_options(self) -> dict[str, Any]:
        """The adapters' own options for this run: fastpath ("on", "off" or "both"), poll_us
        (the units'), app_poll_us (the application's spin) and the hybrid's processors."""
        fp = "both" if len(self.fastpaths) > 1 else self.fastpaths[0]
        return {"fastpath": fp, "poll_us": self.poll_us, "app_poll_us": self.app_poll_us,
                "fastpath_procs": self.procs}

    def describe(self) -> dict[str, Any]:
        """Names of what this testbed made (every name starts with `tag`) and the daemons' pids."""
        return {"tag": self.tag, "peer_ns": self.peer_ns, "kernel_ns": self.kernel_ns,
                "adapter_ns": self.adapter_ns, "tap": self.tap, "daemon_pid": self.daemon_pid,
                "adapters": [dataclasses.asdict(self.adapters[fp]) for fp in self.fastpaths]}


def _wait_ready(p: subprocess.Popen, ready: str, timeout: float, failed: str) -> None:
    """Read p's stdout until a line containing `ready` (BenchError `failed` if it exits or
    the time runs out first), then close it."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while ready not in line:
        line = p.stdout.readline()
        if not line and (p.poll() is not None or time.monotonic() > deadline):
            raise BenchError(f"{failed} (exit {p.poll()})")
    p.stdout.close()


def _run_to_end(full: list[str], name: str, where: str, timeout: float) -> AppRun:
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = _communicate_raw(p, timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        os.waitpid(p.pid, 0)
        p.returncode = -9
        raise BenchError(f"{name} on {where} did not finish within {timeout:.0f} s") from None
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return AppRun(p.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                  ru.ru_utime + ru.ru_stime, wall)


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
