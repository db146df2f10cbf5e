"""Python programs through the adapter: asyncio (epoll, nonblocking sockets) and socketserver (fork).

* an asyncio echo server under toe run, 100 concurrent kernel-side asyncio
  clients; and the mirror, 100 concurrent asyncio clients under toe run
  against a kernel-side asyncio echo server. Each connection sends a random
  amount (up to 256 KB), half-closes, and must get exactly its bytes back
  before end of file.
* a socketserver.ForkingTCPServer under toe run: each kernel-side client is
  served by a forked child (the offloaded socket crosses fork; the parent
  closes its copy), byte-exact.

Two programs under toe run in the same namespace would talk through the
adapter's loopback, which it does not do: the peer is always the kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import unique_port, wait_for_line

pytestmark = pytest.mark.integration

CONNECTIONS = 100
MAX_BYTES = 256 * 1024
SEED = "20240607"

ECHO_SERVER = r"""
import asyncio, sys

async def handle(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()                       # after the peer's end of file: ours
    await writer.wait_closed()

async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=256)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

ECHO_CLIENTS = r"""
import asyncio, random, sys

host, port, count, seed, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

async def one(i):
    rng = random.Random(f"{seed}-{i}")
    data = rng.randbytes(rng.randint(1, most))
    reader, writer = await asyncio.open_connection(host, port)

    async def send():
        for off in range(0, len(data), 16384):
            writer.write(data[off:off + 16384])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = bytearray()
    while chunk := await reader.read(65536):
        got += chunk
    await sender
    writer.close()
    await writer.wait_closed()
    return len(data), len(got), bytes(got) == data

async def main():
    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True), 180)
    errors = [f"{i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    bad = [f"{i}: sent {r[0]} got {r[1]}" for i, r in enumerate(results)
           if not isinstance(r, BaseException) and not r[2]]
    print("RESULT", sum(r[2] for r in ok), sum(r[0] for r in ok), "errors", errors[:5], "bad", bad[:5], flush=True)

asyncio.run(main())
"""

FORKING_SERVER = r"""
import hashlib, os, socketserver, sys

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        size = int(self.rfile.readline())
        data = self.rfile.read(size)
        self.wfile.write(f"{os.getpid()} {len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())
        self.wfile.write(data)

class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True

with Server((sys.argv[1], int(sys.argv[2])), Handler) as server:
    print("listening", os.getpid(), flush=True)
    server.serve_forever()
"""

FORKING_CLIENTS = r"""
import hashlib, json, os, socket, sys, threading

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = [None] * count

def one(i):
    data = os.urandom(1_000_000 + 7919 * i)
    with socket.create_connection((host, port), timeout=120) as s:
        sender = threading.Thread(target=s.sendall, args=(f"{len(data)}\n".encode() + data,))
        sender.start()
        f = s.makefile("rb")
        pid, size, digest = f.readline().split()
        echo = f.read(len(data))
        rest = f.read()
        sender.join()
    results[i] = {"pid": int(pid), "size_ok": int(size) == len(data),
                  "digest_ok": digest.decode() == hashlib.sha256(data).hexdigest(),
                  "echo_ok": echo == data, "eof_ok": rest == b""}

threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


def echo_result(res: subprocess.CompletedProcess, who: str) -> None:
    out = res.stdout
    assert res.returncode == 0, f"{who} exited {res.returncode}: {out[-2000:]} {res.stderr[-2000:]}"
    line = next((line for line in out.splitlines() if line.startswith("RESULT ")), None)
    assert line, f"{who} printed no result: {out[-2000:]} {res.stderr[-2000:]}"
    words = line.split(maxsplit=3)
    ok, total = int(words[1]), int(words[2])
    print(f"\n{who}: {ok}/{CONNECTIONS} connections byte-exact, {total} bytes each way")
    assert ok == CONNECTIONS, line


def test_asyncio_echo_server_under_toe_run(adapter, client_ns):
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", ECHO_SERVER, adapter.ip, str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_line(server, "listening")
    res = adapter.run([sys.executable, "-c", ECHO_CLIENTS, adapter.ip, str(port), str(CONNECTIONS), SEED,
                       str(MAX_BYTES)], text=True, timeout=240)
    echo_result(res, "kernel-side asyncio clients -> asyncio server under toe run")
    assert server.poll() is None, "the asyncio server under toe run died"
    totals = adapter.stat()["totals"]
    assert totals["connections"] + totals["closed_connections"] >= CONNECTIONS, totals


def test_asyncio_echo_clients_under_toe_run(adapter, client_ns):
    port = unique_port()
    server = adapter.popen([sys.executable, "-u", "-c", ECHO_SERVER, adapter.host_ip, str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_line(server, "listening")
    res = client_ns.toe_run(adapter, [sys.executable, "-c", ECHO_CLIENTS, adapter.host_ip, str(port),
                                      str(CONNECTIONS), SEED, str(MAX_BYTES)], text=True, timeout=240)
    echo_result(res, "asyncio clients under toe run -> kernel-side asyncio server")
    totals = adapter.stat()["totals"]
    assert totals["connections"] + totals["closed_connections"] >= CONNECTIONS, totals
    assert totals["handovers"] == 0, totals


def test_forking_tcp_server_under_toe_run(adapter, client_ns):
    clients = 8
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", FORKING_SERVER, adapter.ip, str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = wait_for_line(server, "listening")
    server_pid = int(line.split()[1])
    res = adapter.run([sys.executable, "-c", FORKING_CLIENTS, adapter.ip, str(port), str(clients)], text=True,
                      timeout=240)
    assert res.returncode == 0, f"kernel-side clients failed: {res.stderr[-3000:]}"
    results = json.loads(res.stdout.splitlines()[-1])
    assert len(results) == clients
    for r in results:
        assert r["size_ok"] and r["digest_ok"] and r["echo_ok"] and r["eof_ok"], results
    pids = {r["pid"] for r in results}
    assert len(pids) == clients and server_pid not in pids, f"not one forked child per client: {pids}"
    assert server.poll() is None, "the forking server under toe run died"
