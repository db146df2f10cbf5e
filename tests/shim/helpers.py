"""Running programs under the shim from the tests."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

TIMEOUT_S = 20


# As root, every program under test runs in its own loopback-only network
# namespace: should the shim ever fall back to the kernel, test traffic for
# 198.18.0.0/24 fails there (ENETUNREACH) instead of leaving the machine.
ISOLATE = os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))


def isolated(argv: list[str], env: dict) -> tuple[list[str], dict]:
    """argv/env that run argv in a fresh network namespace with lo up.  Only the
    program itself gets the variables the test set (LD_PRELOAD ...), not the
    helpers that prepare the namespace."""
    if not ISOLATE:
        return argv, env
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v or k.startswith("LD_")}
    outer = {k: v for k, v in env.items() if k not in changed}
    inner = [f"{k}={v}" for k, v in changed.items()]
    return (["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec env "$@"', "sh",
             *inner, *argv], outer)


def run(argv: list[str], env: dict, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run to completion; on timeout the whole process group it started is killed
    (children it forked included), then TimeoutExpired is raised."""
    argv, env = isolated(argv, env)
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process group led by p (started with start_new_session) and reap p."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()


def run_py(code: str, env: dict, *args: object, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a Python snippet under the shim; it must exit 0."""
    r = run([sys.executable, "-c", code, *map(str, args)], env, timeout)
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def lines(r: subprocess.CompletedProcess) -> dict[str, str]:
    """'key=value' / 'key value' lines of a program's output as a dict."""
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.replace("=", " ", 1).partition(" ")
        out[k] = v.strip()
    return out


class Interactive:
    """A Python snippet under the shim that talks to the test line by line."""

    def __init__(self, code: str, env: dict, *args: object) -> None:
        argv, env = isolated([sys.executable, "-c", code, *map(str, args)], env)
        self.p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put("")

    def expect(self, prefix: str, timeout: float = TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.p.kill()
                raise AssertionError(f"timed out waiting for {prefix!r}; stderr:\n{self._stderr()}") from None
            if not line:
                self.p.wait()
                raise AssertionError(f"exited (rc={self.p.returncode}) before {prefix!r}; "
                                     f"stderr:\n{self._stderr()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def _stderr(self) -> str:
        return self.p.stderr.read() if self.p.stderr is not None else ""

    def send(self, text: str = "go") -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def finish(self, timeout: float = TIMEOUT_S) -> None:
        assert self.p.stdin is not None and self.p.stderr is not None
        self.p.stdin.close()
        rc = self.p.wait(timeout=timeout)
        assert rc == 0, f"rc={rc}\nstderr:\n{self.p.stderr.read()}"


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()
