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
    return reduce_to_cdef(os.path.join(SHIM, "toe_abi.h"), "TOE_CDEF")


def reduce_to_cdef(path: str, guard: str) -> str:
    """A C header reduced to what cffi's cdef accepts: comments and preprocessor lines go,
    except `#define NAME <integer>`, and so does everything inside `#ifndef <guard>`.
    (nic_model/_fp_build.py uses it too, for nic_model/hw/fp.h.)"""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out, skip = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(f"#ifndef {guard}"):
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
uint32_t toe_rx_arm_window_at(struct toe_sock_shm *s, uint32_t at);
uint32_t toe_ring_load(uint32_t *p);
uint16_t toe_csum_fold(const uint8_t *buf, size_t len, uint32_t initial);
int toe_shm_init(struct toe_sock_shm *s, uint32_t sock_id, uint32_t tx_size, uint32_t rx_size);
uint32_t toe_d_rx_space(struct toe_sock_shm *s, uint32_t rx_size);
int toe_d_rx_push(struct toe_sock_shm *s, uint32_t tx_size, uint32_t rx_size, const uint8_t *src,
                  uint32_t len);
int toe_fd_unix_stream(int fd);
uint64_t toe_fd_cookie(int fd);
int toe_fd_memfd(int fd, uint64_t size);
int toe_fd_tcp_listener(int fd);
void *toe_map(int fd, uint64_t size);
int toe_unmap(void *p, uint64_t size);
"""

HELPERS_SRC = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "toe_ring.h"

uint32_t toe_ring_load(uint32_t *p) { return TOE_LOAD_ACQ(p); }

int toe_shm_init(struct toe_sock_shm *s, uint32_t sock_id, uint32_t tx_size, uint32_t rx_size)
{
    if (s->magic != TOE_SHM_MAGIC || s->abi_version != TOE_ABI_VERSION)
        return -1;
    if (s->tx_size != tx_size || s->rx_size != rx_size)
        return -2;
    s->sock_id = sock_id;
    return 0;
}

/* Descriptors a shim passes, checked for what they must be (0 / -errno). */
static int is_socket(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

static int sockopt_is(int fd, int opt, int want)
{
    int v = 0;
    socklen_t l = sizeof(v);
    return getsockopt(fd, SOL_SOCKET, opt, &v, &l) == 0 && v == want;
}

int toe_fd_unix_stream(int fd)
{
    if (!is_socket(fd))
        return -ENOTSOCK;
    return sockopt_is(fd, SO_DOMAIN, AF_UNIX) && sockopt_is(fd, SO_TYPE, SOCK_STREAM) ? 0 : -EINVAL;
}

/* SO_COOKIE of a socket (0 if it has none): read by the daemon itself, never taken
 * from a command. */
uint64_t toe_fd_cookie(int fd)
{
    uint64_t c = 0;
    socklen_t l = sizeof(c);
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) < 0 || l != sizeof(c))
        return 0;
    return c;
}

/* A memfd of exactly `size` bytes that can neither shrink nor grow (a mapping of a
 * file its owner could truncate would fault the daemon with SIGBUS). */
int toe_fd_memfd(int fd, uint64_t size)
{
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != size)
        return -EINVAL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return -EINVAL;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDWR)
        return -EINVAL;
    return 0;
}

/* A socket's shared mapping, MAP_SHARED read-write (NULL: errno).  Python's mmap.mmap
 * would keep a dup of the memfd: a descriptor more per socket, and two more system calls. */
void *toe_map(int fd, uint64_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int toe_unmap(void *p, uint64_t size)
{
    return munmap(p, size) < 0 ? -errno : 0;
}

/* A listening TCP/IPv4 socket (LISTEN's kernel listener for INADDR_ANY). */
int toe_fd_tcp_listener(int fd)
{
    if (!is_socket(fd))
        return -ENOTSOCK;
    return sockopt_is(fd, SO_DOMAIN, AF_INET) && sockopt_is(fd, SO_PROTOCOL, IPPROTO_TCP) &&
                   sockopt_is(fd, SO_ACCEPTCONN, 1)
               ? 0
               : -EINVAL;
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
