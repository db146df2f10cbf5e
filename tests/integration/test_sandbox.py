"""A sandboxed child serving on an inherited offloaded socket (issue 9).

Privilege-separated servers (sshd, vsftpd, postfix, dovecot...) accept as root,
fork, and the child chroots, changes user and enters a seccomp sandbox before its
first call on the inherited socket. `sandbox_server.c` (beside this file, compiled
at test time) does exactly that: chroot(empty dir) + setuid(nobody) + a seccomp
allow-list of plain I/O calls (read/write/send/recv, poll/epoll, close, shutdown,
futex, memory and signal housekeeping, exit; no socket/connect/sendmsg/recvmsg/
open/mmap), then it reads "GET <n>\\n", writes n bytes of a fixed pattern with
write() and send(), shuts down its sending side and reads to EOF. The kernel-side
client checks every byte.

Forbidden calls kill the child (SIGSYS) in mode "kill", and fail with EPERM in
mode "errno"; the transfer must be exact either way. The baseline runs the same
program and client on the kernel path (no toe run), inside the adapter's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tools, unique_port, wait_for_line

pytestmark = pytest.mark.integration

NBYTES = 8 * 1024 * 1024
NOBODY = 65534  # uid nobody, gid nogroup
SOURCE = Path(__file__).with_name("sandbox_server.c")
PATTERN_MUL = 0x9E3779B97F4A7C15

# the child's exit codes, as sandbox_server.c names them
CHILD_EXITS = {20: "sandbox set-up failed", 21: "read() of the request failed", 22: "EOF before the request",
               23: "bad request", 24: "write() failed", 25: "send() failed", 26: "shutdown(SHUT_WR) failed",
               27: "read() before EOF failed", 28: "the client sent more", 29: "close() failed"}

CLIENT = r"""
import json, socket, sys
host, port, nbytes, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
got, err = 0, None
try:
    c = socket.create_connection((host, port), timeout=30)
    c.sendall(b"GET %d\n" % nbytes)
    with open(out, "wb") as f:
        while True:
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            f.write(chunk)
            got += len(chunk)
    c.close()
except OSError as e:
    err = f"{type(e).__name__}: {e}"
print(json.dumps({"received": got, "error": err}))
"""


def expected_pattern(n: int) -> bytes:
    """Little-endian 64-bit words, word k = k * 0x9E3779B97F4A7C15 mod 2**64 (see sandbox_server.c)."""
    words = (n + 7) // 8
    mask = (1 << 64) - 1
    return b"".join(((k * PATTERN_MUL) & mask).to_bytes(8, "little") for k in range(words))[:n]


@pytest.fixture(scope="module")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sandbox_server.c, compiled for this run."""
    require_tools("gcc")
    exe = tmp_path_factory.mktemp("sandbox") / "sandbox_server"
    res = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"gcc {SOURCE.name}:\n{res.stderr}"
    return exe


@pytest.fixture(scope="module")
def pattern() -> bytes:
    return expected_pattern(NBYTES)


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    d.chmod(0o755)
    return d


def rest_of(proc: subprocess.Popen, timeout: float = 60) -> tuple[int | None, str]:
    """Wait for the server and read what is left of its stdout (after wait_for_line: from the fd)."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    out = b""
    if code is not None:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            out += chunk
    return code, out.decode(errors="replace")


def seccomp_record(pids: list[str]) -> str:
    """The kernel's audit line for the killed child (it names the system call), if dmesg shows it."""
    if not pids:
        return ""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    hits = [ln for ln in log.splitlines() if "type=1326" in ln and f" pid={pids[0]} " in ln]
    if not hits:
        return ""
    words = {w.split("=")[0]: w.split("=", 1)[1] for w in hits[-1].split() if "=" in w}
    return f"; kernel: syscall={words.get('syscall')} arch={words.get('arch')}"


def check_transfer(server: subprocess.Popen, client: subprocess.CompletedProcess, received: Path,
                   pattern: bytes, stderr_path: Path) -> None:
    """The server's child exited 0 and the client got exactly the pattern."""
    code, out = rest_of(server)
    err = stderr_path.read_text(errors="replace").strip().splitlines()[-15:]
    summary = json.loads(client.stdout) if client.stdout.strip() else {"received": None,
                                                                       "error": client.stderr.strip()}
    lines = [ln for ln in out.splitlines() if ln.startswith("child ")]
    child = lines[-1] if lines else None
    why = ""
    if child and child.startswith("child exit ") and child != "child exit 0":
        why = f" ({CHILD_EXITS.get(int(child.split()[2]), 'unknown code')})"
    if child == "child signal 31":
        forked = [ln.split()[1] for ln in out.splitlines() if ln.startswith("forked ")]
        why = f" (SIGSYS: the seccomp filter killed it for a forbidden call{seccomp_record(forked)})"
    if summary["received"] == len(pattern) and "timed out" in str(summary["error"]):
        why += "; the client got every byte but no FIN: shutdown(SHUT_WR) did not reach the wire"
    context = f"server said {child!r}{why}, exit {code}; client {summary}; server stderr: {err}"
    assert child == "child exit 0", context
    assert code == 0, context
    assert summary["error"] is None, context
    data = received.read_bytes()
    if data != pattern:
        common = min(len(data), len(pattern))
        first = next((i for i in range(common) if data[i] != pattern[i]), common)
        pytest.fail(f"received {len(data)} bytes, expected {len(pattern)}; first difference at offset {first}")


def run_sandboxed_under_toe(adapter, client_ns, sandbox_server, empty_dir, pattern, tmp_path, mode):
    port = unique_port()
    stderr_path = tmp_path / "server.err"
    with open(stderr_path, "wb") as err:
        server = client_ns.toe_popen(
            adapter,
            [str(sandbox_server), adapter.ip, str(port), str(NBYTES), str(empty_dir), str(NOBODY), str(NOBODY), mode],
            stdout=subprocess.PIPE, stderr=err,
        )
    wait_for_line(server, "listening")
    received = tmp_path / "received"
    client = adapter.run([sys.executable, "-c", CLIENT, adapter.ip, str(port), str(NBYTES), str(received)],
                         text=True, timeout=240)
    check_transfer(server, client, received, pattern, stderr_path)

    stat = adapter.stat()
    ours = [c for c in stat.get("connections", []) + stat.get("closed", [])
            if c.get("local") == f"{adapter.ip}:{port}"]
    assert ours, f"the connection to port {port} is neither open nor closed in toe stat: not offloaded"
    assert max(c.get("bytes_out", 0) for c in ours) >= NBYTES, ours


def test_sandboxed_child_serves_on_inherited_socket(adapter, client_ns, sandbox_server, empty_dir, pattern,
                                                    tmp_path):
    """Forbidden calls kill the child (SIGSYS)."""
    run_sandboxed_under_toe(adapter, client_ns, sandbox_server, empty_dir, pattern, tmp_path, "kill")


def test_sandboxed_child_with_eperm_sandbox_serves_on_inherited_socket(adapter, client_ns, sandbox_server,
                                                                       empty_dir, pattern, tmp_path):
    """Forbidden calls fail with EPERM: the shim must not lose or corrupt a byte over it."""
    run_sandboxed_under_toe(adapter, client_ns, sandbox_server, empty_dir, pattern, tmp_path, "errno")


@pytest.mark.parametrize("mode", ["kill", "errno"])
def test_sandboxed_child_on_the_kernel_path(adapter, sandbox_server, empty_dir, pattern, tmp_path, mode):
    """Baseline: the same program and check without toe run (kernel sockets, adapter's namespace)."""
    port = unique_port()
    stderr_path = tmp_path / "server.err"
    with open(stderr_path, "wb") as err:
        server = adapter.popen(
            [str(sandbox_server), adapter.host_ip, str(port), str(NBYTES), str(empty_dir), str(NOBODY),
             str(NOBODY), mode],
            stdout=subprocess.PIPE, stderr=err,
        )
    wait_for_line(server, "listening")
    received = tmp_path / "received"
    client = adapter.run([sys.executable, "-c", CLIENT, adapter.host_ip, str(port), str(NBYTES), str(received)],
                         text=True, timeout=240)
    check_transfer(server, client, received, pattern, stderr_path)
