"""`toe bench --fastpath on|off|both` and `--poll-us N`, without root, network or measurement:
the arguments, the plan's variants (kernel, hybrid, software-only), what each sample records,
the testbed's adapters as planned (nothing is started), the summary and the tables with a
software-only column, the targets (the hybrid's only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bench import cli, report, runner
from bench.errors import BenchError
from bench.testbed import AppRun
from bench.testbed import Testbed as _Testbed
from offload_daemon.cli.app import build_parser
from offload_daemon.client.errors import CLIError
from offload_daemon.config import AdapterConfig
from tests.conftest import run_toe

# --- arguments ----------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("kind", ["stream", "rr", "crr"])
def test_defaults_are_fastpath_on_and_the_adapters_own_poll(kind: str) -> None:
    args = parse(kind)
    assert (args.fastpath, args.poll_us) == ("on", None)


@pytest.mark.parametrize("choice", ["on", "off", "both"])
def test_fastpath_choices(choice: str) -> None:
    args = parse("rr", "--fastpath", choice, "--poll-us", "20")
    assert (args.fastpath, args.poll_us) == (choice, 20)


def test_seeds_take_poll_us_but_not_fastpath() -> None:
    assert parse("seeds", "--poll-us", "5").poll_us == 5
    with pytest.raises(CLIError, match="--fastpath"):
        parse("seeds", "--fastpath", "off")


@pytest.mark.parametrize(("choice", "settings"), [("on", ("on",)), ("off", ("off",)), ("both", ("on", "off"))])
def test_fastpath_settings(choice: str, settings: tuple[str, ...]) -> None:
    assert cli.fastpath_settings(choice) == settings


def test_fastpath_settings_unknown() -> None:
    with pytest.raises(BenchError, match="--fastpath"):
        cli.fastpath_settings("sometimes")


@pytest.mark.parametrize(("args", "fragment"), [
    (["rr", "--fastpath", "sometimes"], "--fastpath"),
    (["stream", "--poll-us", "-1"], "--poll-us"),
    (["crr", "--poll-us", "2000000"], "--poll-us"),
    (["rr", "--poll-us", "x"], "--poll-us"),
])
def test_bad_fastpath_arguments_are_one_line(args: list[str], fragment: str) -> None:
    res = run_toe("bench", *args)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("toe: ") and fragment in lines[0], res.stderr


# --- the plan -----------------------------------------------------------------------------------


def test_legs() -> None:
    assert runner.legs(("kernel", "adapter")) == (("kernel", None), ("adapter", "on"))
    assert runner.legs(("kernel", "adapter"), ("on", "off")) == (
        ("kernel", None), ("adapter", "on"), ("adapter", "off"))
    assert runner.legs(("adapter",), ("off",)) == (("adapter", "off"),)
    with pytest.raises(BenchError, match="fastpath"):
        runner.legs(("kernel", "adapter"), ("maybe",))


def test_jobs_interleave_three_variants_alternating() -> None:
    plan = list(runner.jobs("rr", "builtin", ["rr"], [1, 64], ("kernel", "adapter"), 2, 1.0, ("on", "off")))
    assert len(plan) == 2 * 2 * 3
    assert [(j.rep, j.size, j.variant) for j in plan[:6]] == [
        (0, 1, "kernel"), (0, 1, "adapter"), (0, 1, "software"),
        (0, 64, "kernel"), (0, 64, "adapter"), (0, 64, "software")]
    assert [j.variant for j in plan[6:9]] == ["software", "adapter", "kernel"]  # reversed in rep 1
    assert {(j.path, j.fastpath) for j in plan} == {("kernel", None), ("adapter", "on"), ("adapter", "off")}


def test_jobs_default_is_the_hybrid_only() -> None:
    plan = list(runner.jobs("rr", "builtin", ["rr"], [1], ("kernel", "adapter"), 1, 1.0))
    assert [(j.path, j.fastpath, j.variant) for j in plan] == [("kernel", None, "kernel"),
                                                               ("adapter", "on", "adapter")]


def test_jobs_fastpath_off_only() -> None:
    plan = list(runner.jobs("rr", "builtin", ["rr"], [1], ("kernel", "adapter"), 1, 1.0, ("off",)))
    assert [j.variant for j in plan] == ["kernel", "software"]


def measurement() -> dict[str, Any]:
    return {"bytes": 2000, "elapsed_s": 1.0, "transactions": 1000, "lat_us": {"p50": 10.0},
            "app_cpu_s": 0.1, "extra": {}}


@pytest.mark.parametrize(("path", "fastpath", "variant", "poll"), [
    ("kernel", None, "kernel", None), ("adapter", "on", "adapter", 20), ("adapter", "off", "software", 20)])
def test_make_sample_records_the_variant(path: str, fastpath: str | None, variant: str, poll: int | None) -> None:
    job = runner.Job("rr", "rr", "builtin", 1, path, 0, 1.0, fastpath)
    s = runner.make_sample(job, measurement(), poll_us=20, app_poll_us=20)
    assert (s["path"], s["fastpath"], s["variant"], s["poll_us"], s["app_poll_us"]) == (path, fastpath, variant, poll,
                                                                                       poll)
    assert report.variant_of(s) == variant


# --- the testbed as planned (nothing started) ---------------------------------------------------


def test_testbed_both_plans_two_adapters() -> None:
    tb = _Testbed(fastpath=("on", "off"), poll_us=20, tag="tbx")
    assert tb.fastpaths == ("on", "off")
    on, off = tb.adapter("on"), tb.adapter("off")
    assert (on.tap, on.host_addr, on.addr) == ("tbxt", "198.18.0.1", "198.18.0.2")
    assert (off.tap, off.host_addr, off.addr) == ("tbxu", "198.18.2.1", "198.18.2.2")
    assert tb.tap == "tbxt" and tb.adapter() is on
    assert tb.peer_addr("adapter", "off") == "198.18.2.1" and tb.peer_addr("adapter") == "198.18.0.1"
    assert tb.peer_addr("kernel", "off") == "198.18.1.1"
    assert tb.adapter_options() == {"fastpath": "both", "poll_us": 20, "app_poll_us": 20, "fastpath_procs": 1}
    env = tb.app_env("off")
    assert env["TOE_POLL_US"] == "20" and env["TOE_SOCK"].endswith("/tbxu.sock")
    argv = tb.app_argv("adapter", ["prog"], "on")
    assert "TOE_POLL_US=20" in argv and any(a.startswith("TOE_SOCK=") and a.endswith("/tbxt.sock") for a in argv)
    assert not any(a.startswith("TOE_") for a in tb.app_argv("kernel", ["prog"]))
    assert [a["fastpath"] for a in tb.describe()["adapters"]] == ["on", "off"]


def test_testbed_defaults() -> None:
    tb = _Testbed(tag="tby")
    # the units poll as `toe up` does by default; the application does not spin
    assert tb.fastpaths == ("on",) and tb.poll_us == AdapterConfig.poll_us > 0 and tb.tap == "tbyt"
    assert tb.adapter_options() == {"fastpath": "on", "poll_us": AdapterConfig.poll_us, "app_poll_us": 0,
                                    "fastpath_procs": 1}
    assert _Testbed(tag="tbv", poll_us=0).adapter_options()["poll_us"] == 0
    assert _Testbed(tag="tbw", procs=2).adapter_options()["fastpath_procs"] == 2
    assert "TOE_POLL_US" not in tb.app_env()
    with pytest.raises(BenchError, match="no adapter with fastpath off"):
        tb.adapter("off")


def test_testbed_off_only_uses_the_first_subnet() -> None:
    tb = _Testbed(fastpath=("off",), tag="tbz")
    assert (tb.adapter("off").tap, tb.peer_addr("adapter")) == ("tbzt", "198.18.0.1")
    assert tb.adapter_options()["fastpath"] == "off"


@pytest.mark.parametrize("kw", [{"fastpath": ("fast",)}, {"fastpath": ()}, {"poll_us": -1}, {"procs": 3}])
def test_testbed_bad_options(kw: dict[str, Any]) -> None:
    with pytest.raises(BenchError):
        _Testbed(**kw)


def test_header_line_names_fastpath_and_poll() -> None:
    tb = _Testbed(fastpath=("on",), poll_us=20, tag="tbh")
    line = cli.header_line("rr", 6, 2.0, "builtin", tb)
    assert line.endswith("offloads on, fastpath on, poll 20 µs (client spins 20 µs)"), line
    both = cli.header_line("rr", 9, 2.0, "builtin", _Testbed(fastpath=("on", "off"), tag="tbh"))
    assert f"fastpath on and off, poll {AdapterConfig.poll_us} µs (client does not spin)" in both


# --- the runner's bookkeeping, with a fake testbed ----------------------------------------------


class FakeTestbed:
    """Answers like a Testbed with adapters 'on' and 'off'; records which adapter each call used."""

    def __init__(self) -> None:
        self.fastpaths = ("on", "off")
        self.poll_us = 7
        self.app_poll_us = 0
        self.servers = {"builtin"}
        self.calls: list[tuple[str, Any]] = []
        self.cpu = {"on": 0.0, "off": 0.0}

    def peer_addr(self, path: str, fastpath: str | None = None) -> str:
        self.calls.append(("peer_addr", (path, fastpath)))
        return {"on": "198.18.0.1", "off": "198.18.2.1", None: "198.18.1.1"}[fastpath]

    def stat(self, fastpath: str | None = None) -> dict[str, Any]:
        fp = fastpath or "on"
        self.calls.append(("stat", fp))
        units = {u: dict.fromkeys(names, 0) for u, names in runner.UNIT_COUNTERS.items()}
        return {"cpu": {"user_s": self.cpu[fp], "system_s": 0.0}, "units": units,
                "totals": {"data_segments_fast": 0, "data_segments_software": 0}}

    def run_app(self, path: str, argv: list[str], timeout: float, fastpath: str | None = None) -> AppRun:
        self.calls.append(("run_app", (path, fastpath, argv[argv.index("--host") + 1])))
        if fastpath:
            self.cpu[fastpath] += 0.25 if fastpath == "on" else 0.5
        out = {"test": "rr", "size": 1, "rsize": 1, "duration_s": 1, "elapsed_s": 1.0, "bytes": 2000,
               "transactions": 1000, "short_calls": 0, "cpu_user_s": 0.1, "cpu_sys_s": 0.0,
               "lat_ns": {"min": 5000, "p50": 10000, "p90": 12000, "p99": 20000, "mean": 11000, "max": 30000}}
        return AppRun(0, json.dumps(out) + "\n", "", 0.1, 1.0)


def test_runner_runs_each_variant_on_its_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.perf, "perf_path", lambda: "/bin/toe_perf")
    tb = FakeTestbed()
    r = runner.Runner(tb)  # type: ignore[arg-type]
    plan = list(runner.jobs("rr", "builtin", ["rr"], [1], ("kernel", "adapter"), 1, 1.0, ("on", "off")))
    samples = [r.run(j) for j in plan]
    runs = [c[1] for c in tb.calls if c[0] == "run_app"]
    assert runs == [("kernel", None, "198.18.1.1"), ("adapter", "on", "198.18.0.1"),
                    ("adapter", "off", "198.18.2.1")]
    assert [c[1] for c in tb.calls if c[0] == "stat"] == ["on", "on", "off", "off"]  # before and after
    assert [(s["variant"], s["fastpath"], s["poll_us"]) for s in samples] == [
        ("kernel", None, None), ("adapter", "on", 7), ("software", "off", 7)]
    assert [s["adapter_cpu_s"] for s in samples] == [None, 0.25, 0.5]
    assert samples[2]["extra"]["adapter.totals.data_segments_software"] == 0


# --- summary, tables, files ---------------------------------------------------------------------


def rr_sample(variant: str, rep: int, p50: float, tps: float, size: int = 1) -> dict[str, Any]:
    path, fp = {"kernel": ("kernel", None), "adapter": ("adapter", "on"), "software": ("adapter", "off")}[variant]
    lat = {"min": p50 / 2, "p50": p50, "p90": p50, "p99": p50 * 2, "mean": p50, "max": p50 * 3}
    return {"scenario": "rr", "test": "rr", "tool": "builtin", "path": path, "fastpath": fp, "variant": variant,
            "poll_us": None if fp is None else 0, "size": size, "rep": rep, "duration_s": 1.0,
            "elapsed_s": 1.0, "bytes": 2000, "transactions": 1000, "throughput_bps": None, "tps": tps,
            "lat_us": lat, "app_cpu_s": 0.1, "app_cpu_util": 0.1, "app_cpu_s_per_gb": None,
            "app_cpu_us_per_tx": 100.0, "adapter_cpu_s": None if fp is None else 0.2, "extra": {}}


def three_variants() -> list[dict[str, Any]]:
    """p50: kernel 40 µs, hybrid 20 µs (0.5×), software-only 80 µs (2×); tps 10000, 20000, 5000."""
    return [rr_sample("kernel", 0, 40, 10000), rr_sample("adapter", 0, 20, 20000), rr_sample("software", 0, 80, 5000),
            rr_sample("software", 1, 80, 5000), rr_sample("adapter", 1, 20, 20000), rr_sample("kernel", 1, 40, 10000)]


def console() -> Console:
    return Console(record=True, width=250, force_terminal=True, color_system="standard")


def test_summary_has_software_beside_adapter() -> None:
    (row,) = report.summarize(three_variants())
    assert row["n"] == {"kernel": 2, "adapter": 2, "software": 2}
    assert row["metrics"]["lat_us.p50"] == {"kernel": 40.0, "adapter": 20.0, "ratio": 0.5,
                                            "software": 80.0, "ratio_software": 2.0}
    assert row["metrics"]["adapter_cpu_s"] == {"kernel": None, "adapter": 0.2, "ratio": None,
                                               "software": 0.2, "ratio_software": None}


def test_summary_without_software_keeps_its_shape() -> None:
    samples = [s for s in three_variants() if s["variant"] != "software"]
    (row,) = report.summarize(samples)
    assert row["n"] == {"kernel": 2, "adapter": 2}
    assert row["metrics"]["lat_us.p50"] == {"kernel": 40.0, "adapter": 20.0, "ratio": 0.5}


def test_old_samples_without_fastpath_are_the_hybrid() -> None:
    old = [{k: v for k, v in s.items() if k not in ("fastpath", "variant")} for s in three_variants()
           if s["variant"] != "software"]
    assert {report.variant_of(s) for s in old} == {"kernel", "adapter"}
    assert report.summarize(old) == report.summarize([s for s in three_variants() if s["variant"] != "software"])


def test_off_only_summary() -> None:
    (row,) = report.summarize([s for s in three_variants() if s["variant"] != "adapter"])
    assert row["n"] == {"kernel": 2, "adapter": 0, "software": 2}
    assert row["metrics"]["tps"] == {"kernel": 10000.0, "adapter": None, "ratio": None,
                                     "software": 5000.0, "ratio_software": 0.5}
    assert report.row_variants([row]) == ["kernel", "software"]


def test_render_summary_with_software_only_column() -> None:
    c = console()
    report.render_summary(c, report.summarize(three_variants()), ["lat_us.p50", "tps"], "rr both")
    text = c.export_text(styles=False, clear=False)
    for expected in ("kernel", "hybrid", "software-only", "40.0", "20.0", "0.50×", "80.0", "2.00×",
                     "10,000", "20,000", "5,000", "2.00×", "0.50×"):
        assert expected in text, expected
    header = next(ln for ln in text.splitlines() if "hybrid" in ln)
    assert header.index("kernel") < header.index("hybrid") < header.index("software-only")
    styled = c.export_text(styles=True)
    assert "\x1b[32m0.50×" in styled  # the hybrid's latency: better than the kernel, green
    assert "\x1b[31m2.00×" in styled  # the software-only latency: worse, red


def test_render_summary_off_only_has_no_adapter_column() -> None:
    c = console()
    report.render_summary(c, report.summarize([s for s in three_variants() if s["variant"] != "adapter"]),
                          ["lat_us.p50"], "rr off")
    text = c.export_text(styles=False)
    assert "software-only" in text and "80.0" in text and "2.00×" in text
    assert "hybrid" not in text and "adapter" not in text


def test_render_summary_on_only_is_unchanged() -> None:
    c = console()
    report.render_summary(c, report.summarize([s for s in three_variants() if s["variant"] != "software"]),
                          ["lat_us.p50"], "rr on")
    text = c.export_text(styles=False)
    assert "adapter" in text and "software" not in text and "hybrid" not in text


def test_csv_records_the_variant(tmp_path: Path) -> None:
    doc = {"toe_bench": 1, "env": {"fastpath": "both", "poll_us": 0}, "samples": three_variants(), "notes": []}
    paths = report.write_results(tmp_path, doc)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["fastpath"], r["variant"]) for r in rows[:3]] == [
        ("kernel", "", "kernel"), ("adapter", "on", "adapter"), ("adapter", "off", "software")]
    assert report.load_results(paths["json"])["env"] == {"fastpath": "both", "poll_us": 0}


def test_compare_shows_the_software_rows_and_the_env_change() -> None:
    a = {"toe_bench": 1, "env": {"fastpath": "both", "poll_us": 0}, "samples": three_variants()}
    faster = three_variants()
    for s in faster:
        if s["variant"] == "software":
            s["lat_us"] = {**s["lat_us"], "p50": 40.0}
    b = {"toe_bench": 1, "env": {"fastpath": "both", "poll_us": 20}, "samples": faster}
    c = console()
    rows = report.compare(a, b, c, metrics=["lat_us.p50"])
    got = {r["path"]: (r["a"], r["b"], r["change"]) for r in rows}
    assert got["software"] == (80.0, 40.0, -0.5) and got["ratio_software"] == (2.0, 1.0, -0.5)
    assert got["adapter"] == (20.0, 20.0, 0.0)
    text = c.export_text(styles=False)
    assert "poll_us 0 → 20" in text and "1.00×" in text


def test_plot_with_three_series(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    samples = three_variants() + [rr_sample(v, 0, p, t, size=64) for v, p, t in
                                  (("kernel", 50, 9000), ("adapter", 25, 18000), ("software", 90, 4000))]
    summary = report.summarize(samples)
    assert report._series(summary, "lat_us.p50").keys() == {("rr", "builtin", v) for v in report.VARIANTS}
    out = report.plot_vs_size(summary, scenario="rr", metric="lat_us.p50", path=tmp_path / "rr.png",
                              title="rr", ylabel="µs")
    assert Path(out).read_bytes().startswith(b"\x89PNG")


# --- targets ------------------------------------------------------------------------------------


def test_targets_are_the_issues() -> None:
    assert {(kind, metric, bound, is_min) for kind, metric, bound, is_min, _, _ in cli.TARGETS} == {
        ("stream", "throughput_bps", 0.8, True), ("stream", "app_cpu_s_per_gb", 0.2, False),
        ("rr", "lat_us.p50", 1.0, False), ("crr", "tps", 0.5, True)}


def test_targets_check_the_hybrid_only() -> None:
    samples = three_variants() + [rr_sample(v, 0, p, 1000, size=64) for v, p in (("kernel", 10), ("adapter", 30))]
    checks = cli.check_targets(report.summarize(samples), {"rr"})
    assert len(checks) == 1  # RR's target is at 1 B
    (c,) = checks
    assert (c["name"], c["value"], c["goal"], c["ok"]) == ("RR 1 B p50 latency ≤ 1.0× kernel", 0.5, 1.0, True)


def test_targets_not_checked_without_the_hybrid() -> None:
    off_only = [s for s in three_variants() if s["variant"] != "adapter"]
    assert cli.check_targets(report.summarize(off_only), {"rr"}) == []


def stream_row(test: str, thr_ratio: float, cpu_ratio: float) -> dict[str, Any]:
    return {"scenario": "stream", "test": test, "tool": "builtin", "size": 16384,
            "metrics": {"throughput_bps": {"kernel": 1.0, "adapter": thr_ratio, "ratio": thr_ratio,
                                           "software": 0.1, "ratio_software": 0.1},
                        "app_cpu_s_per_gb": {"kernel": 1.0, "adapter": cpu_ratio, "ratio": cpu_ratio}}}


def test_stream_targets_both_directions() -> None:
    checks = cli.check_targets([stream_row("stream-send", 0.85, 0.1), stream_row("stream-recv", 0.75, 0.3)],
                               {"stream"})
    got = {(c["name"], c["detail"].split()[0]): c["ok"] for c in checks}
    assert got == {("stream throughput ≥ 0.8× kernel", "stream-send"): True,
                   ("stream throughput ≥ 0.8× kernel", "stream-recv"): False,
                   ("app CPU per GB ≤ 0.2× kernel", "stream-send"): True,
                   ("app CPU per GB ≤ 0.2× kernel", "stream-recv"): False}


def test_crr_target() -> None:
    row = {"scenario": "crr", "test": "crr", "tool": "builtin", "size": 1,
           "metrics": {"tps": {"kernel": 100.0, "adapter": 49.0, "ratio": 0.49}}}
    (c,) = cli.check_targets([row], {"crr"})
    assert (c["name"], c["ok"]) == ("CRR rate ≥ 0.5× kernel", False)
