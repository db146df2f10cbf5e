"""Abuse of the inspection API (/run/toe/<tap>.api, JSON lines) by an allowed user (issue 9).

nobody (allowed with --allow-users) sends what a hostile client would: a line of
1,000,000 nested brackets, a 100 MB line that never ends, and 10,000 pipelined
stat requests whose answers it never reads. The daemon must neither crash,
grow without bound nor stall: meanwhile root's `toe stat` answers and a root
transfer stays byte-exact; afterwards the daemon is back to its descriptors.
The only memory bound is a ratio of what the client offered (10 %).
"""

from __future__ import annotations

import errno
import json
import select
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import run_toe, unique_port
from tests.security import hostile, transfer
from tests.security.hostile import NOBODY_GID, NOBODY_UID, Channel
from tests.security.transfer import Lines

pytestmark = pytest.mark.integration

ALLOW_NOBODY = ("--allow-users", "nobody")
DEPTH = 1_000_000
ENDLESS = 100 << 20
PIPELINED = 10_000


def read_answer(s: socket.socket) -> dict[str, Any]:
    """The first answer line, or how the connection ended."""
    buf = bytearray()
    try:
        while b"\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                return {"closed": "EOF", "partial": bytes(buf[:200]).decode(errors="replace")}
            buf += chunk
    except OSError as e:
        return {"closed": errno.errorcode.get(e.errno or 0, str(e))}
    except TimeoutError:
        return {"closed": "timeout (no answer)"}
    line = bytes(buf).split(b"\n", 1)[0]
    try:
        return {"answer": json.loads(line)}
    except ValueError:
        return {"answer_raw": line[:200].decode(errors="replace")}


def send_deep(api: str, opener: str, depth: int) -> dict[str, Any]:
    s = hostile.api_connect(api, timeout=120)
    data = opener.encode() * depth + b"\n"
    out: dict[str, Any] = {"bytes": len(data)}
    try:
        s.sendall(data)
    except OSError as e:
        out["send_error"] = errno.errorcode.get(e.errno or 0, str(e))
    out.update(read_answer(s))
    s.close()
    return out


def root_stat_works(adapter) -> dict[str, Any]:
    res = run_toe("stat", "--tap", adapter.tap, "--json", timeout=120)
    assert res.returncode == 0, f"toe stat failed: {res.stderr.strip()}"
    return json.loads(res.stdout)


NESTED = [("[", DEPTH), ('{"a":', DEPTH),
          ("[", 3000), ('{"a":', 800)]       # deeper than Python's recursion limit, within 4 KiB


@pytest.mark.parametrize(("opener", "depth"), NESTED, ids=[f"{'arrays' if o == '[' else 'objects'}-{d}"
                                                           for o, d in NESTED])
def test_deeply_nested_request(adapter_factory, opener, depth):
    """A request line nested 1,000,000 deep (and one nested past Python's recursion limit yet
    short enough for any sane line limit): an error answer or a disconnect; the daemon lives
    on, answers stat, and holds no more descriptors than before."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    pid = hostile.daemon_pid(adapter.tap)
    base = hostile.figures(pid)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, send_deep, hostile.api_path(adapter.tap), opener, depth,
                          timeout=180)
    n = hostile.settle_fds(pid, base["fds"]) if hostile.alive(pid) else -1
    after = hostile.figures(pid) if hostile.alive(pid) else {}
    print(f"\nnested {opener!r} x {depth}: {got}; daemon before {base}, after {after}")
    assert hostile.alive(pid), f"the daemon died on a deeply nested request ({got})"
    if "answer" in got:
        assert got["answer"].get("ok") is False or "error" in got["answer"], \
            f"a {depth}-deep request got a non-error answer: {str(got['answer'])[:200]}"
    else:
        assert "closed" in got, f"neither an error answer nor a disconnect: {got}"
    root_stat_works(adapter)
    assert n == base["fds"], f"daemon descriptors {base['fds']} before, {n} after"


def send_endless(api: str, total: int) -> dict[str, Any]:
    """A line without newline, sent as fast as possible, 1 MiB per send."""
    s = hostile.api_connect(api, timeout=120)
    chunk = b"x" * (1 << 20)
    sent = 0
    out: dict[str, Any] = {}
    try:
        while sent < total:
            sent += s.send(chunk[: min(len(chunk), total - sent)])
    except OSError as e:
        out["error"] = errno.errorcode.get(e.errno or 0, str(e))
    except TimeoutError:
        out["error"] = "timeout (the daemon stopped reading without closing)"
    out["sent"] = sent
    s.close()
    return out


def test_endless_line(adapter_factory):
    """100 MB without a newline: the client is disconnected (EPIPE/ECONNRESET) before it has
    sent it all, and the daemon's memory (VmRSS, and its peak VmHWM) grows by less than 10 %
    of what the client offered."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    pid = hostile.daemon_pid(adapter.tap)
    base = hostile.figures(pid)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, send_endless, hostile.api_path(adapter.tap), ENDLESS, timeout=300)
    assert hostile.alive(pid), f"the daemon died on an endless line ({got})"
    n = hostile.settle_fds(pid, base["fds"])
    after = hostile.figures(pid)
    grow_rss, grow_hwm = after["rss_kb"] - base["rss_kb"], after["hwm_kb"] - base["hwm_kb"]
    bound_kb = ENDLESS // 10 // 1024
    figures = (f"sent {got['sent']:,} of {ENDLESS:,} bytes ({got.get('error', 'no error')}); daemon fds "
               f"{base['fds']} -> {n}, VmRSS {base['rss_kb']} -> {after['rss_kb']} kB (+{grow_rss}), "
               f"VmHWM {base['hwm_kb']} -> {after['hwm_kb']} kB (+{grow_hwm}); bound +{bound_kb} kB")
    print(f"\nendless line: {figures}")
    assert got.get("error") in ("EPIPE", "ECONNRESET"), f"the client was not disconnected: {figures}"
    assert got["sent"] < ENDLESS, figures
    assert grow_hwm < bound_kb and grow_rss < bound_kb, f"the daemon buffered the line: {figures}"
    root_stat_works(adapter)
    assert n == base["fds"], figures


def flood_unread(peer: hostile.Peer, api: str, count: int) -> dict[str, Any]:
    """Pipeline `count` stat requests and never read an answer; hold the connection until
    told to close. Sending stops when the daemon stops taking them (2 s without progress)."""
    s = hostile.api_connect(api)
    s.setblocking(False)
    data = b'{"cmd": "stat"}\n' * count
    sent, stalled_since = 0, None
    end = "all sent"
    while sent < len(data):
        try:
            sent += s.send(data[sent:sent + (1 << 16)])
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 2.0:
                end = "the daemon stopped taking requests"
                break
            select.select([], [s], [], 0.2)
        except OSError as e:
            end = f"dropped ({errno.errorcode.get(e.errno or 0, e)})"
            break
    peer.send({"requests_sent": sent // 16, "end": end})
    peer.recv(600)
    s.close()
    return {"requests_sent": sent // 16, "end": end}


def test_pipelined_requests_never_read(adapter_factory, client_ns):
    """10,000 stat requests whose answers nobody reads: meanwhile root's `toe stat` answers,
    a root transfer is byte-exact and HELLO is answered; once the client closes, the daemon
    is back to its descriptors."""
    adapter = adapter_factory(*ALLOW_NOBODY)
    pid = hostile.daemon_pid(adapter.tap)
    base = hostile.figures(pid)
    flood = hostile.UserProc(NOBODY_UID, NOBODY_GID, flood_unread, hostile.api_path(adapter.tap), PIPELINED)
    try:
        sent = flood.recv(120)
        during = hostile.figures(pid)
        t0 = time.monotonic()
        stat = run_toe("stat", "--tap", adapter.tap, "--json", timeout=120)
        stat_s = time.monotonic() - t0
        try:
            with Channel(hostile.ctl_path(adapter.tap), timeout=30) as ch:
                hello: Any = ch.hello().result
        except (OSError, hostile.ChannelClosed) as e:
            hello = f"no answer ({e!r}): the daemon stalled"
        total, port = 4 << 20, unique_port()
        server = adapter.popen([sys.executable, "-u", "-c", transfer.PATTERN_SERVER, adapter.host_ip, str(port),
                                str(total), "1"], stdout=subprocess.PIPE)
        Lines(server).wait("listening")
        try:
            res = client_ns.toe_run(adapter, [sys.executable, "-c", transfer.PACED_CLIENT, adapter.host_ip, str(port),
                                              str(total), "0", "0"], timeout=120)
            moved = res.stdout.decode().split()[-4:] if res.returncode == 0 else \
                [f"exit {res.returncode}: {res.stderr.decode()[-300:]}"]
        except subprocess.TimeoutExpired:
            moved = ["timed out (the daemon stalled?)"]
        flood.send("close")
        flood.result(60)
    finally:
        flood.kill()
    n = hostile.settle_fds(pid, base["fds"])
    after = hostile.figures(pid)
    figures = (f"{sent}; daemon before {base}, with the flood {during}, after {after} (fds settled at {n}); "
               f"root's toe stat took {stat_s:.1f} s")
    print(f"\nnever-read requests: {figures}")
    assert stat.returncode == 0, f"root's toe stat failed during the flood: {stat.stderr.strip()}. {figures}"
    assert hello == 0, f"HELLO answered {hello} during the flood"
    assert moved == ["done", str(total), transfer.pattern_digest(total), "0"], \
        f"a root transfer during the flood: {moved}"
    assert n == base["fds"], f"the daemon holds {n} descriptors, {base['fds']} before. {figures}"
