"""An application whose adapter dies under it fails cleanly: a reset, then end of file.

Never a hang, never a poll() loop spinning on a socket that stays readable
with nothing to read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from offload_daemon.config import state_path
from tests.conftest import unique_port, wait_for_line

pytestmark = pytest.mark.integration

CLIENT = r"""
import errno, select, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
print("connected", flush=True)
if sys.stdin.readline().strip() == "send":  # a doorbell into A that the (stopped) daemon never reads
    s.send(b"x")
    print("sent", flush=True)
    sys.stdin.readline()                   # the test kills the daemon, then lets us go on
p = select.poll()
p.register(s, select.POLLIN)
for wakeups in range(1, 1001):
    p.poll(10000)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        continue
    except OSError as e:
        print("error", errno.errorcode[e.errno], wakeups, flush=True)
        break
    print("eof" if not data else "data", wakeups, flush=True)
    break
else:
    print("spinning", wakeups, flush=True)
print("after", repr(s.recv(10)), flush=True)
"""


@pytest.mark.parametrize("unread", [False, True], ids=["idle", "doorbell-unread"])
def test_daemon_killed_under_a_nonblocking_poll_loop(adapter, client_ns, unread):
    """With `unread`, the daemon dies with a doorbell byte still in B: the kernel then reports
    ECONNRESET on A once by itself, and the shim must not add a second one."""
    port = unique_port()
    peer = adapter.popen(["nc", "-l", adapter.host_ip, str(port)], stdout=subprocess.DEVNULL)
    adapter.wait_kernel_listener(port)
    client = client_ns.toe_popen(adapter, [sys.executable, "-c", CLIENT, adapter.host_ip, str(port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(client, "connected")
    with open(state_path(adapter.tap)) as f:
        pid = json.load(f)["pid"]
    if unread:
        os.kill(pid, signal.SIGSTOP)
        client.stdin.write("send\n")
        client.stdin.flush()
        wait_for_line(client, "sent")
    os.kill(pid, signal.SIGKILL)
    out, err = client.communicate("go\n", timeout=60)
    lines = out.split("\n")
    first = next(line for line in lines if line.split()[:1] in (["error"], ["eof"], ["data"], ["spinning"]))
    verdict, *rest = first.split()
    assert verdict == "error" and rest[0] == "ECONNRESET", out
    assert int(rest[1]) <= 3, f"took {rest[1]} poll wake-ups: {out}"
    assert "after b''" in out, (out, err, client.returncode)   # reported once, then end of file
    assert client.returncode == 0
    peer.kill()
