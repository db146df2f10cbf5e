"""virtio-net header exchanged with a TAP opened with IFF_VNET_HDR.

    struct virtio_net_hdr_mrg_rxbuf (12 bytes, little-endian on x86):
      u8 flags; u8 gso_type; u16 hdr_len; u16 gso_size;
      u16 csum_start; u16 csum_offset; u16 num_buffers;
"""

from __future__ import annotations

import struct

LEN = 12
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80

_HDR = struct.Struct("<BBHHHHH")
NONE = _HDR.pack(0, GSO_NONE, 0, 0, 0, 0, 0)


def parse(buf) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)."""
    return _HDR.unpack_from(buf, 0)[:6]


def pack_into(out, off: int, flags: int, gso_type: int, hdr_len: int, gso_size: int,
              csum_start: int, csum_offset: int) -> None:
    _HDR.pack_into(out, off, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
