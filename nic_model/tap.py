"""The TAP port: Ethernet frames to and from the Linux kernel.

Opened with IFF_VNET_HDR so that, when offloads are on, the kernel hands the
adapter 64 KB TSO frames with partial checksums and accepts the same from it
(TUN_F_CSUM | TUN_F_TSO4) - what a real TOE NIC negotiates. With offloads off
every frame is MTU-sized and carries full checksums (fidelity mode); the
12-byte virtio header is still present, all zero.

The TAP is not persistent: it exists while the adapter holds it open.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from .counters import TapPortCounters
from .wire import vnet

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02


class TapError(Exception):
    pass


class TapPort:
    def __init__(self, name: str, offloads: bool = True, pcap: str | None = None):
        self.name = name
        self.pcap = None
        self.offloads = offloads
        self.counters = TapPortCounters()
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.LEN))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4) if offloads else 0)
        except OSError as e:
            os.close(self.fd)
            if e.errno == 16:
                raise TapError(f"TAP {name} is busy (another adapter holds it)") from None
            raise TapError(f"cannot set up TAP {name}: {e.strerror}") from None
        if pcap:
            try:
                self.pcap = open(pcap, "wb", buffering=1 << 20)
            except OSError as e:
                os.close(self.fd)
                raise TapError(f"cannot write pcap {pcap}: {e.strerror}") from None
            # classic pcap, Ethernet link type, 256 KB snap length (TSO frames are up to 64 KB)
            self.pcap.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))

    def _record(self, frame) -> None:
        t = time.time()
        n = len(frame) - vnet.LEN
        self.pcap.write(struct.pack("<IIII", int(t), int((t % 1) * 1e6), n, n))  # type: ignore[union-attr]
        self.pcap.write(frame[vnet.LEN:])  # type: ignore[union-attr]

    def recv_into(self, buf) -> int:
        """One frame (with its virtio header) into buf; -1 when none is waiting."""
        try:
            n = os.readv(self.fd, (buf,))
        except BlockingIOError:
            return -1
        c = self.counters
        c.rx_frames += 1
        c.rx_bytes += n - vnet.LEN
        if buf[1]:                      # gso_type: a TSO super-frame from the kernel
            c.rx_gso_frames += 1
        if self.pcap is not None:
            self._record(memoryview(buf)[:n])
        return n

    def send(self, parts, nbytes: int, gso: bool = False) -> None:
        """Write one frame given as buffers (virtio header first)."""
        c = self.counters
        try:
            os.writev(self.fd, parts)
        except OSError:
            c.tx_errors += 1
            return
        c.tx_frames += 1
        c.tx_bytes += nbytes - vnet.LEN
        if self.pcap is not None:
            self._record(b"".join(parts))
        if gso:
            c.tx_gso_frames += 1

    def close(self) -> None:
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
