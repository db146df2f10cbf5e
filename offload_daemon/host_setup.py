"""The host around the adapter: descriptor limits, entering the adapter's network
namespace, the kernel side of the TAP (its address, up)."""

from __future__ import annotations

import errno
import os
import resource

from .config import AdapterConfig


class SetupError(Exception):
    """A reason the adapter cannot start, as one readable line."""


def raise_fd_limit(want: int) -> None:
    """Make room for the sockets the limits allow (root may raise the hard limit up to
    fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    target = min(max(want, soft), max(ceiling, hard))
    if target <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def enter_netns(name: str) -> None:
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        raise SetupError(f"network namespace {name!r} does not exist")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:        # CLONE_NEWNET
            err = ctypes.get_errno()
            raise SetupError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def configure_kernel_side(cfg: AdapterConfig) -> None:
    """Give the kernel's end of the TAP its address and bring it (and lo) up."""
    from pyroute2 import IPRoute

    try:
        with open(f"/proc/sys/net/ipv6/conf/{cfg.tap}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    host = cfg.host_iface
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cfg.tap)
        if not idx:
            raise SetupError(f"TAP {cfg.tap} vanished during setup")
        ipr.link("set", index=idx[0], mtu=cfg.mtu)
        try:
            ipr.addr("add", index=idx[0], address=str(host.ip), prefixlen=host.network.prefixlen)
        except Exception as e:  # pyroute2 NetlinkError
            if getattr(e, "code", None) != errno.EEXIST:
                raise SetupError(f"cannot give {cfg.tap} address {host}: {e}") from None
        ipr.link("set", index=idx[0], state="up")
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
