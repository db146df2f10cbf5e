"""`toe stat`'s answer: the adapter's state, counters and connections, as the inspection
API sends it (and `toe stat` renders it). Root sees everything; another user the adapter's
totals and counters, and only its own connections and processes. With the fast path on,
each unit's counters are the compiled units' plus the software path's, and the
connections the units own are read through a snapshot (fp_peek).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from nic_model import fastpath as fpmod
from nic_model.wire import ethernet

from .host import HostSocket
from .tcp import ip_str


def round_trips_per_connection(ad) -> float | None:
    """Control-channel commands per connection opened (connected or accepted), leaving out
    those a process pays once (HELLO, FORK) or that name no connection (HANDOVER)."""
    hc = ad.counters_host
    opened = ad.tcp.stats.active_opens + hc.accepts
    if not opened:
        return None
    n = hc.commands - sum(hc.by_op.get(k, 0) for k in ad._PROCESS_OPS)
    return round(n / opened, 2)

def adapter_stat(ad: Any, uid: int | None = None) -> dict:
    """`toe stat`'s data for `ad` (daemon.Adapter: not imported, the daemon imports this);
    with `uid`, only what belongs to that user."""
    now = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    fp = ad.fp
    if fp is not None:
        for c in ad.tcp.conns.values():
            fp.refresh(c)
    ccbs = [c.info() for c in ad.tcp.conns.values()]
    # the units' TIME-WAIT records: listed; their bytes are the closed connections' already
    every = ccbs + (fp.tw_info() if fp is not None else [])
    conns = every if uid is None else [c for c in every if c.get("uid") == uid]
    closed = [c for c in ad.tcp.closed_info() if uid is None or c.get("uid") == uid]
    listeners = []
    for lsts in ad.tcp.listeners.values():
        for lst in lsts:
            if uid is not None and lst.sock.uid != uid:
                continue
            listeners.append({"id": lst.sock.id, "local": f"{ip_str(lst.ip)}:{lst.port}",
                              "backlog": lst.backlog, "pending": len(lst.queue),
                              "embryonic": len(lst.embryonic), "pid": lst.sock.pid})
    tapc = ad.tap.counters  # type: ignore[union-attr]
    bytes_in = sum(c["bytes_in"] for c in ccbs) + ad.tcp.closed_bytes_in
    bytes_out = sum(c["bytes_out"] for c in ccbs) + ad.tcp.closed_bytes_out
    data_fast = sum(c["data_fast"] for c in ccbs) + ad.tcp.closed_data_fast
    data_sw = sum(c["data_software"] for c in ccbs) + ad.tcp.closed_data_sw
    units = {
        "tap_port": tapc.snapshot(),
        "rx_checker": ad.rx.counters.snapshot(),
        "tx_hdrgen": ad.tx.counters.snapshot(),
        "ack_gen": ad.ackgen.snapshot(),
        "buffer_pool": ad.pool.counters.snapshot(),
        "host_if": ad.counters_host.snapshot(),
        "tcp": ad.tcp.stats.snapshot(),
        "arp_icmp": ad.arp.counters.snapshot(),
    }
    frames_in, frames_out = tapc.rx_frames, tapc.tx_frames
    if fp is not None:
        u = fp.units
        units["tap_port"] = fpmod.merge(units["tap_port"], u.tap_counters())
        units["rx_checker"] = fpmod.merge(units["rx_checker"], u.rx_checker_counters())
        units["tx_hdrgen"] = fpmod.merge(units["tx_hdrgen"], u.tx_counters())
        units["ack_gen"] = fpmod.merge(units["ack_gen"], u.ack_counters())
        units["host_if"]["doorbells"] += u.counters.doorbells
        units["buffer_pool"] = fpmod.merge(units["buffer_pool"], u.pool_counters())
        units["fast_path"] = u.own_counters()
        frames_in, frames_out = units["tap_port"]["rx_frames"], units["tap_port"]["tx_frames"]
    procs = [{"pid": p.pid, "uid": p.uid, "comm": p.comm, "sockets": p.sockets, "pooled": p.pooled,
              "spares": len(p.spares),
              "offloaded": p.offloaded, "handovers": p.handovers, "refused": p.refused,
              "handover_reasons": dict(p.handover_reasons), "alive": p.alive,
              "forked_from": p.parent_pid or None}
             for p in [*ad.ctl.procs.values(), *ad.exited]  # type: ignore[union-attr]
             if p.allowed and (p.commands or p.sockets) and (uid is None or p.uid == uid)]
    return {
        "ok": True,
        "adapter": {"tap": ad.cfg.tap, "addr": ad.cfg.addr, "host_addr": ad.cfg.host_addr,
                    "mac": ethernet.mac_str(ad.my_mac), "pid": os.getpid(),
                    "uptime_s": round(now - ad.started, 3), "offloads": ad.offloads,
                    "mtu": ad.cfg.mtu, "netns": ad.cfg.netns},
        "cpu": {"user_s": ru.ru_utime, "system_s": ru.ru_stime, "max_rss_kb": ru.ru_maxrss},
        "totals": {"connections": len(every), "closed_connections": ad.tcp.closed_count,
                   "bytes_in": bytes_in, "bytes_out": bytes_out,
                   "frames_in": frames_in, "frames_out": frames_out,
                   "fastpath": fp is not None, "data_segments_fast": data_fast,
                   "data_segments_software": data_sw,
                   "fast_share": round(data_fast / (data_fast + data_sw), 4) if data_fast + data_sw else None,
                   "handovers": ad.counters_host.handovers,
                   "round_trips_per_connection": round_trips_per_connection(ad),
                   "sockets_open": len(ad.socks)},
        "limits": {"max_sockets": ad.cfg.max_sockets,
                   "max_process_sockets": ad.cfg.max_process_sockets,
                   "max_ring_bytes": ad.ring_limit, "sockets": len(ad.socks),
                   "ring_bytes": HostSocket.mapped_bytes,
                   # closed sockets' mappings kept for REUSE (in ring_bytes), and dropped unused
                   "spares": HostSocket.spares, "spares_released": HostSocket.spares_released,
                   "time_wait": ad.tcp.time_wait_count(), "max_time_wait": ad.cfg.max_time_wait,
                   # local ports a socket, a connection or a TIME-WAIT record uses (port_users)
                   "local_ports": ad.tcp.ports_in_use(),
                   "channels": len(ad.ctl.procs)},  # type: ignore[union-attr]
        "connections": conns,
        "closed": closed,
        "listeners": listeners,
        "units": units,
        "arp": ad.arp.info(now),
        "processes": procs,
    }

