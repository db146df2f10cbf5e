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
void toe_shm_recycle(struct toe_sock_shm *s, uint32_t tx_size, uint32_t rx_size);
uint32_t toe_d_rx_space(struct toe_sock_shm *s, uint32_t rx_size);
int toe_d_rx_push(struct toe_sock_shm *s, uint32_t tx_size, uint32_t rx_size, const uint8_t *src,
                  uint32_t len);
int toe_fd_unix_stream(int fd);
uint64_t toe_fd_cookie(int fd);
uint64_t toe_fd_pair(int b, int a);
int toe_fd_memfd(int fd, uint64_t size);
int toe_fd_tcp_listener(int fd);
void *toe_map(int fd, uint64_t size);
void toe_reap(void *p, uint64_t size, int fd1, int fd2);
void toe_reap_stop(void);
"""

HELPERS_SRC = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
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

/* A closed socket's header, reset for its process's next socket (REUSE): every field as
 * the shim's make_sock() writes a new one, then the state that says so (release: the
 * shim reads the rest after it). The rings keep their bytes, the same process's, out of
 * reach: every index is 0. */
void toe_shm_recycle(struct toe_sock_shm *s, uint32_t tx_size, uint32_t rx_size)
{
    memset(s, 0, sizeof(*s));
    s->magic = TOE_SHM_MAGIC;
    s->abi_version = TOE_ABI_VERSION;
    s->tx_size = tx_size;
    s->rx_size = rx_size;
    s->sndbuf = tx_size;
    s->rcvbuf = rx_size;
    __atomic_store_n(&s->state, TOE_SS_RECYCLED, __ATOMIC_RELEASE);
}

/* Descriptors a shim passes, checked for what they must be (0 / -errno).  A descriptor
 * that is no socket fails getsockopt() with ENOTSOCK: no fstat() first (these checks run
 * for every socket of every pool refill). */
static int sockopt_is(int fd, int opt, int want)
{
    int v = 0;
    socklen_t l = sizeof(v);
    if (getsockopt(fd, SOL_SOCKET, opt, &v, &l) < 0)
        return errno == ENOTSOCK ? -ENOTSOCK : -EINVAL;
    return v == want ? 0 : -EINVAL;
}

int toe_fd_unix_stream(int fd)
{
    int r = sockopt_is(fd, SO_DOMAIN, AF_UNIX);
    return r < 0 ? r : sockopt_is(fd, SO_TYPE, SOCK_STREAM);
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

/* A socket's pair as a shim passes it: B and A both AF_UNIX stream sockets. A's SO_COOKIE
 * (0: not a pair, or A has none), with B made nonblocking (the daemon's end; the shim
 * makes it so, and then nothing is changed). */
uint64_t toe_fd_pair(int b, int a)
{
    if (toe_fd_unix_stream(b) < 0 || toe_fd_unix_stream(a) < 0)
        return 0;
    uint64_t c = toe_fd_cookie(a);
    int fl = fcntl(b, F_GETFL);
    if (!c || fl < 0 || (!(fl & O_NONBLOCK) && fcntl(b, F_SETFL, fl | O_NONBLOCK) < 0))
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

/* A socket's shared mapping, MAP_SHARED read-write (NULL: errno); the reaper unmaps it.
 * Python's mmap.mmap would keep a dup of the memfd: a descriptor more per socket, and two
 * more system calls. */
void *toe_map(int fd, uint64_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

/*
 * The reaper: a released socket's mapping and descriptors are given back by a thread of
 * their own.  The last munmap of a socket's memory frees its memfd (~25 us in the kernel,
 * the longest single step of a short connection's release); done here it would sit on
 * the path of the next connection's connect().  A descriptor keeps its number until the
 * reaper closes it, so nothing can be confused with it meanwhile.  If the thread cannot
 * be started, or too much waits, or it was stopped, the caller does the work itself.
 * toe_reap_stop() at the adapter's end: what waits is done and the thread joined, so the
 * daemon exits as one thread (a process whose leader is a zombie while another thread
 * still runs looks gone to `toe down` before it is).
 */
struct toe_reaped { void *p; uint64_t size; int fd[2]; };
#define TOE_REAP_MAX 4096
static pthread_mutex_t reap_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t reap_cv = PTHREAD_COND_INITIALIZER;
static struct toe_reaped reap_q[TOE_REAP_MAX];
static uint32_t reap_n;
static int reap_state;                 /* 0 not started, 1 running, -1 none (failed or stopped) */
static int reap_stopping;
static pthread_t reap_thread;

static void reap_one(const struct toe_reaped *r)
{
    if (r->p)
        munmap(r->p, r->size);
    for (int i = 0; i < 2; i++)
        if (r->fd[i] >= 0)
            close(r->fd[i]);
}

static void *reaper(void *arg)
{
    static struct toe_reaped batch[TOE_REAP_MAX];
    (void)arg;
    pthread_mutex_lock(&reap_mu);
    for (;;) {
        while (reap_n == 0 && !reap_stopping)
            pthread_cond_wait(&reap_cv, &reap_mu);
        if (reap_n == 0)
            break;                     /* stopping, and nothing left */
        uint32_t n = reap_n;
        memcpy(batch, reap_q, n * sizeof(batch[0]));
        reap_n = 0;
        pthread_mutex_unlock(&reap_mu);
        for (uint32_t i = 0; i < n; i++)
            reap_one(&batch[i]);
        pthread_mutex_lock(&reap_mu);
    }
    pthread_mutex_unlock(&reap_mu);
    return NULL;
}

void toe_reap(void *p, uint64_t size, int fd1, int fd2)
{
    struct toe_reaped r = {p, size, {fd1, fd2}};
    pthread_mutex_lock(&reap_mu);
    if (reap_state == 0) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);   /* signals stay the main thread's */
        reap_state = pthread_create(&reap_thread, NULL, reaper, NULL) == 0 ? 1 : -1;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (reap_state == 1 && reap_n < TOE_REAP_MAX) {
        reap_q[reap_n++] = r;
        pthread_cond_signal(&reap_cv);
        pthread_mutex_unlock(&reap_mu);
        return;
    }
    pthread_mutex_unlock(&reap_mu);
    reap_one(&r);
}

void toe_reap_stop(void)
{
    pthread_mutex_lock(&reap_mu);
    int running = reap_state == 1;
    reap_stopping = 1;
    pthread_cond_signal(&reap_cv);
    pthread_mutex_unlock(&reap_mu);
    if (running)
        pthread_join(reap_thread, NULL);
    pthread_mutex_lock(&reap_mu);
    reap_state = -1;                   /* from now on the caller does the work */
    pthread_mutex_unlock(&reap_mu);
}

/* A listening TCP/IPv4 socket (LISTEN's kernel listener for INADDR_ANY). */
int toe_fd_tcp_listener(int fd)
{
    int r = sockopt_is(fd, SO_DOMAIN, AF_INET);
    if (r == 0)
        r = sockopt_is(fd, SO_PROTOCOL, IPPROTO_TCP);
    return r == 0 ? sockopt_is(fd, SO_ACCEPTCONN, 1) : r;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(abi_cdef() + HELPERS_CDEF)
ffibuilder.set_source(
    "offload_daemon._toe_abi",
    HELPERS_SRC,
    include_dirs=[SHIM],
    extra_compile_args=["-O2", "-Wall", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "build", "cffi"), verbose=False)
