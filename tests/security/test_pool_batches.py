"""SOCKETS, the batch that fills a shim's pool (issue 12), from a hostile client: it obeys
the same checks and limits as SOCKET, one socket at a time, and keeps no descriptor of a
batch it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from tests.security import hostile
from tests.security.hostile import NOBODY_GID, NOBODY_UID, OP, Channel
from tests.security.test_bad_input import ALLOW_NOBODY, E, before, check_daemon

pytestmark = pytest.mark.integration


def batch(ch: Channel, sfs: list[hostile.SockFds], n: int | None = None) -> int:
    fds = [fd for sf in sfs for fd in sf.fds]
    rsp = ch.call_nofds(OP.SOCKETS, fds, arg0=len(sfs) if n is None else n, shm_bytes=sfs[0].shm_bytes)
    return rsp.result


def batches(ctl: str) -> dict[str, Any]:
    """Runs as nobody: a good batch, one with a bad socket in the middle, a miscounted one."""
    ch = Channel(ctl)
    assert ch.hello().result == 0
    tx, rx = ch.ring_sizes()
    out: dict[str, Any] = {}
    good = [hostile.make_socket_fds(tx, rx) for _ in range(4)]
    for sf in good:
        sf.map()
    out["good"] = batch(ch, good)
    ids = [int(sf.header().sock_id) for sf in good]
    out["ids"] = ids
    # each id is the channel's: a command naming it is obeyed
    out["bind"] = [ch.call_nofds(OP.BIND, sock_id=i, addr_be32=0, port_be16=0).result for i in ids]
    mixed = [hostile.make_socket_fds(tx, rx), hostile.make_socket_fds(tx, rx),
             hostile.make_socket_fds(tx, rx, seal=False), hostile.make_socket_fds(tx, rx)]
    out["mixed"] = batch(ch, mixed)
    out["first_bad"] = batch(ch, [hostile.make_socket_fds(tx, rx, seal=False), hostile.make_socket_fds(tx, rx)])
    out["miscounted"] = batch(ch, [hostile.make_socket_fds(tx, rx) for _ in range(2)], n=3)
    out["too_many"] = batch(ch, [hostile.make_socket_fds(tx, rx) for _ in range(17)])
    for sf in good + mixed:
        sf.close()
    ch.close()
    return out


def test_a_batch_is_checked_socket_by_socket(ad):
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, batches, hostile.ctl_path(ad.tap), timeout=60)
    assert got["good"] == 4, got
    assert len(set(got["ids"])) == 4 and all(got["ids"]), got           # each header names its socket
    assert got["bind"] == [0] * 4, got
    assert got["mixed"] == 2, got                                       # up to the unsealed memfd
    assert got["first_bad"] == E["EINVAL"], got                         # none: that socket's error
    assert got["miscounted"] == E["EINVAL"] and got["too_many"] == E["EINVAL"], got
    problems = check_daemon(ad, pid, fds0, "after the batches")
    assert not problems, problems


def fill(ctl: str) -> list[int]:
    ch = Channel(ctl)
    assert ch.hello().result == 0
    tx, rx = ch.ring_sizes()
    held = []
    results = []
    for n in (6, 6):
        sfs = [hostile.make_socket_fds(tx, rx) for _ in range(n)]
        results.append(batch(ch, sfs))
        held += sfs
    for sf in held:
        sf.close()
    ch.close()
    return results


def test_a_batch_stops_at_the_process_limit(adapter_factory):
    """--max-process-sockets 8: a batch of 6, then one of 6 registers 2 (the limit), and
    the next would be EMFILE, as SOCKET's."""
    adapter = adapter_factory(*ALLOW_NOBODY, "--max-process-sockets", "8")
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, fill, hostile.ctl_path(adapter.tap), timeout=60)
    assert got == [6, 2], got


def s32(sock_id: int) -> int:
    """A u32 socket id in the command's int32 arg1, as the shim puts it there."""
    return sock_id - (1 << 32) if sock_id >= 1 << 31 else sock_id


def accepts(ctl: str) -> dict[str, int]:
    """Runs as nobody: ACCEPT into sockets named by id (the pooled form)."""
    ch, other = Channel(ctl), Channel(ctl)
    assert ch.hello().result == 0 and other.hello().result == 0
    _, lst = ch.socket()
    assert ch.call_nofds(OP.BIND, sock_id=lst.sock_id, addr_be32=0, port_be16=0).result == 0
    assert ch.call_nofds(OP.LISTEN, sock_id=lst.sock_id, arg0=8).result == 0
    _, fresh = ch.socket()
    _, bound = ch.socket()
    assert ch.call_nofds(OP.BIND, sock_id=bound.sock_id, addr_be32=0, port_be16=0).result == 0
    _, theirs = other.socket()
    out = {
        "theirs": ch.call_nofds(OP.ACCEPT, sock_id=lst.sock_id, arg1=s32(theirs.sock_id)).result,
        "guessed": ch.call_nofds(OP.ACCEPT, sock_id=lst.sock_id, arg1=s32(theirs.sock_id ^ 0x5A5A)).result,
        "itself": ch.call_nofds(OP.ACCEPT, sock_id=lst.sock_id, arg1=s32(lst.sock_id)).result,
        "bound": ch.call_nofds(OP.ACCEPT, sock_id=lst.sock_id, arg1=s32(bound.sock_id)).result,
        "fresh": ch.call_nofds(OP.ACCEPT, sock_id=lst.sock_id, arg1=s32(fresh.sock_id)).result,
    }
    for sf in (lst, fresh, bound, theirs):
        sf.close()
    ch.close()
    other.close()
    return out


def test_accept_into_a_named_socket_takes_only_a_fresh_one_of_the_channels(ad):
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, accepts, hostile.ctl_path(ad.tap), timeout=60)
    assert got == {"theirs": E["EBADF"], "guessed": E["EBADF"], "itself": E["EINVAL"],
                   "bound": E["EINVAL"], "fresh": -11}, got             # -EAGAIN: nothing queued
