"""The compiled fast path (seed 003's hardware units, nic_model/hw/*.c) from Python.

`FastPathUnits` owns one `struct fp_state`: the CCB table, the frame buffers it
borrows from the software path's pool, and the counters, which it reports in
the software units' own names so that `toe stat` shows one adapter: what the
units counted plus what the software path counted, per unit.
"""

from __future__ import annotations

import os

from ._fastpath import ffi, lib
from .rx import CLASS_NAMES

DROP_NAMES = ("ip_checksum", "ip_length", "ip_fragment", "not_our_ip", "tcp_offset", "tcp_flags",
              "tcp_port", "tcp_checksum", "tcp_option")
PUNT_NAMES = ("unparsed", "syn", "no_ccb", "follows", "fin", "rst", "flags", "options", "out_of_order",
              "old_ack", "ack_unsent", "dup_ack", "beyond_window", "zero_window", "cork", "rto", "close",
              "forced", "handshake", "state", "teardown")
HC_NAMES = ("looked", "connects", "passed", "not_fresh", "no_neighbour", "no_port", "no_room", "lost_answers",
            "fresh_stuffed", "completed")
assert len(DROP_NAMES) == lib.FP_NDROPS and len(PUNT_NAMES) == lib.FP_NPUNTS


class FastPathError(Exception):
    pass


class FastPathUnits:
    def __init__(self, capacity: int, tap_fd: int, ep_fd: int, my_ip: int, my_mac: bytes, offloads: bool,
                 max_payload: int, bufs: list):
        """`bufs`: the frame buffers (bytearrays) the units read frames into; they stay the
        caller's, and a frame handed back to software is read from bufs[event.buf]."""
        size = len(bufs[0])
        st = lib.fp_new(capacity, tap_fd, ep_fd, my_ip, my_mac, int(offloads), max_payload, len(bufs), size)
        if st == ffi.NULL:
            raise FastPathError("cannot allocate the fast path's CCB table")
        self.st = ffi.gc(st, lib.fp_free)
        self._keep = [ffi.from_buffer(b) for b in bufs]
        for i, p in enumerate(self._keep):
            lib.fp_set_buf(self.st, i, int(ffi.cast("uintptr_t", p)))
        self.events = self.st.events
        self._sum = ffi.new("struct fp_counters *")
        self.procs = 1

    def start_procs(self, n: int) -> None:
        """Seed 003's two processors: n=2 starts the TX processor (nic_model/hw/tx_proc.c)."""
        if n == 2 and self.procs == 1:
            r = lib.fp_proc_start(self.st)
            if r < 0:
                raise FastPathError(f"cannot start the fast path's TX processor: {os.strerror(-r)}")
            self.procs = 2

    @property
    def counters(self):
        """Both processors' counts added up (a snapshot)."""
        lib.fp_counters_sum(self.st, self._sum)
        return self._sum

    # ---- TIME-WAIT records (nic_model/hw/time_wait.c) ----------------------

    def tw_setup(self, capacity: int, duration_s: float, window: int) -> None:
        """TIME-WAIT in the units: at most `capacity` records (0: software keeps it), each
        `duration_s` (2 MSL), answering with the window of a connection without a socket."""
        if lib.fp_tw_setup(self.st, capacity, duration_s, window) < 0:
            raise FastPathError("cannot allocate the fast path's TIME-WAIT table")

    def tw_has(self, rip: int, rport: int, lport: int) -> bool:
        return lib.fp_tw_find(self.st, rip, rport, lport) >= 0

    def tw_count(self) -> int:
        return lib.fp_tw_count(self.st)

    def tw_records(self) -> list:
        """The records, oldest first (copies)."""
        out = []
        w = ffi.new("struct fp_tw *")
        i = lib.fp_tw_next(self.st, -1, w)
        while i >= 0:
            out.append(ffi.new("struct fp_tw *", w[0]))
            i = lib.fp_tw_next(self.st, i, w)
        return out

    def set_policy(self, delack_s: float, ato_s: float) -> None:
        self.st.delack_s = delack_s
        self.st.ato_s = ato_s

    def close(self) -> None:
        if self.st is not None:
            lib.fp_proc_stop(self.st)
            self.st = None
            self.events = None

    # ---- counters in the software units' names --------------------------

    def tap_counters(self) -> dict[str, int]:
        k = self.counters
        return {"rx_frames": k.rx_frames, "rx_bytes": k.rx_bytes, "rx_gso_frames": k.rx_gso_frames,
                "tx_frames": k.tx_frames, "tx_bytes": k.tx_bytes, "tx_gso_frames": k.tx_gso_frames,
                "tx_errors": k.tx_errors}

    def rx_checker_counters(self) -> dict[str, int]:
        k = self.counters
        out = {f"classified.{CLASS_NAMES[i]}": k.cls[i] for i in range(len(CLASS_NAMES)) if k.cls[i]}
        out.update({f"dropped.{DROP_NAMES[i]}": k.drops[i] for i in range(len(DROP_NAMES)) if k.drops[i]})
        out["csum_verified"] = k.csum_verified
        out["csum_offloaded"] = k.csum_offloaded
        return out

    def tx_counters(self) -> dict[str, int]:
        k = self.counters
        return {"segments": k.segments, "payload_bytes": k.payload_bytes, "ccb_cache_hits": k.ccb_cache_hits,
                "ccb_cache_misses": k.ccb_cache_misses, "sw_checksums": k.sw_checksums}

    def ack_counters(self) -> dict[str, int]:
        k = self.counters
        return {"pure_acks": k.pure_acks, "piggybacked": k.piggybacked, "delayed_acks": k.delayed_acks,
                "window_updates": k.window_updates}

    def pool_counters(self) -> dict[str, int]:
        """Per-packet buffers the units mapped (only with buffer reuse off, seed 002)."""
        k = self.counters
        return {"allocations": k.dma_maps, "dma_mappings": k.dma_maps, "dma_unmaps": k.dma_unmaps}

    def own_counters(self) -> dict[str, int]:
        """The fast path's own unit: what it took, what it handed back and why."""
        k = self.counters
        out = {"rx_segments": k.rx_segments, "rx_data_segments": k.rx_data_segments,
               "rx_payload_bytes": k.rx_payload_bytes, "rx_placed": k.rx_placed, "rx_misplaced": k.rx_misplaced,
               "tx_data_segments": k.data_segments, "ring_frees": k.ring_frees,
               "writer_wakeups": k.writer_wakeups, "tokens": k.tokens, "doorbells": k.doorbells, "waits": k.waits,
               "spins": k.spins, "spin_misses": k.spin_misses, "handed_back": k.sw_events, "pushes": k.pushes,
               "pulls": k.pulls, "deadline_scans": k.scans, "table_full": k.table_full, "connections": self.st.active,
               "processors": self.procs, "syns": k.syns, "syn_acks": k.syn_acks, "fins_in": k.fins_in,
               "fins_out": k.fins_out,
               "app_closes": k.app_closes, "closes": k.closes,
               "time_wait": self.tw_count(), "time_wait_entered": k.tw_entered,
               "time_wait_segments": k.tw_segments, "time_wait_acks": k.tw_acks,
               "time_wait_reopened": k.tw_reopened, "time_wait_expired": k.tw_expired}
        out.update({f"punts.{PUNT_NAMES[i]}": k.punts[i] for i in range(len(PUNT_NAMES)) if k.punts[i]})
        h = ffi.new("struct fp_hc_counters *")
        lib.fp_hc_counters(self.st, h)               # the command unit (host_cmd.c)
        out.update({f"commands.{n}": getattr(h, n) for n in HC_NAMES})
        t = ffi.new("struct fp_counters *")
        if lib.fp_proc_counters(self.st, t) == 0:   # the TX processor's share of the above
            out.update({"tx_processor.doorbells": t.doorbells, "tx_processor.tx_frames": t.tx_frames,
                        "tx_processor.tx_data_segments": t.data_segments, "tx_processor.waits": t.waits,
                        "tx_processor.handed_back": t.sw_events})
        return out


def merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Counters of one unit from both paths, summed key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out
