"""RX checker (seed 003): integrity -> classify -> hand to the right engine.

Classes: ERROR (dropped, counted by reason), ARP, ICMP, TCP_SYN (a connection
request: goes to the software control path), TCP_DATA (everything else on
TCP: data, ACK, FIN, RST) and OTHER (not ours: IPv6, other protocols,
other destinations; dropped and counted). The hot path (IPv4 without
options carrying TCP) is one `struct` unpack; everything else goes through
the validating parsers in `wire/`.
"""

from __future__ import annotations

import struct
from typing import Any

from .counters import RxCheckerCounters
from .wire import IntegrityError, SanityError, WireError, ethernet, ipv4, tcp, vnet
from .wire.arp import ArpRepr
from .wire.icmp import IcmpEcho

ERROR, ARP, ICMP, TCP_SYN, TCP_DATA, OTHER = range(6)
CLASS_NAMES = ("ERROR", "ARP", "ICMP", "TCP_SYN", "TCP_DATA", "OTHER")

_ETH_OFF = vnet.LEN
_IP_OFF = vnet.LEN + ethernet.HDR_LEN
_IPTCP = struct.Struct("!BBHHHBBHIIHHIIBBHHH")


class Segment:
    """A checked TCP segment; payload is buf[payload_off:payload_off+payload_len]."""

    __slots__ = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "window",
                 "options", "payload_off", "payload_len", "src_mac", "buf", "handle")
    src: int
    dst: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: tcp.TcpOptions
    payload_off: int
    payload_len: int
    src_mac: bytes
    buf: Any
    handle: Any

    def __repr__(self) -> str:
        return (f"Segment({self.sport}->{self.dport} {tcp.flags_str(self.flags)} "
                f"seq={self.seq} ack={self.ack} win={self.window} len={self.payload_len})")


class RxChecker:
    def __init__(self, my_mac: bytes, my_ip: int, csum_fn):
        """`csum_fn(buf, off, length, initial) -> int` is the checksum unit (0 = valid)."""
        self.my_mac = my_mac
        self.my_ip = my_ip
        self.csum = csum_fn
        self.counters = RxCheckerCounters()

    def drop(self, reason: str) -> tuple[int, None]:
        c = self.counters
        c.classified["ERROR"] += 1
        c.dropped[reason] += 1
        return ERROR, None

    def other(self, reason: str) -> tuple[int, None]:
        c = self.counters
        c.classified["OTHER"] += 1
        c.dropped[reason] += 1
        return OTHER, None

    def check(self, buf, n: int):
        """Classify the frame in buf[:n] (virtio header first): (class, parsed)."""
        if n < _IP_OFF:
            return self.drop("eth_short")
        dst_mac = bytes(buf[_ETH_OFF:_ETH_OFF + 6])
        ethertype = (buf[_ETH_OFF + 12] << 8) | buf[_ETH_OFF + 13]
        if ethertype == ethernet.ETHERTYPE_IPV4:
            if dst_mac != self.my_mac:
                return self.other("not_our_mac")
            return self._ipv4(buf, n)
        if ethertype == ethernet.ETHERTYPE_ARP:
            try:
                arp = ArpRepr.parse(buf, _IP_OFF)
            except WireError as e:
                return self.drop(e.reason)
            self.counters.classified["ARP"] += 1
            return ARP, arp
        return self.other(f"ethertype_{ethertype:04x}")

    def _ipv4(self, buf, n: int):
        if n >= _IP_OFF + 40 and buf[_IP_OFF] == 0x45 and buf[_IP_OFF + 9] == ipv4.PROTO_TCP:
            (vihl, tos, total, ident, frag, ttl, proto, ipcsum, src, dst,
             sport, dport, seq, ack, doff, flags, window, _tcsum, _urg) = _IPTCP.unpack_from(buf, _IP_OFF)
            s = (vihl << 8 | tos) + total + ident + frag + (ttl << 8 | proto) + ipcsum \
                + (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            if s != 0xFFFF:
                return self.drop("ip_checksum")
            if total < 40 or _IP_OFF + total > n:
                return self.drop("ip_length")
            if frag & ipv4.MF_OFFSET_MASK:
                return self.drop("ip_fragment")
            if dst != self.my_ip:
                return self.other("not_our_ip")
            return self._tcp(buf, src, dst, total - 20, sport, dport, seq, ack, doff, flags, window)
        try:
            ip = ipv4.Ipv4Repr.parse(buf, _IP_OFF, n)
        except WireError as e:
            return self.drop(e.reason)
        if int.from_bytes(ip.dst, "big") != self.my_ip:
            return self.other("not_our_ip")
        off = _IP_OFF + ip.header_len
        if ip.proto == ipv4.PROTO_ICMP:
            try:
                msg = IcmpEcho.parse(buf, off, ip.payload_len)
            except WireError as e:
                return self.drop(e.reason)
            self.counters.classified["ICMP"] += 1
            return ICMP, (ip, msg)
        if ip.proto == ipv4.PROTO_TCP:
            if ip.payload_len < 20:
                return self.drop("tcp_short")
            sport, dport, seq, ack, doff, flags, window = struct.unpack_from("!HHIIBBH", buf, off)
            # IP options present: move the TCP header up against a 20-byte IP header
            # view by parsing at its real offset.
            return self._tcp(buf, int.from_bytes(ip.src, "big"), int.from_bytes(ip.dst, "big"),
                             ip.payload_len, sport, dport, seq, ack, doff, flags, window, off)
        return self.other(f"ip_proto_{ip.proto}")

    def _tcp(self, buf, src, dst, seg_len, sport, dport, seq, ack, doff, flags, window,
             off: int = _IP_OFF + 20):
        c = self.counters
        hlen = (doff >> 4) * 4
        if hlen < 20 or hlen > seg_len:
            return self.drop("tcp_offset")
        if flags & tcp.SYN and flags & (tcp.FIN | tcp.RST):
            return self.drop("tcp_flags")
        if sport == 0 or dport == 0:
            return self.drop("tcp_port")
        vflags = buf[0]
        if vflags & (vnet.F_NEEDS_CSUM | vnet.F_DATA_VALID):
            c.csum_offloaded += 1
        else:
            initial = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 6 + seg_len
            if self.csum(buf, off, seg_len, initial) != 0:
                return self.drop("tcp_checksum")
            c.csum_verified += 1
        if hlen > 20:
            try:
                opts = tcp.TcpOptions.parse(buf, off + 20, off + hlen)
            except (IntegrityError, SanityError) as e:
                return self.drop(e.reason)
        else:
            opts = tcp.NO_OPTIONS
        seg = Segment()
        seg.src = src
        seg.dst = dst
        seg.sport = sport
        seg.dport = dport
        seg.seq = seq
        seg.ack = ack
        seg.flags = flags
        seg.window = window
        seg.options = opts
        seg.payload_off = off + hlen
        seg.payload_len = seg_len - hlen
        seg.src_mac = bytes(buf[_ETH_OFF + 6:_ETH_OFF + 12])
        seg.buf = buf
        seg.handle = None
        if flags & tcp.SYN and not flags & tcp.ACK:
            c.classified["TCP_SYN"] += 1
            return TCP_SYN, seg
        c.classified["TCP_DATA"] += 1
        return TCP_DATA, seg
