"""The command unit (nic_model/hw/host_cmd.c) driven by a hostile host, for sanitized.py's
child (mode "commands"): channels and fresh sockets registered, forgotten and registered
again; commands of random op, size, socket id, address and port, some with descriptors,
sent on registered and unregistered channels; B ends' events with random flags; neighbours
learnt stale or fresh; port use counts filled; the CCB table filled. Each socket's mapping
sits between PROT_NONE guard pages and its header is garbage. Every command the unit
looked at must be counted once (answered, or left for one reason), a command it left must
still be on the channel, and what it answered must name one of the registered sockets.
Imports nothing from the project (the child loads only the sanitized units)."""

from __future__ import annotations

import ctypes
import os
import random
import select
import socket
import struct

CMD_SIZE, RSP_SIZE, HDR = 64, 64, 4096
OP_CONNECT, OP_BIND = 5, 3
EV_CONNECT = 4
RING = 4096
REASONS = ("connects", "passed", "not_fresh", "no_neighbour", "no_port", "no_room")


def _cmd(r: random.Random, op: int, sid: int, ip: int, port: int) -> bytes:
    """A struct toe_cmd (shim/toe_abi.h) with random fields, mostly of the right size."""
    head = struct.pack("=IIiiIHHII", op, sid, r.getrandbits(31), r.getrandbits(31), socket.htonl(ip),
                       socket.htons(port), r.getrandbits(16), r.getrandbits(32), r.getrandbits(32))
    full = head + r.randbytes(CMD_SIZE - len(head))
    size = CMD_SIZE if r.random() < 0.9 else r.choice([0, 1, 32, 63, 65, 128])
    return full[:size] if size <= CMD_SIZE else full + r.randbytes(size - CMD_SIZE)


class Commands:
    def __init__(self, ffi, lib, r: random.Random, mapping, me: int, peer: int, my_mac: bytes, peer_mac: bytes):
        self.ffi, self.lib, self.r = ffi, lib, r
        self.me, self.peer, self.peer_mac = me, peer, peer_mac
        self.tap_mine, self.tap_units = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tap_mine.setblocking(False)
        self.ep = select.epoll()
        self.mac = ffi.new("uint8_t[]", my_mac)
        st = lib.fp_new(8, self.tap_units.fileno(), self.ep.fileno(), me, self.mac, 1, 65000, 2, 65536 + 256)
        assert st != ffi.NULL
        self.st = st
        self.bufs = [ffi.new("uint8_t[]", 65536 + 256) for _ in range(2)]
        for i, b in enumerate(self.bufs):
            lib.fp_set_buf(st, i, int(ffi.cast("uintptr_t", b)))
        self.ids = ffi.new("struct fp_ids *")
        self.ids.eph_secret = r.getrandbits(64)
        self.ports = ffi.new("uint32_t[65536]")
        t = self.tmpl = ffi.new("struct fp_ccb *")
        t.state, t.rcv_wscale, t.cwnd, t.ssthresh, t.rto, t.rtt_valid = 2, 7, 14600, 1 << 30, 1.0, 1
        t.cflags = 32                                   # FP_CF_SEND_SYN
        assert lib.fp_hc_setup(st, 24, 1460, 32768, 60999, self.ids, self.ports, t) == 0
        assert lib.fp_hc_setup(st, 24, 1460, 32768, 60999, self.ids, self.ports, t) < 0   # once
        self.chans = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
        for shim, daemon in self.chans:
            shim.setblocking(False)
            daemon.setblocking(False)
        self.gens = [0, 0, 0]
        self.next_gen = 1
        self.socks = []                                 # (A, B, mapping address)
        for _ in range(8):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            a.setblocking(False)
            b.setblocking(False)
            addr = mapping(HDR + 2 * RING)
            ctypes.memmove(addr, r.randbytes(HDR), HDR)  # a header of garbage
            self.socks.append((a, b, addr))
        self.id_pool = [r.getrandbits(32) | 1 for _ in range(6)]
        self.registered: dict[int, int] = {}            # B fd -> id
        self.now = 1000.0
        self.stats = {"steps": 0, "sent": 0, "records": 0, "pulled": 0, "events": 0}

    def _chan(self, i: int, on: bool) -> None:
        fd = self.chans[i][1].fileno()
        if on:
            self.gens[i] = self.next_gen
            self.next_gen += 1
        else:
            self.gens[i] = 0
        assert self.lib.fp_hc_channel(self.st, fd, self.gens[i]) == 0

    def _sock(self) -> None:
        a, b, addr = self.r.choice(self.socks)
        if self.r.random() < 0.3:
            self.lib.fp_hc_unsock(self.st, b.fileno())
            self.registered.pop(b.fileno(), None)
            return
        ch = self.r.randrange(3)
        sid = self.r.choice(self.id_pool + [0])
        tx = self.r.choice([RING, RING, RING - 1, 0])
        res = self.lib.fp_hc_sock(self.st, sid, b.fileno(), self.chans[ch][1].fileno(), addr, tx, RING,
                                  self.r.getrandbits(32))
        ok = sid != 0 and self.gens[ch] != 0 and tx == RING
        assert (res == 0) == ok, (res, sid, self.gens[ch], tx)
        if ok:
            self.registered[b.fileno()] = sid

    def _drain(self) -> None:
        """Software's part: read what the unit left on the channels (closing any descriptors),
        and the answers on the shims' ends; take back the connections the unit made."""
        st, ffi = self.st, self.ffi
        for i in range(st.nevents):
            e = st.events[i]
            self.stats["events"] += 1
            if e.kind != EV_CONNECT:
                continue
            rec = self.lib.fp_hc_conns(st)[e.buf]
            assert e.fd == rec.b_fd and e.slot == rec.slot
            assert any(b.fileno() == rec.b_fd for _a, b, _ in self.socks), rec.b_fd
            assert 32768 <= rec.local_port <= 60999 and rec.remote_ip != self.me
            self.stats["records"] += 1
            self.registered.pop(rec.b_fd, None)         # used: the unit forgot it
            if self.r.random() < 0.8:                   # software takes it back (else the table fills)
                f = ffi.new("struct fp_ccb *")
                assert self.lib.fp_pull(st, rec.slot, f) == 0
                self.stats["pulled"] += 1
                if self.r.random() < 0.7 and self.ports[rec.local_port] >= 2:
                    self.ports[rec.local_port] -= 2       # (released)
        st.nevents = 0
        for shim, daemon in self.chans:
            for end in (shim, daemon):
                while True:
                    try:
                        _msg, fds, _f, _ = socket.recv_fds(end, 4096, 8)
                    except (BlockingIOError, OSError):
                        break
                    for fd in fds:
                        os.close(fd)
        while True:
            try:
                self.tap_mine.recv(70000)
            except BlockingIOError:
                break

    def step(self) -> None:
        r, lib, st = self.r, self.lib, self.st
        self.stats["steps"] += 1
        self.now += r.choice([0.0, 0.001, 0.5])
        k = r.random()
        if k < 0.05:
            self._chan(r.randrange(3), r.random() < 0.7)
        elif k < 0.2:
            self._sock()
        elif k < 0.27:
            ip = r.choice([self.peer, self.peer, self.me, self.me | 0xFF, r.getrandbits(32) or 1])
            lib.fp_hc_neighbour(st, ip, self.peer_mac, self.now + r.choice([-1.0, 0.0, 30.0, 1e9]))
        elif k < 0.3:                                   # ports in use: some, all, or none
            lo, n = r.choice([(r.randrange(32768, 60999), r.randrange(1, 200)), (32768, 28232), (32768, 28232)])
            v = r.choice([0, 0, 1, 0xFFFFFFFF])
            for p in range(lo, min(lo + n, 61000)):
                self.ports[p] = v
        elif k < 0.4:
            _a, b, _ = r.choice(self.socks)
            if r.random() < 0.5:
                with_suppress(lambda: _a.send(b"\0" * r.randrange(1, 64)))
            ev = r.choice([select.EPOLLIN, select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLHUP, 0])
            lib.fp_hc_event(st, b.fileno(), ev, self.now)
        else:
            i = r.randrange(3)
            shim, daemon = self.chans[i]
            op = OP_CONNECT if r.random() < 0.85 else r.choice([OP_BIND, 0, 99, r.getrandbits(32)])
            sid = r.choice(list(self.registered.values()) + self.id_pool + [0, r.getrandbits(32)])
            ip = r.choice([self.peer] * 6 + [self.me, self.me & 0xFFFFFF00, self.me | 0xFF, 0x0A000001,
                                             r.getrandbits(32)])
            port = r.choice([80, 80, 8080, 0, r.getrandbits(16)])
            msg = _cmd(r, op, sid, ip, port)
            fds = [shim.fileno()] if r.random() < 0.05 else []
            try:
                if fds:
                    socket.send_fds(shim, [msg], fds)
                else:
                    shim.send(msg)
                self.stats["sent"] += 1
            except (BlockingIOError, OSError):
                pass
            ev = select.EPOLLIN if r.random() < 0.9 else r.choice([select.EPOLLIN | select.EPOLLHUP, 0])
            before = _waiting(daemon)
            took = lib.fp_hc_event(st, daemon.fileno(), ev, self.now)
            after = _waiting(daemon)
            # answered: the command was taken off the channel; left: it is still there
            assert (before and not after) if took else after == before, (took, before, after)
        self._drain()

    def close(self) -> dict:
        h = self.ffi.new("struct fp_hc_counters *")
        self.lib.fp_hc_counters(self.st, h)
        counts = {n: getattr(h, n) for n in REASONS + ("looked", "lost_answers", "fresh_stuffed")}
        assert counts["looked"] == sum(counts[n] for n in REASONS), counts
        self.lib.fp_free(self.st)
        for shim, daemon in self.chans:
            shim.close()
            daemon.close()
        for a, b, _ in self.socks:
            a.close()
            b.close()
        self.tap_mine.close()
        self.tap_units.close()
        self.ep.close()
        return {**counts, **self.stats}


def _waiting(s: socket.socket) -> bool:
    try:
        return len(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= 0
    except BlockingIOError:
        return False
    except OSError:
        return True


def with_suppress(fn) -> None:
    try:
        fn()
    except OSError:
        pass


def child_commands(ffi, lib, r: random.Random, n: int, mapping, consts: dict) -> dict:
    eng = Commands(ffi, lib, r, mapping, consts["ME"], consts["PEER"], consts["MY_MAC"], consts["PEER_MAC"])
    for _ in range(n):
        eng.step()
    return eng.close()
