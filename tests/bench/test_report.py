"""bench.report on synthetic results: no network, no root, no measurement.

The numbers are chosen so that every median and ratio is exact: each
(scenario, test, tool, size, path) has two reps whose median is their mean.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bench.report import (
    METRICS,
    BenchError,
    compare,
    fmt_metric,
    fmt_size,
    load_results,
    plot_vs_size,
    render_summary,
    summarize,
    targets_table,
    value,
    write_results,
)

PNG_MAGIC = b"\x89PNG"


def sample(scenario: str, test: str, path: str, size: int, rep: int, **metrics: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "scenario": scenario, "test": test, "tool": "builtin", "path": path, "size": size, "rep": rep,
        "duration_s": 2.0, "elapsed_s": 2.01, "bytes": None, "transactions": None,
        "throughput_bps": None, "tps": None, "lat_us": None,
        "app_cpu_s": 0.9, "app_cpu_util": 0.45, "app_cpu_s_per_gb": None, "app_cpu_us_per_tx": None,
        "adapter_cpu_s": 0.5 if path == "adapter" else None,
    }
    s.update(metrics)
    return s


def stream(path: str, size: int, rep: int, gbps: float, retrans: int) -> dict[str, Any]:
    return sample("stream", "stream-send", path, size, rep, throughput_bps=gbps * 1e9, extra={"retrans": retrans})


def rr(path: str, size: int, rep: int, tps: float, p50: float) -> dict[str, Any]:
    lat = {"min": p50 / 2, "p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "mean": p50, "max": p50 * 3}
    return sample("rr", "rr", path, size, rep, tps=tps, lat_us=lat)


def make_samples() -> list[dict[str, Any]]:
    """stream: kernel 2 / 5 Gbit/s, adapter 1 / 3 Gbit/s at 64 B / 1 KiB; rr: 11000 vs 6000 tps, p50 45 vs 19 µs.

    Deliberately out of order (1 KiB before 64 B) to check the summary's ordering.
    """
    return [
        stream("kernel", 1024, 0, 4, 1), stream("kernel", 1024, 1, 6, 3),
        stream("adapter", 1024, 0, 2, 4), stream("adapter", 1024, 1, 4, 6),
        stream("kernel", 64, 0, 1, 1), stream("kernel", 64, 1, 3, 3),
        stream("adapter", 64, 0, 0.5, 4), stream("adapter", 64, 1, 1.5, 6),
        rr("kernel", 64, 0, 10000, 40), rr("kernel", 64, 1, 12000, 50),
        rr("adapter", 64, 0, 5000, 18), rr("adapter", 64, 1, 7000, 20),
        rr("kernel", 1, 0, 10000, 40), rr("kernel", 1, 1, 12000, 50),
        rr("adapter", 1, 0, 5000, 18), rr("adapter", 1, 1, 7000, 20),
    ]


def make_doc(samples: list[dict[str, Any]] | None = None, commit: str = "abc123") -> dict[str, Any]:
    return {
        "toe_bench": 1, "command": "stream", "argv": ["stream", "--sizes", "64,1024"],
        "started": "2026-11-21T10:00:00Z",
        "env": {"kernel": "6.1.0-test", "cpus": 2, "pin": "none",
                "placement": {"app": None, "peer": None, "adapter": None},
                "offloads": True, "git_commit": commit, "python": "3.11.7", "host": "test"},
        "samples": make_samples() if samples is None else samples,
        "notes": ["synthetic"],
    }


def row_of(summary: list[dict[str, Any]], scenario: str, size: int) -> dict[str, Any]:
    (row,) = [r for r in summary if r["scenario"] == scenario and r["size"] == size]
    return row


def recording_console() -> Console:
    return Console(record=True, width=200, force_terminal=True, color_system="standard")


# --- value --------------------------------------------------------------------------------------


def test_value_dotted_lookup() -> None:
    s = rr("kernel", 64, 0, 10000, 40)
    s["extra"] = {"xyz": 7, "label": "text", "flag": True}
    assert value(s, "tps") == 10000.0
    assert value(s, "lat_us.p50") == 40.0
    assert value(s, "extra.xyz") == 7.0


@pytest.mark.parametrize("name", ["throughput_bps", "nope", "lat_us.p999", "extra.nope", "extra.label",
                                  "extra.flag", "tps.p50", "rep.x"])
def test_value_missing_or_not_a_number_is_none(name: str) -> None:
    s = rr("kernel", 64, 0, 10000, 40)
    s["extra"] = {"label": "text", "flag": True}
    assert value(s, name) is None


def test_value_null_parent_is_none() -> None:
    s = stream("kernel", 64, 0, 1, 1)
    assert s["lat_us"] is None
    assert value(s, "lat_us.p50") is None


# --- summarize ----------------------------------------------------------------------------------


def test_summarize_medians_and_ratios() -> None:
    summary = summarize(make_samples())
    s64 = row_of(summary, "stream", 64)
    assert s64["n"] == {"kernel": 2, "adapter": 2}
    assert s64["metrics"]["throughput_bps"] == {"kernel": 2e9, "adapter": 1e9, "ratio": 0.5}
    assert row_of(summary, "stream", 1024)["metrics"]["throughput_bps"] == {"kernel": 5e9, "adapter": 3e9,
                                                                           "ratio": 0.6}
    assert s64["metrics"]["extra.retrans"] == {"kernel": 2.0, "adapter": 5.0, "ratio": 2.5}
    assert s64["metrics"]["adapter_cpu_s"] == {"kernel": None, "adapter": 0.5, "ratio": None}

    r1 = row_of(summary, "rr", 1)
    assert r1["metrics"]["tps"] == {"kernel": 11000.0, "adapter": 6000.0, "ratio": 6000 / 11000}
    assert r1["metrics"]["lat_us.p50"] == {"kernel": 45.0, "adapter": 19.0, "ratio": 19 / 45}


def test_summarize_lists_only_metrics_with_values() -> None:
    summary = summarize(make_samples())
    stream_metrics = set(row_of(summary, "stream", 64)["metrics"])
    rr_metrics = set(row_of(summary, "rr", 64)["metrics"])
    assert stream_metrics == {"throughput_bps", "app_cpu_util", "adapter_cpu_s", "extra.retrans"}
    assert rr_metrics == {"tps", "lat_us.min", "lat_us.p50", "lat_us.p99", "lat_us.mean", "app_cpu_util",
                          "adapter_cpu_s"}
    assert stream_metrics - {"extra.retrans"} <= set(METRICS)


def test_summarize_order_first_seen_then_size() -> None:
    samples = make_samples()
    summary = summarize(samples)
    assert [(r["scenario"], r["size"]) for r in summary] == [("stream", 64), ("stream", 1024), ("rr", 1), ("rr", 64)]
    rr_first = summarize(samples[8:] + samples[:8])
    assert [(r["scenario"], r["size"]) for r in rr_first] == [("rr", 1), ("rr", 64), ("stream", 64), ("stream", 1024)]


def test_summarize_one_path_only() -> None:
    (row,) = summarize([stream("adapter", 64, 0, 1, 1)])
    assert row["n"] == {"kernel": 0, "adapter": 1}
    assert row["metrics"]["throughput_bps"] == {"kernel": None, "adapter": 1e9, "ratio": None}


# --- formatting and render_summary --------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [(1, "1 B"), (64, "64 B"), (1000, "1000 B"), (1024, "1 KiB"),
                                         (1536, "1.5 KiB"), (65536, "64 KiB"), (1 << 20, "1 MiB"), (None, "—")])
def test_fmt_size(n: int | None, text: str) -> None:
    assert fmt_size(n) == text


@pytest.mark.parametrize(("name", "v", "text"), [
    ("throughput_bps", 4.9e9, "4.90"),
    ("throughput_bps", 52.3e6, "0.0523"),
    ("throughput_bps", 123.4e9, "123"),
    ("tps", 12345.6, "12,346"),
    ("lat_us.p50", 19.04, "19.0"),
    ("app_cpu_util", 0.45, "45.0"),
    ("extra.retrans", 3.0, "3"),
    ("tps", None, "—"),
])
def test_fmt_metric(name: str, v: float | None, text: str) -> None:
    assert fmt_metric(name, v) == text


def test_render_summary_numbers_and_missing() -> None:
    console = recording_console()
    summary = summarize(make_samples())
    render_summary(console, summary, ["throughput_bps", "adapter_cpu_s", "lat_us.p50"], "stream and rr")
    text = console.export_text(styles=False)
    assert "stream and rr" in text
    for expected in ["64 B", "1 KiB", "2.00", "1.00", "0.50×", "5.00", "3.00", "0.60×",
                     "45.0", "19.0", "0.42×", "throughput (Gbit/s)", "kernel", "adapter", "×"]:
        assert expected in text, expected
    assert "—" in text  # the kernel path has no adapter CPU
    assert "scenario" in text  # two scenarios: the scenario column is shown


def test_render_summary_colours_the_ratio() -> None:
    console = recording_console()
    summary = [r for r in summarize(make_samples()) if r["scenario"] == "rr"]
    render_summary(console, summary, ["tps", "lat_us.p50"], "rr")
    styled = console.export_text(styles=True, clear=False)
    assert "\x1b[31m0.55×" in styled  # tps: higher is better, adapter worse by > 10 %: red
    assert "\x1b[32m0.42×" in styled  # latency: lower is better, adapter better: green
    assert "scenario" not in console.export_text(styles=False)


def test_render_summary_within_ten_percent_is_plain() -> None:
    samples = [stream("kernel", 64, 0, 1.0, 0), stream("adapter", 64, 0, 0.95, 0)]
    console = recording_console()
    render_summary(console, summarize(samples), ["throughput_bps"], "t")
    styled = console.export_text(styles=True, clear=False)
    assert "0.95×" in styled
    assert "\x1b[31m0.95×" not in styled and "\x1b[32m0.95×" not in styled


# --- files --------------------------------------------------------------------------------------


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    doc = make_doc()
    paths = write_results(tmp_path / "out", doc)
    assert paths == {"json": str(tmp_path / "out" / "results.json"), "csv": str(tmp_path / "out" / "results.csv")}
    assert load_results(paths["json"]) == doc
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.json"]  # no temp left

    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[:6] == ["scenario", "test", "tool", "path", "size", "rep"]
    assert "lat_us.p99" in header and "adapter_cpu_s" in header
    assert header[-1] == "extra.retrans"
    assert len(body) == len(doc["samples"])
    records = [dict(zip(header, r, strict=True)) for r in body]
    (adapter_64_rep0,) = [r for r in records if r["scenario"] == "stream" and r["path"] == "adapter"
                          and r["size"] == "64" and r["rep"] == "0"]
    assert float(adapter_64_rep0["throughput_bps"]) == 0.5e9
    assert adapter_64_rep0["extra.retrans"] == "4"
    assert adapter_64_rep0["lat_us.p50"] == ""
    (rr_kernel_1_rep1,) = [r for r in records if r["scenario"] == "rr" and r["path"] == "kernel"
                           and r["size"] == "1" and r["rep"] == "1"]
    assert float(rr_kernel_1_rep1["lat_us.p50"]) == 50.0
    assert rr_kernel_1_rep1["extra.retrans"] == ""


def test_write_results_replaces_existing_files(tmp_path: Path) -> None:
    write_results(tmp_path, make_doc())
    paths = write_results(tmp_path, make_doc(samples=[stream("kernel", 64, 0, 1, 1)]))
    assert len(load_results(paths["json"])["samples"]) == 1
    assert len(Path(paths["csv"]).read_text().splitlines()) == 2


def _load_error(path: Path) -> str:
    with pytest.raises(BenchError) as info:
        load_results(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert "not a toe bench results file" in message
    return message


def test_load_results_missing_file(tmp_path: Path) -> None:
    assert "No such file" in _load_error(tmp_path / "A.json")


def test_load_results_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "A.json"
    bad.write_text("this is not\njson\n")
    assert "not JSON" in _load_error(bad)


@pytest.mark.parametrize("doc", [
    {"samples": []},
    {"toe_bench": 2, "samples": []},
    {"toe_bench": True, "samples": []},
    {"toe_bench": 1},
    {"toe_bench": 1, "samples": [{"scenario": "s", "test": "t", "tool": "x", "size": 1}]},
    {"toe_bench": 1, "samples": ["x"]},
    [1, 2],
])
def test_load_results_wrong_shape(tmp_path: Path, doc: Any) -> None:
    bad = tmp_path / "A.json"
    bad.write_text(json.dumps(doc))
    _load_error(bad)


def test_bench_error_is_one_line() -> None:
    assert str(BenchError("a\nb   c")) == "a b c"


# --- plots --------------------------------------------------------------------------------------


def test_plot_vs_size_multi_size(tmp_path: Path) -> None:
    summary = summarize(make_samples())
    out = plot_vs_size(summary, scenario="stream", metric="throughput_bps", path=tmp_path / "p" / "stream.png",
                       title="stream", ylabel="Gbit/s")
    assert out == str(tmp_path / "p" / "stream.png")
    assert Path(out).read_bytes().startswith(PNG_MAGIC)


def test_plot_vs_size_single_size_with_paper_lines(tmp_path: Path) -> None:
    summary = [r for r in summarize(make_samples()) if r["scenario"] == "rr" and r["size"] == 64]
    paper = [("paper: NIC 43 µs", None, 43.0), ("paper: TOE 19 µs", None, 19.0), ("paper point", 64, 30.0)]
    out = plot_vs_size(summary, scenario="rr", metric="lat_us.p50", path=tmp_path / "rr.png", title="rr",
                       ylabel="µs", tests=["rr"], tool="builtin", logy=True, paper=paper)
    assert Path(out).read_bytes().startswith(PNG_MAGIC)


def test_plot_vs_size_missing_values_and_no_data(tmp_path: Path) -> None:
    samples = make_samples()
    for s in samples:
        if s["scenario"] == "stream" and s["size"] == 64 and s["path"] == "adapter":
            s["throughput_bps"] = None
    summary = summarize(samples)
    out = plot_vs_size(summary, scenario="stream", metric="throughput_bps", path=tmp_path / "gap.png",
                       title="gap", ylabel="Gbit/s")
    assert Path(out).read_bytes().startswith(PNG_MAGIC)
    out = plot_vs_size(summary, scenario="nothing", metric="tps", path=tmp_path / "none.png",
                       title="none", ylabel="1/s")
    assert Path(out).read_bytes().startswith(PNG_MAGIC)


def test_importing_report_does_not_import_matplotlib() -> None:
    code = "import sys, bench.report; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


# --- compare ------------------------------------------------------------------------------------


def doubled_adapter_doc() -> dict[str, Any]:
    """B: the adapter's stream throughput is twice A's, plus a 4 KiB stream row that A lacks."""
    samples = copy.deepcopy(make_samples())
    for s in samples:
        if s["scenario"] == "stream" and s["path"] == "adapter":
            s["throughput_bps"] *= 2
    samples += [stream("kernel", 4096, 0, 8, 0), stream("adapter", 4096, 0, 4, 0)]
    return make_doc(samples, commit="def456")


def test_compare_change_and_only_in_b() -> None:
    console = recording_console()
    rows = compare(make_doc(), doubled_adapter_doc(), console)
    text = console.export_text(styles=False)

    def find(size: int, metric: str, path: str) -> dict[str, Any]:
        (row,) = [r for r in rows if r["scenario"] == "stream" and r["size"] == size
                  and r["metric"] == metric and r["path"] == path]
        return row

    adapter = find(64, "throughput_bps", "adapter")
    assert (adapter["a"], adapter["b"], adapter["change"]) == (1e9, 2e9, 1.0)
    assert find(64, "throughput_bps", "kernel")["change"] == 0.0
    assert find(64, "throughput_bps", "ratio")["change"] == 1.0
    assert "+100.0 %" in text
    assert "git_commit abc123 → def456" in text

    (only_b,) = [r for r in rows if r["only"] is not None]
    assert (only_b["only"], only_b["scenario"], only_b["size"]) == ("B", "stream", 4096)
    assert "only in B" in text and "only in A" not in text
    assert all(r["only"] is None for r in rows if r["scenario"] == "rr")
    rr_metrics = {r["metric"] for r in rows if r["scenario"] == "rr"}
    assert "lat_us.p50" in rr_metrics and "throughput_bps" not in rr_metrics


def test_compare_colours_and_metric_choice() -> None:
    console = recording_console()
    rows = compare(make_doc(), doubled_adapter_doc(), console, metrics=["throughput_bps"])
    assert {r["metric"] for r in rows if r["only"] is None} == {"throughput_bps"}
    assert "\x1b[32m+100.0 %" in console.export_text(styles=True)  # higher throughput: better, green
    reverse = recording_console()
    compare(doubled_adapter_doc(), make_doc(), reverse, metrics=["throughput_bps"])
    styled = reverse.export_text(styles=True)
    assert "\x1b[31m-50.0 %" in styled
    assert "only in A" in styled


def test_compare_same_env_prints_no_env_line() -> None:
    console = recording_console()
    compare(make_doc(), make_doc(), console)
    assert "env differs" not in console.export_text(styles=False)


# --- targets ------------------------------------------------------------------------------------


def test_targets_table() -> None:
    console = recording_console()
    targets_table(console, [
        {"name": "stream ≥ 0.15× kernel", "value": 0.55, "goal": 0.15, "ok": True, "detail": "1 KiB"},
        {"name": "rr p50 ≤ 19 µs", "value": 25.0, "goal": 19.0, "ok": False, "detail": "64 B"},
    ])
    styled = console.export_text(styles=True, clear=False)
    plain = console.export_text(styles=False)
    assert "stream ≥ 0.15× kernel" in plain and "0.55" in plain and "1 KiB" in plain
    assert "\x1b[32mmet" in styled and "\x1b[31mnot met" in styled
