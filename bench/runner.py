"""Measurements: one client run on one path becomes one sample.

Three drivers run the same unmodified client binary on the kernel path and
on the adapter path (see `bench.testbed`):

* builtin  `bench/toe_perf` (C): stream-send, stream-recv, rr, crr and the
           per-call tests calls-send / calls-recv; the client reports its
           own CPU over the measured window (getrusage) and every latency
           percentile;
* iperf3   stream-send (`iperf3 -c`), stream-recv (`iperf3 -c -R`);
* sockperf rr (`sockperf ping-pong --full-rtt`), stream-send
           (`sockperf throughput`).

For iperf3 and sockperf the application's CPU is the whole process's, from
wait4. The adapter's CPU (the daemon's) is read from its inspection API before
and after each adapter-path run, with the per-unit counters that moved.

An adapter-path job names the adapter's `--fastpath` setting ("on": the hybrid,
"off": software-only); with several settings the plan interleaves kernel, on,
off (reversed every other repetition). Each sample records its `path`, its
`fastpath` (None on the kernel path), its `variant` ("kernel", "adapter" or
"software"; `bench.report.VARIANTS`), the adapter's `poll_us` and the client's spin
(`app_poll_us`).

A sample is a flat dict (see `bench.report` for the fields); a failed run
raises `BenchError` with the client's last stderr line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from . import perf, report
from .errors import BenchError
from .testbed import FASTPATHS, PATHS, Testbed

TESTS = ("stream-send", "stream-recv", "rr", "crr", "calls-send", "calls-recv")
TOOLS = ("builtin", "iperf3", "sockperf")
TOOL_TESTS = {
    "builtin": TESTS,
    "iperf3": ("stream-send", "stream-recv"),
    "sockperf": ("stream-send", "rr"),
}
SOCKPERF_MIN_SIZE = 14  # sockperf's message header
PORTS = {"builtin": 5201 + 1000, "iperf3": 5201, "sockperf": 11111}
SIDES = ("client", "server")
APP_SERVER_PORT = 5201 + 2000   # the builtin server as the application under test (side "server")
# counters of the adapter's units whose change is kept with each adapter-path sample
UNIT_COUNTERS = {
    "tap_port": ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes"),
    "tx_hdrgen": ("segments",),
    "ack_gen": ("pure_acks",),
    "buffer_pool": ("allocations", "dma_mappings"),
    "host_if": ("commands",),
    "tcp": ("active_opens", "passive_opens"),
}
# totals of the adapter whose change is kept too: data segments through the units vs the software
TOTAL_COUNTERS = ("data_segments_fast", "data_segments_software")


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement to make: test × size on one path (on the adapter: with `fastpath`), repetition `rep`."""

    scenario: str
    test: str
    tool: str
    size: int
    path: str
    rep: int
    duration_s: float
    fastpath: str | None = None  # the adapter's --fastpath ("on"/"off"); None on the kernel path
    side: str = "client"         # the application under test: the client, or the server (SIDES)

    @property
    def variant(self) -> str:
        return report.variant_name(self.path, self.fastpath)


def check_job(tool: str, test: str, size: int, side: str = "client") -> None:
    """Raise BenchError (one line) when `tool` cannot run `test` at `size` (on `side`)."""
    if side not in SIDES:
        raise BenchError(f"unknown side {side!r} (choose {', '.join(SIDES)})")
    if side == "server" and tool != "builtin":
        raise BenchError(f"--side server runs the builtin server under test (not {tool})")
    if side == "server" and test.startswith("calls-"):
        raise BenchError(f"--side server does not do {test} (a client's per-call test)")
    if tool not in TOOLS:
        raise BenchError(f"unknown tool {tool!r} (choose {', '.join(TOOLS)})")
    if test not in TOOL_TESTS[tool]:
        raise BenchError(f"--tool {tool} does not do {test} (it does {', '.join(TOOL_TESTS[tool])}); "
                         f"use the builtin client")
    if tool == "sockperf" and size < SOCKPERF_MIN_SIZE:
        raise BenchError(f"sockperf's smallest message is {SOCKPERF_MIN_SIZE} bytes (asked for {size})")
    if not 1 <= size <= 1 << 20:
        raise BenchError(f"message size {size} is out of range 1..1048576")


def legs(paths: tuple[str, ...], fastpath: tuple[str, ...] = ("on",)) -> tuple[tuple[str, str | None], ...]:
    """(path, fastpath) of each run per repetition: the adapter path once per fastpath setting."""
    bad = [f for f in fastpath if f not in FASTPATHS]
    if bad or not fastpath:
        raise BenchError(f"unknown fastpath setting {', '.join(bad) or '(none)'} (choose on, off)")
    out: list[tuple[str, str | None]] = []
    for path in paths:
        if path not in PATHS:
            raise BenchError(f"unknown path {path!r}")
        out += [(path, fp) for fp in dict.fromkeys(fastpath)] if path == "adapter" else [(path, None)]
    return tuple(out)


def jobs(scenario: str, tool: str, tests: list[str], sizes: list[int], paths: tuple[str, ...],
         repeat: int, duration_s: float, fastpath: tuple[str, ...] = ("on",),
         side: str = "client") -> Iterator[Job]:
    """Every run of a plan, interleaved: for each repetition, test and size, one run per path
    and, on the adapter path, per fastpath setting (kernel, on, off; the order reverses
    between repetitions, so drift hits all alike)."""
    each = legs(paths, fastpath)
    for rep in range(repeat):
        for test in tests:
            for size in sizes:
                order = each if rep % 2 == 0 else tuple(reversed(each))
                for path, fp in order:
                    yield Job(scenario, test, tool, size, path, rep, duration_s, fp, side)


class Runner:
    """Runs jobs on a testbed; starts each tool's server on the peer the first time it is needed."""

    def __init__(self, tb: Testbed):
        self.tb = tb

    def _server(self, tool: str) -> int:
        port = PORTS[tool]
        if tool in self.tb.servers:
            return port
        if tool == "builtin":
            self.tb.start_peer([perf.perf_path(), "server", "--port", str(port)], ready="ready")
        elif tool == "iperf3":
            self.tb.start_peer(["iperf3", "-s", "-p", str(port)])
            self.tb.wait_port(port)
        else:
            self.tb.start_peer(["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(port)])
            self.tb.wait_port(port)
        self.tb.servers.add(tool)
        return port

    def run(self, job: Job) -> dict[str, Any]:
        check_job(job.tool, job.test, job.size, job.side)
        if job.path not in PATHS:
            raise BenchError(f"unknown path {job.path!r}")
        fp = (job.fastpath or self.tb.fastpaths[0]) if job.path == "adapter" else None
        job = dataclasses.replace(job, fastpath=fp)
        where = f"the {job.path} path" + (f" (fastpath {fp})" if fp else "")
        timeout = job.duration_s * 3 + 30
        server = None
        if job.side == "server":
            # the application under test is the server, on the path; the client is the peer's
            server = self.tb.start_app(job.path, [perf.perf_path(), "server", "--port", str(APP_SERVER_PORT)],
                                       ready="ready", fastpath=fp)
            argv, parse = DRIVERS[job.tool](self.tb.app_addr(job.path, fp), APP_SERVER_PORT, job)
        else:
            port = self._server(job.tool)
            argv, parse = DRIVERS[job.tool](self.tb.peer_addr(job.path, fp), port, job)
        before = self._adapter_snapshot(fp) if job.path == "adapter" else None
        if server is not None:
            res = self.tb.run_peer(argv, timeout=timeout)
            after = self._adapter_snapshot(fp) if before is not None else None
            res.cpu_s = self.tb.stop_app(server)      # the application's CPU: the server's
        else:
            res = self.tb.run_app(job.path, argv, timeout=timeout, fastpath=fp)
            after = self._adapter_snapshot(fp) if before is not None else None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"{argv[0].rsplit('/', 1)[-1]} {job.test} {job.size} B on {where} "
                             f"failed (exit {res.returncode}): {last}")
        try:
            m = parse(res.stdout)
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{job.tool} {job.test} on {where}: cannot read its output ({e})") from None
        if m.get("app_cpu_s") is None or server is not None:
            m["app_cpu_s"] = res.cpu_s
        extra = m.setdefault("extra", {})
        extra["app_cpu_s_process"] = round(res.cpu_s, 6)
        if before is not None and after is not None:
            m["adapter_cpu_s"] = after["cpu"] - before["cpu"]
            for k, v in after.items():
                if k != "cpu":
                    extra[f"adapter.{k}"] = v - before[k]
        if job.path != "adapter":
            return make_sample(job, m)
        return make_sample(job, m, poll_us=self.tb.poll_us, app_poll_us=self.tb.app_poll_us)

    def _adapter_snapshot(self, fastpath: str | None = None) -> dict[str, float]:
        st = self.tb.stat(fastpath)
        snap = {"cpu": float(st["cpu"]["user_s"] + st["cpu"]["system_s"])}
        for unit, names in UNIT_COUNTERS.items():
            for n in names:
                snap[f"{unit}.{n}"] = float(st["units"][unit].get(n, 0))
        totals = st.get("totals") or {}
        for n in TOTAL_COUNTERS:
            if isinstance(totals.get(n), int | float):
                snap[f"totals.{n}"] = float(totals[n])
        return snap


def make_sample(job: Job, m: dict[str, Any], poll_us: int | None = None,
                app_poll_us: int | None = None) -> dict[str, Any]:
    """The sample for `job` from a driver's measurement `m` (bytes, elapsed_s, transactions,
    lat_us, app_cpu_s, optional throughput_bps, adapter_cpu_s, extra): derived rates filled in.
    `fastpath`, `variant`, `poll_us` and `app_poll_us` say which adapter (its units' busy
    poll, the client's spin) it measured."""
    elapsed = float(m["elapsed_s"])
    nbytes = int(m.get("bytes") or 0)
    tx = m.get("transactions")
    cpu = float(m["app_cpu_s"])
    thr = m.get("throughput_bps")
    if thr is None and job.test.startswith("stream") and elapsed > 0:
        thr = nbytes * 8 / elapsed
    return {
        "scenario": job.scenario, "test": job.test, "tool": job.tool, "side": job.side, "path": job.path,
        "fastpath": job.fastpath if job.path == "adapter" else None, "variant": job.variant,
        "poll_us": poll_us if job.path == "adapter" else None,
        "app_poll_us": app_poll_us if job.path == "adapter" else None,
        "size": job.size, "rep": job.rep, "duration_s": job.duration_s,
        "elapsed_s": elapsed, "bytes": nbytes, "transactions": tx,
        "throughput_bps": thr,
        "tps": tx / elapsed if tx and elapsed > 0 else None,
        "lat_us": m.get("lat_us"),
        "app_cpu_s": cpu,
        "app_cpu_util": cpu / elapsed if elapsed > 0 else None,
        "app_cpu_s_per_gb": cpu / (nbytes / 1e9) if nbytes else None,
        "app_cpu_us_per_tx": cpu / tx * 1e6 if tx else None,
        "adapter_cpu_s": m.get("adapter_cpu_s"),
        "adapter_cpu_us_per_tx": m["adapter_cpu_s"] / tx * 1e6 if tx and m.get("adapter_cpu_s") is not None else None,
        # control-channel round trips per transaction (crr: per connection), the adapter's count
        "round_trips_per_tx": (m.get("extra", {}).get("adapter.host_if.commands", 0) / tx
                               if tx and "adapter.host_if.commands" in m.get("extra", {}) else None),
        "extra": m.get("extra", {}),
    }


# ------------------------------------------------------------------ drivers
# Each returns (argv, parse): parse(stdout) -> measurement dict for make_sample.

Parse = Callable[[str], dict[str, Any]]


def _builtin(addr: str, port: int, job: Job) -> tuple[list[str], Parse]:
    argv = [perf.perf_path(), "client", "--host", addr, "--port", str(port), "--test", job.test,
            "--size", str(job.size), "--duration", f"{job.duration_s:g}"]

    def parse(out: str) -> dict[str, Any]:
        r = perf.parse_client_output(out)
        lat = r.get("lat_ns")
        return {
            "bytes": r["bytes"], "elapsed_s": r["elapsed_s"],
            "transactions": r.get("transactions") if job.test not in ("stream-send", "stream-recv") else None,
            "lat_us": {k: v / 1000 for k, v in lat.items()} if lat else None,
            "app_cpu_s": r["cpu_user_s"] + r["cpu_sys_s"],
            "extra": {"short_calls": r.get("short_calls", 0)},
        }
    return argv, parse


def _whole_seconds(d: float) -> str:
    return str(max(1, round(d)))


def _iperf3(addr: str, port: int, job: Job) -> tuple[list[str], Parse]:
    argv = ["iperf3", "-c", addr, "-p", str(port), "-t", _whole_seconds(job.duration_s),
            "-l", str(job.size), "-J"]
    if job.test == "stream-recv":
        argv.append("-R")

    def parse(out: str) -> dict[str, Any]:
        end = json.loads(out)["end"]
        rcv = end["sum_received"]
        return {"bytes": int(rcv["bytes"]), "elapsed_s": float(rcv["seconds"]),
                "throughput_bps": float(rcv["bits_per_second"]), "transactions": None, "lat_us": None,
                "app_cpu_s": None,  # the whole process's, from wait4
                "extra": {"iperf3_host_cpu_pct": end["cpu_utilization_percent"]["host_total"],
                          "retransmits": end.get("sum_sent", {}).get("retransmits", 0)}}
    return argv, parse


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _sockperf_field(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise ValueError(f"no {pattern!r} in sockperf's output")
    return float(m.group(1))


def _sockperf(addr: str, port: int, job: Job) -> tuple[list[str], Parse]:
    common = ["--tcp", "-i", addr, "-p", str(port), "-t", _whole_seconds(job.duration_s), "-m", str(job.size)]
    if job.test == "rr":
        argv = ["sockperf", "ping-pong", *common, "--full-rtt"]
    else:
        argv = ["sockperf", "throughput", *common]

    def parse(out: str) -> dict[str, Any]:
        text = _ANSI.sub("", out)
        if job.test == "rr":
            run_s = _sockperf_field(text, r"\[Valid Duration\] RunTime=([\d.]+) sec")
            n = int(_sockperf_field(text, r"\[Valid Duration\].*ReceivedMessages=(\d+)"))
            lat = {"min": _sockperf_field(text, r"<MIN> observation =\s*([\d.]+)"),
                   "p50": _sockperf_field(text, r"percentile 50\.000 =\s*([\d.]+)"),
                   "p90": _sockperf_field(text, r"percentile 90\.000 =\s*([\d.]+)"),
                   "p99": _sockperf_field(text, r"percentile 99\.000 =\s*([\d.]+)"),
                   "mean": _sockperf_field(text, r"Round trip is ([\d.]+) usec"),
                   "max": _sockperf_field(text, r"<MAX> observation =\s*([\d.]+)")}
            return {"bytes": 2 * n * job.size, "elapsed_s": run_s, "transactions": n, "lat_us": lat,
                    "app_cpu_s": None}
        run_s = _sockperf_field(text, r"Total of \d+ messages sent in ([\d.]+) sec")
        n = int(_sockperf_field(text, r"Total of (\d+) messages sent"))
        mbps = _sockperf_field(text, r"BandWidth is [\d.]+ MBps \(([\d.]+) Mbps\)")
        return {"bytes": n * job.size, "elapsed_s": run_s, "throughput_bps": mbps * 1e6,
                "transactions": None, "lat_us": None, "app_cpu_s": None}
    return argv, parse


DRIVERS: dict[str, Callable[[str, int, Job], tuple[list[str], Parse]]] = {
    "builtin": _builtin, "iperf3": _iperf3, "sockperf": _sockperf,
}


def run_jobs(tb: Testbed, plan: list[Job], console: Any) -> list[dict[str, Any]]:
    """Run every job with a progress bar (on stderr, only on a terminal); fail on the first error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    r = Runner(tb)
    samples = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(plan))
        for job in plan:
            progress.update(task, description=f"{job.test} {report.fmt_size(job.size)} "
                            f"{report.VARIANT_LABELS[job.variant]} (rep {job.rep + 1})")
            samples.append(r.run(job))
            progress.advance(task)
    return samples
