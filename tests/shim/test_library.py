"""The shared object itself: exports, imports, loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .fake_adapter import PEER_ADDR
from .helpers import run, run_py

EXPORTS = {
    "socket", "bind", "listen", "accept", "accept4", "connect", "read", "write", "readv",
    "writev", "send", "recv", "sendto", "recvfrom", "sendmsg", "recvmsg", "close", "shutdown",
    "getsockname", "getpeername", "getsockopt", "setsockopt", "fcntl", "fcntl64", "ioctl",
    "dup", "dup2", "dup3", "__read_chk", "__recv_chk", "__recvfrom_chk",
    "sendfile", "sendfile64", "splice", "recvmmsg", "sendmmsg", "close_range", "closefrom",
}
# weak references every gcc-built shared object carries (crtbeginS.o)
CRT_WEAK = {"_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable", "__gmon_start__",
            "__cxa_finalize"}


def nm(so, *flags: str) -> list[tuple[str, str]]:
    out = subprocess.run(["nm", "-D", *flags, str(so)], check=True, capture_output=True,
                         text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((parts[-2], parts[-1]))
    return rows


def test_imports_only_versioned_libc(shim_so):
    rows = nm(shim_so, "--undefined-only")
    assert rows
    for kind, sym in rows:
        assert "Py" not in sym, sym
        name = sym.split("@")[0]
        if kind == "w":
            assert name in CRT_WEAK, sym
        else:
            assert kind == "U" and "@GLIBC_" in sym, sym


def test_exports_exactly_the_interposed_calls(shim_so):
    rows = nm(shim_so, "--defined-only")
    assert {sym for kind, sym in rows if kind in "TW"} == EXPORTS


def test_loads_with_bind_now(shim_so):
    env = dict(os.environ, LD_BIND_NOW="1", LD_PRELOAD=str(shim_so))
    r = run(["/bin/true"], env)
    assert r.returncode == 0 and r.stderr == ""
    r = run([sys.executable, "-c", "import socket; socket.socketpair()"], env)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_no_daemon_kernel_fallback_and_one_warning(shim_so, ctl_dir):
    path = os.path.join(ctl_dir, "nobody-here.sock")
    env = dict(os.environ, LD_PRELOAD=str(shim_so), TOE_SOCK=path)
    code = r"""
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
c = socket.socket(); c.connect(l.getsockname())
a, _ = l.accept()
c.sendall(b"k" * 100000)
got = b""
while len(got) < 100000:
    got += a.recv(65536)
assert got == b"k" * 100000
assert c.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
for _ in range(3):
    socket.socket().close()
print("ok")
"""
    r = run_py(code, env)
    assert r.stdout.strip() == "ok"
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("toe:")]
    assert warnings == [f"toe: no adapter at {path} (No such file or directory); sockets use the kernel"]


def test_works_before_the_shim_constructor(shim_so, env, fake, tmp_path):
    """A constructor that runs before the shim's (LD_PRELOAD="shim early")
    connects, writes and reads an offloaded socket."""
    early = tmp_path / "libearly.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-o", str(early),
                    str(Path(__file__).with_name("early.c"))], check=True)
    init = run(["/bin/true"], dict(env, LD_DEBUG="files", LD_PRELOAD=f"{shim_so} {early}"))
    order = [ln.split()[-1] for ln in init.stderr.splitlines() if "calling init" in ln]
    assert order.index(str(early)) < order.index(str(shim_so)), order
    r = run(["/bin/echo", "main"], dict(env, LD_PRELOAD=f"{shim_so} {early}", EARLY_ADDR=PEER_ADDR,
                                        EARLY_PORT="7"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["early=ok", "main"]
    assert fake.stats()["ops"] == {1: 1, 13: 1, 5: 1}   # HELLO, SOCKETS (a pool of one), CONNECT


EARLY_EXEC = r"""
import os, socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.set_inheritable(True)
os.environ["EARLY_FD"] = str(s.fileno())
os.environ["LD_PRELOAD"] = sys.argv[3]
os.execv("/bin/echo", ["echo", "main"])
"""


def test_adopts_inherited_sockets_before_the_shim_constructor(shim_so, env, fake, tmp_path):
    """A constructor that runs before the shim's uses an offloaded socket inherited
    across exec: the first lookup that misses runs the adoption itself."""
    early = tmp_path / "libearly.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-o", str(early),
                    str(Path(__file__).with_name("early.c"))], check=True)
    r = run_py(EARLY_EXEC, env, PEER_ADDR, 7, f"{shim_so} {early}")
    assert r.stdout.split() == ["early_fd=ok", "main"]
    assert [res for _, res in fake.stats()["adopts"]] == [0]
