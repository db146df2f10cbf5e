"""Bulk HTTP transfer, kernel path vs adapter path, in one run.

    python -m bench.transfer [--size-mb 100] [--repeat 3] [--json FILE]

Both directions with the same unmodified binaries (curl, python3 -m
http.server):

* download: curl fetches a file from a kernel-side http.server;
* upload:   an http.server serves a file to a kernel-side curl.

Kernel path: the program runs in a namespace joined to the server's by a veth
pair (a plain NIC). Adapter path: it runs under `toe run` in a loopback-only
namespace, so every byte crosses the adapter. Each transfer is checked by
sha256. Reported per path: wall time, throughput, the application process's
CPU seconds, and for the adapter path the daemon's CPU ("the adapter's CPU").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from offload_daemon import netns
from offload_daemon.config import api_path, ctl_path, log_path

SRV_NET, VETH_SRV, VETH_CLI = "198.18.1", "198.18.1.1", "198.18.1.2"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _toe(*args: str) -> list[str]:
    return [sys.executable, "-m", "offload_daemon.cli", *args]


def _daemon_cpu(tap: str) -> float:
    s = socket.socket(socket.AF_UNIX)
    s.connect(api_path(tap))
    s.sendall(b'{"cmd": "stat"}\n')
    d = json.loads(s.makefile().readline())
    s.close()
    return d["cpu"]["user_s"] + d["cpu"]["system_s"]


def _wait_port(ns: str, ip: str, port: int) -> None:
    for _ in range(200):
        r = netns.run(ns, ["curl", "-s", "-o", "/dev/null", "-I", f"http://{ip}:{port}/"],
                      capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"server {ip}:{port} in {ns} did not come up")


def _preload(tap: str) -> list[str]:
    """What `toe run` does, minus its Python start-up (which would be charged to the app)."""
    shim = importlib.resources.files("shim") / "libtoe_shim.so"
    return ["env", f"LD_PRELOAD={shim}", f"TOE_SOCK={ctl_path(tap)}"]


def _timed_child(argv: list[str]) -> tuple[float, float]:
    """Run argv to completion: (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _proc_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write every sample here")
    a = ap.parse_args(argv)
    tag = f"tb{os.getpid()}"
    srv, kcli, acli, tap = f"{tag}-srv", f"{tag}-kcli", f"{tag}-acli", f"{tag}t"
    tmp = tempfile.mkdtemp(prefix="toe-bench-")
    blob = os.path.join(tmp, "blob")
    with open(blob, "wb") as f:
        for _ in range(a.size_mb):
            f.write(os.urandom(1 << 20))
    want = _sha256(blob)
    out = os.path.join(tmp, "out")
    samples: list[dict] = []
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(_toe("up", "--netns", srv, "--tap", tap), check=True, stdout=subprocess.DEVNULL)
        netns.create_loopback_only(kcli)
        netns.create_loopback_only(acli)
        subprocess.run(["ip", "link", "add", f"{tag}a", "netns", srv, "type", "veth", "peer", "name",
                        f"{tag}b", "netns", kcli], check=True)
        netns.run(srv, ["ip", "addr", "add", f"{VETH_SRV}/24", "dev", f"{tag}a"], check=True)
        netns.run(srv, ["ip", "link", "set", f"{tag}a", "up"], check=True)
        netns.run(kcli, ["ip", "addr", "add", f"{VETH_CLI}/24", "dev", f"{tag}b"], check=True)
        netns.run(kcli, ["ip", "link", "set", f"{tag}b", "up"], check=True)
        port = 18000 + os.getpid() % 1000
        procs.append(netns.popen(srv, ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(port)],
                                 cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(srv, "127.0.0.1", port)
        toe_run = _toe("run", "--tap", tap, "--")
        # upload servers: one per path, serving the same file
        up_k = netns.popen(kcli, ["python3", "-m", "http.server", "--bind", VETH_CLI, str(port + 1)],
                           cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        up_a = netns.popen(acli, [*toe_run, "python3", "-m", "http.server", "--bind", "198.18.0.2",
                                  str(port + 1)], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs += [up_k, up_a]
        _wait_port(srv, VETH_CLI, port + 1)
        _wait_port(srv, "198.18.0.2", port + 1)
        for rep in range(a.repeat):
            for path in ("kernel", "adapter"):
                # download: the application is curl
                ns, ip = (kcli, VETH_SRV) if path == "kernel" else (acli, "198.18.0.1")
                pre = [] if path == "kernel" else _preload(tap)
                url = f"http://{ip}:{port}/blob"
                # timed to /dev/null (the app's CPU is then its socket work), then checked
                d0 = _daemon_cpu(tap)
                wall, cpu = _timed_child(netns.exec_argv(ns, pre + ["curl", "-sS", "-o", "/dev/null", url]))
                dcpu = _daemon_cpu(tap) - d0
                _timed_child(netns.exec_argv(ns, pre + ["curl", "-sS", "-o", out, url]))
                ok = _sha256(out) == want
                samples.append({"direction": "download", "path": path, "rep": rep, "wall_s": wall,
                                "app_cpu_s": cpu, "adapter_cpu_s": dcpu if path == "adapter" else None,
                                "sha256_ok": ok})
                # upload: the application is the http.server
                server = up_k if path == "kernel" else up_a
                ip = VETH_CLI if path == "kernel" else "198.18.0.2"
                c0, d0 = _proc_cpu(server.pid), _daemon_cpu(tap)
                url = f"http://{ip}:{port + 1}/blob"
                wall, _ = _timed_child(netns.exec_argv(srv, ["curl", "-sS", "-o", "/dev/null", url]))
                cpu, dcpu = _proc_cpu(server.pid) - c0, _daemon_cpu(tap) - d0
                _timed_child(netns.exec_argv(srv, ["curl", "-sS", "-o", out, url]))
                ok = _sha256(out) == want
                samples.append({"direction": "upload", "path": path, "rep": rep, "wall_s": wall,
                                "app_cpu_s": cpu, "adapter_cpu_s": dcpu if path == "adapter" else None,
                                "sha256_ok": ok})
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(_toe("down", "--tap", tap), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            os.unlink(log_path(tap))
        except FileNotFoundError:
            pass
        for ns in (kcli, acli, srv):
            netns.delete(ns)
        shutil.rmtree(tmp, ignore_errors=True)
    size = a.size_mb * (1 << 20)
    print(f"{a.size_mb} MiB over HTTP, {a.repeat} repetitions, medians "
          f"(kernel: veth; adapter: toe run, offloads on)")
    print(f"{'direction':<10} {'path':<8} {'time s':>8} {'Gbit/s':>8} {'app CPU s':>10} {'adapter CPU s':>14} ok")
    for direction in ("download", "upload"):
        for path in ("kernel", "adapter"):
            ss = [s for s in samples if s["direction"] == direction and s["path"] == path]
            wall = statistics.median(s["wall_s"] for s in ss)
            cpu = statistics.median(s["app_cpu_s"] for s in ss)
            med_dcpu = statistics.median(s["adapter_cpu_s"] for s in ss) if path == "adapter" else None
            ok = all(s["sha256_ok"] for s in ss)
            print(f"{direction:<10} {path:<8} {wall:8.3f} {size * 8 / wall / 1e9:8.2f} {cpu:10.3f} "
                  f"{'' if med_dcpu is None else f'{med_dcpu:14.3f}':>14} {'yes' if ok else 'NO'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size_bytes": size, "samples": samples}, f, indent=1)
    return 0 if all(s["sha256_ok"] for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
