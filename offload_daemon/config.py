"""Adapter configuration: what `toe up` decides and the daemon obeys.

One frozen dataclass shared by the CLI (which builds it from flags) and the
daemon (which runs it). Paths follow the adapter's TAP name so that several
adapters can run side by side.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

RUN_DIR = "/run/toe"


def ctl_path(tap: str) -> str:
    """Control socket the shim connects to (SOCK_SEQPACKET)."""
    return f"{RUN_DIR}/{tap}.sock"


def api_path(tap: str) -> str:
    """Inspection API socket (JSON lines over SOCK_STREAM)."""
    return f"{RUN_DIR}/{tap}.api"


def state_path(tap: str) -> str:
    """JSON file describing a running adapter (pid, netns, addresses)."""
    return f"{RUN_DIR}/{tap}.json"


def log_path(tap: str) -> str:
    return f"{RUN_DIR}/{tap}.log"


@dataclass(frozen=True)
class AdapterConfig:
    tap: str = "toe0"
    addr: str = "198.18.0.2/24"          # the adapter's own address (what apps use)
    host_addr: str = "198.18.0.1/24"     # the kernel side of the TAP
    netns: str | None = None             # run inside this network namespace
    netns_created: bool = False          # `toe up` created it; `toe down` deletes it
    mtu: int = 1500
    offloads: bool = True                # IFF_VNET_HDR + TSO/CSUM with the kernel
    syn_retries: int = 6                 # like net.ipv4.tcp_syn_retries
    tx_ring_bytes: int = 1 << 20
    rx_ring_bytes: int = 1 << 20
    time_wait_s: float = 60.0
    pcap: str | None = None              # write every adapter frame here
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def iface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.addr)

    @property
    def host_iface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.host_addr)

    @property
    def ctl_path(self) -> str:
        return ctl_path(self.tap)

    @property
    def api_path(self) -> str:
        return api_path(self.tap)

    @property
    def state_path(self) -> str:
        return state_path(self.tap)

    def validate(self) -> None:
        """Raise ValueError with one readable line if the configuration is unusable."""
        if not 1 <= len(self.tap) <= 15 or "/" in self.tap or " " in self.tap:
            raise ValueError(f"bad TAP name {self.tap!r} (1-15 characters, no '/' or spaces)")
        try:
            me, host = self.iface, self.host_iface
        except ValueError as e:
            raise ValueError(f"bad address: {e}") from None
        if me.ip == host.ip:
            raise ValueError(f"--addr and --host-addr are both {me.ip}")
        if host.ip not in me.network:
            raise ValueError(f"--host-addr {host.ip} is not in the adapter's subnet {me.network}")
        for n, name in ((self.tx_ring_bytes, "tx ring"), (self.rx_ring_bytes, "rx ring")):
            if n < 4096 or n & (n - 1) or n > 1 << 30:
                raise ValueError(f"{name} size {n} must be a power of two in 4 KiB..1 GiB")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"MTU {self.mtu} out of range 576..9000")
