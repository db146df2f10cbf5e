"""IPv4 header (RFC 791).

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Version|  IHL  |    DSCP/ECN   |          Total Length         |
    |         Identification        |Flags|      Fragment Offset    |
    |  Time to Live |    Protocol   |         Header Checksum       |
    |                       Source Address                          |
    |                    Destination Address                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IntegrityError, SanityError

HDR_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
FLAG_DF = 0x4000
MF_OFFSET_MASK = 0x3FFF

_HDR = struct.Struct("!BBHHHBBH4s4s")


def fold(s: int) -> int:
    """Fold a one's-complement sum to 16 bits (not inverted)."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def header_sum(buf, off: int, ihl_bytes: int) -> int:
    """One's-complement sum of the header's 16-bit words (valid header: 0xFFFF)."""
    words = struct.unpack_from(f"!{ihl_bytes // 2}H", buf, off)
    return fold(sum(words))


@dataclass(frozen=True, slots=True)
class Ipv4Repr:
    src: bytes
    dst: bytes
    proto: int
    payload_len: int
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    df: bool = True
    header_len: int = HDR_LEN

    @classmethod
    def parse(cls, buf, off: int = 0, end: int | None = None, verify_csum: bool = True) -> "Ipv4Repr":
        """Validate an IPv4 header at buf[off:end]; `end` defaults to len(buf)."""
        if end is None:
            end = len(buf)
        avail = end - off
        if avail < HDR_LEN:
            raise IntegrityError(f"IPv4 packet of {avail} bytes < 20", "ip_short")
        vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(buf, off)
        if vihl >> 4 != 4:
            raise IntegrityError(f"IP version {vihl >> 4}", "ip_version")
        ihl = (vihl & 0xF) * 4
        if ihl < HDR_LEN:
            raise IntegrityError(f"IHL {ihl} < 20", "ip_ihl")
        if total < ihl or total > avail:
            raise IntegrityError(f"total length {total} vs header {ihl}, frame {avail}", "ip_length")
        if verify_csum and header_sum(buf, off, ihl) != 0xFFFF:
            raise IntegrityError("IPv4 header checksum", "ip_checksum")
        if frag & MF_OFFSET_MASK:
            raise SanityError("IPv4 fragment (reassembly is not offered)", "ip_fragment")
        if src[0] >= 224 or src == b"\xff\xff\xff\xff":
            raise SanityError("multicast/broadcast source address", "ip_bad_source")
        return cls(src, dst, proto, total - ihl, ttl, ident, tos, bool(frag & FLAG_DF), ihl)

    def emit(self, out, off: int = 0) -> int:
        """Write a 20-byte header with a correct checksum."""
        total = HDR_LEN + self.payload_len
        _HDR.pack_into(out, off, 0x45, self.tos, total, self.ident & 0xFFFF,
                       FLAG_DF if self.df else 0, self.ttl, self.proto, 0, self.src, self.dst)
        csum = 0xFFFF - header_sum(out, off, HDR_LEN)
        struct.pack_into("!H", out, off + 10, csum)
        return HDR_LEN


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """One's-complement sum of the TCP/UDP pseudo-header (folded, not inverted)."""
    a = struct.unpack("!HHHH", src + dst)
    return fold(a[0] + a[1] + a[2] + a[3] + proto + length)
