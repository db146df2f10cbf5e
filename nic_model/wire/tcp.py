"""TCP header and options (RFC 9293 3.1, RFC 7323, RFC 2018).

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          Source Port          |       Destination Port        |
    |                        Sequence Number                        |
    |                    Acknowledgment Number                      |
    |  Data |       |C|E|U|A|P|R|S|F|                               |
    | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
    |           Checksum            |         Urgent Pointer        |
    |                    Options                    |    Padding    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IntegrityError

HDR_LEN = 20

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_MSS = struct.Struct("!BBH")


def flags_str(flags: int) -> str:
    names = "FSRPAUEC"
    return "".join(n for i, n in enumerate(names) if flags & (1 << i)) or "."


@dataclass(frozen=True, slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    timestamp: tuple[int, int] | None = None
    sack: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, buf, off: int, end: int) -> "TcpOptions":
        mss = wscale = ts = None
        sack_perm = False
        sack: list[tuple[int, int]] = []
        i = off
        while i < end:
            kind = buf[i]
            if kind == OPT_END:
                break
            if kind == OPT_NOP:
                i += 1
                continue
            if i + 1 >= end:
                raise IntegrityError("TCP option runs past the header", "tcp_option")
            length = buf[i + 1]
            if length < 2 or i + length > end:
                raise IntegrityError(f"TCP option {kind} length {length}", "tcp_option")
            if kind == OPT_MSS and length == 4:
                mss = struct.unpack_from("!H", buf, i + 2)[0]
            elif kind == OPT_WSCALE and length == 3:
                wscale = min(buf[i + 2], 14)
            elif kind == OPT_SACK_PERM and length == 2:
                sack_perm = True
            elif kind == OPT_TIMESTAMP and length == 10:
                ts = struct.unpack_from("!II", buf, i + 2)
            elif kind == OPT_SACK and (length - 2) % 8 == 0:
                for j in range(i + 2, i + length, 8):
                    sack.append(struct.unpack_from("!II", buf, j))
            i += length
        return cls(mss, wscale, sack_perm, ts, tuple(sack))

    def emit(self) -> bytes:
        """Options block, padded with NOPs to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += _MSS.pack(OPT_MSS, 4, self.mss)
        if self.sack_perm:
            out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
        if self.timestamp is not None:
            out += bytes((OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10)) + struct.pack("!II", *self.timestamp)
        if self.wscale is not None:
            out += bytes((OPT_NOP, OPT_WSCALE, 3, self.wscale))
        if self.sack:
            out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack)))
            for left, right in self.sack:
                out += struct.pack("!II", left, right)
        while len(out) % 4:
            out.append(OPT_NOP)
        return bytes(out)


NO_OPTIONS = TcpOptions()
