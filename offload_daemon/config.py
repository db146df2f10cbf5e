"""Adapter configuration: what `toe up` decides and the daemon obeys.

One frozen dataclass shared by the CLI (which builds it from flags) and the
daemon (which runs it). It crosses from one to the other as JSON
(`dataclasses.asdict`), so every field is a JSON value and tuples arriving as
lists are accepted. Paths follow the adapter's TAP name so that several
adapters can run side by side.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace

RUN_DIR = "/run/toe"
MIB = 1 << 20
ID_MAX = 0xFFFF_FFFE            # uids and gids are u32; 0xffffffff is (uid_t)-1, "no id"
SOCKETS_MAX = 1 << 20           # sockets: each costs the daemon two descriptors (B end, memfd)

_SPECIAL = [  # (network, why an address in it cannot be an interface address); first match wins
    (ipaddress.IPv4Network("0.0.0.0/32"), "the unspecified address"),
    (ipaddress.IPv4Network("255.255.255.255/32"), "the limited broadcast address"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "in 0.0.0.0/8 ('this network', RFC 1122)"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address (127.0.0.0/8)"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "a link-local address (169.254.0.0/16)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address (224.0.0.0/4)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "in the reserved range 240.0.0.0/4"),
]


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


def default_ring_mb() -> int:
    """Half of the machine's memory (MemTotal) in MiB: the ring limit `max_ring_mb=0` means."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 2 << 30
    return max(1, total // 2 // MIB)


def check_address(flag: str, iface: ipaddress.IPv4Interface,
                  subnet: ipaddress.IPv4Network | None = None) -> None:
    """Raise ValueError (one line) unless iface.ip can be a host address in `subnet`
    (default: iface's own network), whose prefix must be /30 or shorter: the adapter and
    the kernel side share it, and its network and broadcast addresses are no host's (a
    /31 per RFC 3021 is not supported: the daemon treats both of its addresses as network
    and broadcast address)."""
    net = subnet or iface.network
    if net.prefixlen > 30:
        raise ValueError(f"{flag} {iface.with_prefixlen}: the prefix must be /30 or shorter "
                         f"(e.g. {iface.ip}/24), one subnet for the adapter and the kernel side")
    for special, why in _SPECIAL:
        if iface.ip in special:
            raise ValueError(f"{flag} {iface.with_prefixlen} is {why}")
    if iface.ip == net.network_address:
        raise ValueError(f"{flag} {iface.with_prefixlen} is the subnet's network address")
    if iface.ip == net.broadcast_address:
        raise ValueError(f"{flag} {iface.with_prefixlen} is the subnet's broadcast address")


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= ID_MAX


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
    max_time_wait: int = 32768           # connections in TIME-WAIT at once (tcp_max_tw_buckets)
    pcap: str | None = None              # write every adapter frame here
    # Seed 003's hybrid: established connections' packets in the compiled units
    # (nic_model/hw); off: every packet through the software path (the comparison,
    # and the oracle of the differential tests). A pcap needs every frame in Python: off.
    fastpath: bool = True
    # The units busy-poll this long for more work before the adapter sleeps (hardware does
    # not sleep: without it every reply pays the daemon's wake-up); programs under toe run
    # spin app_poll_us in blocking receives (TOE_POLL_US), the host's CPU: none by default.
    poll_us: int = 20
    app_poll_us: int = 0
    fastpath_procs: int = 1              # seed 003's two processors: 2 runs TX on a thread of its own
    buffer_reuse: bool = True            # seed 002; off: a buffer mapped and unmapped per packet
    # Who may use the adapter (docs/security.md): root always, these uids, members of this gid.
    allow_users: tuple[int, ...] = ()
    allow_group: int | None = None
    # Resource limits: offloaded sockets in total and per process (per control channel),
    # ring memory over all open sockets in MiB (0: half of MemTotal; `toe up` resolves it).
    max_sockets: int = 16384
    max_process_sockets: int = 8192
    max_ring_mb: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow_users, list):  # JSON has no tuples
            object.__setattr__(self, "allow_users", tuple(self.allow_users))

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

    @property
    def socket_bytes(self) -> int:
        """Ring memory one offloaded socket takes: header page + TX ring + RX ring (docs/abi.md)."""
        return 4096 + self.tx_ring_bytes + self.rx_ring_bytes

    def ring_limit_bytes(self) -> int:
        """Ring memory allowed over all open sockets, in bytes (> 0)."""
        return (self.max_ring_mb if self.max_ring_mb > 0 else default_ring_mb()) * MIB

    def resolved(self) -> AdapterConfig:
        """This config with max_ring_mb=0 replaced by the number it stands for here."""
        return self if self.max_ring_mb > 0 else replace(self, max_ring_mb=default_ring_mb())

    def validate(self) -> None:
        """Raise ValueError with one readable line if the configuration is unusable."""
        if not 1 <= len(self.tap) <= 15 or "/" in self.tap or " " in self.tap:
            raise ValueError(f"bad TAP name {self.tap!r} (1-15 characters, no '/' or spaces)")
        try:
            me, host = self.iface, self.host_iface
        except ValueError as e:
            raise ValueError(f"bad address: {e}") from None
        check_address("--addr", me)
        check_address("--host-addr", host)
        if me.ip == host.ip:
            raise ValueError(f"--addr and --host-addr are both {me.ip}")
        if host.ip not in me.network:
            raise ValueError(f"--host-addr {host.ip} is not in the adapter's subnet {me.network}")
        check_address("--host-addr", host, me.network)
        for n, name in ((self.tx_ring_bytes, "tx ring"), (self.rx_ring_bytes, "rx ring")):
            if n < 4096 or n & (n - 1) or n > 1 << 30:
                raise ValueError(f"{name} size {n} must be a power of two in 4 KiB..1 GiB")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"MTU {self.mtu} out of range 576..9000")
        self._validate_access()
        self._validate_limits()

    def _validate_access(self) -> None:
        users = self.allow_users
        if not isinstance(users, tuple) or not all(_is_id(u) for u in users):
            raise ValueError(f"allow_users {users!r}: uids must be integers in 0..{ID_MAX}")
        if self.allow_group is not None and not _is_id(self.allow_group):
            raise ValueError(f"allow_group {self.allow_group!r}: a gid must be an integer in 0..{ID_MAX}")

    def _validate_limits(self) -> None:
        for n, flag in ((self.max_sockets, "--max-sockets"), (self.max_process_sockets, "--max-process-sockets")):
            if not isinstance(n, int) or not 1 <= n <= SOCKETS_MAX:
                raise ValueError(f"{flag} {n} out of range 1..{SOCKETS_MAX}")
        if self.max_process_sockets > self.max_sockets:
            raise ValueError(f"--max-process-sockets {self.max_process_sockets} is more than "
                             f"--max-sockets {self.max_sockets}")
        if not isinstance(self.max_ring_mb, int) or self.max_ring_mb < 0:
            raise ValueError(f"--max-ring-mb {self.max_ring_mb} must be 0 (half of the memory) or more")
        if self.ring_limit_bytes() < self.socket_bytes:
            raise ValueError(f"--max-ring-mb {self.ring_limit_bytes() // MIB} is less than one socket's "
                             f"rings ({self.socket_bytes / MIB:.1f} MiB; see --ring-kb)")
