"""`toe run`: exec a program with the shim preloaded."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

from offload_daemon.client.adapter import check_adapter_answers, choose_tap, preload_env
from offload_daemon.client.errors import CLIError


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CLIError("run needs a command: toe run [--tap NAME] -- CMD [ARGS...]")
    tap = choose_tap(args.tap)
    check_adapter_answers(tap)
    env = preload_env(tap, dict(os.environ), strict=args.strict)
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
