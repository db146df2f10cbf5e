"""Network namespace helpers for the CLI, the demo and the tests.

Namespaces are the named kind `ip netns` manages (a bind mount under
/run/netns), created and removed with pyroute2. Programs are run inside one
with `ip netns exec NAME ...` (`exec_argv`), which also gives them the
namespace's view of /sys. Every helper that creates something has a context
manager that removes it again, whatever happens inside.

All failures are raised as `NetnsError` with one readable line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

NETNS_DIR = "/run/netns"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class NetnsError(Exception):
    """A namespace operation failed; str() is one line for the user."""


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise NetnsError(f"bad network namespace name {name!r} (letters, digits, '_', '.', '-'; max 64)")
    return name


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, check_name(name)))


def names() -> list[str]:
    """Names of the namespaces in /run/netns."""
    return sorted(_netns.listnetns(NETNS_DIR))


def create(name: str) -> None:
    """Create the namespace; it must not exist. Only `lo` is in it (down)."""
    check_name(name)
    if exists(name):
        raise NetnsError(f"network namespace {name} already exists")
    try:
        _netns.create(name)
    except PermissionError:
        raise NetnsError(f"creating network namespace {name} needs root") from None
    except OSError as e:
        raise NetnsError(f"cannot create network namespace {name}: {e.strerror or e}") from None
    if not exists(name):
        raise NetnsError(f"cannot create network namespace {name}")


def delete(name: str, missing_ok: bool = True) -> bool:
    """Remove the namespace's name; returns False if it did not exist.

    The namespace itself lives on while a process is still inside it: stop
    them first (`pids`), or its links (a TAP held open by a daemon) stay.
    """
    check_name(name)
    if not exists(name):
        if missing_ok:
            return False
        raise NetnsError(f"network namespace {name} does not exist")
    try:
        _netns.remove(name)
    except PermissionError:
        raise NetnsError(f"deleting network namespace {name} needs root") from None
    except FileNotFoundError:
        return False
    except OSError as e:
        raise NetnsError(f"cannot delete network namespace {name}: {e.strerror or e}") from None
    return True


def set_loopback_up(name: str) -> None:
    with IPRoute(netns=check_name(name)) as ipr:
        (idx,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=idx, state="up")


def links(name: str | None) -> list[str]:
    """Interface names in the namespace (None: this process's namespace)."""
    with IPRoute(netns=check_name(name)) if name else IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def create_loopback_only(name: str) -> None:
    """Create a namespace with `lo` up and nothing else: no other link, no route off it."""
    create(name)
    try:
        set_loopback_up(name)
        extra = [n for n in links(name) if n != "lo"]
        if extra:
            raise NetnsError(f"namespace {name} is not loopback-only: {', '.join(extra)}")
    except BaseException:
        delete(name)
        raise


def pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is `name`."""
    path = os.path.join(NETNS_DIR, check_name(name))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            out.append(int(entry))
    return sorted(out)


def stop_pids(pid_list: Sequence[int], grace_s: float = 5.0) -> None:
    """SIGTERM each pid, then SIGKILL the ones still alive after `grace_s`."""
    live = []
    for pid in pid_list:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            live.append(pid)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        live = [p for p in live if _alive(p)]
        if live:
            time.sleep(0.05)
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":  # our own child, not yet reaped: reap it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def exec_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside namespace `name` (unchanged when name is None)."""
    if name is None:
        return list(argv)
    return ["ip", "netns", "exec", check_name(name), *argv]


def run(name: str | None, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run inside the namespace."""
    return subprocess.run(exec_argv(name, argv), **kwargs)


def popen(name: str | None, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen inside the namespace; `ip netns exec` execs, so the pid is the program's."""
    return subprocess.Popen(exec_argv(name, argv), **kwargs)


@contextlib.contextmanager
def namespace(name: str, loopback_only: bool = True, kill_stragglers: bool = True) -> Iterator[str]:
    """Create `name` (loopback-only, or bare with lo down), yield it, always delete it.

    With kill_stragglers, processes still inside at exit are stopped by pid
    first, so the namespace really disappears.
    """
    if loopback_only:
        create_loopback_only(name)
    else:
        create(name)
    try:
        yield name
    finally:
        if kill_stragglers:
            stop_pids(pids(name))
        delete(name)
