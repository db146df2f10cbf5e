"""TX header generator with a connection-control-block cache (seed 003).

For each connection the generator keeps a header template: virtio header
slot, Ethernet addresses, the constant IPv4 fields with their partial
checksum, the TCP ports. A segment is the template plus the per-segment
words (length, id, seq, ack, flags, window) and checksums, followed by the
payload straight out of the socket's TX ring (gathered by writev: no copy).

The cache holds a bounded number of templates, like the on-chip CCB cache;
misses rebuild the template from the CCB and are counted.

Checksums: with offloads on, the TCP checksum is left to the kernel
(NEEDS_CSUM with the pseudo-header sum seeded) and segments up to 64 KB go
out as one TSO frame; with offloads off every segment is at most one MSS and
carries a full software checksum.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from .counters import TxHeaderGenCounters
from .wire import ethernet, ipv4, vnet

_ETH_IP = struct.Struct("!6s6sHBBHHHBBHII")      # ethernet + IPv4 header (34 bytes)
_TCP = struct.Struct("!HHIIBBHHH")
_HDR_OFF = vnet.LEN
_IP_OFF = vnet.LEN + ethernet.HDR_LEN
_TCP_OFF = _IP_OFF + ipv4.HDR_LEN
MAX_TSO_BYTES = 65535 - 20 - 60


class _Template:
    __slots__ = ("eth_ip", "ip_base", "pseudo_base", "sport", "dport", "src", "dst")
    eth_ip: tuple[bytes, bytes, int]
    ip_base: int
    pseudo_base: int
    sport: int
    dport: int
    src: int
    dst: int


class TxEngine:
    def __init__(self, port, my_mac: bytes, offloads: bool, csum_fn, cache_entries: int = 64):
        """`csum_fn(buf, off, length, initial) -> checksum` is the checksum unit."""
        self.port = port
        self.my_mac = my_mac
        self.offloads = offloads
        self.csum = csum_fn
        self.cache: OrderedDict[object, _Template] = OrderedDict()
        self.cache_entries = cache_entries
        self.counters = TxHeaderGenCounters()
        self._hdr = bytearray(_TCP_OFF + 60)
        self._ip_id = 0

    def _template(self, key, peer_mac: bytes, src: int, dst: int, sport: int, dport: int) -> _Template:
        c = self.counters
        t = self.cache.get(key)
        if t is not None:
            c.ccb_cache_hits += 1
            self.cache.move_to_end(key)
            return t
        c.ccb_cache_misses += 1
        t = _Template()
        t.eth_ip = (peer_mac, self.my_mac, ethernet.ETHERTYPE_IPV4)
        # IP words that never change: version/IHL/TOS, flags(DF), TTL/proto, addresses
        t.ip_base = 0x4500 + ipv4.FLAG_DF + (64 << 8 | ipv4.PROTO_TCP) + \
            (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
        t.pseudo_base = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + ipv4.PROTO_TCP
        t.sport, t.dport, t.src, t.dst = sport, dport, src, dst
        self.cache[key] = t
        if len(self.cache) > self.cache_entries:
            self.cache.popitem(last=False)
            c.ccb_cache_evictions += 1
        return t

    def invalidate(self, key) -> None:
        self.cache.pop(key, None)

    def segment(self, key, peer_mac: bytes, src: int, dst: int, sport: int, dport: int,
                seq: int, ack: int, flags: int, window: int, options: bytes = b"",
                payload=(), payload_len: int = 0, mss: int = 1460) -> None:
        """Emit one segment (a TSO frame if payload_len > mss and offloads are on)."""
        t = self._template(key, peer_mac, src, dst, sport, dport)
        hdr = self._hdr
        thl = 20 + len(options)
        tcp_len = thl + payload_len
        total = 20 + tcp_len
        self._ip_id = ip_id = (self._ip_id + 1) & 0xFFFF
        s = t.ip_base + total + ip_id
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        _ETH_IP.pack_into(hdr, _HDR_OFF, t.eth_ip[0], t.eth_ip[1], t.eth_ip[2], 0x45, 0, total,
                          ip_id, ipv4.FLAG_DF, 64, ipv4.PROTO_TCP, 0xFFFF - s, src, dst)
        c = self.counters
        c.segments += 1
        c.payload_bytes += payload_len
        end = _TCP_OFF + thl
        if self.offloads:
            ps = t.pseudo_base + tcp_len
            ps = (ps & 0xFFFF) + (ps >> 16)
            ps = (ps & 0xFFFF) + (ps >> 16)
            _TCP.pack_into(hdr, _TCP_OFF, sport, dport, seq, ack, (thl // 4) << 4, flags, window, ps, 0)
            if options:
                hdr[_TCP_OFF + 20:end] = options
            gso = payload_len > mss
            vnet.pack_into(hdr, 0, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4 if gso else vnet.GSO_NONE,
                           end - vnet.LEN if gso else 0, mss if gso else 0, _TCP_OFF - vnet.LEN, 16)
            self.port.send((memoryview(hdr)[:end], *payload), end + payload_len, gso)
            return
        _TCP.pack_into(hdr, _TCP_OFF, sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0, 0)
        if options:
            hdr[_TCP_OFF + 20:end] = options
        vnet.pack_into(hdr, 0, 0, vnet.GSO_NONE, 0, 0, 0, 0)
        frame = bytearray(hdr[:end])
        for p in payload:
            frame += p
        csum = self.csum(frame, _TCP_OFF, tcp_len, t.pseudo_base + tcp_len)
        struct.pack_into("!H", frame, _TCP_OFF + 16, csum)
        c.sw_checksums += 1
        self.port.send((frame,), len(frame), False)

    def raw_frame(self, dst_mac: bytes, ethertype: int, body: bytes) -> None:
        """Emit a non-TCP frame (ARP, ICMP) with a zero virtio header."""
        frame = vnet.NONE + dst_mac + self.my_mac + struct.pack("!H", ethertype) + body
        self.port.send((frame,), len(frame), False)
