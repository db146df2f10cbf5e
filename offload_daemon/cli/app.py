"""The `toe` command line: up, down, run, stat, demo.

Contract: a user's mistake or an environment problem is reported as one line,
`toe: <message>`, on stderr, with exit status 1 (130 when interrupted); no
traceback unless TOE_DEBUG=1. Everything that names an adapter does so by its
TAP name; the adapter's files are the /run/toe paths of `config.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from offload_daemon.cli.demo import cmd_demo
from offload_daemon.cli.run import cmd_run
from offload_daemon.cli.stat_view import cmd_stat
from offload_daemon.cli.up_down import TOE_GROUP, cmd_down, cmd_up
from offload_daemon.client.adapter import DEFAULT_TAP, netns
from offload_daemon.client.errors import CLIError, Interrupted, ranged
from offload_daemon.config import MIB, SOCKETS_MAX, AdapterConfig, default_ring_mb


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


TAP_HELP = f"the adapter's TAP name (default {DEFAULT_TAP})"
TAP_HELP_ONE_UP = f"the adapter's TAP name (default: the one adapter that is up, else {DEFAULT_TAP})"


class _Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked (start-up stays fast)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"toe {package_version()}")
        parser.exit()


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("toe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install .)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="toe", description="User-space TCP Offload Engine emulator.")
    p.add_argument("--version", action=_Version, help="print the version of toe and exit")
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
    up.add_argument("--fastpath", choices=("on", "off"), default="on",
                    help="on (default): established connections' packets run in the compiled units "
                         "(seed 003's hardware path); off: every packet through the software path. "
                         "--pcap implies off")
    up.add_argument("--no-buffer-reuse", action="store_true",
                    help="seed 002's comparison: map and unmap a frame buffer per packet instead of "
                         "reusing the pre-mapped pool (counted as dma_mappings in toe stat)")
    up.add_argument("--fastpath-procs", type=int, choices=(1, 2), default=1, metavar="{1,2}",
                    help="seed 003's processors: 1 (default) runs the units on one thread; 2 gives "
                         "TX (the doorbells of the units' connections) a thread of its own, sharing "
                         "the CCBs with RX (docs/fastpath.md: no gain measured on 2 CPUs)")
    up.add_argument("--poll-us", type=ranged(0, 1_000_000), metavar="N",
                    help="the fast path busy-polls N µs for more work before it sleeps, and programs "
                         "under toe run spin as long in blocking receives (TOE_POLL_US); default: "
                         "the fast path 20, programs 0. docs/fastpath.md has what it costs and buys")
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
    limits.add_argument("--max-time-wait", type=ranged(1, 1 << 22), metavar="N",
                        help=f"connections kept in TIME-WAIT at once; past it a connection closes "
                        f"without it, as with Linux's tcp_max_tw_buckets (default "
                        f"{AdapterConfig.max_time_wait})")
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
    run.add_argument("--tap", metavar="NAME", help=TAP_HELP_ONE_UP)
    run.add_argument("--strict", action="store_true",
                     help="make a would-be handover to the kernel an error (connect: ENETUNREACH, "
                     "bind: EADDRNOTAVAIL) with one line on stderr, instead of a silent fallback")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and its arguments")
    run.set_defaults(func=cmd_run)

    stat = sub.add_parser("stat", help="show connections and counters", description="Query the adapter's "
                          "inspection API and show connections, listeners, per-unit counters, processes.")
    stat.add_argument("--tap", metavar="NAME", help=TAP_HELP_ONE_UP)
    stat.add_argument("--json", action="store_true", help="print the raw JSON answer")
    stat.add_argument("--watch", nargs="?", const=1.0, type=ranged(0.01, 86400, float), metavar="SECONDS",
                      help="a live view, refreshed in place every SECONDS (default 1), with rates per "
                      "second; Ctrl-C ends it")
    stat.add_argument("--watch-count", type=ranged(1, 1 << 31), help=argparse.SUPPRESS)  # tests: stop after N
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
