"""ARP (RFC 826) and ICMP echo: the adapter's neighbour handling, in software.

The ARP table answers requests for the adapter's address, learns from what
it hears, and resolves next hops for active opens: a request, two retries
one second apart, then failure (the connect sees EHOSTUNREACH, as with the
kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nic_model.counters import UnitCounters
from nic_model.wire import ethernet
from nic_model.wire.arp import OP_REPLY, OP_REQUEST, ArpRepr
from nic_model.wire.icmp import ECHO_REPLY, ECHO_REQUEST, IcmpEcho
from nic_model.wire.ipv4 import PROTO_ICMP, Ipv4Repr

from .timers import Timer, Timers

ARP_TRIES = 3
ARP_RETRY_S = 1.0
ARP_TTL_S = 300.0

Resolved = Callable[[bytes | None, float], None]


@dataclass
class ArpIcmpCounters(UnitCounters):
    requests_in: int = 0
    replies_out: int = 0
    requests_out: int = 0
    replies_in: int = 0
    resolve_failures: int = 0
    ignored: int = 0
    echo_requests: int = 0
    echo_replies: int = 0


class _Pending:
    __slots__ = ("waiters", "tries", "timer")
    waiters: list[Resolved]
    tries: int
    timer: Timer


class ArpTable:
    def __init__(self, my_ip: int, my_mac: bytes, tx, timers: Timers):
        self.my_ip = my_ip
        self.my_mac = my_mac
        self.tx = tx
        self.timers = timers
        self.cache: dict[int, tuple[bytes, float]] = {}
        self.pending: dict[int, _Pending] = {}
        self.counters = ArpIcmpCounters()
        # told of every entry learnt, with the time it holds until (the units' copy of the
        # neighbours: nic_model/hw/host_cmd.c)
        self.on_learn: Callable[[int, bytes, float], None] | None = None

    def lookup(self, ip: int, now: float) -> bytes | None:
        e = self.cache.get(ip)
        if e is None or e[1] < now:
            return None
        return e[0]

    def learn(self, ip: int, mac: bytes, now: float) -> None:
        self.cache[ip] = (mac, now + ARP_TTL_S)
        if self.on_learn is not None:
            self.on_learn(ip, mac, now + ARP_TTL_S)
        p = self.pending.pop(ip, None)
        if p is not None:
            self.timers.cancel(p.timer)
            for cb in p.waiters:
                cb(mac, now)

    def resolve(self, ip: int, now: float, cb: Resolved) -> None:
        mac = self.lookup(ip, now)
        if mac is not None:
            cb(mac, now)
            return
        p = self.pending.get(ip)
        if p is not None:
            p.waiters.append(cb)
            return
        p = _Pending()
        p.waiters = [cb]
        p.tries = 0
        p.timer = Timer(lambda t: self._retry(ip, t))
        self.pending[ip] = p
        self._request(ip, p, now)

    def _request(self, ip: int, p: _Pending, now: float) -> None:
        p.tries += 1
        self.counters.requests_out += 1
        req = ArpRepr(OP_REQUEST, self.my_mac, self.my_ip.to_bytes(4, "big"), b"\0" * 6,
                      ip.to_bytes(4, "big"))
        body = bytearray(28)
        req.emit(body)
        self.tx.raw_frame(ethernet.BROADCAST, ethernet.ETHERTYPE_ARP, bytes(body))
        self.timers.arm(p.timer, now + ARP_RETRY_S)

    def _retry(self, ip: int, now: float) -> None:
        p = self.pending.get(ip)
        if p is None:
            return
        if p.tries >= ARP_TRIES:
            del self.pending[ip]
            self.counters.resolve_failures += 1
            for cb in p.waiters:
                cb(None, now)
            return
        self._request(ip, p, now)

    def input(self, arp: ArpRepr, now: float) -> None:
        sip = int.from_bytes(arp.sender_ip, "big")
        tip = int.from_bytes(arp.target_ip, "big")
        if tip != self.my_ip:
            if sip in self.cache:
                self.learn(sip, arp.sender_mac, now)        # RFC 826 merge
            self.counters.ignored += 1
            return
        if sip:
            self.learn(sip, arp.sender_mac, now)
        if arp.op == OP_REQUEST:
            self.counters.requests_in += 1
            rep = ArpRepr(OP_REPLY, self.my_mac, arp.target_ip, arp.sender_mac, arp.sender_ip)
            body = bytearray(28)
            rep.emit(body)
            self.tx.raw_frame(arp.sender_mac, ethernet.ETHERTYPE_ARP, bytes(body))
            self.counters.replies_out += 1
        else:
            self.counters.replies_in += 1

    def icmp_input(self, ip: Ipv4Repr, msg: IcmpEcho, src_mac: bytes) -> None:
        if msg.type != ECHO_REQUEST:
            return
        self.counters.echo_requests += 1
        reply = IcmpEcho(ECHO_REPLY, 0, msg.ident, msg.seq, msg.data).emit()
        hdr = bytearray(20)
        Ipv4Repr(ip.dst, ip.src, PROTO_ICMP, len(reply), df=False).emit(hdr)
        self.tx.raw_frame(src_mac, ethernet.ETHERTYPE_IPV4, bytes(hdr) + reply)
        self.counters.echo_replies += 1

    def info(self, now: float) -> list[dict]:
        return [{"ip": f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}",
                 "mac": ethernet.mac_str(mac), "expires_s": round(exp - now, 1)}
                for ip, (mac, exp) in sorted(self.cache.items())]
