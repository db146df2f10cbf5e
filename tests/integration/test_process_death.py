"""A program under toe run SIGKILLed in the middle of a large transfer.

The kernel counts the references to the socket's A end; when the killed
process's go, the daemon closes the connection as the kernel would on close():
FIN once the TX ring has drained, or RST when unread data remains in the RX
ring. The kernel-side peer (a Python program) must see one or the other
promptly (end of file, ECONNRESET or EPIPE, well within its 60 s guard), and
the adapter must stop listing the connection as open, forget the process
and release its socket.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import require_tools, unique_port, wait_for_line, wait_until

pytestmark = pytest.mark.integration

ANNOUNCE = 8 << 20   # the transfer is well under way once this much has crossed
OPEN_DONE = {"TIME_WAIT", "CLOSED"}

# Receives from the program under toe run: counts bytes until end of file or an error.
RECEIVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
total, announced = 0, False
try:
    while True:
        data = conn.recv(1 << 20)
        if not data:
            print("OUTCOME EOF", total, flush=True)
            break
        total += len(data)
        if not announced and total >= int(sys.argv[3]):
            print("transferring", total, flush=True)
            announced = True
except ConnectionResetError:
    print("OUTCOME ECONNRESET", total, flush=True)
except TimeoutError:
    print("OUTCOME TIMEOUT", total, flush=True)
conn.close()
"""

# Sends to the program under toe run as fast as it takes it; watches for end of file or an error.
SENDER = r"""
import errno, select, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
conn.setblocking(False)
buf = bytes(range(256)) * 256
total, announced, outcome = 0, False, None
while outcome is None:
    r, w, _ = select.select([conn], [conn], [], 60)
    if not r and not w:
        outcome = "TIMEOUT"
        break
    try:
        if r:
            if not conn.recv(65536):
                outcome = "EOF"
                break
        if w:
            total += conn.send(buf)
    except BlockingIOError:
        continue
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e.errno))
        break
    if not announced and total >= int(sys.argv[3]):
        print("transferring", total, flush=True)
        announced = True
print("OUTCOME", outcome, total, flush=True)
conn.close()
"""


@pytest.mark.parametrize("direction", ["toe_sends", "toe_receives"])
def test_sigkill_mid_transfer(adapter, client_ns, direction):
    require_tools("nc")
    port = unique_port()
    peer = adapter.popen([sys.executable, "-u", "-c", RECEIVER if direction == "toe_sends" else SENDER,
                          adapter.host_ip, str(port), str(ANNOUNCE)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    wait_for_line(peer, "listening")
    if direction == "toe_sends":  # nc copies /dev/zero to the peer, without end
        with open("/dev/zero", "rb") as zero:
            prog = client_ns.toe_popen(adapter, ["nc", adapter.host_ip, str(port)], stdin=zero,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:                         # nc reads from the peer, without end (stdin's EOF does not stop it)
        prog = client_ns.toe_popen(adapter, ["nc", adapter.host_ip, str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_line(peer, "transferring")

    def ours() -> list[dict]:
        return [c for c in adapter.stat().get("connections", []) if c.get("remote") == f"{adapter.host_ip}:{port}"]

    (conn,) = ours()
    assert conn["state"] == "ESTABLISHED" and conn["pid"] == prog.pid, conn

    prog.send_signal(signal.SIGKILL)
    assert prog.wait(30) == -signal.SIGKILL
    line = wait_for_line(peer, "OUTCOME", timeout=90)
    outcome = line.split()[1]
    print(f"\n{direction}: the kernel peer saw {outcome} after {line.split()[2]} bytes")
    assert outcome in ({"EOF", "ECONNRESET"} if direction == "toe_sends" else {"EOF", "ECONNRESET", "EPIPE"}), line
    assert peer.wait(30) == 0

    wait_until(lambda: all(c["state"] in OPEN_DONE for c in ours()), "the connection to leave the open states")
    # the process is listed as exited (toe stat keeps recent ones), holding no socket
    stat = wait_until(lambda: (s := adapter.stat())
                      and all(not p.get("alive", True) and p["sockets"] == 0
                              for p in s["processes"] if p["pid"] == prog.pid)
                      and s["totals"]["sockets_open"] == 0 and s, "the adapter to see the killed process exit")
    closed = [c for c in stat.get("closed", []) if c.get("remote") == f"{adapter.host_ip}:{port}"]
    assert closed or all(c["state"] in OPEN_DONE for c in ours()), stat.get("connections")
