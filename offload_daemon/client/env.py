"""Environment checks and the environment of child processes."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import sys

from offload_daemon.client.errors import CLIError


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
