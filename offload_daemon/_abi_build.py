"""cffi build script for the daemon's `_toe_abi` module.

The cdef is read from shim/toe_abi.h itself (the one header both sides use),
keeping only what cffi's parser understands; the compiled source includes
toe_ring.h so the daemon runs the very same ring primitives as the shim.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(os.path.dirname(HERE), "shim")


def abi_cdef() -> str:
    """The ABI header reduced to what cffi's cdef accepts."""
    with open(os.path.join(SHIM, "toe_abi.h")) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out, skip = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#ifndef TOE_CDEF"):
            skip = 1
            continue
        if skip:
            if s.startswith("#endif"):
                skip = 0
            continue
        if s.startswith("#"):
            if re.match(r"#define\s+\w+\s+-?\d+\s*$", s):
                out.append(s)
            continue
        out.append(line)
    return "\n".join(out)


HELPERS_CDEF = """
uint32_t toe_tx_space(struct toe_sock_shm *s);
uint32_t toe_tx_room(struct toe_sock_shm *s);
int toe_tx_writable(struct toe_sock_shm *s);
uint32_t toe_tx_arm_doorbell(struct toe_sock_shm *s);
int toe_tx_release(struct toe_sock_shm *s, uint32_t new_head);
int toe_tx_sent(struct toe_sock_shm *s, uint32_t new_sent);
int toe_tx_wake(struct toe_sock_shm *s);
uint32_t toe_rx_space(struct toe_sock_shm *s);
int toe_rx_push(struct toe_sock_shm *s, const uint8_t *src, uint32_t len);
void toe_rx_token_sent(struct toe_sock_shm *s);
uint32_t toe_rx_arm_window(struct toe_sock_shm *s);
uint32_t toe_ring_load(uint32_t *p);
uint16_t toe_csum_fold(const uint8_t *buf, size_t len, uint32_t initial);
int toe_shm_init(struct toe_sock_shm *s, uint32_t sock_id, uint32_t tx_size, uint32_t rx_size);
"""

HELPERS_SRC = r"""
#include "toe_ring.h"

uint32_t toe_ring_load(uint32_t *p) { return TOE_LOAD_ACQ(p); }

/*
 * RFC 1071 Internet checksum of buf, starting from `initial` (a one's-complement
 * sum of big-endian 16-bit words, e.g. the pseudo-header).  Returns the
 * checksum as a host integer, to be stored big-endian.
 */
uint16_t toe_csum_fold(const uint8_t *buf, size_t len, uint32_t initial)
{
    uint64_t init = initial;
    while (init >> 16)
        init = (init & 0xffff) + (init >> 16);
    /* the loop below sums little-endian words: move `initial` into that domain */
    uint64_t sum = ((init >> 8) | (init << 8)) & 0xffff;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, buf, 8);
        sum += (w & 0xffffffffu) + (w >> 32);
        buf += 8;
        len -= 8;
    }
    while (len >= 2) {
        uint16_t w;
        memcpy(&w, buf, 2);
        sum += w;
        buf += 2;
        len -= 2;
    }
    if (len)
        sum += *buf;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    /* the sum was taken over host-order (little-endian) words: swap back */
    uint16_t r = (uint16_t)~sum;
    return (uint16_t)((r >> 8) | (r << 8));
}

int toe_shm_init(struct toe_sock_shm *s, uint32_t sock_id, uint32_t tx_size, uint32_t rx_size)
{
    if (s->magic != TOE_SHM_MAGIC || s->abi_version != TOE_ABI_VERSION)
        return -1;
    if (s->tx_size != tx_size || s->rx_size != rx_size)
        return -2;
    s->sock_id = sock_id;
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(abi_cdef() + HELPERS_CDEF)
ffibuilder.set_source(
    "offload_daemon._toe_abi",
    HELPERS_SRC,
    include_dirs=[SHIM],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "build", "cffi"), verbose=False)
