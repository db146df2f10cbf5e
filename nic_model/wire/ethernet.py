"""Ethernet II framing.

     0                   6                  12      14
    +-------------------+-------------------+-------+----------
    | destination MAC   | source MAC        | type  | payload
    +-------------------+-------------------+-------+----------
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IntegrityError

HDR_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
BROADCAST = b"\xff" * 6

_HDR = struct.Struct("!6s6sH")


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


@dataclass(frozen=True, slots=True)
class EthernetRepr:
    dst: bytes
    src: bytes
    ethertype: int

    @classmethod
    def parse(cls, buf, off: int = 0) -> "EthernetRepr":
        if len(buf) - off < HDR_LEN:
            raise IntegrityError(f"ethernet frame of {len(buf) - off} bytes < 14", "eth_short")
        dst, src, et = _HDR.unpack_from(buf, off)
        return cls(dst, src, et)

    def emit(self, out, off: int = 0) -> int:
        _HDR.pack_into(out, off, self.dst, self.src, self.ethertype)
        return HDR_LEN

    def header(self) -> bytes:
        return _HDR.pack(self.dst, self.src, self.ethertype)
