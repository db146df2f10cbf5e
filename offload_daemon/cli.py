"""The `toe` command line: up, down, run, stat, demo.

Contract: a user's mistake or an environment problem is reported as one line,
`toe: <message>`, on stderr, with exit status 1 (130 when interrupted); no
traceback unless TOE_DEBUG=1. Everything that names an adapter does so by its
TAP name; the adapter's files are the /run/toe paths of `config.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import grp
import hashlib
import importlib
import importlib.resources
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from offload_daemon.config import (
    ID_MAX,
    MIB,
    RUN_DIR,
    SOCKETS_MAX,
    AdapterConfig,
    api_path,
    ctl_path,
    default_ring_mb,
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
API_TIMEOUT_S = 10.0
DEMO_BYTES = 20 * 1024 * 1024
TOE_GROUP = "toe"          # members of this group may use adapters by default, if it exists


class CLIError(Exception):
    """A failure to report as one line (`toe: <message>`), exit status 1."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP during a command that cleans up after itself."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- environment


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CLIError(f"{what} needs root (it uses network namespaces and TAP devices)")


def require_tun() -> None:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except FileNotFoundError:
        raise CLIError("/dev/net/tun does not exist (no TUN/TAP support: modprobe tun)") from None
    except OSError as e:
        raise CLIError(f"cannot open /dev/net/tun: {e.strerror}") from None
    os.close(fd)


def require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise CLIError(f"{name} is not installed (apt-get install {package})")
    return path


def shim_path() -> str:
    """Absolute path of the built shim, shim/libtoe_shim.so of the installed package."""
    path = str(importlib.resources.files("shim").joinpath("libtoe_shim.so"))
    if not os.path.isfile(path):
        raise CLIError(f"the shim is not built ({path} is missing): run scripts/setup.sh")
    if any(c in path for c in " :"):
        raise CLIError(f"the shim's path {path!r} contains a space or ':' (LD_PRELOAD cannot carry it)")
    return path


def package_root() -> str:
    """Directory holding the `offload_daemon` package this CLI was imported from."""
    import offload_daemon

    return os.path.dirname(os.path.dirname(os.path.abspath(offload_daemon.__file__)))


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python child that must import the same toe packages as we do."""
    env = dict(os.environ)
    root = package_root()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in parts if p != root]])
    env.update(extra or {})
    return env


def toe_argv() -> list[str]:
    """argv prefix that runs this very `toe` in a child process."""
    return [sys.executable, "-m", "offload_daemon.cli"]


# ---------------------------------------------------------------- adapter state


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


def api_request(tap: str, request: dict[str, Any], timeout: float = API_TIMEOUT_S) -> str:
    """Send one JSON line to the adapter's inspection API, return the answer line."""
    path = api_path(tap)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise CLIError(f"adapter {tap} is not up (no {path}); start it with 'toe up --tap {tap}'") from None
        except ConnectionRefusedError:
            raise CLIError(f"adapter {tap} does not answer on {path} (daemon gone? 'toe down --tap {tap}')") from None
        except PermissionError:
            raise CLIError(f"you (uid {os.getuid()}) are not allowed to use adapter {tap} ({path}); "
                           "ask its admin for 'toe up --allow-users'") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise CLIError(f"adapter {tap} did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise CLIError(f"talking to adapter {tap}: {e.strerror or e}") from None
    finally:
        s.close()
    line = bytes(buf).split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line:
        raise CLIError(f"adapter {tap} closed the inspection connection without answering")
    return line


def api_call(tap: str, request: dict[str, Any], timeout: float = API_TIMEOUT_S) -> dict[str, Any]:
    line = api_request(tap, request, timeout)
    try:
        answer = json.loads(line)
    except ValueError:
        raise CLIError(f"adapter {tap} answered something that is not JSON: {line[:80]!r}") from None
    if not isinstance(answer, dict):
        raise CLIError(f"adapter {tap} answered {type(answer).__name__}, not a JSON object")
    if answer.get("error"):
        raise CLIError(f"adapter {tap}: {answer['error']}")
    return answer


def api_pings(tap: str) -> bool:
    try:
        api_call(tap, {"cmd": "ping"}, timeout=2.0)
    except CLIError:
        return False
    return True


def last_log_line(tap: str) -> str:
    try:
        with open(log_path(tap), errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1].removeprefix("toe: ") if lines else ""


# ---------------------------------------------------------------- up / down


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


# ---------------------------------------------------------------- who may use it


def _parse_id(text: str, flag: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A name or numeric id -> id (numeric ones need no passwd/group entry)."""
    if text.isdigit():
        n = int(text)
        if n > ID_MAX:
            raise CLIError(f"{flag}: {kind[0]}id {n} out of range 0..{ID_MAX}")
        return n
    try:
        return lookup(text)
    except KeyError:
        raise CLIError(f"{flag}: no {kind} named {text!r}") from None


def parse_uid(text: str, flag: str = "--allow-users") -> int:
    return _parse_id(text, flag, "user", lambda name: pwd.getpwnam(name).pw_uid)


def parse_gid(text: str, flag: str = "--allow-group") -> int:
    return _parse_id(text, flag, "group", lambda name: grp.getgrnam(name).gr_gid)


def default_allow_users() -> tuple[int, ...]:
    """The user who ran `sudo toe up` (SUDO_UID); nobody besides root when root ran it."""
    sudo_uid = os.environ.get("SUDO_UID", "")
    if os.getuid() == 0 and sudo_uid.isdigit() and 0 < int(sudo_uid) <= ID_MAX:
        return (int(sudo_uid),)
    return ()


def default_allow_group() -> int | None:
    """Group `toe`, if the system has one."""
    try:
        return grp.getgrnam(TOE_GROUP).gr_gid
    except KeyError:
        return None


def allow_from_args(args: argparse.Namespace) -> tuple[tuple[int, ...], int | None]:
    """(allow_users, allow_group): each flag given replaces its own default; root is implicit."""
    if args.allow_users is None:
        users = default_allow_users()
    else:
        uids = [parse_uid(u.strip()) for u in args.allow_users.split(",") if u.strip()]
        users = tuple(sorted({u for u in uids if u != 0}))
    if args.allow_group is None:
        group = default_allow_group()
    else:
        group = parse_gid(args.allow_group.strip()) if args.allow_group.strip() else None
    return users, group


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


def config_from_args(args: argparse.Namespace) -> AdapterConfig:
    kw: dict[str, Any] = dict(
        tap=args.tap, addr=args.addr, host_addr=args.host_addr, netns=args.netns,
        offloads=not args.no_offloads,
    )
    if args.mtu is not None:
        kw["mtu"] = args.mtu
    if args.syn_retries is not None:
        kw["syn_retries"] = args.syn_retries
    if args.ring_kb is not None:
        kw["tx_ring_bytes"] = kw["rx_ring_bytes"] = args.ring_kb * 1024
    if args.pcap is not None:
        kw["pcap"] = os.path.abspath(args.pcap)
    kw["allow_users"], kw["allow_group"] = allow_from_args(args)
    for flag in ("max_sockets", "max_process_sockets", "max_ring_mb"):
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    config = AdapterConfig(**kw).resolved()
    try:
        if config.netns is not None:
            netns.check_name(config.netns)
        config.validate()
    except netns.NetnsError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(str(e)) from None
    return config


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


def cmd_up(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    require_root("up")
    require_tun()
    if args.foreground:
        return run_foreground(config)
    adapter_up(config)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if read_state(args.tap) is not None:
        require_root("down")
    adapter_down(args.tap)
    return 0


# ---------------------------------------------------------------- run


def preload_env(tap: str, env: dict[str, str], strict: bool = False) -> dict[str, str]:
    """`env` changed the way `toe run` runs a program on adapter `tap`: the shim first in
    LD_PRELOAD (other preloads kept after it), TOE_SOCK naming the adapter, TOE_STRICT."""
    shim = shim_path()
    env = dict(env)
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


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CLIError("run needs a command: toe run [--tap NAME] -- CMD [ARGS...]")
    check_adapter_answers(args.tap)
    env = preload_env(args.tap, dict(os.environ), strict=args.strict)
    if "/" in cmd[0]:
        exe: str | None = cmd[0] if os.path.isfile(cmd[0]) else None
    else:
        exe = shutil.which(cmd[0], path=env.get("PATH", os.defpath))
    if exe is None:
        raise CLIError(f"command not found: {cmd[0]}")
    # Python ignores SIGPIPE and SIGXFSZ; the program must get the defaults, as from a shell.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(exe, cmd, env)
    except OSError as e:
        raise CLIError(f"cannot run {cmd[0]}: {e.strerror or e}") from None
    return 127  # not reached


# ---------------------------------------------------------------- stat


def cmd_stat(args: argparse.Namespace) -> int:
    if args.json:
        line = api_request(args.tap, {"cmd": "stat"})
        try:
            json.loads(line)
        except ValueError:
            raise CLIError(f"adapter {args.tap} answered something that is not JSON: {line[:80]!r}") from None
        print(line)
        return 0
    render_stat(api_call(args.tap, {"cmd": "stat"}))
    return 0


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _rows(x: Any) -> list[dict[str, Any]]:
    return [r for r in x if isinstance(r, dict)] if isinstance(x, list) else []


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-" if n is None else str(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt(v: Any, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.3g}{suffix}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return f"{v}{suffix}"


def fmt_mib(n: Any) -> str:
    """Bytes in MiB, the unit of --max-ring-mb."""
    return f"{n / MIB:.1f} MiB" if isinstance(n, (int, float)) and not isinstance(n, bool) else fmt(n)


def limits_line(lim: dict[str, Any]) -> str:
    """The `limits` block of a stat answer as one line: use / limit; any key may be missing."""
    parts, rest = [], dict(lim)
    used, cap, per = rest.pop("sockets", None), rest.pop("max_sockets", None), rest.pop("max_process_sockets", None)
    if used is not None or cap is not None:
        parts.append(f"sockets {fmt(used)} / {fmt(cap)}")
    if per is not None:
        parts.append(f"per process {fmt(per)}")
    ring, ring_cap = rest.pop("ring_bytes", None), rest.pop("max_ring_bytes", None)
    if ring is not None or ring_cap is not None:
        parts.append(f"ring memory {fmt_mib(ring)} / {fmt_mib(ring_cap)}")
    parts += [f"{k.replace('_', ' ')} {fmt(v)}" for k, v in rest.items()]
    return "[bold]limits[/]  " + ("  ".join(parts) if parts else "-")


def render_stat(data: dict[str, Any], console: Any = None) -> None:
    """Render a `stat` answer for people; every key is optional."""
    from rich.columns import Columns
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 160)
    a, cpu, tot = _d(data.get("adapter")), _d(data.get("cpu")), _d(data.get("totals"))
    bits = [f"[bold]adapter {fmt(a.get('tap'))}[/]", f"{fmt(a.get('addr'))} ⇄ kernel {fmt(a.get('host_addr'))}"]
    for key in ("mac", "mtu", "offloads", "netns", "pid"):
        if key in a:
            bits.append(f"{key} {fmt(a[key])}")
    console.print("  ".join(bits), highlight=False)
    bits = []
    if "uptime_s" in a:
        bits.append(f"up {fmt(a['uptime_s'], ' s')}")
    for key, value in cpu.items():
        bits.append(f"cpu {key.removesuffix('_s')} {fmt(value, ' s' if key.endswith('_s') else '')}")
    if bits:
        console.print("  ".join(bits), highlight=False)
    if isinstance(data.get("limits"), dict):
        console.print(limits_line(data["limits"]), highlight=False)

    conns = _rows(data.get("connections"))
    t = Table(title=f"connections ({len(conns)})", title_justify="left")
    cols = [("id", "id"), ("local", "local"), ("remote", "remote"), ("state", "state"), ("in", "bytes_in"),
            ("out", "bytes_out"), ("cwnd", "cwnd"), ("srtt µs", "srtt_us"), ("rto ms", "rto_ms"),
            ("retrans", "retransmits"), ("pid", "pid")]
    for title, _ in cols:
        t.add_column(title, justify="left" if title in ("local", "remote", "state") else "right")
    for c in conns:
        t.add_row(*[fmt_bytes(c.get(k)) if k in ("bytes_in", "bytes_out") else fmt(c.get(k)) for _, k in cols])
    console.print(t)
    if conns:
        t = Table(title="sequence space, windows and rings (bytes queued in the TX / RX ring)",
                  title_justify="left")
        keys = ("id", "snd_una", "snd_nxt", "rcv_nxt", "snd_wnd", "rcv_wnd", "cwnd", "ssthresh",
                "tx_queued", "rx_queued")
        for k in keys:
            t.add_column(k, justify="right")
        for c in conns:
            t.add_row(*[fmt(c.get(k)) for k in keys])
        console.print(t)

    closed = _rows(data.get("closed"))
    if closed:
        t = Table(title=f"recently closed ({len(closed)})", title_justify="left")
        ckeys = [("id", "id"), ("local", "local"), ("remote", "remote"), ("closed from", "closed_from"),
                 ("in", "bytes_in"), ("out", "bytes_out"), ("retrans", "retransmits"), ("pid", "pid")]
        for title, _ in ckeys:
            t.add_column(title, justify="left" if title in ("local", "remote", "closed from") else "right")
        for c in closed:
            t.add_row(*[fmt_bytes(c.get(k)) if k in ("bytes_in", "bytes_out") else fmt(c.get(k)) for _, k in ckeys])
        console.print(t)

    lst = _rows(data.get("listeners"))
    if lst:
        t = Table(title=f"listeners ({len(lst)})", title_justify="left")
        for title in ("id", "local", "backlog", "pending", "pid"):
            t.add_column(title)
        for row in lst:
            t.add_row(*[fmt(row.get(k)) for k in ("id", "local", "backlog", "pending", "pid")])
        console.print(t)

    units = _d(data.get("units"))
    if units:
        tables = []
        for unit, counters in units.items():
            t = Table(title=str(unit), title_justify="left", show_header=False)
            t.add_column("counter")
            t.add_column("value", justify="right")
            for name, value in (counters.items() if isinstance(counters, dict) else [("value", counters)]):
                t.add_row(str(name), fmt(value))
            tables.append(t)
        console.print("[bold]hardware units[/]", highlight=False)
        console.print(Columns(tables))

    procs = _rows(data.get("processes"))
    if procs:
        t = Table(title=f"processes ({len(procs)}, with those that exited recently)", title_justify="left")
        for title in ("pid", "comm", "", "open", "offloaded", "to kernel", "refused", "why to kernel"):
            t.add_column(title)
        for p in procs:
            why = ", ".join(f"{k} ×{v}" for k, v in (p.get("handover_reasons") or {}).items())
            t.add_row(fmt(p.get("pid")), fmt(p.get("comm")), "" if p.get("alive", True) else "exited",
                      *[fmt(p.get(k)) for k in ("sockets", "offloaded", "handovers", "refused")], why or "")
        console.print(t)

    if tot:
        parts = []
        for key, v in tot.items():
            shown = f"{fmt_bytes(v)} ({v})" if key.startswith("bytes") else fmt(v)
            parts.append(f"{key.replace('_', ' ')} {shown}")
        console.print("[bold]totals[/]  " + "  ".join(parts), highlight=False)


# ---------------------------------------------------------------- demo


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so that `finally` blocks clean up.

    Only in this process: a forked child (pyroute2 forks to enter namespaces)
    inherits the handler and must die the default way, not run our cleanup.
    """
    me = os.getpid()

    def handler(signum: int, _frame: Any) -> None:
        if os.getpid() != me:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Keep Ctrl-C and SIGTERM from cutting a cleanup short (it is bounded in time)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_line(proc: subprocess.Popen, marker: str, timeout: float) -> str | None:
    """Read proc.stdout until a line containing `marker`; None if the process exits first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
            for line in buf[: buf.rfind(b"\n") + 1].decode(errors="replace").splitlines():
                if marker in line:
                    return line
        elif proc.poll() is not None:
            return None
    raise CLIError(f"timed out waiting for {marker!r} from pid {proc.pid}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cmd_demo(args: argparse.Namespace) -> int:
    require_root("demo")
    require_tun()
    require_program("ip", "iproute2")
    curl = require_program("curl", "curl")
    shim_path()
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} out of range 1..65535")
    pid = os.getpid()
    config = AdapterConfig(tap=f"toed{pid}", netns=f"toe-demo-{pid}")
    client_ns = f"toe-demo-{pid}-client"
    host_ip, port = str(config.host_iface.ip), args.port
    url = f"http://{host_ip}:{port}/blob"
    keep = False
    server = None
    up = False
    client_made = False
    workdir = tempfile.mkdtemp(prefix="toe-demo-")
    step = 0
    problems: list[str] = []

    def say(msg: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}/6] {msg}", flush=True)

    try:
        with _terminate_on_signals():
            print(f"toe demo: a kernel web server behind the adapter, curl through the adapter "
                  f"(namespaces {config.netns} and {client_ns})", flush=True)
            adapter_up(config, quiet=True)
            up = True
            say(f"adapter {config.tap} up in netns {config.netns}: {config.addr}, "
                f"kernel side {config.host_addr} (log {log_path(config.tap)})")
            netns.create_loopback_only(client_ns)
            client_made = True
            say(f"client netns {client_ns}: loopback only, no route anywhere")

            served = os.path.join(workdir, "srv")
            os.mkdir(served)
            blob = os.path.join(served, "blob")
            with open(blob, "wb") as f:
                for _ in range(DEMO_BYTES // (1 << 20)):
                    f.write(os.urandom(1 << 20))
            want = sha256_file(blob)
            server_err = os.path.join(workdir, "http.server.log")
            with open(server_err, "wb") as errf:
                server = netns.popen(
                    config.netns,
                    [sys.executable, "-u", "-m", "http.server", "--bind", host_ip, "--directory", served, str(port)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf, cwd=workdir,
                )
            if _wait_line(server, "Serving HTTP", 30.0) is None:
                _stop(server)
                with open(server_err, errors="replace") as logf:
                    lines = [ln.strip() for ln in logf if ln.strip()]
                why = lines[-1] if lines else f"exit status {server.returncode}"
                if "Address already in use" in why:
                    raise CLIError(f"port {port} is in use on {host_ip} in netns {config.netns}; "
                                   "pick another with --port")
                raise CLIError(f"the kernel-side web server did not start: {why}")
            say(f"kernel side: python3 -m http.server on {host_ip}:{port} in {config.netns}, "
                f"serving a {DEMO_BYTES // (1 << 20)} MB random file (sha256 {want[:16]}…)")

            out = os.path.join(workdir, "downloaded")
            argv = [*toe_argv(), "run", "--tap", config.tap, "--",
                    curl, "-sS", "-o", out, "-w", "%{size_download} %{time_total}", url]
            say(f"in {client_ns}: toe run -- curl -sS -o {out} {url}")
            t0 = time.monotonic()
            res = netns.run(client_ns, argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            cwd=workdir, env=python_env())
            elapsed = time.monotonic() - t0
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
                raise CLIError(f"curl through the adapter failed: {why.removeprefix('toe: ')}")
            got_bytes = os.path.getsize(out)
            try:
                _, t_total = res.stdout.split()
                secs = float(t_total)
            except ValueError:
                secs = elapsed
            secs = max(secs, 1e-6)
            rate = got_bytes / secs
            say(f"downloaded {got_bytes:,} bytes in {secs:.2f} s: {rate / 1e6:.1f} MB/s ({rate * 8 / 1e6:.0f} Mbit/s)")
            got = sha256_file(out)
            if got != want or got_bytes != DEMO_BYTES:
                raise CLIError(f"the download is corrupt: {got_bytes} bytes, sha256 {got[:16]}… "
                               f"instead of {DEMO_BYTES} bytes, {want[:16]}…")
            say(f"sha256 ok: {got}")
            print()
            render_stat(api_call(config.tap, {"cmd": "stat"}))
            keep = args.keep
    finally:
        with _signals_ignored():
            if not keep:
                _stop(server)
                if up:
                    try:
                        adapter_down(config.tap, quiet=True)
                    except CLIError as e:
                        problems.append(str(e))
                if client_made:
                    try:
                        netns.stop_pids(netns.pids(client_ns))
                        netns.delete(client_ns)
                    except netns.NetnsError as e:
                        problems.append(str(e))
                shutil.rmtree(workdir, ignore_errors=True)
                left = [n for n in (config.netns, client_ns) if n and netns.exists(n)]
                if left:
                    problems.append(f"namespaces left behind: {', '.join(left)}")
                with contextlib.suppress(OSError):
                    os.unlink(log_path(config.tap))
            if problems and sys.exc_info()[0] is not None:  # a failure is on its way out: add this one
                print(f"toe: demo cleanup: {'; '.join(problems)}", file=sys.stderr)
    if problems:
        raise CLIError(f"demo cleanup: {'; '.join(problems)}")
    if keep:
        assert server is not None
        toe = os.path.abspath(sys.argv[0]) if os.path.basename(sys.argv[0]) == "toe" else "toe"
        print(f"\nkept: adapter {config.tap} (netns {config.netns}), client netns {client_ns}, "
              f"web server pid {server.pid}, files in {workdir}")
        print(f"again: ip netns exec {client_ns} {toe} run --tap {config.tap} -- curl -o /dev/null {url}")
        print(f"clean up: kill {server.pid}; {toe} down --tap {config.tap}; ip netns del {client_ns}; rm -r {workdir}")
    else:
        print(f"\ncleaned up: daemon stopped, namespaces {config.netns} and {client_ns} deleted")
    return 0


# ---------------------------------------------------------------- parser / main


def ranged(lo: float, hi: float, kind: type = int) -> Any:
    """argparse type: a number of `kind` (int, also as 0x..; or float) within lo..hi."""
    def conv(text: str) -> Any:
        try:
            v = int(text, 0) if kind is int else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= v <= hi:
            show = str if kind is int else "{:g}".format
            raise argparse.ArgumentTypeError(f"{show(v)} is out of range {show(lo)}..{show(hi)}")
        return v
    return conv


TAP_HELP = f"the adapter's TAP name (default {DEFAULT_TAP})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="toe", description="User-space TCP Offload Engine emulator.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    up = sub.add_parser("up", help="start an adapter (daemon + TAP)",
                        description="Start the offload daemon and its TAP; print one line when it answers.")
    up.add_argument("--netns", metavar="NS", help="run the adapter in this network namespace (created if missing)")
    up.add_argument("--tap", default=DEFAULT_TAP, metavar="NAME", help=f"TAP name (default {DEFAULT_TAP})")
    up.add_argument("--addr", default=AdapterConfig.addr, metavar="A.B.C.D/N",
                    help=f"the adapter's own address (default {AdapterConfig.addr})")
    up.add_argument("--host-addr", default=AdapterConfig.host_addr, metavar="A.B.C.D/N",
                    help=f"the kernel side of the TAP (default {AdapterConfig.host_addr})")
    up.add_argument("--foreground", action="store_true", help="run the daemon in this process")
    up.add_argument("--no-offloads", action="store_true", help="no TSO/checksum offloads with the kernel")
    up.add_argument("--syn-retries", type=ranged(1, 127), metavar="N",
                    help=f"SYN retransmissions before ETIMEDOUT (default {AdapterConfig.syn_retries})")
    up.add_argument("--mtu", type=ranged(0, 1 << 20), metavar="N", help=f"MTU (default {AdapterConfig.mtu})")
    up.add_argument("--ring-kb", type=ranged(1, 1 << 20), metavar="N",
                    help=f"TX and RX ring size per socket in KiB (default {AdapterConfig.tx_ring_bytes // 1024})")
    up.add_argument("--pcap", metavar="FILE",
                    help="write every frame the adapter sends and receives to FILE (pcap, for Wireshark)")
    access = up.add_argument_group(
        "who may use the adapter",
        "Root always may. Each flag given replaces its own default; '' means none "
        "(--allow-users '' --allow-group '': root only). See docs/security.md.")
    access.add_argument("--allow-users", metavar="USER[,USER...]",
                        help="users (names or uids) who may run programs on it (default: the user who "
                        "ran 'sudo toe up' (SUDO_UID); nobody else when root ran it directly)")
    access.add_argument("--allow-group", metavar="GROUP",
                        help=f"a group (name or gid) whose members may use it (default: group "
                        f"'{TOE_GROUP}' if it exists, none otherwise)")
    limits = up.add_argument_group("limits", "What all local users together, and one process, may take.")
    limits.add_argument("--max-sockets", type=ranged(1, SOCKETS_MAX), metavar="N",
                        help=f"offloaded sockets open at once, in total (default {AdapterConfig.max_sockets})")
    limits.add_argument("--max-process-sockets", type=ranged(1, SOCKETS_MAX), metavar="N",
                        help=f"offloaded sockets open at once per process (default "
                        f"{AdapterConfig.max_process_sockets})")
    limits.add_argument("--max-ring-mb", type=ranged(0, 1 << 30), metavar="N",
                        help=f"ring memory of all open sockets in MiB (default 0: half of the memory, "
                        f"here {default_ring_mb()}; one socket takes "
                        f"{AdapterConfig().socket_bytes / MIB:.1f} MiB with the default --ring-kb)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop an adapter", description="Stop the adapter's daemon; "
                          "delete the namespace 'toe up' created for it.")
    down.add_argument("--tap", default=DEFAULT_TAP, metavar="NAME", help=TAP_HELP)
    down.set_defaults(func=cmd_down)

    run = sub.add_parser("run", help="run a program with its TCP sockets on the adapter",
                         usage="toe run [-h] [--tap NAME] [--strict] -- CMD [ARGS ...]",
                         description="Run CMD with the shim preloaded (same pid: exec). Sockets the "
                         "adapter does not serve (loopback, other subnets) go to the kernel, and "
                         "'toe stat' counts them per process with the reason.")
    run.add_argument("--tap", default=DEFAULT_TAP, metavar="NAME", help=TAP_HELP)
    run.add_argument("--strict", action="store_true",
                     help="make a would-be handover to the kernel an error (connect: ENETUNREACH, "
                     "bind: EADDRNOTAVAIL) with one line on stderr, instead of a silent fallback")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and its arguments")
    run.set_defaults(func=cmd_run)

    stat = sub.add_parser("stat", help="show connections and counters", description="Query the adapter's "
                          "inspection API and show connections, listeners, per-unit counters, processes.")
    stat.add_argument("--tap", default=DEFAULT_TAP, metavar="NAME", help=TAP_HELP)
    stat.add_argument("--json", action="store_true", help="print the raw JSON answer")
    stat.set_defaults(func=cmd_stat)

    demo = sub.add_parser("demo", help="show the adapter at work, in namespaces it creates and deletes",
                          description="Create an adapter and a loopback-only client namespace, download "
                          "a 20 MB file from a kernel web server through the adapter with curl, check its "
                          "sha256, show 'toe stat', clean up.")
    demo.add_argument("--keep", action="store_true", help="leave the adapter, namespaces and server running")
    demo.add_argument("--port", type=ranged(1, 65535), default=8080, help="web server port (default 8080)")
    demo.set_defaults(func=cmd_demo)

    from bench import cli as bench_cli  # here, not at the top: bench imports this module

    bench_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    debug = os.environ.get("TOE_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            raise CLIError("missing command: up, down, run, stat, demo or bench (see 'toe --help')")
        return int(args.func(args) or 0)
    except CLIError as e:
        if debug:
            traceback.print_exc()
        print(f"toe: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        if debug:
            traceback.print_exc()
        print(f"toe: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 1
    except netns.NetnsError as e:
        if debug:
            traceback.print_exc()
        print(f"toe: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the contract: one line, whatever broke
        if debug:
            traceback.print_exc()
        print(f"toe: {type(e).__name__}: {e}" if str(e) else f"toe: {type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
