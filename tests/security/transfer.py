"""The victim's side of the security tests: a root transfer to keep byte-exact.

* `PATTERN_SERVER`, `PACED_CLIENT`, `KERNEL_CONNECTOR`: the scripts of the
  victim's transfer (a deterministic pattern, checked by sha256 and length);
  `pattern_block` / `pattern_digest` compute what must arrive.
* `Lines`: whole lines of a process's stdout, kept across waits.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from tests.security.hostile import readable

# ---------------------------------------------------------------- the victim's transfer


def pattern_block(i: int) -> bytes:
    """Block i (64 KiB) of the deterministic pattern PATTERN_SERVER sends."""
    return hashlib.sha256(b"toe-%d" % i).digest() * 2048


def pattern_digest(total: int) -> str:
    h = hashlib.sha256()
    i = sent = 0
    while sent < total:
        blk = pattern_block(i)[: total - sent]
        h.update(blk)
        sent += len(blk)
        i += 1
    return h.hexdigest()


# argv: host port total [connections (0: any number)]; each connection in a thread gets
# `total` bytes of the pattern (total 0: forever, until the peer goes away), then FIN.
PATTERN_SERVER = r"""
import hashlib, socket, sys, threading
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = int(sys.argv[4]) if len(sys.argv) > 4 else 0
def block(i):
    return hashlib.sha256(b"toe-%d" % i).digest() * 2048
def serve(c):
    try:
        i = sent = 0
        while total == 0 or sent < total:
            blk = block(i) if total == 0 else block(i)[: total - sent]
            c.sendall(blk)
            sent += len(blk)
            i += 1
    except OSError:
        pass
    finally:
        c.close()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(64)
print("listening", flush=True)
n = 0
while conns == 0 or n < conns:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
    n += 1
for t in threading.enumerate():
    if t is not threading.current_thread():
        t.join()
"""

# argv: host port total gate pace_s [listen_ip listen_port]
# Reads `gate` bytes, prints "midway", waits for a line on stdin (the test attacks then,
# with the rest of the transfer in flight), reads the rest with `pace_s` between reads,
# prints "done <bytes> <sha256> <bytes after the end>". With a listener: listens first
# ("listening") and accepts one connection at the very end ("accepted <its first line>").
PACED_CLIENT = r"""
import hashlib, os, socket, sys, time
host, port, total, gate, pace = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
lsock = None
if len(sys.argv) > 7:
    lsock = socket.socket()
    lsock.bind((sys.argv[6], int(sys.argv[7])))
    lsock.listen(4)
    print("listening", lsock.fileno(), flush=True)
s = socket.create_connection((host, port), timeout=120)
print("connected", os.getpid(), s.fileno(), flush=True)
h = hashlib.sha256()
n = 0
def take(limit, paced):
    global n
    while n < limit:
        b = s.recv(min(65536, limit - n))
        if not b:
            return
        h.update(b)
        n += len(b)
        if paced:
            time.sleep(pace)
take(gate, False)
print("midway", n, flush=True)
sys.stdin.readline()
take(total, True)
extra = len(s.recv(65536)) if n == total else 0
print("done", n, h.hexdigest(), extra, flush=True)
if lsock is not None:
    lsock.settimeout(60)
    c, peer = lsock.accept()
    c.settimeout(60)
    line = b""
    while not line.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            break
        line += b
    print("accepted", line.decode(errors="replace").strip() or "-", flush=True)
"""

# argv: host port message [hold|close]: connects (retrying while refused, 60 s), sends
# message + newline, then closes at once (close) or waits for the peer's EOF (hold).
KERNEL_CONNECTOR = r"""
import socket, sys, time
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
mode = sys.argv[4] if len(sys.argv) > 4 else "close"
deadline = time.monotonic() + 60
while True:
    try:
        c = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
c.sendall(msg + b"\n")
print("connected", flush=True)
if mode == "hold":
    c.settimeout(None)
    while c.recv(65536):
        pass
c.close()
"""


class Lines:
    """Whole lines of a process's stdout pipe, kept across calls (wait() for a marker
    never loses the lines that arrived with it)."""

    def __init__(self, proc: Any, name: str | None = None):
        self.proc = proc
        self.name = name or f"pid {proc.pid}"
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.seen: list[str] = []
        self.pos = 0

    def _fill(self, timeout: float) -> bool:
        if not readable(self.fd, timeout):
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        self.seen += [x.decode(errors="replace") for x in done]
        return True

    def wait(self, marker: str, timeout: float = 120.0) -> str:
        """The next line (after the ones already returned) that contains `marker`."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pos < len(self.seen):
                line = self.seen[self.pos]
                self.pos += 1
                if marker in line:
                    return line
            left = deadline - time.monotonic()
            if left > 0 and self._fill(min(left, 0.5)):
                continue
            if left > 0 and self.proc.poll() is None:   # EOF, the process still exiting
                time.sleep(0.05)
                continue
            raise AssertionError(f"{self.name} did not print {marker!r} (exit {self.proc.poll()}); "
                                 f"its last output: {self.seen[-5:]}")
