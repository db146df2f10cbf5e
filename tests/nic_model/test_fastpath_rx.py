"""Differential test: the compiled RX checker (nic_model/hw/rx_checker.c) against the
software one (nic_model/rx.py).

For every frame: a C class of UNPARSED is allowed only for a frame outside the hot
path (IPv4 without options carrying TCP to our MAC, at least 12+14+40 bytes); any
other C class must be the Python class, with the same drop reason for ERROR/OTHER
and the same parsed fields for TCP_SYN/TCP_DATA.  Frames are built with struct and
checksummed here (RFC 1071), independently of both checkers.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nic_model._fastpath import ffi, lib

from nic_model import rx as rxmod
from nic_model.fastpath import DROP_NAMES
from nic_model.rx import RxChecker
from offload_daemon.abi import csum

from .sanitized import inet_sum  # RFC 1071, seeded with a one's-complement sum

MY_MAC = b"\x02\x00\x00\x00\x00\x02"
PEER_MAC = b"\x02\x00\x00\x00\x00\x01"
ME = 0xC6120002
PEER = 0xC6120001
HOT_MIN = 12 + 14 + 40

ACK, SYN, FIN, RST, PSH = 0x10, 0x02, 0x01, 0x04, 0x08

_c_mac = ffi.new("uint8_t[]", MY_MAC)


# ---------------------------------------------------------------- frame building


def ip_header(total: int, src: int = PEER, dst: int = ME, ident: int = 1, frag: int = 0x4000, ttl: int = 64,
              proto: int = 6, tos: int = 0, vihl: int = 0x45, good_csum: bool = True, options: bytes = b"") -> bytes:
    hdr = struct.pack("!BBHHHBBHII", vihl, tos, total & 0xFFFF, ident, frag, ttl, proto, 0, src, dst) + options
    c = inet_sum(hdr) if good_csum else (inet_sum(hdr) ^ 0x1234)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:]


def tcp_segment(src: int, dst: int, sport: int = 4000, dport: int = 80, seq: int = 1000, ack: int = 2000,
                flags: int = ACK, window: int = 65535, options: bytes = b"", payload: bytes = b"",
                doff: int | None = None, urg: int = 0, good_csum: bool = True, reserved: int = 0) -> bytes:
    if doff is None:
        doff = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff << 4) | (reserved & 0xF), flags, window, 0,
                      urg) + options + payload
    pseudo = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 6 + len(seg)
    c = inet_sum(seg, pseudo)
    if not good_csum:
        c ^= 0x0F0F
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def vnet_header(flags: int = 0, gso_type: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, 0, 0, 0, 0, 0)


def eth_header(dst: bytes = MY_MAC, src: bytes = PEER_MAC, ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def tcp_frame(vflags: int = 0, src: int = PEER, dst: int = ME, ip_total: int | None = None, frag: int = 0x4000,
              ip_good: bool = True, pad: bytes = b"", mac: bytes = MY_MAC, ethertype: int = 0x0800,
              ip_options: bytes = b"", ident: int = 1, ttl: int = 64, tos: int = 0, proto: int = 6,
              **tcp) -> bytes:
    seg = tcp_segment(src, dst, **tcp)
    ihl = (20 + len(ip_options)) // 4
    total = 4 * ihl + len(seg) if ip_total is None else ip_total
    ip = ip_header(total, src, dst, ident=ident, frag=frag, ttl=ttl, tos=tos, proto=proto, vihl=0x40 | ihl,
                   good_csum=ip_good, options=ip_options)
    return vnet_header(vflags) + eth_header(mac, ethertype=ethertype) + ip + seg + pad


# ---------------------------------------------------------------- the comparison


def in_hot_path(data: bytes) -> bool:
    return (len(data) >= HOT_MIN and data[12:18] == MY_MAC and data[24:26] == b"\x08\x00"
            and data[26] == 0x45 and data[35] == 6)


def c_parse(data: bytes):
    buf = ffi.new("uint8_t[]", max(len(data), 1))
    ffi.memmove(buf, data, len(data))
    out = ffi.new("struct fp_seg *")
    cls = lib.fp_rx_parse(buf, len(data), ME, _c_mac, out)
    return cls, out


def py_check(data: bytes):
    rc = RxChecker(MY_MAC, ME, csum)
    buf = bytearray(data)
    cls, parsed = rc.check(buf, len(buf))
    return cls, parsed, rc.counters


SEG_FIELDS = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "window", "payload_off", "payload_len")


def compare(data: bytes) -> int:
    """Both checkers on one frame; returns the class both agree on (UNPARSED when C declined)."""
    ccls, out = c_parse(data)
    assert 0 <= ccls <= lib.FP_CLS_UNPARSED, f"C class {ccls} out of range"
    if ccls == lib.FP_CLS_UNPARSED:
        assert not in_hot_path(data), f"C left a hot-path frame to software: {data.hex()}"
        return ccls
    assert in_hot_path(data), f"C classified ({ccls}) a frame outside the hot path: {data.hex()}"
    pcls, seg, counters = py_check(data)
    assert ccls == pcls, f"class C={ccls} Python={pcls} ({dict(counters.dropped)}) frame {data.hex()}"
    if ccls in (lib.FP_CLS_ERROR, lib.FP_CLS_OTHER):
        assert out.drop < len(DROP_NAMES), f"C drop index {out.drop}"
        assert dict(counters.dropped) == {DROP_NAMES[out.drop]: 1}, \
            f"drop C={DROP_NAMES[out.drop]} Python={dict(counters.dropped)} frame {data.hex()}"
    else:
        assert ccls in (lib.FP_CLS_TCP_SYN, lib.FP_CLS_TCP_DATA)
        got = {f: getattr(out, f) for f in SEG_FIELDS}
        want = {f: getattr(seg, f) for f in SEG_FIELDS}
        assert got == want, f"frame {data.hex()}"
        assert out.hlen == seg.payload_off - (12 + 14 + 20)
        assert out.has_options == (out.hlen > 20)
        assert out.csum_offloaded == (1 if data[0] & 3 else 0)
        assert counters.csum_offloaded == out.csum_offloaded
        assert counters.csum_verified == 1 - out.csum_offloaded
    return ccls


# ---------------------------------------------------------------- the table


def _with_byte(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    b[off] = value
    return bytes(b)


GOOD = tcp_frame(payload=b"hello")
GOOD_OPTS = bytes((2, 4, 0x05, 0xB4, 1, 3, 3, 7, 4, 2, 1, 1, 8, 10)) + bytes(8) + bytes((1, 1))  # 24 bytes
TCP = 12 + 14 + 20

ERR, OTH = rxmod.ERROR, rxmod.OTHER
# (id, frame, expected: a drop name, or the class of an accepted frame, or "unparsed")
TABLE = [
    ("good_data", GOOD, rxmod.TCP_DATA),
    ("good_syn", tcp_frame(flags=SYN, options=bytes((2, 4, 5, 0xB4))), rxmod.TCP_SYN),
    ("good_synack", tcp_frame(flags=SYN | ACK), rxmod.TCP_DATA),
    ("good_empty_ack", tcp_frame(), rxmod.TCP_DATA),
    ("bad_ip_checksum", tcp_frame(ip_good=False), "ip_checksum"),
    ("ip_total_short", tcp_frame(ip_total=39), "ip_length"),
    ("ip_total_too_long", tcp_frame(ip_total=20 + 20 + 5 + 1, payload=b"hello"), "ip_length"),
    ("ip_total_far_too_long", tcp_frame(ip_total=0xFFFF), "ip_length"),
    ("fragment_mf", tcp_frame(frag=0x2000), "ip_fragment"),
    ("fragment_offset", tcp_frame(frag=0x0001), "ip_fragment"),
    ("df_is_fine", tcp_frame(frag=0x4000), rxmod.TCP_DATA),
    ("not_our_ip", tcp_frame(dst=0xC6120009), "not_our_ip"),
    ("tcp_offset_below_20", tcp_frame(doff=4), "tcp_offset"),
    ("tcp_offset_zero", tcp_frame(doff=0), "tcp_offset"),
    ("tcp_offset_past_segment", tcp_frame(doff=15, payload=b"x" * 8), "tcp_offset"),
    ("tcp_offset_exactly_segment", tcp_frame(doff=7, payload=b"\x01" * 8), rxmod.TCP_DATA),
    ("syn_fin", tcp_frame(flags=SYN | FIN), "tcp_flags"),
    ("syn_rst", tcp_frame(flags=SYN | RST), "tcp_flags"),
    ("fin_rst_no_syn_is_data", tcp_frame(flags=FIN | RST | ACK), rxmod.TCP_DATA),
    ("sport_zero", tcp_frame(sport=0), "tcp_port"),
    ("dport_zero", tcp_frame(dport=0), "tcp_port"),
    ("bad_tcp_checksum", tcp_frame(good_csum=False, payload=b"abc"), "tcp_checksum"),
    ("bad_tcp_checksum_needs_csum", tcp_frame(vflags=1, good_csum=False, payload=b"abc"), rxmod.TCP_DATA),
    ("bad_tcp_checksum_data_valid", tcp_frame(vflags=2, good_csum=False, payload=b"abc"), rxmod.TCP_DATA),
    ("bad_tcp_checksum_vflag_4", tcp_frame(vflags=4, good_csum=False, payload=b"abc"), "tcp_checksum"),
    ("odd_payload_checksum", tcp_frame(payload=b"abcdefg"), rxmod.TCP_DATA),
    ("option_len_0", tcp_frame(options=bytes((2, 0, 0, 0))), "tcp_option"),
    ("option_len_1", tcp_frame(options=bytes((2, 1, 0, 0))), "tcp_option"),
    ("option_past_header", tcp_frame(options=bytes((1, 1, 8, 10))), "tcp_option"),
    ("option_one_past_header", tcp_frame(options=bytes((1, 1, 5, 3))), "tcp_option"),
    ("option_one_past_header_first", tcp_frame(options=bytes((2, 5, 0, 0)), payload=b"zz"), "tcp_option"),
    ("option_kind_no_len", tcp_frame(options=bytes((1, 1, 1, 8))), "tcp_option"),
    ("option_len_exactly_header", tcp_frame(options=bytes((1, 1, 254, 2))), rxmod.TCP_DATA),
    ("option_eol_then_garbage", tcp_frame(options=bytes((0, 2, 0, 0))), rxmod.TCP_DATA),
    ("option_len_past_header_into_payload", tcp_frame(options=bytes((5, 10, 0, 0)), payload=b"x" * 20),
     "tcp_option"),
    ("good_options", tcp_frame(options=GOOD_OPTS), rxmod.TCP_DATA),
    ("good_options_syn", tcp_frame(flags=SYN, options=GOOD_OPTS), rxmod.TCP_SYN),
    ("trailing_padding", tcp_frame(pad=b"\0" * 6), rxmod.TCP_DATA),
    ("trailing_padding_garbage", tcp_frame(pad=b"\xAA" * 18, payload=b""), rxmod.TCP_DATA),
    ("not_our_mac", tcp_frame(mac=b"\x02" * 6), "unparsed"),
    ("ip_options", tcp_frame(ip_options=b"\x01\x01\x01\x00"), "unparsed"),
    ("udp", tcp_frame(proto=17), "unparsed"),
    ("arp_ethertype", tcp_frame(ethertype=0x0806), "unparsed"),
    ("runt_65", GOOD[:HOT_MIN - 1], "unparsed"),
    ("exactly_66", tcp_frame(), rxmod.TCP_DATA),
    ("empty", b"", "unparsed"),
    ("vnet_only", vnet_header(), "unparsed"),
    ("ip_total_cuts_payload", tcp_frame(vflags=1, ip_total=20 + 20 + 2, payload=b"hello"), rxmod.TCP_DATA),
    ("ip_total_cuts_payload_csum", tcp_frame(ip_total=20 + 20 + 2, payload=b"hello"), "tcp_checksum"),
    ("truncated_payload", GOOD[:-1], "ip_length"),
    ("ttl_zero_is_fine", tcp_frame(ttl=0), rxmod.TCP_DATA),
    ("tos_ecn", tcp_frame(tos=0x03), rxmod.TCP_DATA),
    ("reserved_bits", tcp_frame(reserved=0xF, flags=0xFF & ~SYN), rxmod.TCP_DATA),
]


@pytest.mark.parametrize("data,expected", [(f, e) for _, f, e in TABLE], ids=[i for i, _, _ in TABLE])
def test_table(data, expected):
    ccls = compare(data)
    if expected == "unparsed":
        assert ccls == lib.FP_CLS_UNPARSED
        return
    assert ccls != lib.FP_CLS_UNPARSED
    if isinstance(expected, str):
        _, out = c_parse(data)
        assert ccls in (ERR, OTH) and DROP_NAMES[out.drop] == expected
    else:
        assert ccls == expected


def test_table_payload_located():
    _, out = c_parse(GOOD)
    assert GOOD[out.payload_off:out.payload_off + out.payload_len] == b"hello"
    ip_cut = tcp_frame(vflags=1, ip_total=20 + 20 + 2, payload=b"hello", pad=b"\0" * 4)
    _, out = c_parse(ip_cut)
    assert (out.payload_off, out.payload_len) == (TCP + 20, 2)


# ---------------------------------------------------------------- hypothesis

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(min_size=0, max_size=2000))
def test_random_bytes(data):
    compare(data)


@SETTINGS
@given(st.binary(min_size=0, max_size=300), st.integers(0, 3))
def test_random_bytes_behind_a_hot_prefix(tail, vflags):
    # vnet + Ethernet to us + 0x45 ... protocol 6: random rest, so the hot path sees garbage
    head = bytearray(vnet_header(vflags) + eth_header() + bytes(20))
    head[26] = 0x45
    head[35] = 6
    data = bytes(head) + tail
    compare(data)


_BASES = [
    tcp_frame(payload=b"hello world"),
    tcp_frame(flags=SYN, options=bytes((2, 4, 5, 0xB4))),
    tcp_frame(options=GOOD_OPTS, payload=b"x" * 33),
    tcp_frame(vflags=1, payload=b"y" * 100),
    tcp_frame(pad=b"\0" * 6),
]


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_BASES), st.lists(st.tuples(st.integers(0, 300), st.integers(1, 255)), max_size=4),
       st.one_of(st.none(), st.integers(0, 300)))
def test_mutated_valid_frame(base, flips, cut):
    b = bytearray(base)
    for off, x in flips:
        if off < len(b):
            b[off] ^= x
    if cut is not None:
        del b[cut:]
    compare(bytes(b))


_options = st.one_of(
    st.just(b""),
    st.just(GOOD_OPTS),
    st.binary(min_size=0, max_size=40).map(lambda o: o + b"\x01" * (-len(o) % 4)),
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vflags=st.sampled_from([0, 0, 0, 1, 2, 3, 4, 0x80]),
    dst=st.sampled_from([ME, ME, ME, PEER, 0, 0xFFFFFFFF]),
    src=st.integers(0, 0xFFFFFFFF),
    frag=st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x1FFF, 0x8000, 0xC000]),
    total_delta=st.one_of(st.just(0), st.just(0), st.integers(-60, 60), st.integers(0, 0xFFFF)),
    ip_good=st.booleans(),
    sport=st.sampled_from([0, 1, 80, 4000, 65535]),
    dport=st.sampled_from([0, 1, 80, 4000, 65535]),
    seq=st.integers(0, 0xFFFFFFFF),
    ack=st.integers(0, 0xFFFFFFFF),
    flags=st.integers(0, 0xFF),
    window=st.integers(0, 0xFFFF),
    urg=st.integers(0, 0xFFFF),
    options=_options,
    doff_delta=st.one_of(st.just(0), st.just(0), st.integers(-5, 10)),
    payload=st.binary(max_size=200),
    tcp_good=st.booleans(),
    pad=st.sampled_from([b"", b"", b"\0" * 6, b"\xFF" * 30]),
    ident=st.integers(0, 0xFFFF),
    ttl=st.integers(0, 255),
    tos=st.integers(0, 255),
)
def test_random_header_fields(vflags, dst, src, frag, total_delta, ip_good, sport, dport, seq, ack, flags, window,
                              urg, options, doff_delta, payload, tcp_good, pad, ident, ttl, tos):
    doff = max(0, min(15, (20 + len(options)) // 4 + doff_delta))
    seg_len = 20 + len(options) + len(payload)
    total = (20 + seg_len + total_delta) & 0xFFFF if total_delta < 1000 else total_delta
    data = tcp_frame(vflags=vflags, src=src, dst=dst, ip_total=total, frag=frag, ip_good=ip_good, pad=pad,
                     ident=ident, ttl=ttl, tos=tos, sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                     window=window, options=options, payload=payload, doff=doff, urg=urg, good_csum=tcp_good)
    compare(data)


def test_hypothesis_cases_reach_every_class():
    """The generators above are not vacuous: valid frames of every hot-path outcome exist."""
    seen = {compare(f) for _, f, _ in TABLE}
    assert {lib.FP_CLS_ERROR, lib.FP_CLS_OTHER, lib.FP_CLS_TCP_SYN, lib.FP_CLS_TCP_DATA,
            lib.FP_CLS_UNPARSED} <= seen
    reasons = set()
    for _, f, _ in TABLE:
        cls, out = c_parse(f)
        if cls in (ERR, OTH):
            reasons.add(DROP_NAMES[out.drop])
    assert reasons == set(DROP_NAMES)


@pytest.mark.parametrize("options", [
    b"\x01\x01\x08\x0a" + struct.pack("!II", 0x01020304, 0xA0B0C0D0),           # NOP NOP TS
    b"\x02\x04\x05\xb4\x08\x0a" + struct.pack("!II", 7, 0xFFFFFFFF) + b"\x00\x00",  # MSS, TS, END
    b"\x01\x01\x05\x0a" + struct.pack("!II", 100, 200) + b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 6),
])
def test_the_timestamp_option_is_extracted_as_the_software_parser_reads_it(options):
    data = tcp_frame(options=options, payload=b"x" * 10)
    cls, out = c_parse(data)
    pcls, seg, _ = py_check(data)
    assert cls == pcls == lib.FP_CLS_TCP_DATA
    assert out.has_options == 1
    assert out.has_ts == 1 and (out.tsval, out.tsecr) == seg.options.timestamp


def test_no_timestamp_without_the_option():
    cls, out = c_parse(tcp_frame(options=b"\x02\x04\x05\xb4"))
    assert cls == lib.FP_CLS_TCP_DATA and out.has_ts == 0
