"""CONNECT answered by the units' command unit (nic_model/hw/host_cmd.c), from a hostile
client: a channel connects only its own fresh sockets there, and a CONNECT the unit leaves
(another channel's socket, descriptors attached, a socket software has used) gets
software's answer, as before the unit existed."""

from __future__ import annotations

import errno
import socket
import sys
import time
from typing import Any

import pytest

from tests.security import hostile
from tests.security.hostile import NOBODY_GID, NOBODY_UID, OP, Channel
from tests.security.test_bad_input import E, be32, before, check_daemon

pytestmark = pytest.mark.integration

LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"""


def _connect(ch: Channel, sid: int, host_ip: str, port: int, fds: list[int] | None = None) -> int:
    if fds:
        rsp, got = ch.call_raw(hostile.pack_cmd(OP.CONNECT, sock_id=sid, addr_be32=be32(host_ip),
                                                port_be16=socket.htons(port)), fds)
        hostile.close_all(got)
        return rsp.result
    return ch.call_nofds(OP.CONNECT, sock_id=sid, addr_be32=be32(host_ip), port_be16=socket.htons(port)).result


def _wait_state(h: Any, state: int) -> int:
    deadline = time.monotonic() + 20
    while h.state != state and time.monotonic() < deadline:
        time.sleep(0.01)
    return int(h.state)


def connects(ctl: str, host_ip: str, port: int) -> dict[str, Any]:
    """Runs as nobody: pooled (fresh) sockets of one channel, named by it and by another."""
    ch, other = Channel(ctl), Channel(ctl)
    assert ch.hello().result == 0 and other.hello().result == 0
    tx, rx = ch.ring_sizes()
    sfs = [hostile.make_socket_fds(tx, rx) for _ in range(5)]
    for sf in sfs:
        sf.map()
    fds = [fd for sf in sfs for fd in sf.fds]
    out: dict[str, Any] = {"batch": ch.call_nofds(OP.SOCKETS, fds, arg0=len(sfs), shm_bytes=sfs[0].shm_bytes).result}
    hdrs = [sf.header() for sf in sfs]
    ids = [int(h.sock_id) for h in hdrs]
    # the first connect() teaches the adapter the kernel side's MAC (its ARP is software's)
    out["first"] = _connect(ch, ids[0], host_ip, port)
    out["first_state"] = _wait_state(hdrs[0], hostile.SS_CONNECTED)
    # another channel names a fresh socket of ch's: refused (not taken by the unit either)
    out["foreign"] = _connect(other, ids[1], host_ip, port)
    out["foreign_state"] = int(hdrs[1].state)
    # ch's own fresh socket: connected (by the unit), once
    out["own"] = _connect(ch, ids[1], host_ip, port)
    out["own_state"] = _wait_state(hdrs[1], hostile.SS_CONNECTED)
    out["own_again"] = _connect(ch, ids[1], host_ip, port)
    # descriptors with a CONNECT: software's answer to a malformed command
    pipe = hostile.make_fd("pipe")
    out["with_fds"] = _connect(ch, ids[2], host_ip, port, fds=[pipe.fd])
    pipe.close()
    out["with_fds_state"] = int(hdrs[2].state)
    # a socket software has used (BIND): its CONNECT is software's, and works
    out["bind"] = ch.call_nofds(OP.BIND, sock_id=ids[3], addr_be32=0, port_be16=0).result
    out["after_bind"] = _connect(ch, ids[3], host_ip, port)
    out["after_bind_state"] = _wait_state(hdrs[3], hostile.SS_CONNECTED)
    # off the subnet: handed over (software's answer), the socket untouched
    rsp, got = ch.call(OP.CONNECT, sock_id=ids[4], addr_be32=be32("10.99.0.1"), port_be16=socket.htons(port))
    hostile.close_all(got)
    out["off_subnet_flags"] = rsp.flags
    for sf in sfs:
        sf.close()
    ch.close()
    other.close()
    return out


def test_only_a_channels_own_fresh_sockets_are_connected_by_the_units(ad):
    port = 7311
    ad.popen([sys.executable, "-u", "-c", LISTENER, ad.host_ip, str(port)])
    ad.wait_kernel_listener(port)
    pid, fds0 = before(ad)
    units0 = ad.stat()["units"]["fast_path"]
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, connects, hostile.ctl_path(ad.tap), ad.host_ip, port,
                          timeout=120)
    connected = hostile.SS_CONNECTED
    assert got["batch"] == 5, got
    assert got["first"] == E["EINPROGRESS"] and got["first_state"] == connected, got
    assert got["foreign"] == E["EBADF"] and got["foreign_state"] == hostile.lib.TOE_SS_NEW, got
    assert got["own"] == E["EINPROGRESS"] and got["own_state"] == connected, got
    assert got["own_again"] == -errno.EISCONN, got
    assert got["with_fds"] == E["EINVAL"] and got["with_fds_state"] == hostile.lib.TOE_SS_NEW, got
    assert got["bind"] == 0 and got["after_bind"] == E["EINPROGRESS"] and got["after_bind_state"] == connected, got
    assert got["off_subnet_flags"] == hostile.lib.TOE_RF_HANDOVER, got
    units = ad.stat()["units"]["fast_path"]
    made = units["commands.connects"] - units0["commands.connects"]
    # the unit answered ch's own fresh socket (and the first one, if the MAC was known
    # before it); everything else was software's
    assert 1 <= made <= 2, (units0, units)
    # the other channel's, the used one again, the bound one
    assert units["commands.not_fresh"] - units0["commands.not_fresh"] >= 3, (units0, units)
    problems = check_daemon(ad, pid, fds0, "after the CONNECTs")
    assert not problems, problems
