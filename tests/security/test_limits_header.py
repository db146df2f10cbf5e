"""The adapter's limits, and a shared header the application fills with garbage.

* `--max-process-sockets` / `--max-sockets` / `--max-ring-mb`: a socket beyond a limit is
  refused as the kernel refuses its own (EMFILE, ENFILE, ENOBUFS), the use is in
  `toe stat`'s limits, and closing gives the room back;
* the header of a socket's shared mapping is writable by the application: garbage in
  every field while data flows must not hurt the daemon or anyone else's transfer.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import run_toe, unique_port, wait_until
from tests.security import hostile, transfer
from tests.security.hostile import NOBODY_GID, NOBODY_UID, OP, Channel
from tests.security.test_bad_input import ALLOW_NOBODY, E, be32, before
from tests.security.transfer import Lines

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- limits


def hold_sockets(peer: hostile.Peer, ctl: str, n: int) -> list[int]:
    """Make n sockets on one channel, report the answers, hold them until told, close."""
    ch = Channel(ctl)
    results, socks = [], []
    for _ in range(n):
        rsp, sf = ch.socket()
        results.append(rsp.result)
        socks.append(sf)
    peer.send(results)
    peer.recv()
    for sf in socks:
        sf.close()
    ch.close()
    return results


def test_socket_limits(adapter_factory):
    """--max-process-sockets 8 --max-sockets 12: the 9th socket of a process -EMFILE; past 12
    in total (another process) -ENFILE; stat's limits say so; after closing, sockets again."""
    adapter = adapter_factory(*ALLOW_NOBODY, "--max-process-sockets", "8", "--max-sockets", "12")
    ctl = hostile.ctl_path(adapter.tap)
    p1 = hostile.UserProc(NOBODY_UID, NOBODY_GID, hold_sockets, ctl, 9)
    p2 = None
    try:
        first = p1.recv()
        limits = adapter.stat().get("limits", {})
        p2 = hostile.UserProc(NOBODY_UID, NOBODY_GID, hold_sockets, ctl, 5)
        second = p2.recv()
        limits_full = adapter.stat().get("limits", {})
        p1.send("close")
        p2.send("close")
        p1.result(60)
        p2.result(60)
    finally:
        p1.kill()
        if p2 is not None:
            p2.kill()
    print(f"\nfirst process {[hostile.errname(r) for r in first]}, second {[hostile.errname(r) for r in second]}; "
          f"limits {limits} then {limits_full}")
    assert first == [0] * 8 + [E["EMFILE"]], f"per-process limit: {[hostile.errname(r) for r in first]}"
    assert second == [0] * 4 + [E["ENFILE"]], f"adapter limit: {[hostile.errname(r) for r in second]}"
    for key, want in (("max_sockets", 12), ("max_process_sockets", 8), ("sockets", 8)):
        assert limits.get(key) == want, f"stat limits.{key}: {limits}"
    assert limits_full.get("sockets") == 12, limits_full
    assert limits_full.get("ring_bytes", 0) >= 12 * (2 << 20), limits_full
    wait_until(lambda: adapter.stat().get("limits", {}).get("sockets") == 0, "the closed sockets to be freed")
    third = hostile.as_user(NOBODY_UID, NOBODY_GID, lambda c: hold_sockets(_NoPeer(), c, 8), ctl)
    assert third == [0] * 8, f"after closing, sockets cannot be made again: {third}"


def two_channels(ctl: str, n: int) -> list[int]:
    """n sockets on each of two channels of one process (the limit is the process's)."""
    chans = [Channel(ctl), Channel(ctl)]
    results, socks = [], []
    for ch in chans:
        for _ in range(n):
            rsp, sf = ch.socket()
            results.append(rsp.result)
            socks.append(sf)
    for sf in socks:
        sf.close()
    for ch in chans:
        ch.close()
    return results


def test_process_limit_counts_all_channels_of_the_process(adapter_factory):
    """--max-process-sockets 4: a process cannot get around it by opening a second channel."""
    adapter = adapter_factory(*ALLOW_NOBODY, "--max-process-sockets", "4")
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, two_channels, hostile.ctl_path(adapter.tap), 3)
    assert got == [0] * 4 + [E["EMFILE"]] * 2, [hostile.errname(r) for r in got]


class _NoPeer:
    """hold_sockets without a parent to wait for."""

    def send(self, obj: Any) -> None:
        pass

    def recv(self, timeout: float = 0) -> None:
        return None


def test_ring_memory_limit(adapter_factory):
    """--max-ring-mb 7 with 2 MiB of rings per socket: 3 sockets fit, the 4th is -ENOBUFS."""
    adapter = adapter_factory(*ALLOW_NOBODY, "--max-ring-mb", "7")
    ctl = hostile.ctl_path(adapter.tap)
    with Channel(ctl) as ch:
        tx, rx = ch.ring_sizes()
    fit = (7 << 20) // (hostile.HDR_SIZE + tx + rx)
    assert fit == (7 << 20) // (tx + rx), "test precondition: the header page must not change the count"
    got = hostile.as_user(NOBODY_UID, NOBODY_GID, lambda c: hold_sockets(_NoPeer(), c, fit + 1), ctl)
    print(f"\nring {tx}+{rx}: {[hostile.errname(r) for r in got]}")
    assert got == [0] * fit + [E["ENOBUFS"]], [hostile.errname(r) for r in got]


# ---------------------------------------------------------------- a hostile shared header

HEADER_FIELDS = ("rx_size", "tx_size", "rx_head", "tx_tail", "tx_head", "rx_tail", "tx_push", "tx_sent",
                 "tok_sent", "tok_taken", "tx_full_wait", "tx_doorbell_armed", "rx_wnd_wait", "sndbuf", "rcvbuf",
                 "notsent_lowat", "user_mss", "opt_flags", "state", "flags", "sock_id", "accept_pending",
                 "linger_s", "keepidle_s", "keepintvl_s", "keepcnt", "mss", "so_error")
SIGNED_FIELDS = ("so_error", "linger_s")


def mangle_header(peer: hostile.Peer, ctl: str, host_ip: str, port: int, rounds: int) -> dict[str, Any]:
    """Runs as nobody: connect one of its own sockets to a server that sends without end,
    then rewrite its shared header with garbage while data flows, ringing doorbells."""
    rng = random.Random(9)
    ch = Channel(ctl)
    rsp, sf = ch.socket(keep_map=True)
    if rsp.result != 0:
        return {"setup": f"SOCKET {rsp.err}"}
    hdr = sf.header()
    r = ch.call_nofds(OP.CONNECT, sock_id=sf.sock_id, addr_be32=be32(host_ip), port_be16=socket.htons(port))
    if r.result not in (0, E["EINPROGRESS"]):
        return {"setup": f"CONNECT {r.err}"}
    deadline = time.monotonic() + 30
    while (hdr.state != hostile.SS_CONNECTED or hdr.rx_tail == 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if hdr.rx_tail == 0:
        return {"setup": f"no data arrived (state {hdr.state})"}
    peer.send("mangling")
    os.set_blocking(sf.a, False)
    answers: dict[str, int] = {}
    values = (0, 1, 0xFFFF_FFFF, 0x8000_0000, 0x7FFF_FFFF, 4096, 1 << 30)
    for i in range(rounds):
        name = rng.choice(HEADER_FIELDS)
        v = rng.choice(values) if rng.random() < 0.5 else rng.getrandbits(32)
        setattr(hdr, name, v - (1 << 32) if name in SIGNED_FIELDS and v >= 1 << 31 else v)
        if i % 7 == 0:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                os.write(sf.a, b"\0")           # a doorbell: look at the header now
        if i % 50 == 0:
            r = ch.call_nofds(OP.SETSOCKOPT, sock_id=sf.sock_id, arg0=socket.SOL_SOCKET, arg1=socket.SO_SNDBUF,
                              opt=struct.pack("=i", rng.getrandbits(31)), optlen=4)
            answers[f"SETSOCKOPT {r.err}"] = answers.get(f"SETSOCKOPT {r.err}", 0) + 1
            time.sleep(0.002)               # let the daemon and the data move
    mm = sf.map()
    mm[0:hostile.HDR_SIZE] = rng.randbytes(hostile.HDR_SIZE)     # the whole header, at once
    with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
        os.write(sf.a, b"\0")
    r = ch.call_nofds(OP.SHUTDOWN, sock_id=sf.sock_id, arg0=socket.SHUT_WR)
    answers[f"SHUTDOWN {r.err}"] = 1
    hello = ch.hello()
    sf.close()
    ch.close()
    return {"answers": answers, "hello": hello.result}


def test_hostile_shared_header(ad, client_ns):
    """nobody rewrites its own socket's shared header (ring sizes, indices, options, state)
    with garbage while data flows into it: the daemon stays up and a root download on
    another connection ends byte-exact."""
    pid, _ = before(ad)
    flood_port, port, total = unique_port(), unique_port(), 8 << 20
    for p, size, conns in ((flood_port, 0, 0), (port, total, 1)):
        srv = ad.popen([sys.executable, "-u", "-c", transfer.PATTERN_SERVER, ad.host_ip, str(p), str(size), str(conns)],
                       stdout=subprocess.PIPE)
        Lines(srv).wait("listening")
    victim = client_ns.toe_popen(ad, [sys.executable, "-u", "-c", transfer.PACED_CLIENT, ad.host_ip, str(port),
                                      str(total), str(1 << 20), "0.001"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines = Lines(victim, f"the victim (pid {victim.pid})")
    lines.wait("midway")
    attacker = hostile.UserProc(NOBODY_UID, NOBODY_GID, mangle_header, hostile.ctl_path(ad.tap), ad.host_ip,
                                flood_port, 20_000)
    try:
        try:
            assert attacker.recv(60) == "mangling"
        finally:
            assert victim.stdin is not None
            victim.stdin.write(b"go\n")
            victim.stdin.flush()
        got = attacker.result(180)
    finally:
        attacker.kill()
    words = lines.wait("done", timeout=180).split()
    print(f"\nhostile header: {got}; victim {words}")
    assert "setup" not in got, got["setup"] if "setup" in got else ""
    assert hostile.alive(pid) and hostile.daemon_pid(ad.tap) == pid, "the daemon died"
    assert got["hello"] == 0, f"the attacker's channel stopped working: {got}"
    assert words[1:] == [str(total), transfer.pattern_digest(total), "0"], f"the other connection was hurt: {words}"
    assert victim.wait(60) == 0
    stat = run_toe("stat", "--tap", ad.tap, "--json")
    assert stat.returncode == 0, stat.stderr
