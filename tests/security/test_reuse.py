"""REUSE, recycled sockets (issue 12), from a hostile client: a closed socket's mapping
comes back only to the channel that made it, with its header exactly a new socket's, never
after a FORK, and nothing of a refused REUSE stays behind (descriptors, mappings)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest

from tests.security import hostile
from tests.security.hostile import NOBODY_GID, NOBODY_UID, OP, Channel
from tests.security.test_bad_input import E, before, check_daemon

pytestmark = pytest.mark.integration

SS_NEW, SS_RECYCLED = hostile.lib.TOE_SS_NEW, hostile.lib.TOE_SS_RECYCLED


def post_reuse(ch: Channel, ids: list[int]) -> list[socket.socket]:
    """A posted REUSE (the shim's refill ahead of need) naming `ids`, a new pair each: the
    A ends (ours to close); no answer is read."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in ids]
    data = hostile.pack_cmd(OP.REUSE, arg0=len(ids), arg1=hostile.lib.TOE_REUSE_POSTED) + \
        struct.pack(f"={len(ids)}I", *ids)
    ch.send_raw(data, [fd for a, b in pairs for fd in (b.fileno(), a.fileno())])
    for _a, b in pairs:
        b.close()
    return [a for a, _b in pairs]


def posts(ctl: str) -> dict[str, Any]:
    """Runs as nobody: posted REUSEs answered, flagged, before the next command software
    answers; two in a row; one left waiting when the channel goes."""
    ch = Channel(ctl)
    out: dict[str, Any] = {"hello_flags": ch.hello().flags}
    kept = [closed_and_reset(ch)[0] for _ in range(3)]
    keep_a = post_reuse(ch, [kept[0].sock_id, kept[1].sock_id ^ 0x77])     # one good, one not ours
    r1, g1 = ch.call(OP.BIND, sock_id=0, addr_be32=0, port_be16=0)        # software's command
    r2, g2 = ch.recv()
    hostile.close_all(g1 + g2)
    out["first"] = (r1.result, r1.flags & hostile.lib.TOE_RF_POSTED)
    out["second"] = (r2.result, r2.flags & hostile.lib.TOE_RF_POSTED)
    # two in a row: both answered, in order, flagged
    keep_a += post_reuse(ch, [kept[1].sock_id]) + post_reuse(ch, [kept[2].sock_id])
    a1, a2 = ch.recv()[0], ch.recv()[0]
    out["two"] = [(a1.result, a1.flags), (a2.result, a2.flags)]
    # a bigger one, an id not ours in the middle
    six = [closed_and_reset(ch)[0] for _ in range(6)]
    keep_a += post_reuse(ch, [x.sock_id for x in six[:3]] + [0x5A5A5A5A] + [x.sock_id for x in six[3:]])
    big = ch.recv()[0]
    out["seven"] = (big.result, big.flags)
    # one waiting when the channel goes: its descriptors must not stay in the daemon
    sf, _ = closed_and_reset(ch)
    keep_a += post_reuse(ch, [sf.sock_id])
    for x in (*kept, *six, sf):
        x.close()
    for a in keep_a:
        a.close()
    ch.close()
    return out


def reuse(ch: Channel, ids: list[int], pairs: list[tuple[int, int]] | None = None,
          n: int | None = None) -> int:
    """REUSE naming `ids` with a [B, A] pair each (made here unless given); our ends are
    closed afterwards except the A ends the caller asked for."""
    made = []
    if pairs is None:
        pairs = []
        for _ in ids:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            made.append((a, b))
            pairs.append((b.fileno(), a.fileno()))
    data = hostile.pack_cmd(OP.REUSE, arg0=len(ids) if n is None else n) + struct.pack(f"={len(ids)}I", *ids)
    rsp, got = ch.call_raw(data, [fd for p in pairs for fd in p])
    hostile.close_all(got)
    for a, b in made:
        b.close()
        a.close()
    return rsp.result


def closed_and_reset(ch: Channel) -> tuple[hostile.SockFds, Any]:
    """A socket made and closed (A), once the daemon has reset its header: (fds, header)."""
    _, sf = ch.socket(keep_map=True)
    h = sf.header()
    hostile.close_all([sf.a])
    sf.a = -1
    deadline = time.monotonic() + 20
    while h.state != SS_RECYCLED and time.monotonic() < deadline:
        time.sleep(0.01)
    return sf, h


def header_words(h: Any) -> list[int]:
    return list(struct.unpack("=1024I", bytes(hostile.ffi.buffer(h, hostile.HDR_SIZE))))


def reuses(ctl: str) -> dict[str, Any]:
    """Runs as nobody."""
    ch, other = Channel(ctl), Channel(ctl)
    assert ch.hello().result == 0 and other.hello().result == 0
    tx, rx = ch.ring_sizes()
    out: dict[str, Any] = {}

    sf, h = closed_and_reset(ch)
    old = sf.sock_id
    out["state"] = h.state
    # what the shim's make_sock writes, and the state that says it was reset
    want = hostile.ffi.new("struct toe_sock_shm *")
    want.magic, want.abi_version = hostile.SHM_MAGIC, hostile.ABI_VERSION
    want.tx_size = want.sndbuf = tx
    want.rx_size = want.rcvbuf = rx
    want.state = SS_RECYCLED
    out["header_is_new"] = header_words(h) == header_words(want)

    # nobody else names it: another channel, a live socket's id, a guess
    _, live = ch.socket()
    out["other_channel"] = reuse(other, [old])
    out["live"] = reuse(ch, [live.sock_id])
    out["guessed"] = reuse(ch, [old ^ 0x5A5A5A5A])
    # framing: ids and descriptors must match arg0
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out["too_few_ids"] = reuse(ch, [old], [(b.fileno(), a.fileno())], n=2)
    out["too_many_fds"] = reuse(ch, [old], [(b.fileno(), a.fileno()), (b.fileno(), a.fileno())])
    a.close()
    b.close()

    # its channel takes it: a new id in the header, the state of a new socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out["taken"] = reuse(ch, [old], [(b.fileno(), a.fileno())])
    b.close()
    new = int(h.sock_id)
    out["new_id"] = new not in (0, old)
    out["new_state"] = h.state
    out["bind_new"] = ch.call_nofds(OP.BIND, sock_id=new, addr_be32=0, port_be16=0).result
    out["bind_old"] = ch.call_nofds(OP.BIND, sock_id=old, addr_be32=0, port_be16=0).result
    out["again"] = reuse(ch, [old])
    a.close()

    # a pair that is not one: refused, and the mapping is not kept either
    sf2, h2 = closed_and_reset(ch)
    pipe = hostile.make_fd("pipe")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out["bad_pair"] = reuse(ch, [sf2.sock_id], [(pipe.fd, a.fileno())])
    out["after_bad_pair"] = reuse(ch, [sf2.sock_id])
    pipe.close()
    a.close()
    b.close()

    # one good, one foreign, one good in a batch: the mask says which
    sfs = [closed_and_reset(ch) for _ in range(2)]
    out["mask"] = reuse(ch, [sfs[0][0].sock_id, old ^ 0x1234, sfs[1][0].sock_id])

    # after FORK the child has every mapping: none is recycled
    sf3, h3 = closed_and_reset(ch)
    _, before_fork = ch.socket(keep_map=True)
    fork_rsp, fork_fds = ch.call(OP.FORK)
    hostile.close_all(fork_fds)
    out["fork"] = fork_rsp.result
    out["after_fork"] = reuse(ch, [sf3.sock_id])
    hostile.close_all([before_fork.a])
    before_fork.a = -1
    sf4, after_fork = closed_and_reset(ch)              # made after it: kept again
    out["made_before_fork_kept"] = before_fork.header().state == SS_RECYCLED
    out["made_after_fork_kept"] = after_fork.state == SS_RECYCLED
    for x in (sf, live, sf2, sf3, sf4, before_fork, *(s for s, _ in sfs)):
        x.close()
    ch.close()
    other.close()
    return out


def test_a_recycled_socket_comes_back_new_and_only_to_its_channel(ad):
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, reuses, hostile.ctl_path(ad.tap), timeout=120)
    assert got["state"] == SS_RECYCLED and got["header_is_new"], got
    assert got["other_channel"] == got["live"] == got["guessed"] == 0, got      # no bit: not taken
    assert got["too_few_ids"] == E["EPROTO"] and got["too_many_fds"] == E["EINVAL"], got
    assert got["taken"] == 1 and got["new_id"] and got["new_state"] == SS_NEW, got
    assert got["bind_new"] == 0 and got["bind_old"] == E["EBADF"] and got["again"] == 0, got
    assert got["bad_pair"] == 0 and got["after_bad_pair"] == 0, got
    assert got["mask"] == 0b101, got
    assert got["fork"] == 0 and got["after_fork"] == 0, got
    # a socket made before the FORK (the child has a copy of its mapping) is never kept
    assert got["made_before_fork_kept"] is False and got["made_after_fork_kept"] is True, got
    problems = check_daemon(ad, pid, fds0, "after the REUSEs")
    assert not problems, problems


def test_a_posted_reuse_is_answered_flagged_and_nothing_of_it_stays(ad):
    """The shim's pool refills ahead of need with a posted REUSE (docs/abi.md "The pool"):
    HELLO says the daemon answers them; the answer is flagged TOE_RF_POSTED and comes before
    that of the next command software answers (what came before is done first); two in a
    row are both answered, in order; one of seven ids gets the mask of the six that are
    ours; one still waiting when its channel goes leaves no
    descriptor in the daemon."""
    pid, fds0 = before(ad)
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, posts, hostile.ctl_path(ad.tap), timeout=120)
    posted = hostile.lib.TOE_RF_POSTED
    assert got["hello_flags"] & posted, got
    assert got["first"] == [0b01, posted], got            # the good id taken, the foreign one not
    assert got["second"] == [E["EBADF"], 0], got          # BIND of id 0: software's answer, unflagged
    assert got["two"] == [[1, posted], [1, posted]], got
    assert got["seven"] == [0b1110111, posted], got      # seven ids, the fourth not ours
    problems = check_daemon(ad, pid, fds0, "after the posted REUSEs")
    assert not problems, problems
