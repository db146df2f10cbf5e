"""The units leave one doorbell byte unread in B (nic_model/hw/fp_engine.c, kick_kept): its
read would free A's send buffer and wake a recv() asleep on A for nothing. One byte left
must keep A writable (the shim's A has the minimum send buffer), and the next doorbell
drains what is there."""

from __future__ import annotations

import array
import fcntl
import select
import socket
import termios

from .fixtures import Harness
from .test_fastpath_diff import World


def _unread(fd: int) -> int:
    n = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, n)
    return n[0]


def _writable(a: socket.socket) -> bool:
    p = select.poll()
    p.register(a.fileno(), select.POLLOUT)
    return bool(p.poll(0))


def test_one_doorbell_byte_stays_in_b_and_a_stays_writable():
    try:
        w = World(True)
        assert w.units.st.kick_kept == 1                 # this kernel: probed at fp_new
        a, b = w.app.a, w.hs.b_fd
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)   # as the shim makes A
        w.app.write(b"x")
        a.send(b"\0")                                    # the shim's doorbell
        w.doorbell()
        assert _unread(b) == 1 and _writable(a)
        assert [f[5] for f in w.frames() if f[5]] == [b"x"]   # the doorbell was taken
        w.app.write(b"y")
        a.send(b"\0")
        w.doorbell()
        assert _unread(b) == 0 and _writable(a)          # the next doorbell drains both
    finally:
        Harness.close_all()
