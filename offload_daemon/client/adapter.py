"""An adapter's life cycle: its /run/toe files, start (up), stop (down), and what
`toe run` needs (the preload environment, the check that the adapter answers)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import grp
import importlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from offload_daemon.client.env import python_env, shim_path
from offload_daemon.client.errors import CLIError
from offload_daemon.client.inspection import api_pings
from offload_daemon.config import (
    RUN_DIR,
    AdapterConfig,
    api_path,
    ctl_path,
    log_path,
    state_path,
)


class _LazyModule:
    """Import a module on first use: `toe run` must exec its command without paying for
    pyroute2 (about 150 ms of start-up that would be charged to the application)."""

    def __init__(self, name: str):
        self._name = name
        self._mod: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._mod is None:
            self._mod = importlib.import_module(self._name)
        return getattr(self._mod, attr)


netns: Any = _LazyModule("offload_daemon.netns")

DEFAULT_TAP = AdapterConfig.tap
UP_TIMEOUT_S = 30.0        # how long `toe up` waits for the daemon to answer ping
DOWN_GRACE_S = 10.0        # SIGTERM -> SIGKILL escalation in `toe down`


def read_state(tap: str) -> dict[str, Any] | None:
    try:
        with open(state_path(tap)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def daemon_alive(pid: Any) -> bool:
    """True if `pid` is a live process that looks like a toe daemon (guards against pid reuse)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
    return not zombie and (b"offload_daemon" in cmdline or b"toe" in cmdline)


def remove_files(tap: str) -> list[str]:
    """Remove the adapter's state file and sockets (not its log); return the names removed."""
    removed = []
    for path in (state_path(tap), state_path(tap) + ".tmp", ctl_path(tap), api_path(tap)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(os.path.basename(path))
    return removed


def lingering(pid: int, ns: str | None) -> bool:
    """True if `pid` still runs in the adapter's network namespace (`ns`, None: ours) although
    daemon_alive() says no: a killed daemon that has not finished exiting (its cmdline is
    empty once its memory is gone, but it still holds the TAP and the namespace)."""
    if pid <= 0 or process_gone(pid):
        return False
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat(os.path.join(netns.NETNS_DIR, ns) if ns else "/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def last_log_line(tap: str) -> str:
    try:
        with open(log_path(tap), errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1].removeprefix("toe: ") if lines else ""



def prepare_netns(config: AdapterConfig) -> tuple[AdapterConfig, bool]:
    """Create config.netns if it does not exist (then `toe down` deletes it); make /run/toe.
    Returns the config (marked netns_created when made here) and whether it was made."""
    created = False
    if config.netns and not netns.exists(config.netns):
        try:
            netns.create(config.netns)
        except netns.NetnsError as e:
            raise CLIError(str(e)) from None
        created = True
        config = dataclasses.replace(config, netns_created=True)
    prepare_run_dir()
    return config, created


def prepare_run_dir() -> None:
    """/run/toe as root's 0755 directory (access.ensure_run_dir); say what was repaired."""
    from offload_daemon.access import ensure_run_dir

    try:
        repaired = ensure_run_dir()
    except OSError as e:
        raise CLIError(str(e) if e.filename is None else f"{RUN_DIR}: {e.strerror}") from None
    if repaired:
        print(f"toe: repaired {RUN_DIR}: {', '.join(repaired)}", file=sys.stderr)



def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return f"gid {gid}"


def access_summary(config: AdapterConfig) -> str:
    who = ["root", *(user_name(u) for u in config.allow_users)]
    if config.allow_group is not None:
        who.append(f"group {group_name(config.allow_group)}")
    return ", ".join(who)


def check_not_up(config: AdapterConfig) -> tuple[AdapterConfig, list[str]]:
    """Refuse a second adapter on the same TAP name; clear what a dead one left behind.

    Returns the config to use (netns_created carried over when a dead adapter
    of ours left its namespace behind and we are asked for the same one: it is
    reused, and deleted by `toe down` as if made now) and notes on what was cleared.
    """
    tap = config.tap
    state = read_state(tap)
    notes: list[str] = []
    if state is not None and daemon_alive(state.get("pid")):
        where = f" in netns {state['netns']}" if state.get("netns") else ""
        raise CLIError(f"adapter {tap} is already up (daemon pid {state.get('pid')}{where}); "
                       f"'toe down --tap {tap}' first")
    if state is None and os.path.exists(api_path(tap)) and api_pings(tap):
        raise CLIError(f"adapter {tap} is already up (it answers on {api_path(tap)})")
    if state is not None or os.path.exists(ctl_path(tap)) or os.path.exists(api_path(tap)):
        old = state or {}
        old_ns = old.get("netns") if isinstance(old.get("netns"), str) else None
        old_pid = old.get("pid")
        if isinstance(old_pid, int) and lingering(old_pid, old_ns):
            wait_gone(old_pid, DOWN_GRACE_S)
        removed = remove_files(tap)  # a daemon that died without cleaning up
        dead = f"daemon pid {old_pid}" if isinstance(old_pid, int) else "a daemon"
        notes.append(f"{dead} of adapter {tap} was gone; removed its stale {', '.join(removed)}")
        if old.get("netns_created") and old_ns and netns.exists(old_ns):
            if old_ns == config.netns:
                config = dataclasses.replace(config, netns_created=True)
                notes.append(f"reusing its netns {old_ns}")
            elif not (inside := netns.pids(old_ns)):
                netns.delete(old_ns)
                notes.append(f"deleted its netns {old_ns}")
            else:
                notes.append(f"left its netns {old_ns} (pids {', '.join(map(str, inside))} in it)")
    present = False
    if config.netns is None or netns.exists(config.netns):
        with contextlib.suppress(netns.NetnsError, OSError):
            present = config.tap in netns.links(config.netns)
    if present:
        where = f"netns {config.netns}" if config.netns else "this network namespace"
        raise CLIError(f"an interface named {config.tap} already exists in {where}")
    return config, notes


def adapter_up(config: AdapterConfig, quiet: bool = False) -> dict[str, Any]:
    """Start the daemon for `config` in the background; return its state once it answers ping.

    Creates config.netns if missing (and deletes it again if the start fails, also
    when it is the namespace of a dead adapter of ours that we reuse).
    """
    config, notes = check_not_up(config.resolved())
    if notes and not quiet:
        print(f"toe: {'; '.join(notes)}", file=sys.stderr)
    config, created = prepare_netns(config)
    created = created or config.netns_created
    proc = None
    try:
        with open(log_path(config.tap), "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "offload_daemon", "--config", json.dumps(dataclasses.asdict(config))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd="/", env=python_env(),
            )
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            rc = proc.poll()
            if rc is not None:
                why = last_log_line(config.tap) or f"the daemon exited with status {rc}"
                raise CLIError(f"adapter {config.tap} failed to start: {why}")
            state = read_state(config.tap)
            if state and state.get("pid") == proc.pid and api_pings(config.tap):
                break
            if time.monotonic() > deadline:
                raise CLIError(f"adapter {config.tap} did not answer within {UP_TIMEOUT_S:.0f} s "
                               f"(see {log_path(config.tap)})")
            time.sleep(0.05)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
            remove_files(config.tap)
        if created and config.netns:
            with contextlib.suppress(netns.NetnsError):
                netns.delete(config.netns)
        raise
    proc.returncode = 0  # detached on purpose: `toe down` stops it by pid
    if not quiet:
        print(summary_line(config, state))
    return state


def summary_line(config: AdapterConfig, state: dict[str, Any]) -> str:
    where = f"netns {config.netns}" if config.netns else "the current network namespace"
    return (f"adapter {config.tap} up in {where}: {config.addr} (kernel side {config.host_addr}), "
            f"daemon pid {state.get('pid')}, log {log_path(config.tap)}; for {access_summary(config)}; "
            f"run programs with 'toe run --tap {config.tap} -- CMD'")


def run_foreground(config: AdapterConfig) -> int:
    config, notes = check_not_up(config.resolved())
    if notes:
        print(f"toe: {'; '.join(notes)}", file=sys.stderr)
    try:
        from offload_daemon.daemon import run  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise CLIError(f"the offload daemon is not available: {e}") from None
    config, created = prepare_netns(config)
    created = created or config.netns_created
    try:
        rc = run(config)
    finally:
        if created and config.netns:
            with contextlib.suppress(netns.NetnsError):
                netns.delete(config.netns)
    return rc if isinstance(rc, int) else 0


def adapter_down(tap: str, quiet: bool = False) -> None:
    """Stop the adapter's daemon (SIGTERM, then SIGKILL), delete the namespace `toe up` made."""
    state = read_state(tap)
    if state is None:
        leftovers = remove_files(tap)
        extra = f" (removed stale {', '.join(leftovers)} from {RUN_DIR})" if leftovers else ""
        raise CLIError(f"adapter {tap} is not up (no {state_path(tap)}){extra}")
    pid = state.get("pid")
    ns = state.get("netns") if isinstance(state.get("netns"), str) and state.get("netns") else None
    killed = False
    alive = daemon_alive(pid)
    if not alive and isinstance(pid, int) and lingering(pid, ns):  # killed a moment ago: let it exit
        wait_gone(pid, DOWN_GRACE_S)
    if alive:
        assert isinstance(pid, int)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, DOWN_GRACE_S):
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not wait_gone(pid, DOWN_GRACE_S):
                raise CLIError(f"daemon pid {pid} of adapter {tap} does not exit, even after SIGKILL")
    removed = remove_files(tap)
    notes = []
    if killed:
        notes.append(f"daemon did not stop on SIGTERM within {DOWN_GRACE_S:.0f} s and was killed")
    if not alive:
        who = f"daemon pid {pid}" if isinstance(pid, int) else "its daemon (state file unreadable)"
        notes.append(f"{who} was already gone; removed its stale {', '.join(removed)} "
                     f"(log kept: {log_path(tap)})")
    if state.get("netns_created") and ns:
        left = netns.pids(ns)
        try:
            deleted = netns.delete(ns)
        except netns.NetnsError as e:
            raise CLIError(f"adapter {tap} stopped, but {e}") from None
        notes.append(f"netns {ns} deleted" if deleted else f"netns {ns} was already gone")
        if left:
            notes.append(f"pids {', '.join(map(str, left))} still in it keep the namespace alive "
                         "until they exit")
    if not quiet:
        print(f"adapter {tap} down" + (f" ({'; '.join(notes)})" if notes else ""))


def process_gone(pid: int) -> bool:
    """True once `pid` has fully exited (gone, or a zombie: its namespaces and files are released)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child (the demo's daemon): reap it
            return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return False


def preload_env(tap: str, env: dict[str, str], strict: bool = False) -> dict[str, str]:
    """`env` changed the way `toe run` runs a program on adapter `tap`: the shim first in
    LD_PRELOAD (other preloads kept after it), TOE_SOCK naming the adapter, TOE_STRICT, and
    TOE_POLL_US from the adapter's app_poll_us (an explicit --poll-us) unless the caller set it."""
    shim = shim_path()
    env = dict(env)
    if "TOE_POLL_US" not in env:
        poll = (read_state(tap) or {}).get("app_poll_us")
        if isinstance(poll, int) and poll > 0:
            env["TOE_POLL_US"] = str(poll)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != shim]
    env["LD_PRELOAD"] = " ".join([shim, *preload])
    env["TOE_SOCK"] = ctl_path(tap)
    if strict:
        env["TOE_STRICT"] = "1"
    else:
        env.pop("TOE_STRICT", None)
    return env


def probe_ctl(path: str) -> int:
    """0 if a live socket is bound at `path`, else the errno a connect() to it gets.

    Connects with the wrong socket type (SOCK_DGRAM to the SOCK_SEQPACKET control
    socket): the kernel checks the path (ENOENT), write permission (EACCES) and that
    a socket is bound there (ECONNREFUSED) before the type (EPROTOTYPE), so a live
    daemon answers EPROTOTYPE and never sees a connection (a real one would appear
    in `toe stat` as a process, with the pid the program gets after exec).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        return 0 if e.errno == errno.EPROTOTYPE else (e.errno or errno.EIO)
    finally:
        s.close()
    return 0


def check_adapter_answers(tap: str) -> None:
    """Before `toe run` execs: exit (CLIError) if adapter `tap` is not up or its daemon is
    dead. A user it does not allow goes on: the shim says so in one line when the program
    makes its first TCP socket, and gives it the kernel path (as with no daemon)."""
    ctl = ctl_path(tap)
    err = probe_ctl(ctl)
    if err == 0:
        return
    state = read_state(tap)
    pid = (state or {}).get("pid")
    again = f"'toe down --tap {tap}' cleans up, 'toe up --tap {tap}' starts it again"
    if err == errno.EACCES:
        if isinstance(pid, int) and not pid_exists(pid):
            raise CLIError(f"adapter {tap} is not answering (daemon pid {pid} is gone); {again}")
        # the program runs; its first TCP socket() gets the shim's one line and the kernel
        return
    if err == errno.ENOENT and state is None:
        raise CLIError(f"adapter {tap} is not up (no {ctl}); start it with 'toe up --tap {tap}'")
    if err in (errno.ENOENT, errno.ECONNREFUSED):
        if not isinstance(pid, int):
            why = f"nothing accepts on {ctl}" if err == errno.ECONNREFUSED else f"no {ctl}"
        elif not daemon_alive(pid):
            why = f"daemon pid {pid} is gone"
        elif err == errno.ENOENT:
            why = f"daemon pid {pid} has no {ctl}"
        else:
            why = f"daemon pid {pid} does not accept connections on {ctl}"
        raise CLIError(f"adapter {tap} is not answering ({why}); {again}")
    raise CLIError(f"cannot reach adapter {tap} at {ctl}: {os.strerror(err)}")


def pid_exists(pid: int) -> bool:
    """Whether any process has this pid (kill 0: works for other users' processes too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---------------------------------------------------------------- which adapter


def adapters_up(run_dir: str = RUN_DIR) -> list[str]:
    """TAP names of the adapters whose state file (<run_dir>/<tap>.json) names a live daemon."""
    taps = []
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "*.json"))):
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and daemon_alive(state.get("pid")):
            taps.append(os.path.basename(path).removesuffix(".json"))
    return taps


def choose_tap(tap: str | None, run_dir: str = RUN_DIR) -> str:
    """--tap if given; else the one adapter that is up; DEFAULT_TAP when none is (so the
    error is the usual 'adapter toe0 is not up'); one line listing them when several are."""
    if tap is not None:
        return tap
    up = adapters_up(run_dir)
    if len(up) > 1:
        raise CLIError(f"{len(up)} adapters are up: {', '.join(up)}; choose one with --tap NAME")
    return up[0] if up else DEFAULT_TAP
