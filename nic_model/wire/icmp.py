"""ICMPv4 echo (RFC 792).

    +-------+-------+---------------+
    | type  | code  |   checksum    |
    +-------+-------+---------------+
    |  identifier   |   sequence    |  ... data
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IntegrityError
from .ipv4 import fold

ECHO_REPLY = 0
DEST_UNREACH = 3
ECHO_REQUEST = 8

_HDR = struct.Struct("!BBHHH")


def checksum(data) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return 0xFFFF - fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    type: int
    code: int
    ident: int
    seq: int
    data: bytes

    @classmethod
    def parse(cls, buf, off: int, length: int) -> "IcmpEcho":
        if length < 8:
            raise IntegrityError(f"ICMP message of {length} bytes < 8", "icmp_short")
        body = bytes(buf[off:off + length])
        if checksum(body) != 0:
            raise IntegrityError("ICMP checksum", "icmp_checksum")
        t, c, _cs, ident, seq = _HDR.unpack_from(body, 0)
        return cls(t, c, ident, seq, body[8:])

    def emit(self) -> bytes:
        msg = bytearray(_HDR.pack(self.type, self.code, 0, self.ident, self.seq) + self.data)
        struct.pack_into("!H", msg, 2, checksum(msg))
        return bytes(msg)
