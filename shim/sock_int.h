/*
 * sock_int.h - what the rooms of the offloaded socket share (internal to the
 * shim; the interface interpose.c calls is toe_shim.h's toe_sock_*).
 *
 * The application's fd is end A of an AF_UNIX stream socketpair whose end B
 * the daemon holds; payload moves through the rings of the socket's shared
 * mapping.  docs/abi.md is the protocol; the primitives (ring copies, token
 * and doorbell hand-offs) are toe_ring.h's, used as they are.
 *
 * Waiting is always done by the kernel, on A, so O_NONBLOCK, SO_RCVTIMEO,
 * SO_SNDTIMEO and SA_RESTART behave exactly as for a TCP socket:
 *   readable   recv(A, 1, MSG_PEEK) returns when a token arrives (or B shuts)
 *   writable   send(A, 1) on a stuffed A returns when the daemon drains B
 * No lock is held across such a wait.  The RX and TX paths have separate
 * locks, so one thread may block in recv() while another sends.
 *
 * errno is preserved on success and set like the kernel's on failure.  The
 * data paths (read/write/recv/send/close, sendfile/splice, *mmsg) neither
 * allocate nor free.
 *
 * The rooms:
 *   sock_life.c  socket(): creation; adoption of inherited / passed sockets
 *   pool.c       ready sockets for socket(), made and registered in batches
 *   ready.c      readiness on A: stuffing, doorbells, tokens, waits
 *   handover.c   the socket given to the kernel (or refused, TOE_STRICT)
 *   conn.c       bind, listen, connect, accept, shutdown, names
 *   recv.c       recv and friends, recvmmsg
 *   send.c       send and friends, sendfile, splice, sendmmsg
 *   sockopt.c    setsockopt, getsockopt: the option table and the code that follows it
 *   sockopt_kernel.c  the kernel's option rules: sysctls, capabilities, rounding
 *   fdcalls.c    fcntl, ioctl, dup, close
 *
 * Functions shared between rooms are declared here; they are not exported
 * (the shim is built with -fvisibility=hidden; TOE_INTERNAL says so too).
 */
#ifndef TOE_SOCK_INT_H
#define TOE_SOCK_INT_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>

#include "toe_ring.h"
#include "toe_shim.h"

extern void __chk_fail(void) __attribute__((noreturn));

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)

/* the kernel's floors for SO_SNDBUF / SO_RCVBUF (SOCK_MIN_SNDBUF, SOCK_MIN_RCVBUF) */
#define TOE_MIN_SNDBUF 4608
#define TOE_MIN_RCVBUF 2304
#define TOE_DEFAULT_MSS 536 /* TCP_MSS_DEFAULT: what the kernel reports before connect */
#define TOE_MIN_MSS 88      /* TCP_MIN_MSS */

#define TOE_INTERNAL __attribute__((visibility("hidden")))

#define TOE_UIO_MAXIOV 1024 /* the kernel's UIO_MAXIOV */
#define TOE_MAX_RW_COUNT ((size_t)(INT_MAX & ~4095)) /* the kernel's MAX_RW_COUNT */
#define TOE_SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE | SPLICE_F_GIFT)

/* bytes written into A to stuff it or to ring its doorbell (ready.c) */
extern const uint8_t toe_filler[2048] TOE_INTERNAL;

static inline int fail(int e)
{
    errno = e;
    return -1;
}

/* ---------------- state ---------------- */

static inline uint32_t state_of(struct toe_sock *s)
{
    return LOAD(&s->shm->state);
}

static inline uint32_t flags_of(struct toe_sock *s)
{
    return LOAD(&s->shm->flags);
}

static inline unsigned lstate_of(struct toe_sock *s)
{
    return __atomic_load_n(&s->lstate, __ATOMIC_ACQUIRE);
}

static inline void lstate_set(struct toe_sock *s, unsigned bits)
{
    __atomic_or_fetch(&s->lstate, bits, __ATOMIC_SEQ_CST);
}

static inline void lstate_clear(struct toe_sock *s, unsigned bits)
{
    __atomic_and_fetch(&s->lstate, ~bits, __ATOMIC_SEQ_CST);
}

static inline int take_so_error(struct toe_sock *s)
{
    return __atomic_exchange_n(&s->shm->so_error, 0, __ATOMIC_ACQ_REL);
}

static inline int nonblocking(int fd)
{
    int fl = toe_real_fcntl(fd, F_GETFL, NULL);
    return fl >= 0 && (fl & O_NONBLOCK);
}

/* ---------------- readiness on A (ready.c; docs/abi.md "Readiness") ---------------- */

/* Write filler into A until the kernel refuses (with tx: or until writable). */
void stuff(int fd, struct toe_sock_shm *tx) TOE_INTERNAL;
/* One byte into A: a doorbell or a kick.  EAGAIN (A stuffed) is dropped. */
void bell(int fd) TOE_INTERNAL;
/* A kick that must arrive: through A, or through the control channel when A is stuffed. */
void kick(struct toe_sock *s, int fd) TOE_INTERNAL;

/* pool.c: ready sockets, made in batches (the rest of its interface is in toe_shim.h) */
struct toe_sock *toe_pool_take(int type, int *a) TOE_INTERNAL;
/* Read the outstanding token bytes that arrived out of A; how many were read. */
uint32_t read_tokens(struct toe_sock_shm *m, int fd) TOE_INTERNAL;
/* The token dance: called (under rx_lock) when the socket is not readable. */
void take_tokens(struct toe_sock *s, int fd) TOE_INTERNAL;
/* Block until A is readable.  1: a token; 0: B was shut down; -1: errno. */
int wait_readable(int fd) TOE_INTERNAL;
int spin_readable(struct toe_sock_shm *m) TOE_INTERNAL;
/* A reads end-of-file although the daemon published neither EOF nor a reset. */
int daemon_gone(struct toe_sock *s, int fd) TOE_INTERNAL;
/* Block until the daemon drains B (A must be stuffed).  0, or -1 with errno. */
int wait_writable(int fd) TOE_INTERNAL;

/* ---------------- socket life (sock_life.c) ---------------- */

/* A new socket object: the pair, the sealed memfd with its header, the
 * mapping; bm[] receives [B, memfd, A] for SCM_RIGHTS; the caller closes
 * bm[0..1] (close_pair_side).  NULL with errno. */
struct toe_sock *make_sock(int flags, int *a, int bm[3]) TOE_INTERNAL;
void close_pair_side(int bm[3]) TOE_INTERNAL;
/* The pair alone (sv[0] = A with the flags' SOCK_NONBLOCK / SOCK_CLOEXEC): 0, or -1 with errno. */
int make_pair(int flags, int sv[2]) TOE_INTERNAL;
/* A's SO_COOKIE: how the daemon finds the socket again after exec (ADOPT). */
uint64_t sock_cookie(int fd) TOE_INTERNAL;

/* ---------------- handover (handover.c) ---------------- */

/* The socket would go to the kernel: hand it over (0; the caller then runs
 * the real operation on fd), or with TOE_STRICT refuse: -1, strict_errno. */
int handover_or_refuse(struct toe_sock *s, int fd, int reason, const char *what, uint32_t a_be32,
                       uint16_t p_be16, int strict_errno) TOE_INTERNAL;

/* ---------------- connection (conn.c) ---------------- */

/* Block (on A) until the handshake has ended.  0, or -1 with errno. */
int wait_connect_done(struct toe_sock *s, int fd) TOE_INTERNAL;

/* ---------------- receive (recv.c) ---------------- */

/* Validate an iovec array like the kernel; *total gets its length. */
int iov_total(const struct iovec *iov, int iovcnt, size_t *total) TOE_INTERNAL;
/* The same for a msghdr (EFAULT for NULL, EMSGSIZE for more than INT_MAX iovecs). */
int msg_total(const struct msghdr *msg, size_t *total) TOE_INTERNAL;

/* ---------------- send (send.c) ---------------- */

/* A write queued its bytes (tx_lock held), or a limit changed: if the socket
 * is no longer writable by tcp_poll's rule, stuff A (once per stuffing). */
void tx_settle(struct toe_sock *s, int fd) TOE_INTERNAL;

/* ---------------- the kernel's option rules (sockopt_kernel.c) ---------------- */

/* Field `field` (0-based) of a numeric sysctl, read once into *cache (dflt: unreadable). */
uint32_t sysctl_field(const char *path, int field, uint32_t *cache, uint32_t dflt) TOE_INTERNAL;
uint32_t sysctl_u32(const char *path, uint32_t *cache, uint32_t dflt) TOE_INTERNAL;
/* SO_SNDBUF / SO_RCVBUF as the kernel keeps them: within the sysctl ceiling
 * unless forced, doubled, at least floor. */
uint32_t buf_size(int v, int force, const char *sysctl, uint32_t *cache,
                  uint32_t floor) TOE_INTERNAL;
/* Linux 6.16 restricted SO_PASSCRED to AF_UNIX/AF_NETLINK (EOPNOTSUPP on TCP). */
int passcred_refused(void) TOE_INTERNAL;
/* CAP_NET_ADMIN or CAP_NET_RAW in the effective set. */
int net_capable(void) TOE_INTERNAL;
/* TCP_DEFER_ACCEPT is kept as SYN-ACK retransmissions: seconds -> count -> seconds. */
int defer_accept_round_trip(int seconds) TOE_INTERNAL;

#endif /* TOE_SOCK_INT_H */
