"""`toe demo`: an adapter at work, in namespaces it creates and deletes."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from offload_daemon.cli.stat_view import render_stat
from offload_daemon.client.adapter import adapter_down, adapter_up, netns
from offload_daemon.client.env import python_env, require_program, require_root, require_tun, shim_path, toe_argv
from offload_daemon.client.errors import CLIError, Interrupted
from offload_daemon.client.inspection import api_call
from offload_daemon.config import AdapterConfig, log_path

DEMO_BYTES = 20 * 1024 * 1024


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so that `finally` blocks clean up.

    Only in this process: a forked child (pyroute2 forks to enter namespaces)
    inherits the handler and must die the default way, not run our cleanup.
    """
    me = os.getpid()

    def handler(signum: int, _frame: Any) -> None:
        if os.getpid() != me:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Keep Ctrl-C and SIGTERM from cutting a cleanup short (it is bounded in time)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_line(proc: subprocess.Popen, marker: str, timeout: float) -> str | None:
    """Read proc.stdout until a line containing `marker`; None if the process exits first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
            for line in buf[: buf.rfind(b"\n") + 1].decode(errors="replace").splitlines():
                if marker in line:
                    return line
        elif proc.poll() is not None:
            return None
    raise CLIError(f"timed out waiting for {marker!r} from pid {proc.pid}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cmd_demo(args: argparse.Namespace) -> int:
    require_root("demo")
    require_tun()
    require_program("ip", "iproute2")
    curl = require_program("curl", "curl")
    shim_path()
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} out of range 1..65535")
    pid = os.getpid()
    config = AdapterConfig(tap=f"toed{pid}", netns=f"toe-demo-{pid}")
    client_ns = f"toe-demo-{pid}-client"
    host_ip, port = str(config.host_iface.ip), args.port
    url = f"http://{host_ip}:{port}/blob"
    keep = False
    server = None
    up = False
    client_made = False
    workdir = tempfile.mkdtemp(prefix="toe-demo-")
    step = 0
    problems: list[str] = []

    def say(msg: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}/6] {msg}", flush=True)

    try:
        with _terminate_on_signals():
            print(f"toe demo: a kernel web server behind the adapter, curl through the adapter "
                  f"(namespaces {config.netns} and {client_ns})", flush=True)
            adapter_up(config, quiet=True)
            up = True
            say(f"adapter {config.tap} up in netns {config.netns}: {config.addr}, "
                f"kernel side {config.host_addr} (log {log_path(config.tap)})")
            netns.create_loopback_only(client_ns)
            client_made = True
            say(f"client netns {client_ns}: loopback only, no route anywhere")

            served = os.path.join(workdir, "srv")
            os.mkdir(served)
            blob = os.path.join(served, "blob")
            with open(blob, "wb") as f:
                for _ in range(DEMO_BYTES // (1 << 20)):
                    f.write(os.urandom(1 << 20))
            want = sha256_file(blob)
            server_err = os.path.join(workdir, "http.server.log")
            with open(server_err, "wb") as errf:
                server = netns.popen(
                    config.netns,
                    [sys.executable, "-u", "-m", "http.server", "--bind", host_ip, "--directory", served, str(port)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf, cwd=workdir,
                )
            if _wait_line(server, "Serving HTTP", 30.0) is None:
                _stop(server)
                with open(server_err, errors="replace") as logf:
                    lines = [ln.strip() for ln in logf if ln.strip()]
                why = lines[-1] if lines else f"exit status {server.returncode}"
                if "Address already in use" in why:
                    raise CLIError(f"port {port} is in use on {host_ip} in netns {config.netns}; "
                                   "pick another with --port")
                raise CLIError(f"the kernel-side web server did not start: {why}")
            say(f"kernel side: python3 -m http.server on {host_ip}:{port} in {config.netns}, "
                f"serving a {DEMO_BYTES // (1 << 20)} MB random file (sha256 {want[:16]}…)")

            out = os.path.join(workdir, "downloaded")
            argv = [*toe_argv(), "run", "--tap", config.tap, "--",
                    curl, "-sS", "-o", out, "-w", "%{size_download} %{time_total}", url]
            say(f"in {client_ns}: toe run -- curl -sS -o {out} {url}")
            t0 = time.monotonic()
            res = netns.run(client_ns, argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            cwd=workdir, env=python_env())
            elapsed = time.monotonic() - t0
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
                raise CLIError(f"curl through the adapter failed: {why.removeprefix('toe: ')}")
            got_bytes = os.path.getsize(out)
            try:
                _, t_total = res.stdout.split()
                secs = float(t_total)
            except ValueError:
                secs = elapsed
            secs = max(secs, 1e-6)
            rate = got_bytes / secs
            say(f"downloaded {got_bytes:,} bytes in {secs:.2f} s: {rate / 1e6:.1f} MB/s ({rate * 8 / 1e6:.0f} Mbit/s)")
            got = sha256_file(out)
            if got != want or got_bytes != DEMO_BYTES:
                raise CLIError(f"the download is corrupt: {got_bytes} bytes, sha256 {got[:16]}… "
                               f"instead of {DEMO_BYTES} bytes, {want[:16]}…")
            say(f"sha256 ok: {got}")
            print()
            render_stat(api_call(config.tap, {"cmd": "stat"}))
            keep = args.keep
    finally:
        with _signals_ignored():
            if not keep:
                _stop(server)
                if up:
                    try:
                        adapter_down(config.tap, quiet=True)
                    except CLIError as e:
                        problems.append(str(e))
                if client_made:
                    try:
                        netns.stop_pids(netns.pids(client_ns))
                        netns.delete(client_ns)
                    except netns.NetnsError as e:
                        problems.append(str(e))
                shutil.rmtree(workdir, ignore_errors=True)
                left = [n for n in (config.netns, client_ns) if n and netns.exists(n)]
                if left:
                    problems.append(f"namespaces left behind: {', '.join(left)}")
                with contextlib.suppress(OSError):
                    os.unlink(log_path(config.tap))
            if problems and sys.exc_info()[0] is not None:  # a failure is on its way out: add this one
                print(f"toe: demo cleanup: {'; '.join(problems)}", file=sys.stderr)
    if problems:
        raise CLIError(f"demo cleanup: {'; '.join(problems)}")
    if keep:
        assert server is not None
        toe = os.path.abspath(sys.argv[0]) if os.path.basename(sys.argv[0]) == "toe" else "toe"
        print(f"\nkept: adapter {config.tap} (netns {config.netns}), client netns {client_ns}, "
              f"web server pid {server.pid}, files in {workdir}")
        print(f"again: ip netns exec {client_ns} {toe} run --tap {config.tap} -- curl -o /dev/null {url}")
        print(f"clean up: kill {server.pid}; {toe} down --tap {config.tap}; ip netns del {client_ns}; rm -r {workdir}")
    else:
        print(f"\ncleaned up: daemon stopped, namespaces {config.netns} and {client_ns} deleted")
    return 0
