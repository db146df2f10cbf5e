"""Results of `toe bench`: summaries, tables, files, plots and comparisons.

Everything here consumes the results document that the benchmark runners
produce (saved as results.json)::

    {"toe_bench": 1, "command": ..., "argv": [...], "started": ..., "env": {...},
     "samples": [SAMPLE, ...], "notes": [...]}

A SAMPLE is one measurement of one path ("kernel" or "adapter") of one
(scenario, test, tool, size) at one repetition; any of its metrics may be
null or missing. On the adapter path, "fastpath" says which adapter: "on"
(the hybrid, the default; also when the key is missing, as in files from
before the switch) or "off" (software-only). Its `variant` is "kernel",
"adapter" (fastpath on) or "software" (fastpath off): summaries hold one
median per variant, "ratio" = adapter / kernel and, when there are
software-only samples, "ratio_software" = software / kernel. Metrics are named by dotted paths into a sample
("throughput_bps", "lat_us.p99", "extra.retransmits"); `METRICS` describes
the known ones (label, unit, direction, display scale and format).

Nothing here measures anything; nothing here imports matplotlib until a plot
is asked for, so importing this module stays fast.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import BenchError

PATHS = ("kernel", "adapter")
# what a sample measured: the kernel, the adapter with its fast path on (the hybrid), or with it off
VARIANTS = ("kernel", "adapter", "software")
VARIANT_LABELS = {"kernel": "kernel", "adapter": "adapter", "software": "software-only"}
# the ratio to the kernel of each non-kernel variant, as named in a summary row's metrics
RATIO_KEYS = {"adapter": "ratio", "software": "ratio_software"}
MISSING = "—"
# A ratio cell is red only when the adapter is worse than the kernel by more than this.
WORSE_TOLERANCE = 0.10

Sample = Mapping[str, Any]
SummaryRow = dict[str, Any]
GroupKey = tuple[Any, Any, Any, Any]  # (scenario, test, tool, size)


def _sig3(v: float) -> str:
    """Three significant digits in fixed point (4.90, 0.0523, 123, 1,234)."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    magnitude = math.floor(math.log10(abs(v)))
    decimals = max(0, 2 - magnitude)
    return f"{v:,.{decimals}f}"


def _plain(v: float) -> str:
    """Whole numbers as such (3, 1,024), others with three significant digits."""
    return f"{v:,.0f}" if v.is_integer() and abs(v) < 1e15 else _sig3(v)


def _fixed(decimals: int) -> Callable[[float], str]:
    def fmt(v: float) -> str:
        return f"{v:,.{decimals}f}"

    return fmt


@dataclass(frozen=True)
class Metric:
    """How to show one metric.

    `scale` multiplies the stored value for display (bit/s -> Gbit/s: 1e-9);
    `fmt` formats the scaled value (without unit). `higher_is_better` is None
    for metrics of unknown direction (extra.*), which are never coloured.
    """

    label: str
    unit: str
    higher_is_better: bool | None
    scale: float = 1.0
    fmt: Callable[[float], str] = _sig3


METRICS: dict[str, Metric] = {
    "throughput_bps": Metric("throughput", "Gbit/s", True, 1e-9, _sig3),
    "tps": Metric("transactions", "1/s", True, 1.0, _fixed(0)),
    "lat_us.min": Metric("latency min", "µs", False, 1.0, _fixed(1)),
    "lat_us.p50": Metric("latency p50", "µs", False, 1.0, _fixed(1)),
    "lat_us.p99": Metric("latency p99", "µs", False, 1.0, _fixed(1)),
    "lat_us.mean": Metric("latency mean", "µs", False, 1.0, _fixed(1)),
    "app_cpu_s_per_gb": Metric("app CPU", "CPU s/GB", False, 1.0, _sig3),
    "app_cpu_us_per_tx": Metric("app CPU", "CPU µs/tx", False, 1.0, _sig3),
    "app_cpu_util": Metric("app CPU", "%", False, 100.0, _fixed(1)),
    "adapter_cpu_s": Metric("adapter CPU", "s", False, 1.0, _sig3),
    "adapter_cpu_us_per_tx": Metric("daemon CPU", "CPU µs/tx", False, 1.0, _sig3),
    "round_trips_per_tx": Metric("round trips", "per tx", False, 1.0, _sig3),
}

# Columns of results.csv before the extra.* ones.
CSV_COLUMNS = (
    "scenario", "test", "tool", "path", "size", "rep", "duration_s", "elapsed_s", "bytes", "transactions",
    "throughput_bps", "tps", "lat_us.min", "lat_us.p50", "lat_us.p90", "lat_us.p99", "lat_us.mean", "lat_us.max",
    "app_cpu_s", "app_cpu_util", "app_cpu_s_per_gb", "app_cpu_us_per_tx", "adapter_cpu_s",
    "adapter_cpu_us_per_tx", "round_trips_per_tx", "fastpath", "variant", "poll_us", "app_poll_us", "side",
)

REQUIRED_SAMPLE_KEYS = ("scenario", "test", "tool", "path", "size")


def metric_info(name: str) -> Metric:
    """The Metric for `name`: from METRICS, or a plain one (no direction, scale 1) for others."""
    known = METRICS.get(name)
    if known is not None:
        return known
    return Metric(name.removeprefix("extra."), "", None, 1.0, _plain)


# --- variants -----------------------------------------------------------------------------------


def variant_name(path: Any, fastpath: Any) -> str:
    """"kernel" for the kernel path; on the adapter path "software" for fastpath "off", else "adapter"."""
    if path != "adapter":
        return "kernel"
    return "software" if fastpath == "off" else "adapter"


def variant_of(sample: Sample) -> str:
    """The sample's variant: its "variant" if it has a known one, else from its path and fastpath."""
    v = sample.get("variant")
    if v in VARIANTS and (v == "kernel") == (sample.get("path") != "adapter"):
        return str(v)
    return variant_name(sample.get("path"), sample.get("fastpath"))


def row_variants(summary: Iterable[SummaryRow]) -> list[str]:
    """The variants a table of `summary` shows: kernel; adapter unless only software-only samples
    are there; software when there are any."""
    rows = list(summary)
    have = {v for row in rows for v, n in row.get("n", {}).items() if n}
    shown = ["kernel"]
    if "adapter" in have or "software" not in have:
        shown.append("adapter")
    if "software" in have:
        shown.append("software")
    return shown


# --- lookup and summary -------------------------------------------------------------------------


def _lookup(sample: Sample, name: str) -> Any:
    """The raw value at dotted path `name` in `sample`, or None where any step is missing."""
    node: Any = sample
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _number(x: Any) -> float | None:
    """x as a finite float, or None if it is not a number (bools are not numbers)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def value(sample: Sample, name: str) -> float | None:
    """The metric at dotted path `name` ("lat_us.p99", "extra.xyz") as a float.

    None when the path is missing, null, or not a finite number.
    """
    return _number(_lookup(sample, name))


def _extra_names(samples: Iterable[Sample]) -> list[str]:
    """Sorted "extra.KEY" names of the numeric top-level extra values in `samples`."""
    names: set[str] = set()
    for s in samples:
        extra = s.get("extra")
        if isinstance(extra, Mapping):
            names.update(f"extra.{k}" for k, v in extra.items() if _number(v) is not None)
    return sorted(names)


def _ratio(adapter: float | None, kernel: float | None) -> float | None:
    if adapter is None or kernel is None or kernel == 0:
        return None
    return adapter / kernel


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _group(samples: Iterable[Sample]) -> dict[GroupKey, list[Sample]]:
    """Samples by (scenario, test, tool, size), ordered by first-seen scenario, test, tool, then size."""
    groups: dict[GroupKey, list[Sample]] = {}
    seen: dict[str, dict[Any, int]] = {"scenario": {}, "test": {}, "tool": {}}
    for s in samples:
        for field, order in seen.items():
            order.setdefault(s.get(field), len(order))
        key = (s.get("scenario"), s.get("test"), s.get("tool"), s.get("size"))
        groups.setdefault(key, []).append(s)

    def sort_key(key: GroupKey) -> tuple[int, int, int, bool, float]:
        scenario, test, tool, size = key
        numeric = _number(size)
        return (seen["scenario"][scenario], seen["test"][test], seen["tool"][tool],
                numeric is None, numeric if numeric is not None else 0.0)

    return {key: groups[key] for key in sorted(groups, key=sort_key)}


def _summarize_group(key: GroupKey, group: list[Sample]) -> SummaryRow:
    by_variant = {v: [s for s in group if variant_of(s) == v] for v in VARIANTS}
    # the software-only variant appears only where it was measured (so older summaries keep their shape)
    variants = [v for v in VARIANTS if v != "software" or by_variant[v]]
    metrics: dict[str, dict[str, float | None]] = {}
    for name in [*METRICS, *_extra_names(group)]:
        medians: dict[str, float | None] = {}
        for v in variants:
            values = [x for x in (value(s, name) for s in by_variant[v]) if x is not None]
            medians[v] = _median(values)
        if all(m is None for m in medians.values()):
            continue
        entry = {"kernel": medians["kernel"], "adapter": medians["adapter"],
                 "ratio": _ratio(medians["adapter"], medians["kernel"])}
        if "software" in medians:
            entry.update(software=medians["software"], ratio_software=_ratio(medians["software"],
                                                                             medians["kernel"]))
        metrics[name] = entry
    scenario, test, tool, size = key
    return {"scenario": scenario, "test": test, "tool": tool, "size": size,
            "n": {v: len(by_variant[v]) for v in variants}, "metrics": metrics}


def summarize(samples: Iterable[Sample]) -> list[SummaryRow]:
    """One row per (scenario, test, tool, size): medians over reps per variant, and ratios to the kernel.

    Row: {"scenario", "test", "tool", "size", "n": {"kernel": k, "adapter": a},
    "metrics": {name: {"kernel": median|None, "adapter": median|None, "ratio": adapter/kernel|None}}}.
    A group with software-only samples (fastpath off) also has "n"["software"] and, per metric,
    "software" (its median) and "ratio_software" (software / kernel); "adapter" is the fastpath-on
    adapter (None when only software-only samples were taken).
    `metrics` holds every METRICS entry and every numeric top-level extra.* key with at least one
    value in the group (either path). Rows are ordered by scenario, test and tool in first-seen
    order, then by size ascending (rows without a numeric size last).
    """
    return [_summarize_group(key, group) for key, group in _group(samples).items()]


# --- formatting and the summary table -----------------------------------------------------------


def fmt_size(n: float | None) -> str:
    """A message size for people: 1 B, 64 B, 1 KiB, 64 KiB, 1.5 KiB, 2 MiB; "—" for None."""
    number = _number(n)
    if number is None:
        return MISSING
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(number) >= factor:
            scaled = number / factor
            return f"{scaled:.0f} {unit}" if scaled == int(scaled) else f"{scaled:.1f} {unit}"
    return f"{number:.0f} B" if number == int(number) else f"{number} B"


def fmt_metric(name: str, v: float | None) -> str:
    """The stored value `v` of metric `name`, scaled and formatted for display (no unit); "—" for None."""
    if v is None:
        return MISSING
    m = metric_info(name)
    return m.fmt(v * m.scale)


def fmt_ratio(r: float | None) -> str:
    """An adapter/kernel ratio: "0.55×"; "—" for None."""
    return MISSING if r is None else f"{r:.2f}×"


def _header(name: str) -> str:
    m = metric_info(name)
    return f"{m.label} ({m.unit})" if m.unit else m.label


def _ratio_style(name: str, r: float | None) -> str:
    """green: the adapter is better; red: worse by more than WORSE_TOLERANCE; "" otherwise."""
    better = metric_info(name).higher_is_better
    if r is None or better is None:
        return ""
    if (r > 1) if better else (r < 1):
        return "green"
    if (r < 1 - WORSE_TOLERANCE) if better else (r > 1 + WORSE_TOLERANCE):
        return "red"
    return ""


def render_summary(console: Console, summary: Sequence[SummaryRow], metrics: Sequence[str], title: str) -> None:
    """Print `summary` as one table: test, tool, size, then kernel / adapter / × per metric.

    With software-only samples (fastpath off) each metric also gets "software-only" and its
    ratio to the kernel, and the fastpath-on adapter's column is called "hybrid"; with only
    software-only samples the adapter columns are left out. A scenario column comes first when
    the rows span more than one scenario. A ratio is green when that adapter is better than the
    kernel, red when it is worse by more than 10 %; missing values show as "—".
    """
    show_scenario = len({row["scenario"] for row in summary}) > 1
    shown = row_variants(summary)
    labels = {"adapter": "hybrid" if "software" in shown else "adapter", "software": VARIANT_LABELS["software"]}
    table = Table(title=title)
    if show_scenario:
        table.add_column("scenario")
    table.add_column("test")
    table.add_column("tool")
    table.add_column("size", justify="right")
    for name in metrics:
        table.add_column(f"{_header(name)}\nkernel", justify="right")
        for v in shown[1:]:
            table.add_column(f"\n{labels[v]}", justify="right")
            table.add_column("\n×", justify="right")
    for row in summary:
        cells: list[str | Text] = [str(row["test"]), str(row["tool"]), fmt_size(row["size"])]
        if show_scenario:
            cells.insert(0, str(row["scenario"]))
        for name in metrics:
            m = row["metrics"].get(name, {})
            cells.append(fmt_metric(name, m.get("kernel")))
            for v in shown[1:]:
                ratio = m.get(RATIO_KEYS[v])
                cells += [fmt_metric(name, m.get(v)), Text(fmt_ratio(ratio), style=_ratio_style(name, ratio))]
        table.add_row(*cells)
    console.print(table)


# --- files --------------------------------------------------------------------------------------


def _write_atomically(path: str, write: Callable[[Any], None], newline: str | None = None) -> None:
    """Write `path` by calling write(file) on a temporary file in the same directory, then renaming it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _csv_cell(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, Mapping | list):
        return json.dumps(x)
    return x


def _write_csv(f: Any, samples: Sequence[Sample]) -> None:
    extra_keys: set[str] = set()
    for s in samples:
        extra = s.get("extra")
        if isinstance(extra, Mapping):
            extra_keys.update(str(k) for k in extra)
    columns = [*CSV_COLUMNS, *(f"extra.{k}" for k in sorted(extra_keys))]
    writer = csv.writer(f)
    writer.writerow(columns)
    for s in samples:
        extra = s.get("extra")
        extra = extra if isinstance(extra, Mapping) else {}
        row = [_lookup(s, c) for c in CSV_COLUMNS] + [extra.get(k) for k in sorted(extra_keys)]
        writer.writerow([_csv_cell(x) for x in row])


def write_results(out_dir: str | os.PathLike[str], doc: Mapping[str, Any]) -> dict[str, str]:
    """Write `doc` to out_dir/results.json and its samples to out_dir/results.csv.

    Creates out_dir if needed. Each file is written to a temporary name in out_dir and renamed
    into place, so a reader never sees half a file. CSV: one row per sample, the columns of
    CSV_COLUMNS (dotted names for lat_us.*) then every extra.* key (sorted); empty for missing.
    Returns {"json": path, "csv": path}.
    """
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    csv_path = os.path.join(out, "results.csv")

    def write_json(f: Any) -> None:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")

    _write_atomically(json_path, write_json)
    _write_atomically(csv_path, lambda f: _write_csv(f, list(doc.get("samples", []))), newline="")
    return {"json": json_path, "csv": csv_path}


def _results_problem(doc: Any) -> str | None:
    """Why `doc` is not a results document, or None if it is one."""
    if not isinstance(doc, dict):
        return f"top level is {type(doc).__name__}, not an object"
    version = doc.get("toe_bench")
    if "toe_bench" not in doc:
        return 'no "toe_bench" key'
    if isinstance(version, bool) or version != 1:
        return f'"toe_bench" is {version!r}, this reader knows 1'
    samples = doc.get("samples")
    if not isinstance(samples, list):
        return '"samples" is not a list'
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            return f"samples[{i}] is not an object"
        missing = [k for k in REQUIRED_SAMPLE_KEYS if k not in s]
        if missing:
            return f"samples[{i}] has no {', '.join(missing)}"
    return None


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a results.json: a JSON object with "toe_bench": 1 and a "samples" list
    whose items have scenario, test, tool, path and size.

    Raises BenchError("PATH: not a toe bench results file (REASON)") otherwise.
    """
    name = os.fspath(path)

    def fail(reason: str) -> BenchError:
        return BenchError(f"{name}: not a toe bench results file ({reason})")

    try:
        with open(name, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise fail(e.strerror or str(e)) from e
    except UnicodeDecodeError as e:
        raise fail("not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise fail(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    problem = _results_problem(doc)
    if problem is not None:
        raise fail(problem)
    result: dict[str, Any] = doc
    return result


# --- plots --------------------------------------------------------------------------------------


def _plot_rows(summary: Sequence[SummaryRow], scenario: str, tests: Sequence[str] | None,
               tool: str | None) -> list[SummaryRow]:
    """Rows of `scenario` (optionally only `tests` and `tool`) with a positive numeric size."""
    rows = []
    for row in summary:
        size = _number(row["size"])
        if row["scenario"] != scenario or size is None or size <= 0:
            continue
        if (tests is not None and row["test"] not in tests) or (tool is not None and row["tool"] != tool):
            continue
        rows.append(row)
    return rows


def _series(rows: Sequence[SummaryRow], metric_name: str) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(test, tool, variant) -> [(size, scaled value)] sorted by size, skipping missing values."""
    scale = metric_info(metric_name).scale
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for row in rows:
        values = row["metrics"].get(metric_name, {})
        for p in VARIANTS:
            v = values.get(p)
            if v is not None:
                series.setdefault((row["test"], row["tool"], p), []).append((float(row["size"]), v * scale))
    return {k: sorted(points) for k, points in series.items()}


PLOTS_HINT = "no plots: matplotlib is not installed (pip install 'toe[bench]' to get them)"


def plotting_available() -> bool:
    """Whether matplotlib can be imported (it is the optional `bench` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_vs_size(
    summary: Sequence[SummaryRow],
    *,
    scenario: str,
    metric: str,
    path: str | os.PathLike[str],
    title: str,
    ylabel: str,
    tests: Sequence[str] | None = None,
    tool: str | None = None,
    logy: bool = False,
    paper: Sequence[tuple[str, float | None, float]] | None = None,
) -> str:
    """Plot `metric` against message size for `scenario` as a PNG at `path`; returns the path.

    x: message size on a log2 axis, ticks labelled with fmt_size. One line per (test, variant)
    (per (test, tool, variant) when several tools are shown): kernel dashed, adapter solid,
    software-only (fastpath off, when measured) dash-dotted, all with markers, one colour per
    test. Values are scaled by the metric's scale (so `ylabel` should name the display unit).
    Missing values are skipped; a single size gives single points. `paper` adds reference
    values in display units: (label, None, y) is a labelled horizontal dotted line, (label, x,
    y) a labelled point. With nothing to draw the PNG says "no data". Uses no pyplot state:
    safe to call many times in one process.
    """
    try:
        from matplotlib.figure import Figure  # lazy: importing this module must stay fast
    except ImportError:
        raise BenchError(PLOTS_HINT) from None

    metric_name = metric
    out = os.fspath(path)
    series = _series(_plot_rows(summary, scenario, tests, tool), metric_name)
    several_tools = len({tool_name for _, tool_name, _ in series}) > 1
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    palette = [f"C{i}" for i in range(10)]
    styles = {"kernel": ("--", "o"), "adapter": ("-", "s"), "software": ("-.", "^")}
    for (test, tool_name, p), points in series.items():
        colour = colours.setdefault(test, palette[len(colours) % len(palette)])
        name = VARIANT_LABELS.get(p, p)
        label = f"{test} [{tool_name}] {name}" if several_tools else f"{test} {name}"
        xs, ys = zip(*points, strict=True)
        linestyle, marker = styles.get(p, ("-", "s"))
        ax.plot(xs, ys, linestyle=linestyle, marker=marker, color=colour, label=label)
    for i, (label, x, y) in enumerate(paper or []):
        colour = f"C{(len(colours) + i) % 10}"
        if x is None:
            ax.axhline(y, linestyle=":", color=colour, label=label)
        else:
            ax.plot([x], [y], linestyle="none", marker="*", markersize=10, color=colour, label=label)
    sizes = sorted({x for points in series.values() for x, _ in points} |
                   {x for _, x, _ in (paper or []) if x is not None and x > 0})
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    elif all(y >= 0 for points in series.values() for _, y in points) and all(y >= 0 for *_, y in paper or []):
        ax.set_ylim(bottom=0)  # a linear axis from 0, so heights compare as ratios
    if not series and not paper:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("message size")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if series or paper:
        ax.legend(fontsize="small")
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    fig.clear()
    return out


# --- comparing two results files ----------------------------------------------------------------

ENV_KEYS = ("git_commit", "pin", "offloads", "fastpath", "fastpath_procs", "poll_us", "app_poll_us", "kernel",
            "cpus")


def _env_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    env_a, env_b = a.get("env") or {}, b.get("env") or {}
    return [f"{k} {env_a.get(k)} → {env_b.get(k)}" for k in ENV_KEYS if env_a.get(k) != env_b.get(k)]


def _change(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a - 1


def fmt_change(change: float | None) -> str:
    """A relative change (fraction) as a signed percentage: "+100.0 %"; "—" for None."""
    return MISSING if change is None else f"{change * 100:+.1f} %"


def _change_style(name: str, change: float | None) -> str:
    better = metric_info(name).higher_is_better
    if change is None or better is None or change == 0:
        return ""
    return "green" if (change > 0) == better else "red"


def _row_key(row: SummaryRow) -> GroupKey:
    return (row["scenario"], row["test"], row["tool"], row["size"])


def _compare_rows(key: GroupKey, ra: SummaryRow, rb: SummaryRow, metrics: Sequence[str] | None) -> list[dict[str, Any]]:
    """One entry per (metric, kernel|adapter|ratio|software|ratio_software) with a value in either file."""
    ma, mb = ra["metrics"], rb["metrics"]
    names = list(metrics) if metrics is not None else [n for n in ma if n in mb]
    out = []
    for name in names:
        va, vb = ma.get(name, {}), mb.get(name, {})
        for p in ("kernel", "adapter", "ratio", "software", "ratio_software"):
            a_v, b_v = va.get(p), vb.get(p)
            if a_v is None and b_v is None:
                continue
            scenario, test, tool, size = key
            out.append({"scenario": scenario, "test": test, "tool": tool, "size": size, "metric": name,
                        "path": p, "a": a_v, "b": b_v, "change": _change(a_v, b_v), "only": None})
    return out


def _only_row(key: GroupKey, which: str) -> dict[str, Any]:
    scenario, test, tool, size = key
    return {"scenario": scenario, "test": test, "tool": tool, "size": size, "metric": None,
            "path": None, "a": None, "b": None, "change": None, "only": which}


def _fmt_compare_value(name: str, p: str, v: float | None) -> str:
    return fmt_ratio(v) if p.startswith("ratio") else fmt_metric(name, v)


def compare(a: Mapping[str, Any], b: Mapping[str, Any], console: Console,
            metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print how results doc `b` differs from doc `a`; return the printed rows.

    Rows are matched on (scenario, test, tool, size). For each metric (default: those present
    in both rows) and each of kernel, adapter and ratio (adapter/kernel), and software and
    ratio_software where a file has software-only (fastpath off) samples, a row shows A, B and
    the change B/A - 1, green when B is better (per higher_is_better; for the ratio, a higher
    ratio is better exactly when higher values are better), red when worse. Rows present in
    only one file are listed as "only in A" / "only in B". A line before the table names the
    env differences (git_commit, pin, offloads, fastpath, fastpath_procs, poll_us, app_poll_us, kernel, cpus), if any.

    Each returned row: {"scenario", "test", "tool", "size", "metric", "path" ("kernel",
    "adapter", "ratio", "software" or "ratio_software"), "a", "b", "change" (a fraction: 1.0 is
    +100 %), "only" (None, or "A"/"B" for a row in one file only, whose metric/path/a/b/change
    are None)}.
    """
    diffs = _env_differences(a, b)
    if diffs:
        console.print("env differs (A → B): " + "; ".join(diffs), markup=False, highlight=False)
    rows_a = {_row_key(r): r for r in summarize(a.get("samples", []))}
    rows_b = {_row_key(r): r for r in summarize(b.get("samples", []))}
    printed: list[dict[str, Any]] = []
    for key, ra in rows_a.items():
        rb = rows_b.get(key)
        printed += _compare_rows(key, ra, rb, metrics) if rb is not None else [_only_row(key, "A")]
    printed += [_only_row(key, "B") for key in rows_b if key not in rows_a]

    table = Table(title="A → B")
    for column in ("scenario", "test", "tool", "size", "metric", "path", "A", "B", "change"):
        table.add_column(column, justify="right" if column in ("size", "A", "B", "change") else "left")
    for r in printed:
        head = [str(r["scenario"]), str(r["test"]), str(r["tool"]), fmt_size(r["size"])]
        if r["only"] is not None:
            table.add_row(*head, Text(f"only in {r['only']}", style="yellow"), "", "", "", "")
            continue
        name, p = r["metric"], r["path"]
        table.add_row(*head, _header(name), p, _fmt_compare_value(name, p, r["a"]),
                      _fmt_compare_value(name, p, r["b"]),
                      Text(fmt_change(r["change"]), style=_change_style(name, r["change"])))
    console.print(table)
    return printed


# --- targets ------------------------------------------------------------------------------------


def _fmt_number(v: Any) -> str:
    number = _number(v)
    return MISSING if number is None else f"{number:.3g}"


def targets_table(console: Console, checks: Sequence[Mapping[str, Any]]) -> None:
    """Print target checks, each {"name", "value", "goal", "ok", "detail"?}: "met" in green or "not met" in red."""
    table = Table(title="targets")
    table.add_column("target")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_column("ok")
    table.add_column("detail")
    for c in checks:
        ok = bool(c.get("ok"))
        table.add_row(str(c.get("name", "")), _fmt_number(c.get("value")), _fmt_number(c.get("goal")),
                      Text("met" if ok else "not met", style="green" if ok else "red"), str(c.get("detail") or ""))
    console.print(table)
