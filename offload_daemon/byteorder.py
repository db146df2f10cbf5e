"""Byte order of the ABI's `*_be32` / `*_be16` fields.

The shared header and the command/response structures keep addresses and ports
in network byte order; cffi reads and writes them as native integers. `to_be*`
turns a host-order value into the native integer whose bytes are big-endian
(htonl/htons); `from_be*` is the reverse.
"""

from __future__ import annotations

import socket

to_be32 = socket.htonl
to_be16 = socket.htons
from_be32 = socket.ntohl
from_be16 = socket.ntohs

__all__ = ["to_be32", "to_be16", "from_be32", "from_be16"]
