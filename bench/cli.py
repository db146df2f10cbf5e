"""`toe bench`: the adapter measured against the kernel, in one run, as ratios.

    toe bench stream|rr|crr [--size N | --sizes LIST] [--duration S] [--repeat K]
                            [--tool builtin|iperf3|sockperf] [--side client|server]
                            [--pin [none|split|same]]
                            [--fastpath on|off|both] [--poll-us N]
                            [--no-offloads] [--out DIR]
    toe bench seeds [--only 000,003,002,001] [--sizes LIST] [--duration S] [--repeat K] ...
    toe bench compare A.json B.json

Each run builds its own testbed (namespaces, veth, adapter; `bench.testbed`),
runs every job interleaved (kernel, adapter, kernel, ...), prints a table
with the ratios and the issue's targets, and writes results.json, results.csv
and PNG plots to --out (default results/bench-<time>/).

--fastpath picks the adapter (`toe up --fastpath`): on (the hybrid, default),
off (software-only), both (kernel, hybrid and software-only interleaved, two
adapters side by side). --poll-us N goes to the adapter (`toe up --poll-us N`)
and to the client (TOE_POLL_US=N); without it the adapter polls as `toe up` does
by default and the client does not spin. The targets are the hybrid's. --side server puts the
builtin server under test (the peer runs the client): a server's passive opens, accept()
and closes, reported as scenario "<kind>-server".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
from typing import Any

from offload_daemon.client.env import require_root, require_tun
from offload_daemon.client.errors import ranged
from offload_daemon.config import AdapterConfig

from . import report, runner
from .errors import BenchError
from .testbed import PATHS, PLACEMENTS, Testbed

SWEEP = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
DEFAULT_SIZES = {"stream": [16384], "rr": [1], "crr": [1]}
TESTS = {"stream": ["stream-send", "stream-recv"], "rr": ["rr"], "crr": ["crr"]}
# the metrics each kind's table shows
TABLE_METRICS = {
    "stream": ["throughput_bps", "app_cpu_s_per_gb", "adapter_cpu_s"],
    "rr": ["lat_us.p50", "lat_us.p99", "tps", "app_cpu_us_per_tx", "adapter_cpu_us_per_tx"],
    "crr": ["tps", "lat_us.p50", "lat_us.p99", "app_cpu_us_per_tx", "adapter_cpu_us_per_tx",
            "round_trips_per_tx"],
}
# the targets for the hybrid adapter (fastpath on; the summary's "ratio"):
# (kind, metric, bound, is_minimum, size or None for every size, label)
TARGETS = [
    ("stream", "throughput_bps", 0.8, True, None, "stream throughput ≥ 0.8× kernel"),
    ("stream", "app_cpu_s_per_gb", 0.2, False, None, "app CPU per GB ≤ 0.2× kernel"),
    ("rr", "lat_us.p50", 1.0, False, 1, "RR 1 B p50 latency ≤ 1.0× kernel"),
    ("crr", "tps", 0.5, True, None, "CRR rate ≥ 0.5× kernel"),
]
FASTPATH_CHOICES = ("on", "off", "both")
POLL_US_MAX = 1_000_000
UNITS = {"k": 1 << 10, "m": 1 << 20}


def parse_size(text: str) -> int:
    """'64', '1k', '64K', '1m' -> bytes (binary units), 1 B .. 1 MiB."""
    t = text.strip().lower().removesuffix("b")
    mult = UNITS.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1, 64, 1k, 64k)") from None
    if not 1 <= n <= 1 << 20:
        raise argparse.ArgumentTypeError(f"size {text} is out of range 1 B .. 1 MiB")
    return n


def parse_sizes(text: str) -> list[int]:
    """'1,64,1k' -> [1, 64, 1024]; 'sweep' -> 1 B .. 64 KiB in powers of 4."""
    if text.strip() == "sweep":
        return list(SWEEP)
    sizes = [parse_size(p) for p in text.split(",") if p.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes needs at least one size")
    return sorted(set(sizes))


def fastpath_settings(choice: str) -> tuple[str, ...]:
    """--fastpath on|off|both -> the adapters' settings, in run order: ("on",), ("off",), ("on", "off")."""
    if choice not in FASTPATH_CHOICES:
        raise BenchError(f"unknown --fastpath {choice!r} (choose {', '.join(FASTPATH_CHOICES)})")
    return ("on", "off") if choice == "both" else (choice,)


def add_parser(sub: Any) -> None:
    """Register `toe bench` and its subcommands on the toe CLI's subparsers."""
    b = sub.add_parser("bench", help="benchmark the adapter against the kernel (stream, rr, crr, seeds)",
                       description="Run the same client through the kernel (veth, a plain NIC) and through "
                       "the adapter, interleaved, and report ratios, tables, JSON/CSV and PNG plots. Needs "
                       "root; everything runs in namespaces it creates and deletes.")
    bsub = b.add_subparsers(dest="bench_command", metavar="KIND", parser_class=type(b))
    for kind, what in (("stream", "bulk throughput, both directions (TCP_STREAM)"),
                       ("rr", "request/response latency and rate (TCP_RR)"),
                       ("crr", "connect, request, response, close per second (TCP_CRR)")):
        p = bsub.add_parser(kind, help=what, description=f"{what}; default size "
                            f"{report.fmt_size(DEFAULT_SIZES[kind][0])}.")
        sizes = p.add_mutually_exclusive_group()
        sizes.add_argument("--size", type=parse_size, metavar="N", help="message size (e.g. 64, 1k, 64k)")
        sizes.add_argument("--sizes", type=parse_sizes, metavar="LIST",
                           help="comma-separated sizes, or 'sweep' (1 B .. 64 KiB, powers of 4)")
        p.add_argument("--tool", choices=runner.TOOLS, default="builtin",
                       help="client program: the built-in toe_perf (default), iperf3 (stream) "
                       "or sockperf (stream-send, rr)")
        p.add_argument("--side", choices=runner.SIDES, default="client",
                       help="the application under test (on the kernel path, and under the adapter): "
                       "the client (default; the peer runs the server), or the server (the builtin "
                       "toe_perf server; the peer runs the client): a server's passive opens, "
                       "accept() and closes. Targets are the client side's")
        p.add_argument("--fastpath", choices=FASTPATH_CHOICES, default="on",
                       help="the adapter's fast path (toe up --fastpath): on (default, the hybrid), off "
                       "(software-only), both (kernel, hybrid and software-only interleaved); the "
                       "targets are checked for the hybrid")
        _common(p)
        p.set_defaults(func=cmd_kind, kind=kind)
    s = bsub.add_parser("seeds", help="the four source papers' experiments, side by side with ours",
                        description="seed 000 fig. 5 (time of one send()/recv() call vs size), seed 003 "
                        "figs. 5-7 (latency, host CPU, bandwidth vs size), seed 002 (buffer reuse), seed 001 "
                        "table 1 (protocol efficiency vs payload size). Each prints the paper's numbers "
                        "beside ours.")
    s.add_argument("--only", metavar="LIST", help="comma-separated subset of 000,003,002,001")
    s.add_argument("--sizes", type=parse_sizes, metavar="LIST", help="message sizes (default per scenario)")
    _common(s, duration=1.0, repeat=1)
    s.set_defaults(func=cmd_seeds)
    c = bsub.add_parser("compare", help="what changed between two results.json files",
                        description="Match the two runs' rows (scenario, test, tool, size) and show each "
                        "metric's change for the kernel path, the adapter path and their ratio.")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    c.set_defaults(func=cmd_compare)
    b.set_defaults(func=lambda args: b.error("missing kind: stream, rr, crr, seeds or compare"))


def _common(p: argparse.ArgumentParser, duration: float = 2.0, repeat: int = 3) -> None:
    p.add_argument("--duration", type=ranged(0.05, 3600, float), default=duration, metavar="S",
                   help=f"seconds per run (default {duration:g})")
    p.add_argument("--repeat", type=ranged(1, 1000), default=repeat, metavar="K",
                   help=f"repetitions; medians are reported (default {repeat})")
    p.add_argument("--pin", nargs="?", const="split", default="none", choices=PLACEMENTS,
                   help="CPU placement: none (default), split (app on CPU 0; peer and adapter on CPU 1; "
                   "the default when --pin has no value), same (all on CPU 0)")
    p.add_argument("--poll-us", type=ranged(0, POLL_US_MAX), default=None, metavar="N",
                   help="busy-poll N µs before sleeping: the adapter (toe up --poll-us N) and the "
                   f"client's blocking receives (TOE_POLL_US=N); default: the adapter's own "
                   f"({AdapterConfig.poll_us} µs in the units, the client does not spin)")
    p.add_argument("--fastpath-procs", type=int, choices=(1, 2), default=1, metavar="{1,2}",
                   help="the hybrid adapter's processors (toe up --fastpath-procs): 2 runs TX on a "
                   "thread of its own (seed 003's two processors); default 1")
    p.add_argument("--no-offloads", action="store_true", help="adapter without TSO/checksum offloads")
    p.add_argument("--out", metavar="DIR", help="where results go (default results/bench-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ------------------------------------------------------------------ environment and output

def environment(tb: Testbed | None) -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = None
    try:
        r = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        if r.returncode == 0:
            commit = r.stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    env: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu_model,
           "python": platform.python_version(), "host": platform.node(), "git_commit": commit}
    if tb is not None:
        env.update({"pin": tb.pin, "placement": tb.cpus, "offloads": tb.offloads, **tb.adapter_options(),
                    "testbed": tb.describe()})
    return env


def out_dir(args: argparse.Namespace) -> str:
    if args.out:
        return os.path.abspath(args.out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("results", f"bench-{stamp}"))


def make_doc(command: str, argv: list[str], env: dict[str, Any], samples: list[dict[str, Any]],
             notes: list[str], started: str) -> dict[str, Any]:
    return {"toe_bench": 1, "command": command, "argv": argv, "started": started, "env": env,
            "samples": samples, "notes": notes}


def check_targets(summary: list[dict[str, Any]], kinds: set[str]) -> list[dict[str, Any]]:
    """The issue's targets, one check per matching summary row (same run, same placement).

    They are the hybrid adapter's (fastpath on): checked on "ratio" (adapter / kernel), never on
    the software-only adapter's ratio; a run without fastpath-on samples checks none."""
    checks = []
    for kind, metric, bound, is_min, size, label in TARGETS:
        if kind not in kinds:
            continue
        for row in summary:
            if row["test"] not in TESTS[kind] or (size is not None and row["size"] != size):
                continue
            ratio = row["metrics"].get(metric, {}).get("ratio")
            if ratio is None:
                continue
            ok = ratio >= bound if is_min else ratio <= bound
            checks.append({"name": label, "value": ratio, "goal": bound, "ok": ok,
                           "detail": f"{row['test']} {report.fmt_size(row['size'])} ({row['tool']})"})
    return checks


def _consoles() -> tuple[Any, Any]:
    """(tables on stdout, progress on stderr); tables into a pipe or file are not cut (320 columns)."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=320)
    return out, Console(stderr=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def require_root_and_tun() -> None:
    require_root("bench")
    require_tun()


def require_tools(tool: str) -> None:
    import shutil

    if tool != "builtin" and shutil.which(tool) is None:
        raise BenchError(f"{tool} is not installed (apt-get install {tool}, or run scripts/setup.sh)")


# ------------------------------------------------------------------ commands

def cmd_kind(args: argparse.Namespace) -> int:
    kind = args.kind
    sizes = [args.size] if args.size else (args.sizes or DEFAULT_SIZES[kind])
    tests = [t for t in TESTS[kind] if t in runner.TOOL_TESTS[args.tool]]
    if not tests:
        raise BenchError(f"--tool {args.tool} cannot run {kind} (it does "
                         f"{', '.join(runner.TOOL_TESTS[args.tool])}); use the builtin client")
    for t in tests:
        for s in sizes:
            runner.check_job(args.tool, t, s, args.side)
    scenario = kind if args.side == "client" else f"{kind}-server"
    fastpath = fastpath_settings(args.fastpath)
    require_tools(args.tool)
    require_root_and_tun()
    out, con, err = out_dir(args), *_consoles()
    started = _now()
    plan = list(runner.jobs(scenario, args.tool, tests, sizes, PATHS, args.repeat, args.duration, fastpath,
                            args.side))
    with Testbed(pin=args.pin, offloads=not args.no_offloads, fastpath=fastpath, poll_us=args.poll_us,
                 procs=args.fastpath_procs) as tb:
        env = environment(tb)
        con.print(header_line(kind, len(plan), args.duration, args.tool, tb, args.side))
        samples = runner.run_jobs(tb, plan, err)
    summary = report.summarize(samples)
    report.render_summary(con, summary, TABLE_METRICS[kind], title=summary_title(scenario, args.repeat, fastpath))
    checks = check_targets(summary, {kind}) if args.side == "client" else []
    if checks:
        report.targets_table(con, checks)
    elif args.side == "server":
        con.print("targets: not checked (they are the client side's)", highlight=False)
    elif "on" not in fastpath:
        con.print("targets: not checked (they are the hybrid's, fastpath on)", highlight=False)
    doc = make_doc(kind, sys.argv[1:], env, samples, [], started)
    doc["targets"] = checks
    plots = not args.no_plots and report.plotting_available()
    doc["plots"] = plot_kind(kind, summary, out, scenario) if plots else []
    paths = report.write_results(out, doc)
    con.print(f"results: {paths['json']}, {paths['csv']}" +
              (f", {len(doc['plots'])} plots" if doc["plots"] else ""))
    if not args.no_plots and not plots:
        con.print(report.PLOTS_HINT, markup=False, highlight=False)
    return 0


def fastpath_text(fastpath: tuple[str, ...]) -> str:
    """("on",) -> "fastpath on"; ("on", "off") -> "fastpath on and off"."""
    return "fastpath " + " and ".join(fastpath)


def poll_text(tb: Testbed) -> str:
    spin = f"client spins {tb.app_poll_us} µs" if tb.app_poll_us else "client does not spin"
    return f"poll {tb.poll_us} µs ({spin})"


def procs_text(tb: Testbed) -> str:
    return " (2 processors)" if tb.procs == 2 and "on" in tb.fastpaths else ""


def header_line(kind: str, runs: int, duration: float, tool: str, tb: Testbed, side: str = "client") -> str:
    """The line before a run: what runs, where, and the adapter's options."""
    what = f"{tool} client" if side == "client" else f"{tool} server under test (the peer's client)"
    return (f"toe bench {kind}: {runs} runs of {duration:g} s, {what}, placement {tb.pin} "
            f"{placement_text(tb.cpus)}, offloads {'on' if tb.offloads else 'off'}, "
            f"{fastpath_text(tb.fastpaths)}{procs_text(tb)}, {poll_text(tb)}")


def summary_title(kind: str, repeat: int, fastpath: tuple[str, ...]) -> str:
    if fastpath == ("on",):
        return f"toe bench {kind} (medians of {repeat}; × = adapter / kernel)"
    if fastpath == ("off",):
        return f"toe bench {kind} (medians of {repeat}; software-only: fastpath off; × = adapter / kernel)"
    return (f"toe bench {kind} (medians of {repeat}; hybrid: fastpath on, software-only: fastpath off; "
            f"× = that adapter / kernel)")


def placement_text(cpus: dict[str, Any]) -> str:
    if not any(cpus.values()):
        return "(unpinned)"
    return "(" + ", ".join(f"{k} on CPU {','.join(map(str, v))}" for k, v in cpus.items() if v) + ")"


def plot_kind(kind: str, summary: list[dict[str, Any]], out: str, scenario: str | None = None) -> list[str]:
    scenario = scenario or kind
    os.makedirs(out, exist_ok=True)
    metrics = {"stream": [("throughput_bps", "throughput (Gbit/s)"), ("app_cpu_s_per_gb", "app CPU s per GB")],
               "rr": [("lat_us.p50", "median round trip (µs)"), ("lat_us.p99", "p99 round trip (µs)")],
               "crr": [("tps", "connections per second")]}[kind]
    return [report.plot_vs_size(summary, scenario=scenario, metric=m, path=os.path.join(out, f"{scenario}-"
                                f"{m.replace('.', '_')}.png"), title=f"toe bench {scenario}: {label}",
                                ylabel=label) for m, label in metrics]


def cmd_seeds(args: argparse.Namespace) -> int:
    from . import seeds

    only = seeds.parse_only(args.only)
    require_root_and_tun()
    want_plots = not args.no_plots and report.plotting_available()
    out, con, err = out_dir(args), *_consoles()
    started = _now()
    samples: list[dict[str, Any]] = []
    notes: list[str] = []
    plots: list[str] = []
    env: dict[str, Any] = {}
    # seed 003 compares software-only with the hybrid: the testbed then has both adapters
    fastpath = seeds.SEED003_FASTPATH if "003" in only else ("on",)
    with Testbed(pin=args.pin, offloads=not args.no_offloads, fastpath=fastpath, poll_us=args.poll_us,
                 procs=args.fastpath_procs) as tb:
        env = environment(tb)
        con.print(f"toe bench seeds {', '.join(only)}: {args.duration:g} s per run, repeat {args.repeat}, "
                  f"placement {tb.pin} {placement_text(tb.cpus)}, {fastpath_text(tb.fastpaths)}"
                  f"{' (both for seed 003, on for the others)' if len(tb.fastpaths) > 1 else ''}"
                  f"{procs_text(tb)}, {poll_text(tb)}")
        ctx = seeds.Context(tb=tb, sizes=args.sizes, duration=args.duration, repeat=args.repeat, out=out,
                            plots=want_plots, console=con, progress_console=err, pin=args.pin)
        for name in only:
            res = seeds.SCENARIOS[name](ctx)
            samples += res.samples
            notes += res.notes
            plots += res.plots
    doc = make_doc("seeds", sys.argv[1:], env, samples, notes, started)
    doc["plots"] = plots
    paths = report.write_results(out, doc)
    con.print(f"results: {paths['json']}, {paths['csv']}" + (f", {len(plots)} plots" if plots else ""))
    if not args.no_plots and not want_plots:
        con.print(report.PLOTS_HINT, markup=False, highlight=False)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = report.load_results(args.a), report.load_results(args.b)
    con, _ = _consoles()
    rows = report.compare(a, b, con)
    if not rows:
        con.print("nothing in common to compare")
    return 0
