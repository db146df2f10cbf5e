"""Sequence-number arithmetic modulo 2^32 (RFC 9293 3.4).

A bare `<` on sequence numbers breaks at the wrap; use these.
"""

import os

from nic_model._fastpath import lib as _fp_lib

M32 = 0xFFFFFFFF
HALF = 0x80000000


def seq_lt(a: int, b: int) -> bool:
    """a precedes b."""
    return ((a - b) & M32) >= HALF


def seq_le(a: int, b: int) -> bool:
    return a == b or ((a - b) & M32) >= HALF


def seq_gt(a: int, b: int) -> bool:
    return ((b - a) & M32) >= HALF


def seq_ge(a: int, b: int) -> bool:
    return a == b or ((b - a) & M32) >= HALF


def seq_sub(a: int, b: int) -> int:
    """a - b as a signed distance."""
    d = (a - b) & M32
    return d - (1 << 32) if d >= HALF else d


def seq_add(a: int, n: int) -> int:
    return (a + n) & M32


def seq_max(a: int, b: int) -> int:
    return b if seq_lt(a, b) else a


# one secret per daemon, in the units (nic_model/hw/host_cmd.c): the command unit's
# connect() and software's compute the same ISN
_fp_lib.fp_isn_key(os.urandom(16))
ISN_TICKS_PER_S = 250_000  # RFC 6528: the ISN clock M ticks every 4 µs (host_cmd.c's too)


def initial_seq(local_ip: int, local_port: int, remote_ip: int, remote_port: int, now: float) -> int:
    """RFC 6528 initial sequence number: M + F(4-tuple, secret).

    M is a 4 µs clock, so a new incarnation of a 4-tuple starts above the old
    one's sequence space; a peer still holding the old one in TIME-WAIT then
    accepts the new SYN (RFC 9293 3.4.1) instead of answering it with an ACK.
    F is a keyed hash (SipHash-2-4, as Linux's secure_tcp_seq), so the ISN cannot
    be guessed from outside.
    """
    return _fp_lib.fp_isn(local_ip, local_port, remote_ip, remote_port, now)
