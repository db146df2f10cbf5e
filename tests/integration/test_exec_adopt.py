"""inetd style: a server under toe run hands an accepted socket to an exec'd program.

The exec'd program (plain `cat`, stdin and stdout on the socket) starts with
a fresh shim that knows nothing; it adopts the inherited socket from the
adapter by its cookie, and the echo must come back byte-exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import sha256_file, unique_port, wait_for_line

pytestmark = pytest.mark.integration

INETD = r"""
import os, socket, sys
ls = socket.socket()
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(4)
print("listening", flush=True)
c, _ = ls.accept()
pid = os.fork()
if pid == 0:
    os.dup2(c.fileno(), 0)
    os.dup2(c.fileno(), 1)
    os.closerange(3, 256)
    os.execvp("cat", ["cat"])
c.close()
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_exec_adopts_an_inherited_socket(adapter, client_ns, tmp_path):
    port = unique_port()
    server = client_ns.toe_popen(adapter, [sys.executable, "-u", "-c", INETD, adapter.ip, str(port)],
                                 stdout=subprocess.PIPE, text=True)
    wait_for_line(server, "listening")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 << 20))
    out = tmp_path / "echo"
    with open(data, "rb") as src, open(out, "wb") as dst:
        res = adapter.run(["nc", "-N", adapter.ip, str(port)], stdin=src, stdout=dst, capture_output=False,
                          timeout=120)
    assert res.returncode == 0
    assert sha256_file(out) == sha256_file(data)
    assert wait_for_line(server, "child").split() == ["child", "0"]
    units = adapter.stat()["units"]["host_if"]
    assert units["adoptions"] >= 1, units
