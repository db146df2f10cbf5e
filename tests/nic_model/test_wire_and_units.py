"""Frame formats and the RX/TX units, with scapy as the oracle."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from nic_model import rx as rxmod
from nic_model.rx import RxChecker
from nic_model.tx import TxEngine
from nic_model.wire import WireError, tcp, vnet
from nic_model.wire.arp import ArpRepr
from nic_model.wire.ipv4 import Ipv4Repr
from nic_model.wire.tcp import TcpOptions
from offload_daemon.abi import csum

MY_MAC = b"\x02\x00\x00\x00\x00\x02"
PEER_MAC = "02:00:00:00:00:01"
ME, PEER = "198.18.0.2", "198.18.0.1"
ME_INT = 0xC6120002


def frame(pkt, flags: int = 0) -> bytearray:
    return bytearray(struct.pack("<BBHHHHH", flags, 0, 0, 0, 0, 0, 0) + bytes(pkt))


def checker() -> RxChecker:
    return RxChecker(MY_MAC, ME_INT, csum)


def eth():
    return Ether(src=PEER_MAC, dst="02:00:00:00:00:02")


def test_tcp_syn_with_options_is_classified_and_parsed():
    p = eth() / IP(src=PEER, dst=ME) / TCP(sport=1234, dport=80, flags="S", seq=42,
                                          options=[("MSS", 1400), ("SAckOK", b""), ("WScale", 9)])
    cls, seg = checker().check(frame(p), len(frame(p)))
    assert cls == rxmod.TCP_SYN
    assert (seg.sport, seg.dport, seg.seq, seg.flags) == (1234, 80, 42, tcp.SYN)
    assert seg.options.mss == 1400 and seg.options.wscale == 9 and seg.options.sack_perm


def test_tcp_data_payload_is_located():
    p = eth() / IP(src=PEER, dst=ME) / TCP(sport=1, dport=2, flags="PA", seq=7, ack=9) / b"payload!"
    f = frame(p)
    cls, seg = checker().check(f, len(f))
    assert cls == rxmod.TCP_DATA
    assert bytes(f[seg.payload_off:seg.payload_off + seg.payload_len]) == b"payload!"


def test_arp_request_is_parsed():
    p = Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=PEER, pdst=ME, hwsrc=PEER_MAC)
    cls, arp = checker().check(frame(p), len(frame(p)))
    assert cls == rxmod.ARP and arp.op == 1 and arp.target_ip == bytes([198, 18, 0, 2])


def test_icmp_echo_is_classified():
    p = eth() / IP(src=PEER, dst=ME) / ICMP(type=8, id=5, seq=6) / b"ping"
    cls, (ip, msg) = checker().check(frame(p), len(frame(p)))
    assert cls == rxmod.ICMP and msg.ident == 5 and msg.data == b"ping"


def _corrupt(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    b[off] = value
    return bytes(b)


GOOD = bytes(eth() / IP(src=PEER, dst=ME) / TCP(sport=1, dport=2, flags="A") / b"x")


# (frame bytes, the drop counter it must land in)
BAD_FRAMES = [
    (GOOD[:10], "eth_short"),
    (_corrupt(GOOD, 14 + 10, GOOD[14 + 10] ^ 0xFF), "ip_checksum"),          # IP checksum byte
    (_corrupt(GOOD, 14 + 20 + 16, GOOD[14 + 20 + 16] ^ 0x55), "tcp_checksum"),
    (bytes(eth() / IP(src=PEER, dst=ME) / TCP(sport=1, dport=2, flags="SF")), "tcp_flags"),
    (bytes(eth() / IP(src=PEER, dst=ME) / TCP(sport=0, dport=2, flags="A")), "tcp_port"),
    (bytes(eth() / IP(src=PEER, dst=ME, flags="MF") / TCP(sport=1, dport=2)), "ip_fragment"),
    (bytes(eth() / IP(src=PEER, dst=ME, len=200) / TCP(sport=1, dport=2)), "ip_length"),
    (bytes(eth() / IP(src=PEER, dst="198.18.0.9") / TCP(sport=1, dport=2)), "not_our_ip"),
    (bytes(Ether(src=PEER_MAC, dst="02:00:00:00:00:09") / IP(src=PEER, dst=ME) / TCP()), "not_our_mac"),
    (bytes(eth() / IP(src=PEER, dst=ME) / ICMP(type=8, chksum=1)), "icmp_checksum"),
    (bytes(Ether(src=PEER_MAC, dst="02:00:00:00:00:02", type=0x86DD) / (b"\x60" * 40)), "ethertype_86dd"),
]


@pytest.mark.parametrize("data,reason", BAD_FRAMES, ids=[r for _, r in BAD_FRAMES])
def test_bad_frames_are_dropped_and_counted(data, reason):
    rc = checker()
    f = frame(data)
    cls, obj = rc.check(f, len(f))
    assert cls in (rxmod.ERROR, rxmod.OTHER) and obj is None
    assert rc.counters.dropped[reason] == 1
    assert sum(rc.counters.dropped.values()) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_rx_checker_never_raises_on_garbage(data):
    f = frame(data)
    cls, _ = checker().check(f, len(f))
    assert cls in range(6)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=60))
def test_option_parser_only_raises_wire_errors(data):
    try:
        TcpOptions.parse(data, 0, len(data))
    except WireError:
        pass


@given(mss=st.integers(0, 65535), ws=st.integers(0, 14), sack=st.booleans())
def test_options_round_trip(mss, ws, sack):
    o = TcpOptions(mss=mss, wscale=ws, sack_perm=sack)
    raw = o.emit()
    assert len(raw) % 4 == 0
    assert TcpOptions.parse(raw, 0, len(raw)) == o


def test_ipv4_emit_matches_scapy():
    out = bytearray(20)
    Ipv4Repr(bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1]), 6, 100, ident=7).emit(out)
    ref = IP(bytes(out) + b"\0" * 100)
    assert ref.chksum == IP(bytes(IP(src=ME, dst=PEER, proto=6, id=7, flags="DF", ttl=64,
                                     len=120))).chksum
    assert Ipv4Repr.parse(bytes(out) + b"\0" * 100).payload_len == 100


def test_arp_round_trip():
    a = ArpRepr(2, MY_MAC, bytes([198, 18, 0, 2]), b"\x02" * 6, bytes([198, 18, 0, 1]))
    out = bytearray(28)
    a.emit(out)
    assert ArpRepr.parse(out) == a
    assert ARP(bytes(out)).psrc == ME


class _Port:
    def __init__(self):
        self.frames = []

    def send(self, parts, nbytes, gso=False):
        data = b"".join(bytes(p) for p in parts)
        assert len(data) == nbytes
        self.frames.append((data, gso))


def test_tx_segment_full_checksum_valid_for_scapy():
    port = _Port()
    tx = TxEngine(port, MY_MAC, offloads=False, csum_fn=csum)
    tx.segment("k", bytes.fromhex("020000000001"), ME_INT, 0xC6120001, 80, 4000, 1, 2,
               tcp.ACK | tcp.PSH, 1000, b"", (memoryview(b"hello "), memoryview(b"world")), 11, 1460)
    data, gso = port.frames[0]
    pkt = Ether(data[vnet.LEN:])
    assert bytes(pkt[TCP].payload) == b"hello world"
    ref = IP(bytes(pkt[IP]))
    del ref.chksum
    del ref[TCP].chksum
    ref = IP(bytes(ref))                       # scapy recomputes both checksums
    assert (ref.chksum, ref[TCP].chksum) == (pkt[IP].chksum, pkt[TCP].chksum)
    assert not gso


def test_tx_tso_frame_has_vnet_header_and_pseudo_sum():
    port = _Port()
    tx = TxEngine(port, MY_MAC, offloads=True, csum_fn=csum)
    payload = memoryview(b"A" * 5000)
    tx.segment("k", bytes(6), ME_INT, 0xC6120001, 80, 4000, 1, 2, tcp.ACK, 1000, b"", (payload,),
               5000, 1460)
    data, gso = port.frames[0]
    flags, gso_type, hdr_len, gso_size, cstart, coff = vnet.parse(data)
    assert gso and flags == vnet.F_NEEDS_CSUM and gso_type == vnet.GSO_TCPV4
    assert (hdr_len, gso_size, cstart, coff) == (54, 1460, 34, 16)
    assert IP(data[vnet.LEN + 14:]).len == 20 + 20 + 5000


def test_ccb_cache_counts_hits_misses_evictions():
    port = _Port()
    tx = TxEngine(port, MY_MAC, offloads=True, csum_fn=csum, cache_entries=2)
    for key in ("a", "a", "b", "c", "a"):
        tx.segment(key, bytes(6), ME_INT, 1, 1, 2, 0, 0, tcp.ACK, 0)
    c = tx.counters
    assert (c.ccb_cache_hits, c.ccb_cache_misses, c.ccb_cache_evictions) == (1, 4, 2)
