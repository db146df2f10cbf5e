"""ARP for IPv4 over Ethernet (RFC 826).

     0       2       4   5   6       8
    +-------+-------+---+---+-------+
    | htype | ptype |hln|pln| oper  |
    +-------+-------+---+---+-------+
    | sender MAC (6) | sender IP (4) |
    | target MAC (6) | target IP (4) |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IntegrityError, SanityError

LEN = 28
OP_REQUEST = 1
OP_REPLY = 2

_ARP = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpRepr:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes

    @classmethod
    def parse(cls, buf, off: int = 0) -> "ArpRepr":
        if len(buf) - off < LEN:
            raise IntegrityError(f"ARP packet of {len(buf) - off} bytes < 28", "arp_short")
        htype, ptype, hlen, plen, op, smac, sip, tmac, tip = _ARP.unpack_from(buf, off)
        if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
            raise SanityError(f"ARP for htype {htype} ptype {ptype:#x}", "arp_unsupported")
        if op not in (OP_REQUEST, OP_REPLY):
            raise SanityError(f"ARP op {op}", "arp_unsupported")
        return cls(op, smac, sip, tmac, tip)

    def emit(self, out, off: int = 0) -> int:
        _ARP.pack_into(out, off, 1, 0x0800, 6, 4, self.op, self.sender_mac, self.sender_ip,
                       self.target_mac, self.target_ip)
        return LEN
