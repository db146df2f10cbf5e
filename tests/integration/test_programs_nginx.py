"""nginx (master + 2 workers, epoll) under toe run, served to kernel-side curl.

nginx runs in the loopback-only client namespace with a generated minimal
configuration (everything under the test's tmp directory, `daemon off` so
the pid `toe run` started is the master's). The workers inherit the
listening socket across fork and accept on it with epoll. Checked: a 50 MB
file and 1,000 small files byte-exact (one curl reusing a connection, then
`curl -Z` with 50 connections), a reload (SIGHUP: new workers, the old ones
leave) after which nginx keeps serving, and a graceful stop (SIGQUIT, exit 0).

`sendfile on` makes nginx send file bodies with sendfile(2) on the socket.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tools, sha256_file, unique_port, wait_until

pytestmark = pytest.mark.integration

BIG = 50 * 1000 * 1000 + 17
SMALL_FILES = 40
REQUESTS_EACH = 500  # sequential, then parallel: 1,000 small requests

CONF = """\
daemon off;
master_process on;
worker_processes 2;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ use epoll; worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    log_format t '$pid $status $body_bytes_sent $request_uri';
    access_log {d}/access.log t;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile {sendfile};
    keepalive_requests 10000;
    server {{
        listen {ip}:{port};
        root {d}/www;
    }}
}}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A document root: `big` (50 MB) and small files s1..sN of assorted sizes; name -> sha256."""
    www = tmp_path_factory.mktemp("nginx") / "www"
    www.mkdir()
    rng = random.Random(7)
    with open(www / "big", "wb") as f:
        left = BIG
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)
    for i in range(1, SMALL_FILES + 1):
        (www / f"s{i}").write_bytes(rng.randbytes(rng.choice([0, 1, 100, 1460, 4000, 20000, 70000])))
    return www, {p.name: sha256_file(p) for p in www.iterdir()}


def workers(master: int) -> set[int]:
    """Pids of the master's worker processes."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return set()
    out = set()
    for pid in kids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"nginx: worker process"):
                    out.add(pid)
        except FileNotFoundError:
            pass
    return out


def fetch(adapter, url: str, out: Path, max_time: int = 60) -> None:
    res = adapter.run(["curl", "-sS", "--fail", "--max-time", str(max_time), "-o", str(out), url], text=True)
    assert res.returncode == 0, f"curl {url} failed ({res.returncode}): {res.stderr.strip()}"


def serve_and_reload(adapter, client_ns, site, tmp_path, sendfile: str) -> None:
    require_tools("nginx", "curl")
    www, sums = site
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    os.symlink(www, d / "www")
    port = unique_port()
    conf = d / "nginx.conf"
    conf.write_text(CONF.format(d=d, ip=adapter.ip, port=port, sendfile=sendfile))
    base = f"http://{adapter.ip}:{port}"
    with open(d / "stdout.log", "wb") as log:
        master = client_ns.toe_popen(adapter, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                                     stdout=log, stderr=subprocess.STDOUT)
    adapter.wait_toe_listener(port)
    first = wait_until(lambda: (w := workers(master.pid)) and len(w) == 2 and w, "nginx's two workers")

    def errors() -> str:
        return (d / "error.log").read_text()[-3000:]

    # a small file first (fails fast if bodies do not get through), then 50 MB
    fetch(adapter, f"{base}/s7", tmp_path / "s7", max_time=15)
    assert sha256_file(tmp_path / "s7") == sums["s7"], errors()
    fetch(adapter, f"{base}/big", tmp_path / "big")
    assert (tmp_path / "big").stat().st_size == BIG
    assert sha256_file(tmp_path / "big") == sums["big"], errors()

    # 500 small requests over one kept-alive connection: the concatenation of the bodies
    names = [f"s{i % SMALL_FILES + 1}" for i in range(REQUESTS_EACH)]
    res = adapter.run(["curl", "-sS", "--fail", "--max-time", "120", *[f"{base}/{n}" for n in names]],
                      timeout=180)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    want = hashlib.sha256(b"".join((www / n).read_bytes() for n in names)).hexdigest()
    assert hashlib.sha256(res.stdout).hexdigest() == want, errors()

    # 500 more, in parallel (up to 50 connections at once), each to its own file
    outdir = tmp_path / "par"
    outdir.mkdir()
    cfg = tmp_path / "curl.cfg"
    cfg.write_text("".join(f'url = "{base}/{n}"\noutput = "{outdir}/{i}"\n' for i, n in enumerate(names)))
    res = adapter.run(["curl", "-sS", "--fail", "-Z", "--parallel-max", "50", "--max-time", "120", "-K", str(cfg)],
                      text=True, timeout=180)
    assert res.returncode == 0, f"curl -Z failed ({res.returncode}): {res.stderr.strip()}"
    bad = [i for i, n in enumerate(names) if not (outdir / str(i)).exists()
           or sha256_file(outdir / str(i)) != sums[n]]
    assert not bad, f"{len(bad)} parallel downloads wrong, e.g. #{bad[:5]}; {errors()}"
    log_lines = (d / "access.log").read_text().splitlines()
    assert sum(1 for line in log_lines if line.split()[1] == "200") >= 2 + 2 * REQUESTS_EACH
    served_by = {int(line.split()[0]) for line in log_lines}
    print(f"\nnginx (sendfile {sendfile}): {len(log_lines)} requests, served by workers {sorted(served_by)}")
    assert served_by <= first, (served_by, first)

    # reload: the master starts new workers and retires the old ones; serving goes on
    os.kill(master.pid, signal.SIGHUP)
    wait_until(lambda: (w := workers(master.pid)) and len(w) == 2 and not (w & first), "nginx's new workers")
    fetch(adapter, f"{base}/s3", tmp_path / "s3", max_time=15)
    assert sha256_file(tmp_path / "s3") == sums["s3"], errors()
    fetch(adapter, f"{base}/big", tmp_path / "big2")
    assert sha256_file(tmp_path / "big2") == sums["big"], errors()
    assert "reconfiguring" in (d / "error.log").read_text()
    after = {int(line.split()[0]) for line in (d / "access.log").read_text().splitlines()[len(log_lines):]}
    assert after and not (after & first), f"served after the reload by old workers {after & first}"

    # graceful stop
    master.send_signal(signal.SIGQUIT)
    assert master.wait(60) == 0, errors()
    assert " [alert] " not in (d / "error.log").read_text() and " [emerg] " not in (d / "error.log").read_text(), \
        errors()


def test_nginx_sendfile_off(adapter, client_ns, site, tmp_path):
    serve_and_reload(adapter, client_ns, site, tmp_path, "off")


def test_nginx_sendfile_on(adapter, client_ns, site, tmp_path):
    serve_and_reload(adapter, client_ns, site, tmp_path, "on")
