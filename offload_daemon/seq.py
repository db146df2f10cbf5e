"""Sequence-number arithmetic modulo 2^32 (RFC 9293 3.4).

A bare `<` on sequence numbers breaks at the wrap; use these.
"""

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
