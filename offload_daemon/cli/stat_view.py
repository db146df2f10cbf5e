"""`toe stat`: the inspection API's answer for people (or as JSON)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import Any

from offload_daemon.client.adapter import choose_tap
from offload_daemon.client.errors import CLIError
from offload_daemon.client.inspection import api_call, api_request
from offload_daemon.config import MIB


def cmd_stat(args: argparse.Namespace) -> int:
    if args.json and args.watch is not None:
        raise CLIError("--json and --watch do not go together (see 'toe stat --help')")
    tap = choose_tap(args.tap)
    if args.json:
        line = api_request(tap, {"cmd": "stat"})
        try:
            json.loads(line)
        except ValueError:
            raise CLIError(f"adapter {tap} answered something that is not JSON: {line[:80]!r}") from None
        print(line)
        return 0
    if args.watch is not None:
        return watch(tap, args.watch, count=args.watch_count)
    render_stat(api_call(tap, {"cmd": "stat"}))
    return 0


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _rows(x: Any) -> list[dict[str, Any]]:
    return [r for r in x if isinstance(r, dict)] if isinstance(x, list) else []


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-" if n is None else str(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt(v: Any, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.3g}{suffix}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return f"{v}{suffix}"


def fmt_mib(n: Any) -> str:
    """Bytes in MiB, the unit of --max-ring-mb."""
    return f"{n / MIB:.1f} MiB" if isinstance(n, (int, float)) and not isinstance(n, bool) else fmt(n)


def limits_line(lim: dict[str, Any]) -> str:
    """The `limits` block of a stat answer as one line: use / limit; any key may be missing."""
    parts, rest = [], dict(lim)
    used, cap, per = rest.pop("sockets", None), rest.pop("max_sockets", None), rest.pop("max_process_sockets", None)
    if used is not None or cap is not None:
        parts.append(f"sockets {fmt(used)} / {fmt(cap)}")
    if per is not None:
        parts.append(f"per process {fmt(per)}")
    ring, ring_cap = rest.pop("ring_bytes", None), rest.pop("max_ring_bytes", None)
    if ring is not None or ring_cap is not None:
        parts.append(f"ring memory {fmt_mib(ring)} / {fmt_mib(ring_cap)}")
    tw, tw_cap = rest.pop("time_wait", None), rest.pop("max_time_wait", None)
    if tw is not None or tw_cap is not None:
        parts.append(f"time-wait {fmt(tw)} / {fmt(tw_cap)}")
    parts += [f"{k.replace('_', ' ')} {fmt(v)}" for k, v in rest.items()]
    return "[bold]limits[/]  " + ("  ".join(parts) if parts else "-")


def share(fast: Any, software: Any) -> str:
    """The fast path's share of data segments, as a percentage ("—" when there were none)."""
    if not isinstance(fast, int) or not isinstance(software, int) or fast + software == 0:
        return "—"
    return f"{100 * fast / (fast + software):.1f}"


def fastpath_line(tot: dict[str, Any]) -> str:
    if not tot.get("fastpath"):
        return "fast path off: every packet through the software path"
    f, s = tot.get("data_segments_fast"), tot.get("data_segments_software")
    return (f"fast path on: {fmt(f)} data segments in the compiled units, {fmt(s)} in software "
            f"({share(f, s)} % fast)")


def render_stat(data: dict[str, Any], console: Any = None) -> None:
    """Render a `stat` answer for people; every key is optional."""
    from rich.columns import Columns
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 160)
    a, cpu, tot = _d(data.get("adapter")), _d(data.get("cpu")), _d(data.get("totals"))
    bits = [f"[bold]adapter {fmt(a.get('tap'))}[/]", f"{fmt(a.get('addr'))} ⇄ kernel {fmt(a.get('host_addr'))}"]
    for key in ("mac", "mtu", "offloads", "netns", "pid"):
        if key in a:
            bits.append(f"{key} {fmt(a[key])}")
    console.print("  ".join(bits), highlight=False)
    bits = []
    if "uptime_s" in a:
        bits.append(f"up {fmt(a['uptime_s'], ' s')}")
    for key, value in cpu.items():
        bits.append(f"cpu {key.removesuffix('_s')} {fmt(value, ' s' if key.endswith('_s') else '')}")
    if bits:
        console.print("  ".join(bits), highlight=False)
    if isinstance(data.get("limits"), dict):
        console.print(limits_line(data["limits"]), highlight=False)
    if "fastpath" in tot:
        console.print(fastpath_line(tot), highlight=False)

    conns = _rows(data.get("connections"))
    t = Table(title=f"connections ({len(conns)})", title_justify="left")
    cols = [("id", "id"), ("local", "local"), ("remote", "remote"), ("state", "state"), ("in", "bytes_in"),
            ("out", "bytes_out"), ("cwnd", "cwnd"), ("srtt µs", "srtt_us"), ("rto ms", "rto_ms"),
            ("retrans", "retransmits"), ("path", "path"), ("fast %", "fast_share"), ("pid", "pid")]
    for title, _ in cols:
        t.add_column(title, justify="left" if title in ("local", "remote", "state", "path") else "right")
    for c in conns:
        c = {**c, "fast_share": share(c.get("data_fast"), c.get("data_software"))}
        t.add_row(*[fmt_bytes(c.get(k)) if k in ("bytes_in", "bytes_out") else fmt(c.get(k)) for _, k in cols])
    console.print(t)
    if conns:
        t = Table(title="sequence space, windows and rings (bytes queued in the TX / RX ring)",
                  title_justify="left")
        keys = ("id", "snd_una", "snd_nxt", "rcv_nxt", "snd_wnd", "rcv_wnd", "cwnd", "ssthresh",
                "tx_queued", "rx_queued")
        for k in keys:
            t.add_column(k, justify="right")
        for c in conns:
            t.add_row(*[fmt(c.get(k)) for k in keys])
        console.print(t)

    closed = _rows(data.get("closed"))
    if closed:
        t = Table(title=f"recently closed ({len(closed)})", title_justify="left")
        ckeys = [("id", "id"), ("local", "local"), ("remote", "remote"), ("closed from", "closed_from"),
                 ("in", "bytes_in"), ("out", "bytes_out"), ("retrans", "retransmits"), ("pid", "pid")]
        for title, _ in ckeys:
            t.add_column(title, justify="left" if title in ("local", "remote", "closed from") else "right")
        for c in closed:
            t.add_row(*[fmt_bytes(c.get(k)) if k in ("bytes_in", "bytes_out") else fmt(c.get(k)) for _, k in ckeys])
        console.print(t)

    lst = _rows(data.get("listeners"))
    if lst:
        t = Table(title=f"listeners ({len(lst)})", title_justify="left")
        for title in ("id", "local", "backlog", "pending", "pid"):
            t.add_column(title)
        for row in lst:
            t.add_row(*[fmt(row.get(k)) for k in ("id", "local", "backlog", "pending", "pid")])
        console.print(t)

    units = _d(data.get("units"))
    if units:
        tables = []
        for unit, counters in units.items():
            t = Table(title=str(unit), title_justify="left", show_header=False)
            t.add_column("counter")
            t.add_column("value", justify="right")
            for name, value in (counters.items() if isinstance(counters, dict) else [("value", counters)]):
                t.add_row(str(name), fmt(value))
            tables.append(t)
        console.print("[bold]hardware units[/]", highlight=False)
        console.print(Columns(tables))

    procs = _rows(data.get("processes"))
    if procs:
        t = Table(title=f"processes ({len(procs)}, with those that exited recently)", title_justify="left")
        for title in ("pid", "comm", "", "open", "pooled", "offloaded", "to kernel", "refused", "why to kernel"):
            t.add_column(title)
        for p in procs:
            why = ", ".join(f"{k} ×{v}" for k, v in (p.get("handover_reasons") or {}).items())
            t.add_row(fmt(p.get("pid")), fmt(p.get("comm")), "" if p.get("alive", True) else "exited",
                      *[fmt(p.get(k)) for k in ("sockets", "pooled", "offloaded", "handovers", "refused")],
                      why or "")
        console.print(t)

    if tot:
        parts = []
        for key, v in tot.items():
            shown = f"{fmt_bytes(v)} ({v})" if key.startswith("bytes") else fmt(v)
            parts.append(f"{key.replace('_', ' ')} {shown}")
        console.print("[bold]totals[/]  " + "  ".join(parts), highlight=False)


# ---------------------------------------------------------------- demo



# ---------------------------------------------------------------- --watch

RATE_KEYS = ("bytes", "frames")  # totals shown per second as well


def rates(prev: dict[str, Any], cur: dict[str, Any], seconds: float) -> dict[str, float | None]:
    """Per-second rates of the numeric `totals` whose name starts with bytes/frames, between
    two stat answers `seconds` apart; None where a counter went backwards (daemon restarted)."""
    before, after = _d(prev.get("totals")), _d(cur.get("totals"))
    out: dict[str, float | None] = {}
    for key, v in after.items():
        old = before.get(key)
        if not key.startswith(RATE_KEYS) or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(old, bool) or not isinstance(old, (int, float)) or seconds <= 0:
            continue
        out[key] = (v - old) / seconds if v >= old else None
    return out


def rates_line(r: dict[str, float | None] | None) -> str:
    if r is None:
        return "[bold]rates[/]  (from the next refresh on)"
    parts = []
    for key, v in r.items():
        shown = "-" if v is None else f"{fmt_bytes(v)}/s" if key.startswith("bytes") else f"{v:,.0f}/s"
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return "[bold]rates[/]  " + ("  ".join(parts) if parts else "-")


def watch(tap: str, interval: float, count: int | None = None, console: Any = None) -> int:
    """`toe stat --watch`: the stat view refreshed in place every `interval` s, with rates
    per second from successive answers; Ctrl-C ends it (exit 0). `count`: stop after that
    many views (the hidden --watch-count, for tests)."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.markup import escape
    from rich.text import Text

    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 160)  # as render_stat's
    prev: tuple[float, dict[str, Any]] | None = None
    shown = 0
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                data = api_call(tap, {"cmd": "stat"})
                now = time.monotonic()
                r = rates(prev[1], data, now - prev[0]) if prev else None
                prev = (now, data)
                body = Console(width=console.width, color_system=console.color_system,
                               force_terminal=console.is_terminal, file=io.StringIO())
                with body.capture() as cap:
                    render_stat(data, body)
                head = Text.from_markup(f"[bold]toe stat --tap {escape(tap)}[/]  every {interval:g} s, "
                                        f"{time.strftime('%H:%M:%S')}  (Ctrl-C ends)")
                live.update(Group(head, Text.from_markup(rates_line(r)), Text.from_ansi(cap.get())),
                            refresh=True)
                shown += 1
                if count is not None and shown >= count:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0
