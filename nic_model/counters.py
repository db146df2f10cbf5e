"""One counter set per hardware unit (the `ethtool -S` of the adapter).

Each unit owns a small dataclass; `toe stat` reads them through the inspection
API as {unit: {counter: value}}. Dynamic keys (drop reasons) live in a dict
field so that nothing is dropped without a named counter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class UnitCounters:
    def __getitem__(self, name: str) -> int:
        """A counter by its inspection-API name (read only: units count through attributes)."""
        return getattr(self, name)

    def snapshot(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in fields(self):
            k, v = f.name, getattr(self, f.name)
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in sorted(v.items())})
            else:
                out[k] = v
        return out


@dataclass
class TapPortCounters(UnitCounters):
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_gso_frames: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_gso_frames: int = 0
    tx_errors: int = 0


@dataclass
class RxCheckerCounters(UnitCounters):
    """Integrity -> classify (ERROR / ARP / ICMP / TCP_SYN / TCP_DATA / OTHER)."""

    classified: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    csum_verified: int = 0
    csum_offloaded: int = 0


@dataclass
class TxHeaderGenCounters(UnitCounters):
    """Header generator with its connection-control-block cache."""

    segments: int = 0
    payload_bytes: int = 0
    ccb_cache_hits: int = 0
    ccb_cache_misses: int = 0
    ccb_cache_evictions: int = 0
    sw_checksums: int = 0


@dataclass
class AckGenCounters(UnitCounters):
    pure_acks: int = 0
    piggybacked: int = 0
    dup_acks: int = 0
    window_updates: int = 0
    challenge_acks: int = 0
    resets: int = 0
    delayed_acks: int = 0        # sent when the delayed-ACK timer ran out (nothing to ride on)


@dataclass
class PoolCounters(UnitCounters):
    """Buffer pools (seed 002): allocations and "DMA mappings" happen once, at start."""

    buffers: int = 0
    buffer_bytes: int = 0
    dma_mappings: int = 0
    dma_unmaps: int = 0
    allocations: int = 0
    in_use: int = 0
    exhausted: int = 0
