"""`toe up` and `toe down`."""

from __future__ import annotations

import argparse
import grp
import os
import pwd
from collections.abc import Callable
from typing import Any

from offload_daemon.client.adapter import adapter_down, adapter_up, netns, read_state, run_foreground
from offload_daemon.client.env import require_root, require_tun
from offload_daemon.client.errors import CLIError
from offload_daemon.config import ID_MAX, AdapterConfig

TOE_GROUP = "toe"          # members of this group may use adapters by default, if it exists


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


def config_from_args(args: argparse.Namespace) -> AdapterConfig:
    kw: dict[str, Any] = dict(
        tap=args.tap, addr=args.addr, host_addr=args.host_addr, netns=args.netns,
        offloads=not args.no_offloads, fastpath=args.fastpath == "on",
    )
    if args.poll_us is not None:
        kw["poll_us"] = kw["app_poll_us"] = args.poll_us
    kw["fastpath_procs"] = args.fastpath_procs
    if args.no_buffer_reuse:
        kw["buffer_reuse"] = False
    if args.mtu is not None:
        kw["mtu"] = args.mtu
    if args.syn_retries is not None:
        kw["syn_retries"] = args.syn_retries
    if args.ring_kb is not None:
        kw["tx_ring_bytes"] = kw["rx_ring_bytes"] = args.ring_kb * 1024
    if args.pcap is not None:
        kw["pcap"] = os.path.abspath(args.pcap)
    kw["allow_users"], kw["allow_group"] = allow_from_args(args)
    for flag in ("max_sockets", "max_process_sockets", "max_ring_mb", "max_time_wait"):
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
