"""`toe bench` end to end, once per scenario at a tiny size: it runs, cleans up, and its output parses.

These check behaviour, never speed: every run must move bytes on both paths,
the adapter path must show up in the adapter's counters (so it really went
through the adapter), results.json / results.csv / the plots must be there and
agree, and the testbed must leave no namespace behind. Benchmarks' numbers
are not asserted on.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from offload_daemon import netns
from tests.conftest import require_tools, run_toe

TINY = ["--duration", "0.2", "--repeat", "1"]
integration = pytest.mark.integration


def bench(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    out = tmp_path / "out"
    res = run_toe("bench", *args, "--out", str(out), timeout=timeout)
    assert res.returncode == 0, f"toe bench {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["toe_bench"] == 1
    tb = doc["env"]["testbed"]
    assert tb["peer_ns"].startswith(tb["tag"]) and tb["tap"].startswith(tb["tag"])
    left = [n for n in netns.names() if n.startswith(tb["tag"])]
    assert not left, f"namespaces left behind: {left}"
    assert not psutil.pid_exists(tb["daemon_pid"]), "the adapter's daemon still runs"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["samples"])
    for p in doc.get("plots", []):
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    return doc, res


def by(doc: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [s for s in doc["samples"] if all(s.get(k) == v for k, v in match.items())]


def went_through_adapter(sample: dict[str, Any]) -> None:
    x = sample["extra"]
    assert x["adapter.tap_port.tx_frames"] > 0 and x["adapter.tap_port.rx_frames"] > 0, x
    assert sample["adapter_cpu_s"] is not None and sample["adapter_cpu_s"] >= 0


@integration
def test_stream_both_directions(tmp_path):
    doc, res = bench(tmp_path, "stream", "--size", "1k", *TINY)
    assert {(s["test"], s["path"]) for s in doc["samples"]} == {
        (t, p) for t in ("stream-send", "stream-recv") for p in ("kernel", "adapter")}
    for s in doc["samples"]:
        assert s["size"] == 1024 and s["bytes"] > 0 and s["throughput_bps"] > 0
        assert s["app_cpu_s_per_gb"] is not None and s["lat_us"] is None
        if s["path"] == "adapter":
            went_through_adapter(s)
            assert s["extra"]["adapter.buffer_pool.allocations"] == 0  # seed 002: nothing per packet
    assert doc["env"]["pin"] == "none" and doc["env"]["cpus"] >= 1 and "kernel" in doc["env"]
    assert {c["name"] for c in doc["targets"]} == {"stream throughput ≥ 0.8× kernel",
                                                  "app CPU per GB ≤ 0.2× kernel"}
    assert (doc["env"]["fastpath"], doc["env"]["poll_us"], doc["env"]["app_poll_us"]) == ("on", 20, 0)
    assert {s["fastpath"] for s in by(doc, path="adapter")} == {"on"}
    assert len(doc["plots"]) == 2
    assert "stream-send" in res.stdout and "×" in res.stdout


@integration
def test_rr_sizes_and_pinning(tmp_path):
    doc, _ = bench(tmp_path, "rr", "--sizes", "1,1m", "--pin", *TINY)
    assert doc["env"]["placement"] == {"app": [0], "peer": [1], "adapter": [1]}
    assert sorted({s["size"] for s in doc["samples"]}) == [1, 1 << 20]  # 1 MiB: a full ring per message
    for s in doc["samples"]:
        lat = s["lat_us"]
        assert s["transactions"] > 0 and s["bytes"] == s["transactions"] * 2 * s["size"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    went_through_adapter(by(doc, path="adapter")[0])
    assert [c["name"] for c in doc["targets"]] == ["RR 1 B p50 latency ≤ 1.0× kernel"]  # the 1 B row only


@integration
def test_rr_fastpath_both_and_poll(tmp_path):
    doc, res = bench(tmp_path, "rr", "--fastpath", "both", "--poll-us", "5", *TINY)
    assert (doc["env"]["fastpath"], doc["env"]["poll_us"], doc["env"]["app_poll_us"]) == ("both", 5, 5)
    assert [a["fastpath_active"] for a in doc["env"]["testbed"]["adapters"]] == [True, False]
    for a in doc["env"]["testbed"]["adapters"]:
        assert not psutil.pid_exists(a["daemon_pid"])
    assert [s["variant"] for s in doc["samples"]] == ["kernel", "adapter", "software"]
    on, off = by(doc, variant="adapter")[0], by(doc, variant="software")[0]
    for s in (on, off):
        went_through_adapter(s)
        assert s["poll_us"] == s["app_poll_us"] == 5
    assert on["extra"]["adapter.totals.data_segments_fast"] > 0
    assert off["extra"]["adapter.totals.data_segments_fast"] == 0
    assert off["extra"]["adapter.totals.data_segments_software"] > 0
    assert "fastpath on and off, poll 5 µs" in res.stdout
    assert "software-only" in res.stdout and "hybrid" in res.stdout
    assert [c["name"] for c in doc["targets"]] == ["RR 1 B p50 latency ≤ 1.0× kernel"]


@integration
def test_crr(tmp_path):
    doc, _ = bench(tmp_path, "crr", *TINY)
    for s in doc["samples"]:
        assert s["transactions"] > 0 and s["tps"] > 0 and s["app_cpu_us_per_tx"] is not None
    ad = by(doc, path="adapter")[0]
    went_through_adapter(ad)
    assert ad["extra"]["adapter.tap_port.tx_frames"] >= 3 * ad["transactions"]  # SYN, request, FIN at least


@integration
def test_crr_with_the_server_under_test(tmp_path):
    """--side server: the builtin server on each path (under the adapter: its passive opens,
    accept() and closes), the peer's client; the server's own CPU is the application's."""
    doc, res = bench(tmp_path, "crr", "--side", "server", *TINY)
    assert {(s["scenario"], s["side"], s["path"]) for s in doc["samples"]} == {
        ("crr-server", "server", "kernel"), ("crr-server", "server", "adapter")}
    for s in doc["samples"]:
        assert s["transactions"] > 0 and s["app_cpu_s"] > 0
    ad = by(doc, path="adapter")[0]
    went_through_adapter(ad)
    x = ad["extra"]
    assert x["adapter.tcp.passive_opens"] >= ad["transactions"] and x["adapter.tcp.active_opens"] == 0, x
    assert "server under test" in res.stdout and doc["targets"] == []


@integration
def test_iperf3_driver(tmp_path):
    require_tools("iperf3")
    doc, _ = bench(tmp_path, "stream", "--tool", "iperf3", "--size", "64k", "--duration", "1", "--repeat", "1")
    assert {(s["test"], s["path"], s["tool"]) for s in doc["samples"]} == {
        (t, p, "iperf3") for t in ("stream-send", "stream-recv") for p in ("kernel", "adapter")}
    for s in doc["samples"]:
        assert s["bytes"] > 0 and s["throughput_bps"] > 0 and s["app_cpu_s"] > 0
    went_through_adapter(by(doc, path="adapter")[0])


@integration
def test_sockperf_driver(tmp_path):
    require_tools("sockperf")
    doc, _ = bench(tmp_path, "rr", "--tool", "sockperf", "--size", "64", "--duration", "1", "--repeat", "1")
    for s in doc["samples"]:
        assert s["tool"] == "sockperf" and s["transactions"] > 0
        assert 0 < s["lat_us"]["min"] <= s["lat_us"]["p50"] <= s["lat_us"]["max"]
    went_through_adapter(by(doc, path="adapter")[0])


@integration
def test_seeds_all_four(tmp_path):
    doc, res = bench(tmp_path, "seeds", "--sizes", "64,256", *TINY, timeout=600)
    assert {s["scenario"] for s in doc["samples"]} == {"seed000", "seed003", "seed002", "seed001"}
    assert {s["variant"] for s in by(doc, scenario="seed003")} == {"kernel", "adapter", "software"}
    assert {s["variant"] for s in doc["samples"] if s["scenario"] != "seed003"} <= {"kernel", "adapter"}
    assert {s["test"] for s in by(doc, scenario="seed000")} == {"calls-send", "calls-recv"}
    for s in by(doc, scenario="seed000"):
        assert s["lat_us"]["p50"] > 0 and s["transactions"] > 0
    for s in by(doc, scenario="seed001"):
        x = s["extra"]
        assert s["path"] == "adapter"
        assert 0 < x["eff_wire_pct"] < x["eff_ip_pct"] < 100, x
    assert sum(1 for n in doc["notes"] if n.strip().startswith("paper:")) >= 6
    # seed 002: both sides, the pool mapped once (reuse on) or a buffer mapped per packet (off)
    s002 = by(doc, scenario="seed002")
    off = [s for s in s002 if s["extra"].get("buffer_reuse") is False]
    on = [s for s in s002 if s not in off]
    assert on and off
    assert all(s["extra"].get("adapter.buffer_pool.dma_mappings", 0) == 0 for s in on), on
    assert all(s["extra"].get("adapter.buffer_pool.dma_mappings", 0) > 0 for s in off), off
    assert any("reuse on:" in n and "reuse off:" in n for n in doc["notes"])
    names = {Path(p).name for p in doc["plots"]}
    assert {"seed000-call-time.png", "seed003-fig5-latency.png", "seed003-fig6-cpu.png",
            "seed003-fig7-bandwidth.png", "seed001-efficiency.png"} <= names
    assert "seed 001" in res.stdout and "paper:" in res.stdout


@integration
def test_compare(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bench(tmp_path / "a", "rr", *TINY)
    bench(tmp_path / "b", "rr", "--sizes", "1,64", *TINY)
    res = run_toe("bench", "compare", str(tmp_path / "a/out/results.json"), str(tmp_path / "b/out/results.json"))
    assert res.returncode == 0, res.stderr
    assert "rr" in res.stdout and "%" in res.stdout
    assert "only in B" in res.stdout  # the 64 B row


@pytest.mark.parametrize("args, fragment", [
    (["rr", "--tool", "iperf3"], "does"),
    (["crr", "--tool", "sockperf"], "cannot run crr"),
    (["rr", "--tool", "sockperf", "--side", "server"], "--side server"),
    (["crr", "--side", "both"], "--side"),
    (["rr", "--tool", "sockperf", "--size", "4"], "smallest message"),
    (["stream", "--size", "0"], "out of range"),
    (["stream", "--sizes", "1,x"], "not a size"),
    (["seeds", "--only", "005"], "unknown seed scenario"),
    (["compare", "/nonexistent/a.json", "/nonexistent/b.json"], "a.json"),
    (["stream", "--pin", "diagonal"], "--pin"),
    ([], "missing kind"),
])
def test_bad_arguments(args, fragment):
    res = run_toe("bench", *args)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("toe: ") and fragment in lines[0], res.stderr
