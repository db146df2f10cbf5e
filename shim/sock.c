/*
 * sock.c - the offloaded socket operations.
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
 */
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

static const uint8_t filler[2048];

static int fail(int e)
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

static int nonblocking(int fd)
{
    int fl = toe_real_fcntl(fd, F_GETFL, NULL);
    return fl >= 0 && (fl & O_NONBLOCK);
}

/* ---------------- readiness on A (docs/abi.md "Readiness") ---------------- */

/*
 * Write filler into A until the kernel refuses: A is then not writable.
 * With tx (the send-buffer case) stop as soon as the socket is writable
 * again: the daemon freed space and drained B meanwhile, so stuffing on would
 * only make it drain again.
 */
static void stuff(int fd, struct toe_sock_shm *tx)
{
    int saved = errno;
    for (int i = 0; i < 64; i++) {
        if (toe_real_send(fd, filler, sizeof(filler), MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
            errno != EINTR)
            break;
        if (tx && toe_tx_writable(tx))
            break;
    }
    errno = saved;
}

/* One byte into A: a doorbell or a kick.  EAGAIN (A stuffed) is dropped. */
static void bell(int fd)
{
    int saved = errno;
    toe_real_send(fd, filler, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    errno = saved;
}

/* Read the outstanding token bytes out of A (those that arrived: a counted
 * token may still be on its way).  Returns how many were read. */
static uint32_t read_tokens(struct toe_sock_shm *m, int fd)
{
    uint32_t n = toe_tokens_outstanding(m), got = 0;
    char buf[64];
    while (got < n) {
        size_t want = n - got < sizeof(buf) ? n - got : sizeof(buf);
        ssize_t r = toe_real_recv(fd, buf, want, MSG_DONTWAIT);
        if (r > 0)
            got += (uint32_t)r;
        else if (!(r < 0 && errno == EINTR))
            break;
    }
    return got;
}

/* The token dance: called (under rx_lock) when the socket is not readable. */
static void take_tokens(struct toe_sock *s, int fd)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno;
    uint32_t got = read_tokens(m, fd);
    if (toe_tokens_taken(m, got))
        bell(fd);
    errno = saved;
}

/* Block until A is readable.  1: a token; 0: B was shut down; -1: errno
 * (EINTR, EAGAIN on SO_RCVTIMEO ...) exactly as the kernel reports it. */
static int wait_readable(int fd)
{
    char c;
    ssize_t r = toe_real_recv(fd, &c, 1, MSG_PEEK);
    if (r < 0)
        return -1;
    return r > 0;
}

/* A reads end-of-file although the daemon published neither EOF nor a reset:
 * the daemon went away (crash, `toe down`).  Only asked on slow paths. */
static int daemon_gone(struct toe_sock *s, int fd)
{
    char c;
    int saved = errno;
    ssize_t r = toe_real_recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    errno = saved;
    return r == 0 && !(flags_of(s) & (TOE_SF_RX_EOF | TOE_SF_RESET | TOE_SF_RX_SHUT)) &&
           !toe_rx_avail(s->shm);
}

/* Block until the daemon drains B (A must be stuffed).  0, or -1 with errno
 * (EINTR, EAGAIN on SO_SNDTIMEO, EPIPE when B is gone). */
static int wait_writable(int fd)
{
    return toe_real_send(fd, filler, 1, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* ---------------- creation ---------------- */

/*
 * A new socket object: the pair (A with the application's SOCK_NONBLOCK /
 * SOCK_CLOEXEC), the memfd with its header filled in (sealed: its size can
 * never change under the daemon's mapping), the mapping.
 * bm[] receives [B, memfd, A] for SCM_RIGHTS; the caller closes bm[0..1].
 */
static struct toe_sock *make_sock(int flags, int *a, int bm[3])
{
    const struct toe_adapter *ad = toe_ctl_adapter();
    size_t len = TOE_SHM_HDR_SIZE + (size_t)ad->tx_ring_bytes + ad->rx_ring_bytes;
    int sv[2], mfd = -1, one = 1, e;
    void *p = MAP_FAILED;
    struct toe_sock *s;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        return NULL;
    if (!toe_fd_fits(sv[0])) {
        e = EMFILE;
        goto fail;
    }
    if (!(flags & SOCK_NONBLOCK) && toe_real_fcntl(sv[0], F_SETFL, NULL) < 0)
        goto fail_errno;
    if (!(flags & SOCK_CLOEXEC) && toe_real_fcntl(sv[0], F_SETFD, NULL) < 0)
        goto fail_errno;
    /* the kernel clamps to its minimum: a little filler makes A unwritable */
    toe_real_setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
    mfd = memfd_create("toe-sock", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0 || ftruncate(mfd, (off_t)len) < 0)
        goto fail_errno;
    if (toe_real_fcntl(mfd, F_ADD_SEALS, (void *)(long)(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) < 0)
        goto fail_errno;
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (p == MAP_FAILED)
        goto fail_errno;
    s = toe_sock_alloc();
    if (!s) {
        e = ENOMEM;
        goto fail;
    }
    struct toe_sock_shm *m = p;
    m->magic = TOE_SHM_MAGIC;
    m->abi_version = TOE_ABI_VERSION;
    m->tx_size = ad->tx_ring_bytes;
    m->rx_size = ad->rx_ring_bytes;
    m->sndbuf = ad->tx_ring_bytes;
    m->rcvbuf = ad->rx_ring_bytes;
    s->shm = m;
    s->map_len = len;
    *a = sv[0];
    bm[0] = sv[1];
    bm[1] = mfd;
    bm[2] = sv[0];
    return s;

fail_errno:
    e = errno;
fail:
    if (p != MAP_FAILED)
        munmap(p, len);
    if (mfd >= 0)
        toe_real_close(mfd);
    toe_real_close(sv[0]);
    toe_real_close(sv[1]);
    errno = e;
    return NULL;
}

static void close_pair_side(int bm[3])
{
    toe_real_close(bm[0]);
    toe_real_close(bm[1]);
}

/* Out of descriptors or memory: the kernel's socket() would fail the same way, and a
 * kernel socket instead would silently take the wrong path. */
static int no_resources(int e)
{
    return e == EMFILE || e == ENFILE || e == ENOMEM || e == ENOBUFS;
}

/* A's SO_COOKIE: how the daemon finds the socket again after exec (ADOPT). */
static uint64_t sock_cookie(int fd)
{
    uint64_t c = 0;
    socklen_t l = sizeof(c);
    int saved = errno;
    if (toe_real_getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) < 0 || l != sizeof(c))
        c = 0;
    errno = saved;
    return c;
}

/* Strict mode: a TCP socket that could only be the kernel's is an error. */
static int strict_no_socket(int e)
{
    TOE_DBG("socket: strict, no offloaded socket (%s)", strerror(e));
    return fail(e);
}

int toe_sock_wanted(int domain, int type, int protocol)
{
    return domain == AF_INET && (type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) == SOCK_STREAM &&
           (protocol == 0 || protocol == IPPROTO_TCP);
}

int toe_sock_socket(int domain, int type, int protocol)
{
    int saved = errno, a, bm[3];
    struct toe_cmd cmd;
    struct toe_rsp rsp;

    int up = toe_ctl_up();
    if (up < 0)
        return fail(-up);
    if (!up) {
        if (toe_strict)
            return strict_no_socket(ENETDOWN);
        return toe_real_socket(domain, type, protocol);
    }
    struct toe_sock *s = make_sock(type, &a, bm);
    if (!s) {
        if (toe_strict || no_resources(errno))
            return toe_strict ? strict_no_socket(errno) : fail(errno);
        TOE_DBG("socket: no offloaded socket (%s); kernel socket", strerror(errno));
        errno = saved;
        return toe_real_socket(domain, type, protocol);
    }
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_SOCKET;
    cmd.shm_bytes = (uint32_t)s->map_len;
    s->cookie = sock_cookie(a);
    int r = toe_ctl_call(&cmd, bm, 3, &rsp);
    close_pair_side(bm);
    if (r < 0 || rsp.result < 0) {
        toe_real_close(a);
        toe_sock_put(s);
        if (r < 0) {
            if (no_resources(-r))
                return fail(-r);
            if (toe_strict)
                return strict_no_socket(ENETDOWN);
            errno = saved;
            return toe_real_socket(domain, type, protocol);
        }
        return fail(-rsp.result);
    }
    s->sock_id = rsp.sock_id;
    stuff(a, NULL); /* an unconnected socket is not writable */
    if (toe_fd_install(a, s) < 0) {
        int e = errno;
        toe_real_close(a);
        toe_sock_put(s);
        return fail(e);
    }
    toe_sock_put(s);
    TOE_DBG("socket fd %d -> sock %u", a, rsp.sock_id);
    errno = saved;
    return a;
}

/* ---------------- handover to the kernel ---------------- */

/*
 * Replace the offloaded socket behind fd (and every other fd of this process
 * that points at it) with a fresh kernel socket carrying what the application
 * set so far: O_NONBLOCK, FD_CLOEXEC, recorded options, its bind.  The caller
 * then performs the real operation on fd.  0, or -1 with errno (nothing
 * changed).
 */
static int handover(struct toe_sock *s, int fd, int reason)
{
    int saved = errno, e;
    int fl = toe_real_fcntl(fd, F_GETFL, NULL);
    if (fl < 0)
        return -1;
    int k = toe_real_socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | ((fl & O_NONBLOCK) ? SOCK_NONBLOCK : 0),
                            IPPROTO_TCP);
    if (k < 0)
        return -1;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        struct toe_opt *o = &s->opts[i];
        if (toe_real_setsockopt(k, o->level, o->name, o->val, o->len) < 0)
            TOE_DBG("handover: replaying option %d/%d: %s", o->level, o->name, strerror(errno));
    }
    struct sockaddr_in b = s->bound;
    pthread_mutex_unlock(&s->opt_lock);
    if ((lstate_of(s) & TOE_LS_BOUND) && toe_real_bind(k, (struct sockaddr *)&b, sizeof(b)) < 0)
        goto fail;
    if (toe_fd_replace_all(s, fd, k) < 0)
        goto fail;
    toe_real_close(k);

    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HANDOVER;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = reason;
    toe_ctl_call(&cmd, NULL, 0, &rsp); /* statistics only: errors do not matter */
    TOE_DBG("handover fd %d (sock %u) to the kernel, reason %d", fd, s->sock_id, reason);
    errno = saved;
    return 0;

fail:
    e = errno;
    toe_real_close(k);
    TOE_DBG("handover fd %d failed: %s", fd, strerror(e));
    return fail(e);
}

static const char *handover_words(int reason)
{
    switch (reason) {
    case TOE_HO_LOOPBACK:
        return "loopback";
    case TOE_HO_OFF_SUBNET:
        return "outside the adapter's subnet";
    case TOE_HO_BIND_ADDR:
        return "not the adapter's address";
    case TOE_HO_DAEMON:
        return "the daemon does not serve it";
    case TOE_HO_NO_DAEMON:
        return "no adapter daemon";
    case TOE_HO_KERNEL_PATH:
        return "arrived through the kernel";
    default:
        return "unknown reason";
    }
}

/*
 * A socket operation would give the socket to the kernel.  Normally: do it
 * (0; the caller then runs the real operation on fd).  With TOE_STRICT: say
 * so on stderr, tell the daemon (HANDOVER, arg1 = 1 "refused": the socket
 * stays offloaded and usable) and fail with strict_errno.
 */
static int handover_or_refuse(struct toe_sock *s, int fd, int reason, const char *what,
                              uint32_t a_be32, uint16_t p_be16, int strict_errno)
{
    if (!toe_strict)
        return handover(s, fd, reason);
    char a[INET_ADDRSTRLEN];
    struct in_addr ia = {.s_addr = a_be32};
    inet_ntop(AF_INET, &ia, a, sizeof(a));
    toe_say("toe: strict: %s %s:%u would use the kernel (%s)", what, a, (unsigned)ntohs(p_be16),
            handover_words(reason));
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HANDOVER;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = reason;
    cmd.arg1 = 1;
    toe_ctl_call(&cmd, NULL, 0, &rsp); /* statistics only */
    return fail(strict_errno);
}

/* ---------------- bind / listen / connect / accept ---------------- */

int toe_sock_bind(struct toe_sock *s, int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_in sin;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int reason;

    if (len < sizeof(sin))
        return fail(EINVAL);
    if (!addr)
        return fail(EFAULT);
    memcpy(&sin, addr, sizeof(sin));
    if (sin.sin_family != AF_INET) {
        if (sin.sin_family != AF_UNSPEC || sin.sin_addr.s_addr != htonl(INADDR_ANY))
            return fail(EAFNOSUPPORT);
        sin.sin_family = AF_INET;
    }
    if (lstate_of(s) || state_of(s) != TOE_SS_NEW)
        return fail(EINVAL);
    const struct toe_adapter *ad = toe_ctl_adapter();
    if (sin.sin_addr.s_addr != htonl(INADDR_ANY) && sin.sin_addr.s_addr != ad->addr_be32) {
        reason = TOE_HO_BIND_ADDR;
        goto handover;
    }
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_BIND;
    cmd.sock_id = s->sock_id;
    cmd.addr_be32 = sin.sin_addr.s_addr;
    cmd.port_be16 = sin.sin_port;
    if (toe_ctl_call(&cmd, NULL, 0, &rsp) < 0) {
        reason = TOE_HO_NO_DAEMON;
        goto handover;
    }
    if (rsp.flags & TOE_RF_HANDOVER) {
        reason = TOE_HO_DAEMON;
        goto handover;
    }
    if (rsp.result < 0)
        return fail(-rsp.result);
    pthread_mutex_lock(&s->opt_lock);
    s->bound = sin;
    pthread_mutex_unlock(&s->opt_lock);
    lstate_set(s, TOE_LS_BOUND);
    return 0;

handover:
    if (handover_or_refuse(s, fd, reason, "bind to", sin.sin_addr.s_addr, sin.sin_port,
                           EADDRNOTAVAIL) < 0)
        return -1;
    return toe_real_bind(fd, addr, len);
}

/*
 * An INADDR_ANY listener accepts on both paths (as Onload does): beside the
 * offloaded socket, a kernel listening socket on the same port, kept above
 * the application's descriptors.  The daemon watches a copy of it and makes
 * A readable when a connection waits there.  -1 when it cannot be had (the
 * port is taken in this namespace, say): the adapter path alone then.
 */
static int open_kernel_listener(struct toe_sock *s, int backlog)
{
    int saved = errno, one = 1;
    int k = toe_real_socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (k < 0)
        return -1;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        struct toe_opt *o = &s->opts[i];
        toe_real_setsockopt(k, o->level, o->name, o->val, o->len);
    }
    pthread_mutex_unlock(&s->opt_lock);
    toe_real_setsockopt(k, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = LOAD(&s->shm->local_port_be16);
    if (toe_real_bind(k, (struct sockaddr *)&sin, sizeof(sin)) < 0 || toe_real_listen(k, backlog) < 0) {
        TOE_DBG("listen: no kernel path for port %u: %s", ntohs(sin.sin_port), strerror(errno));
        toe_real_close(k);
        errno = saved;
        return -1;
    }
    int hi = toe_real_fcntl(k, F_DUPFD_CLOEXEC, (void *)(long)TOE_HIGH_FD);
    if (hi >= 0) {
        toe_real_close(k);
        k = hi;
    }
    errno = saved;
    return k;
}

/* A connection waits in the kernel listener's queue. */
static int kernel_pending(struct toe_sock *s)
{
    struct pollfd p = {.fd = s->kfd, .events = POLLIN};
    return s->kfd >= 0 && poll(&p, 1, 0) > 0;
}

int toe_sock_listen(struct toe_sock *s, int fd, int backlog)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    unsigned ls = lstate_of(s);
    uint32_t st = state_of(s);
    int reason, kfd = -1;

    if ((ls & (TOE_LS_CONNECT | TOE_LS_CONNECTED)) ||
        (st != TOE_SS_NEW && st != TOE_SS_BOUND && st != TOE_SS_LISTEN))
        return fail(EINVAL);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_LISTEN;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = backlog;
    if (!(ls & TOE_LS_LISTEN) && s->kfd < 0 && !toe_strict && LOAD(&s->shm->local_addr_be32) == 0 &&
        LOAD(&s->shm->local_port_be16) != 0)
        kfd = open_kernel_listener(s, backlog);
    int r = toe_ctl_call(&cmd, kfd >= 0 ? &kfd : NULL, kfd >= 0, &rsp);
    if (r < 0 || (rsp.flags & TOE_RF_HANDOVER) || rsp.result < 0) {
        if (kfd >= 0)
            toe_real_close(kfd);
        kfd = -1;
    }
    if (r < 0) {
        if (ls & TOE_LS_LISTEN)
            return 0; /* a backlog change; the listener keeps running */
        reason = TOE_HO_NO_DAEMON;
        goto handover;
    }
    if ((rsp.flags & TOE_RF_HANDOVER) && !(ls & TOE_LS_LISTEN)) {
        reason = TOE_HO_DAEMON;
        goto handover;
    }
    if (rsp.result < 0)
        return fail(-rsp.result);
    if (kfd >= 0)
        s->kfd = kfd;
    lstate_set(s, TOE_LS_LISTEN);
    stuff(fd, NULL); /* a listening socket is never writable */
    return 0;

handover:
    if (handover_or_refuse(s, fd, reason, "listen on", LOAD(&s->shm->local_addr_be32),
                           LOAD(&s->shm->local_port_be16), EADDRNOTAVAIL) < 0)
        return -1;
    return toe_real_listen(fd, backlog);
}

/* Block (on A) until the handshake has ended.  0, or -1 with errno. */
static int wait_connect_done(struct toe_sock *s, int fd)
{
    while (state_of(s) == TOE_SS_CONNECTING) {
        if (wait_writable(fd) < 0)
            return -1;
    }
    return 0;
}

/* The handshake has ended: report it like connect() does. */
static int connect_result(struct toe_sock *s)
{
    if (state_of(s) == TOE_SS_CONNECTED) {
        lstate_set(s, TOE_LS_CONNECTED);
        lstate_clear(s, TOE_LS_CONNECT);
        return 0;
    }
    int e = take_so_error(s);
    /* the kernel disconnects a socket whose connect() reported the failure:
     * recv() is ENOTCONN from now on (until a new connect) */
    lstate_set(s, TOE_LS_CONNFAIL);
    lstate_clear(s, TOE_LS_CONNECT);
    return fail(e ? e : ECONNABORTED);
}

/* A blocking connect's wait failed: SO_SNDTIMEO expiry is EINPROGRESS. */
static int connect_wait_failed(void)
{
    return errno == EAGAIN ? fail(EINPROGRESS) : -1;
}

/* A blocking connect: wait for the handshake to end (it may have already), then report
 * its outcome once.  0 with errno as the caller found it, or -1 with errno. */
static int connect_finish(struct toe_sock *s, int fd, int saved)
{
    if (wait_connect_done(s, fd) < 0)
        return connect_wait_failed();
    if (connect_result(s) < 0)
        return -1;
    errno = saved;
    return 0;
}

int toe_sock_connect(struct toe_sock *s, int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_in sin;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    sa_family_t family;
    int reason = 0, saved = errno;

    if (len < sizeof(family))
        return fail(EINVAL);
    if (!addr)
        return fail(EFAULT);
    memcpy(&family, addr, sizeof(family));
    unsigned ls = lstate_of(s);
    uint32_t st = state_of(s);
    if (family == AF_UNSPEC) /* "disconnect": only a no-op is supported */
        return (st == TOE_SS_NEW || st == TOE_SS_BOUND) ? 0 : fail(EINVAL);
    if (len < sizeof(sin))
        return fail(EINVAL);
    if (family != AF_INET)
        return fail(EAFNOSUPPORT);
    memcpy(&sin, addr, sizeof(sin));
    if ((ls & (TOE_LS_LISTEN | TOE_LS_CONNECTED)) || st == TOE_SS_LISTEN)
        return fail(EISCONN);
    if (ls & TOE_LS_CONNECT) {
        /* a connect() is under way or its outcome was not reported yet */
        if (st == TOE_SS_CONNECTING && nonblocking(fd))
            return fail(EALREADY);
        return connect_finish(s, fd, saved);
    }
    if (st == TOE_SS_CONNECTED)
        return fail(EISCONN);

    const struct toe_adapter *ad = toe_ctl_adapter();
    uint32_t dst = sin.sin_addr.s_addr;
    if ((ntohl(dst) >> 24) == 127 || dst == htonl(INADDR_ANY))
        reason = TOE_HO_LOOPBACK;
    else if ((dst & ad->netmask_be32) != (ad->addr_be32 & ad->netmask_be32))
        reason = TOE_HO_OFF_SUBNET;
    if (reason)
        goto handover;

    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_CONNECT;
    cmd.sock_id = s->sock_id;
    cmd.addr_be32 = dst;
    cmd.port_be16 = sin.sin_port;
    if (toe_ctl_call(&cmd, NULL, 0, &rsp) < 0) {
        reason = TOE_HO_NO_DAEMON;
        goto handover;
    }
    if (rsp.flags & TOE_RF_HANDOVER) {
        reason = TOE_HO_DAEMON;
        goto handover;
    }
    lstate_clear(s, TOE_LS_CONNFAIL);
    if (rsp.result == 0) {
        lstate_set(s, TOE_LS_CONNECTED);
        return 0;
    }
    if (rsp.result != -EINPROGRESS)
        return fail(-rsp.result);
    lstate_set(s, TOE_LS_CONNECT);
    if (nonblocking(fd))
        return fail(EINPROGRESS);
    return connect_finish(s, fd, saved);

handover:
    if (handover_or_refuse(s, fd, reason, "connect to", sin.sin_addr.s_addr, sin.sin_port,
                           ENETUNREACH) < 0)
        return -1;
    return toe_real_connect(fd, addr, len);
}

/* Write an IPv4 address the way the kernel does: truncated to *len, the
 * full length written back. */
static int put_sockaddr(struct sockaddr *addr, socklen_t *len, uint32_t a_be32, uint16_t p_be16)
{
    struct sockaddr_in sin;
    if (!len)
        return fail(EFAULT);
    if ((int)*len < 0)
        return fail(EINVAL);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = a_be32;
    sin.sin_port = p_be16;
    size_t n = *len < sizeof(sin) ? *len : sizeof(sin);
    if (n && !addr)
        return fail(EFAULT);
    memcpy(addr, &sin, n);
    *len = sizeof(sin);
    return 0;
}

/* The connection just accepted came through the kernel: count it (statistics only), and
 * leave A's readiness exact when neither queue holds another. */
static void note_kernel_accept(struct toe_sock *s, int fd)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int saved = errno;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HANDOVER;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = TOE_HO_KERNEL_PATH;
    toe_ctl_call(&cmd, NULL, 0, &rsp);
    if (LOAD(&s->shm->accept_pending) == 0 && !kernel_pending(s) && toe_tokens_outstanding(s->shm)) {
        pthread_mutex_lock(&s->rx_lock);
        take_tokens(s, fd);
        pthread_mutex_unlock(&s->rx_lock);
    }
    errno = saved;
}

int toe_sock_accept(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    struct toe_sock_shm *m = s->shm;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int saved = errno, nb = -1, a_eof = 0;

    if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC))
        return fail(EINVAL);
    if (!(lstate_of(s) & TOE_LS_LISTEN))
        return fail(EINVAL);
    if (addr && !len)
        return fail(EFAULT);
    if (addr && (int)*len < 0)
        return fail(EINVAL);
    for (;;) {
        if (LOAD(&m->accept_pending) == 0) {
            if (s->kfd >= 0) {
                /* INADDR_ANY: a connection that came through the kernel is a kernel socket */
                int k = toe_real_accept4(s->kfd, addr, len, flags);
                if (k >= 0) {
                    note_kernel_accept(s, fd);
                    errno = saved;
                    return k;
                }
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED)
                    return -1;
            }
            pthread_mutex_lock(&s->rx_lock);
            take_tokens(s, fd);
            pthread_mutex_unlock(&s->rx_lock);
            if (LOAD(&m->accept_pending))
                continue;
            if (kernel_pending(s)) {
                bell(fd); /* the token may have been taken: have the daemon send another */
                continue;
            }
            if (nb < 0)
                nb = nonblocking(fd);
            if (nb)
                return fail(EAGAIN);
            int w = wait_readable(fd);
            if (w < 0)
                return -1;
            if (w == 0 && a_eof++)
                return fail(EINVAL); /* B is gone: the listener was shut down */
            continue;
        }

        int a, bm[3];
        struct toe_sock *c = make_sock(flags, &a, bm);
        if (!c)
            return -1;
        /* an accepted socket inherits the listener's options */
        struct toe_sock_shm *cm = c->shm;
        cm->opt_flags = LOAD(&m->opt_flags);
        cm->linger_s = m->linger_s;
        cm->keepidle_s = m->keepidle_s;
        cm->keepintvl_s = m->keepintvl_s;
        cm->keepcnt = m->keepcnt;
        cm->user_mss = m->user_mss;
        cm->sndbuf = m->sndbuf;
        cm->rcvbuf = m->rcvbuf;
        cm->notsent_lowat = m->notsent_lowat;
        pthread_mutex_lock(&s->opt_lock);
        c->nopts = s->nopts;
        memcpy(c->opts, s->opts, sizeof(c->opts[0]) * s->nopts);
        pthread_mutex_unlock(&s->opt_lock);

        memset(&cmd, 0, sizeof(cmd));
        cmd.op = TOE_OP_ACCEPT;
        cmd.sock_id = s->sock_id;
        cmd.shm_bytes = (uint32_t)c->map_len;
        c->cookie = sock_cookie(a);
        int r = toe_ctl_call(&cmd, bm, 3, &rsp);
        close_pair_side(bm);
        if (r < 0 || rsp.result < 0) {
            toe_real_close(a);
            toe_sock_put(c);
            if (r == 0 && rsp.result == -EAGAIN)
                continue; /* another process took it */
            return fail(r < 0 ? ECONNABORTED : -rsp.result);
        }
        c->sock_id = rsp.sock_id;
        lstate_set(c, TOE_LS_CONNECTED);
        if (toe_fd_install(a, c) < 0) {
            int e = errno;
            toe_real_close(a);
            toe_sock_put(c);
            return fail(e);
        }
        toe_sock_put(c);
        /* leave the listener's readiness exact for the next select()/poll() */
        if (LOAD(&m->accept_pending) == 0 && toe_tokens_outstanding(m) && !kernel_pending(s)) {
            pthread_mutex_lock(&s->rx_lock);
            take_tokens(s, fd);
            pthread_mutex_unlock(&s->rx_lock);
        }
        if (addr)
            put_sockaddr(addr, len, rsp.addr_be32, rsp.port_be16);
        TOE_DBG("accept fd %d -> fd %d (sock %u)", fd, a, rsp.sock_id);
        errno = saved;
        return a;
    }
}

/* ---------------- receive ---------------- */

/* Copy n ring bytes from idx into the iovecs, starting off bytes in. */
static void ring_to_iov(struct toe_sock_shm *m, uint32_t idx, const struct iovec *iov, int iovcnt,
                        size_t off, size_t n)
{
    const uint8_t *ring = toe_rx_base(m);
    int i = 0;
    while (i < iovcnt && off >= iov[i].iov_len) {
        off -= iov[i].iov_len;
        i++;
    }
    for (; n > 0 && i < iovcnt; i++, off = 0) {
        size_t chunk = iov[i].iov_len - off;
        if (chunk > n)
            chunk = n;
        toe_ring_copy_out(ring, m->rx_size, idx, (uint8_t *)iov[i].iov_base + off, (uint32_t)chunk);
        idx += (uint32_t)chunk;
        n -= chunk;
    }
}

/* Validate an iovec array like the kernel; *total gets its length. */
static int iov_total(const struct iovec *iov, int iovcnt, size_t *total)
{
    size_t t = 0;
    if (iovcnt < 0 || iovcnt > IOV_MAX)
        return fail(EINVAL);
    if (iovcnt && !iov)
        return fail(EFAULT);
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len > (size_t)SSIZE_MAX - t)
            return fail(EINVAL);
        if (iov[i].iov_len && !iov[i].iov_base)
            return fail(EFAULT);
        t += iov[i].iov_len;
    }
    *total = t;
    return 0;
}

/* No more data will come (the ring may still hold some): EOF, reset,
 * SHUT_RD (ours or the daemon's RX_SHUT), a closed socket, the daemon gone. */
static int rx_ended(struct toe_sock *s)
{
    return (flags_of(s) & (TOE_SF_RX_EOF | TOE_SF_RESET | TOE_SF_RX_SHUT)) ||
           (lstate_of(s) & (TOE_LS_SHUT_RD | TOE_LS_GONE)) || state_of(s) == TOE_SS_CLOSED;
}

/* n bytes were consumed from the RX ring (rx_lock held): the window
 * doorbell, and A's readability made exact when the ring emptied. */
static void rx_consume(struct toe_sock *s, int fd, uint32_t n)
{
    struct toe_sock_shm *m = s->shm;
    if (toe_rx_consumed(m, n))
        bell(fd);
    if (toe_rx_avail(m) == 0 && toe_tokens_outstanding(m) &&
        !(flags_of(s) & (TOE_SF_RX_EOF | TOE_SF_RESET | TOE_SF_RX_SHUT)))
        take_tokens(s, fd);
}

/*
 * MSG_PEEK|MSG_WAITALL saw `seen` bytes, fewer than it wants, and must wait
 * for more although the socket is readable.  Read the tokens out of A
 * *without* the kick (the bytes already there must not wake us; with no token
 * outstanding the daemon sends one with the next append), then re-check:
 * 1 when more data or an end showed up in the window (do not wait).
 * Called with rx_lock held.
 */
static int peek_wait_prepare(struct toe_sock *s, int fd, uint32_t seen)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno;
    uint32_t got = read_tokens(m, fd);
    toe_tokens_taken(m, got); /* its "kick" answer is for the data we chose to ignore */
    errno = saved;
    return toe_rx_avail(m) != seen || rx_ended(s);
}

/* Leaving a MSG_PEEK|MSG_WAITALL wait: data in the ring and no token out
 * means A is not readable although the socket is; kick the daemon. */
static void peek_wait_done(struct toe_sock *s, int fd)
{
    if (toe_rx_avail(s->shm) && toe_tokens_outstanding(s->shm) == 0)
        bell(fd);
}

static ssize_t do_recv(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt, size_t total,
                       int flags)
{
    struct toe_sock_shm *m = s->shm;
    uint32_t st = state_of(s);
    int saved = errno, a_eof = 0;
    int peek = flags & MSG_PEEK, waitall = (flags & MSG_WAITALL) != 0;
    int discard = (flags & MSG_TRUNC) != 0; /* TCP: dropped, or (MSG_PEEK) only counted */
    int nb = (flags & MSG_DONTWAIT) ? 1 : -1;
    int peek_waited = 0, peek_stop = 0, peek_err = 0;
    size_t got = 0;

    if (flags & MSG_OOB)
        return fail(EINVAL);
    if (flags & MSG_ERRQUEUE)
        return fail(EAGAIN);
    if (st == TOE_SS_LISTEN || (lstate_of(s) & TOE_LS_LISTEN))
        return fail(ENOTCONN);
    if (total == 0)
        return 0;
    if (st == TOE_SS_NEW || st == TOE_SS_BOUND)
        return fail(ENOTCONN);

    for (;;) {
        pthread_mutex_lock(&s->rx_lock);
        uint32_t avail = toe_rx_avail(m);
        if (avail && peek && waitall && avail < total && !peek_stop && !rx_ended(s)) {
            /* like the kernel, MSG_PEEK|MSG_WAITALL waits for the whole length */
            if (nb < 0)
                nb = nonblocking(fd);
            if (!nb) {
                int more = peek_wait_prepare(s, fd, avail);
                pthread_mutex_unlock(&s->rx_lock);
                peek_waited = 1;
                if (!more) {
                    int w = wait_readable(fd);
                    if (w < 0) {
                        peek_err = errno; /* EINTR, SO_RCVTIMEO: what is there */
                        peek_stop = 1;
                    } else if (w == 0 && a_eof++) {
                        peek_stop = 1;    /* B shut with no end published: daemon gone */
                    }
                }
                continue;
            }
        }
        if (avail) {
            size_t n = total - got < avail ? total - got : avail;
            if (!discard)
                ring_to_iov(m, m->rx_head, iov, iovcnt, got, n);
            if (!peek)
                rx_consume(s, fd, (uint32_t)n);
            got += n;
            pthread_mutex_unlock(&s->rx_lock);
            if (got == total || !waitall || peek)
                break;
            continue;
        }
        if (peek_err) {
            /* the peeked bytes went to another reader meanwhile */
            pthread_mutex_unlock(&s->rx_lock);
            peek_wait_done(s, fd);
            return fail(peek_err);
        }
        uint32_t fl = flags_of(s), st_now = state_of(s);
        if (toe_rx_avail(m)) {
            /* the last data was published just before the flag/state we now see */
            pthread_mutex_unlock(&s->rx_lock);
            continue;
        }
        if (fl & TOE_SF_RESET) {
            pthread_mutex_unlock(&s->rx_lock);
            int e = got ? 0 : take_so_error(s);
            if (e)
                return fail(e);
            if (!got && (lstate_of(s) & TOE_LS_CONNFAIL))
                return fail(ENOTCONN);
            break; /* reported once: end of file from now on */
        }
        if ((fl & (TOE_SF_RX_EOF | TOE_SF_RX_SHUT)) ||
            (lstate_of(s) & (TOE_LS_SHUT_RD | TOE_LS_GONE)) || st_now == TOE_SS_CLOSED) {
            pthread_mutex_unlock(&s->rx_lock);
            break;
        }
        take_tokens(s, fd);
        int again = toe_rx_avail(m) ||
                    (flags_of(s) & (TOE_SF_RX_EOF | TOE_SF_RESET | TOE_SF_RX_SHUT));
        pthread_mutex_unlock(&s->rx_lock);
        if (again)
            continue;
        /* The wait itself honours A's O_NONBLOCK (EAGAIN at once): no fcntl() to ask,
         * so a sandboxed process that may only read/recv/send/poll keeps working. */
        int w = nb > 0 ? (errno = EAGAIN, -1) : wait_readable(fd);
        if (w < 0) {
            if (got)
                break;
            if (errno == EAGAIN && daemon_gone(s, fd)) {
                /* A stays readable (EOF) forever: report a reset once, then end of file,
                 * instead of EAGAIN that would spin a poll() loop */
                lstate_set(s, TOE_LS_GONE);
                return fail(ECONNRESET);
            }
            return -1;
        }
        if (w == 0 && a_eof++) {
            /* B shut down with no EOF/reset published: the daemon went away */
            lstate_set(s, TOE_LS_GONE);
            if (got)
                break;
            return fail(ECONNRESET);
        }
    }
    if (peek_waited)
        peek_wait_done(s, fd);
    errno = saved;
    return (ssize_t)got;
}

ssize_t toe_sock_recv(struct toe_sock *s, int fd, void *buf, size_t n, int flags)
{
    struct iovec iov = {.iov_base = buf, .iov_len = n};
    if (n && !buf)
        return fail(EFAULT);
    return do_recv(s, fd, &iov, 1, n, flags);
}

ssize_t toe_sock_read_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen)
{
    if (n > buflen)
        __chk_fail();
    return toe_sock_recv(s, fd, buf, n, 0);
}

ssize_t toe_sock_recv_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen, int flags)
{
    if (n > buflen)
        __chk_fail();
    return toe_sock_recv(s, fd, buf, n, flags);
}

ssize_t toe_sock_recvfrom(struct toe_sock *s, int fd, void *buf, size_t n, int flags,
                          struct sockaddr *addr, socklen_t *len)
{
    ssize_t r = toe_sock_recv(s, fd, buf, n, flags);
    if (r >= 0 && addr && len)
        *len = 0; /* TCP reports no source address */
    return r;
}

ssize_t toe_sock_recvfrom_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen,
                              int flags, struct sockaddr *addr, socklen_t *len)
{
    if (n > buflen)
        __chk_fail();
    return toe_sock_recvfrom(s, fd, buf, n, flags, addr, len);
}

ssize_t toe_sock_readv(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt)
{
    size_t total;
    if (iov_total(iov, iovcnt, &total) < 0)
        return -1;
    return do_recv(s, fd, iov, iovcnt, total, 0);
}

ssize_t toe_sock_recvmsg(struct toe_sock *s, int fd, struct msghdr *msg, int flags)
{
    size_t total;
    if (!msg)
        return fail(EFAULT);
    if (msg->msg_iovlen > INT_MAX)
        return fail(EMSGSIZE);
    if (iov_total(msg->msg_iov, (int)msg->msg_iovlen, &total) < 0)
        return -1;
    ssize_t r = do_recv(s, fd, msg->msg_iov, (int)msg->msg_iovlen, total, flags);
    if (r >= 0) {
        msg->msg_namelen = 0;
        msg->msg_controllen = 0;
        msg->msg_flags = 0;
    }
    return r;
}

/* ---------------- send ---------------- */

static int broken_pipe(int flags)
{
    if (!(flags & MSG_NOSIGNAL))
        raise(SIGPIPE);
    return fail(EPIPE);
}

/* The send-side error of a socket that cannot send (pending error first). */
static int send_error(struct toe_sock *s, int flags)
{
    int e = take_so_error(s);
    return e ? fail(e) : broken_pipe(flags);
}

/* 0 when data may be queued now; -1 with errno (and SIGPIPE) otherwise.
 * A blocking send on a connecting socket waits for the handshake. */
static int send_ready(struct toe_sock *s, int fd, int flags, int *nb)
{
    for (;;) {
        uint32_t fl = flags_of(s), st = state_of(s);
        if (fl & TOE_SF_RESET)
            return send_error(s, flags);
        if ((lstate_of(s) & TOE_LS_SHUT_WR) || (fl & TOE_SF_TX_SHUT))
            return broken_pipe(flags);
        if (st == TOE_SS_CONNECTED)
            return 0;
        if (st == TOE_SS_CLOSED)
            return send_error(s, flags);
        if (st != TOE_SS_CONNECTING)
            return broken_pipe(flags);
        if (*nb > 0)
            return fail(EAGAIN);
        if (wait_connect_done(s, fd) < 0) /* EAGAIN at once when A is nonblocking */
            return -1;
    }
}

enum { TXW_SPACE, TXW_STOP, TXW_FAIL };

/*
 * The send buffer is full (tx_lock held): make A unwritable, then wait for
 * the daemon to free space, until the socket is writable again (tcp_poll's
 * rule, toe_tx_writable()), as a blocked writer in the kernel sleeps.
 * TXW_SPACE: there is room now (tx_lock held); TXW_STOP: nonblocking or
 * SO_SNDTIMEO expired, give up (tx_lock held); TXW_FAIL: the wait failed or the socket died (tx_lock
 * released, *err = the wait's errno, *dead set).
 */
static int tx_wait_space(struct toe_sock *s, int fd, int *nb, int *err, int *dead)
{
    struct toe_sock_shm *m = s->shm;
    uint32_t declared = LOAD(&m->tx_full_wait); /* A may be stuffed already */
    if (toe_tx_declare_full(m)) {
        if (!declared) /* A was not stuffed and will not be: no drain is owed */
            __atomic_store_n(&m->tx_full_wait, 0, __ATOMIC_SEQ_CST);
        return TXW_SPACE;
    }
    stuff(fd, m);
    if (toe_tx_writable(m))
        return TXW_SPACE;
    if (*nb > 0)
        return TXW_STOP;
    /* the wait honours A's O_NONBLOCK itself (EAGAIN at once): no fcntl() to ask */
    pthread_mutex_unlock(&s->tx_lock);
    int w = wait_writable(fd), e = errno;
    uint32_t fl = flags_of(s);
    *dead = (fl & (TOE_SF_RESET | TOE_SF_TX_SHUT)) || state_of(s) != TOE_SS_CONNECTED ||
            (lstate_of(s) & TOE_LS_SHUT_WR) || (w < 0 && (e == EPIPE || e == ECONNRESET));
    if (w < 0 && e == EAGAIN && !*dead) {
        /* nonblocking (or SO_SNDTIMEO expired): give up with what was queued */
        *nb = 1;
        pthread_mutex_lock(&s->tx_lock);
        return TXW_STOP;
    }
    if (w < 0 || *dead) {
        *err = e;
        return TXW_FAIL;
    }
    pthread_mutex_lock(&s->tx_lock);
    return TXW_SPACE;
}

/* How a send that queued `sent` bytes ends after TXW_FAIL. */
static ssize_t tx_failed(struct toe_sock *s, size_t sent, int saved, int dead, int e, int flags)
{
    if (sent) {
        errno = saved;
        return (ssize_t)sent;
    }
    if (dead)
        return (flags_of(s) & TOE_SF_RESET) ? send_error(s, flags) : broken_pipe(flags);
    return fail(e); /* EINTR, or EAGAIN when SO_SNDTIMEO expired */
}

/* n bytes were written straight into the TX ring at tx_tail: publish them
 * (toe_tx_put() without its copy) and ring the doorbell if it is armed. */
static void tx_commit(struct toe_sock *s, int fd, uint32_t n, int push)
{
    if (toe_tx_commit(s->shm, n, push))
        bell(fd);
}

/*
 * A write queued its bytes (tx_lock held).  If the socket is no longer
 * writable by tcp_poll's rule (SO_SNDBUF, TCP_NOTSENT_LOWAT, or simply a
 * full-enough ring), A must not be either: declare and stuff it, and the
 * daemon drains B once the rule holds again.  Once per stuffing, not per
 * write: a declared wait stays until the daemon clears it.
 */
static void tx_settle(struct toe_sock *s, int fd)
{
    struct toe_sock_shm *m = s->shm;
    if (toe_tx_writable(m) || LOAD(&m->tx_full_wait))
        return;
    if (toe_tx_declare_full(m))
        __atomic_store_n(&m->tx_full_wait, 0, __ATOMIC_SEQ_CST);
    else
        stuff(fd, m);
}

static ssize_t do_send(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt, size_t total,
                       int flags)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno, nb = (flags & MSG_DONTWAIT) ? 1 : -1, e = 0, dead = 0;
    size_t sent = 0, off = 0;
    int i = 0;

    if (send_ready(s, fd, flags, &nb) < 0)
        return -1;
    if (total == 0)
        return 0;
    pthread_mutex_lock(&s->tx_lock);
    for (;;) {
        while (sent < total) {
            while (i < iovcnt && off == iov[i].iov_len) {
                i++;
                off = 0;
            }
            size_t chunk = iov[i].iov_len - off;
            if (chunk > (1u << 30))
                chunk = 1u << 30;
            int ring;
            /* MSG_MORE: the bytes wait for the next write, as TCP_CORK makes them wait */
            uint32_t n = toe_tx_put(m, (const uint8_t *)iov[i].iov_base + off, (uint32_t)chunk,
                                    !(flags & MSG_MORE), &ring);
            if (ring)
                bell(fd);
            sent += n;
            off += n;
            if (n < chunk)
                break;
        }
        if (sent == total)
            break;
        /* the ring is full: A must stop being writable until space frees */
        int w = tx_wait_space(s, fd, &nb, &e, &dead);
        if (w == TXW_STOP)
            break;
        if (w == TXW_FAIL)
            return tx_failed(s, sent, saved, dead, e, flags);
    }
    tx_settle(s, fd);
    pthread_mutex_unlock(&s->tx_lock);
    if (sent == 0)
        return fail(EAGAIN);
    errno = saved;
    return (ssize_t)sent;
}

ssize_t toe_sock_send(struct toe_sock *s, int fd, const void *buf, size_t n, int flags)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = n};
    if (n && !buf)
        return fail(EFAULT);
    return do_send(s, fd, &iov, 1, n, flags);
}

ssize_t toe_sock_sendto(struct toe_sock *s, int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *addr, socklen_t len)
{
    /* like the kernel's TCP the address is ignored, except for MSG_FASTOPEN on an
     * unconnected socket: connect, then send (the data does not ride the SYN) */
    if ((flags & MSG_FASTOPEN) && addr) {
        uint32_t st = state_of(s);
        if ((st == TOE_SS_NEW || st == TOE_SS_BOUND || st == TOE_SS_CLOSED) &&
            !(lstate_of(s) & (TOE_LS_CONNECT | TOE_LS_CONNECTED | TOE_LS_LISTEN))) {
            if (toe_sock_connect(s, fd, addr, len) < 0)
                return -1;
            if (!toe_fd_is_offloaded(fd)) /* handed over to the kernel */
                return toe_real_send(fd, buf, n, flags & ~MSG_FASTOPEN);
        }
    }
    return toe_sock_send(s, fd, buf, n, flags & ~MSG_FASTOPEN);
}

ssize_t toe_sock_writev(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt)
{
    size_t total;
    if (iov_total(iov, iovcnt, &total) < 0)
        return -1;
    return do_send(s, fd, iov, iovcnt, total, 0);
}

ssize_t toe_sock_sendmsg(struct toe_sock *s, int fd, const struct msghdr *msg, int flags)
{
    size_t total;
    if (!msg)
        return fail(EFAULT);
    if (msg->msg_iovlen > INT_MAX)
        return fail(EMSGSIZE);
    if (iov_total(msg->msg_iov, (int)msg->msg_iovlen, &total) < 0)
        return -1;
    return do_send(s, fd, msg->msg_iov, (int)msg->msg_iovlen, total, flags);
}

/* ---------------- sendfile / splice ---------------- */

#define TOE_MAX_RW_COUNT ((size_t)(INT_MAX & ~4095)) /* the kernel's MAX_RW_COUNT */

/* Where sendfile/splice bytes come from. */
struct tx_source {
    int fd;
    off64_t *pos;    /* pread at *pos (advanced by the caller), or NULL: read() */
    int is_pipe;     /* splice from a pipe: once something moved, stop when it is empty */
    int pipe_nowait; /* SPLICE_F_NONBLOCK: never wait for the pipe */
    int more;        /* SPLICE_F_MORE: like send(MSG_MORE) */
};

/* A read that never waits, for pipes: RWF_NOWAIT, else poll first. */
static ssize_t read_nowait(int fd, void *buf, size_t n)
{
    struct iovec v = {.iov_base = buf, .iov_len = n};
    ssize_t r = preadv2(fd, &v, 1, -1, RWF_NOWAIT);
    if (r >= 0 || errno != EOPNOTSUPP)
        return r;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) == 0)
        return fail(EAGAIN);
    return toe_real_read(fd, buf, n);
}

/* A write that never waits, for pipes: RWF_NOWAIT, else poll first and stay
 * within PIPE_BUF (one free slot holds that much). */
static ssize_t write_nowait(int fd, const void *buf, size_t n)
{
    struct iovec v = {.iov_base = (void *)buf, .iov_len = n};
    ssize_t r = pwritev2(fd, &v, 1, -1, RWF_NOWAIT);
    if (r >= 0 || errno != EOPNOTSUPP)
        return r;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 0) == 0)
        return fail(EAGAIN);
    return toe_real_write(fd, buf, n < PIPE_BUF ? n : PIPE_BUF);
}

/* Read up to n source bytes into dst: >0, 0 (end of the source), -1 errno. */
static ssize_t src_read(struct tx_source *src, void *dst, size_t n, size_t moved)
{
    if (src->is_pipe && (src->pipe_nowait || moved))
        return read_nowait(src->fd, dst, n);
    if (src->pos)
        return pread64(src->fd, dst, n, *src->pos);
    return toe_real_read(src->fd, dst, n);
}

/*
 * The sending half of sendfile()/splice(): read from the source straight into
 * the TX ring's free span (no bounce buffer), publish, and wait for space the
 * way send() does (O_NONBLOCK -> EAGAIN or a partial count, SO_SNDTIMEO,
 * signals, EPIPE + SIGPIPE).  Only as much is read as the ring can take, so a
 * failure never loses source bytes.
 */
static ssize_t tx_from_source(struct toe_sock *s, int fd, struct tx_source *src, size_t count)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno, nb = -1, e = 0, dead = 0, src_err = 0, src_end = 0;
    size_t sent = 0;

    if (send_ready(s, fd, 0, &nb) < 0)
        return -1;
    if (count == 0)
        return 0;
    pthread_mutex_lock(&s->tx_lock);
    for (;;) {
        while (sent < count) {
            uint32_t space = toe_tx_room(m);
            if (!space)
                break;
            uint32_t off = m->tx_tail & (m->tx_size - 1);
            size_t span = m->tx_size - off;
            if (span > space)
                span = space;
            if (span > count - sent)
                span = count - sent;
            ssize_t r = src_read(src, toe_tx_base(m) + off, span, sent);
            if (r <= 0) {
                src_end = 1;
                src_err = r < 0 ? errno : 0;
                break;
            }
            tx_commit(s, fd, (uint32_t)r, !src->more);
            sent += (size_t)r;
            if (src->pos)
                *src->pos += r;
        }
        if (src_end || sent == count)
            break;
        int w = tx_wait_space(s, fd, &nb, &e, &dead);
        if (w == TXW_STOP)
            break;
        if (w == TXW_FAIL)
            return tx_failed(s, sent, saved, dead, e, 0);
    }
    tx_settle(s, fd);
    pthread_mutex_unlock(&s->tx_lock);
    if (sent) {
        errno = saved;
        return (ssize_t)sent;
    }
    if (src_err)
        return fail(src_err); /* EAGAIN of an empty nonblocking pipe, EINTR, EIO ... */
    if (src_end) {
        errno = saved;
        return 0;             /* end of file */
    }
    return fail(EAGAIN);      /* nonblocking and the ring is full */
}

/* in_fd must be open for reading: its status flags, or -1 with errno. */
static int readable_fd(int fd)
{
    int fl = toe_real_fcntl(fd, F_GETFL, NULL);
    if (fl < 0)
        return -1;
    if ((fl & O_ACCMODE) == O_WRONLY || (fl & O_PATH))
        return fail(EBADF);
    return fl;
}

ssize_t toe_sock_sendfile(struct toe_sock *s, int out_fd, int in_fd, off64_t *offset,
                          size_t count)
{
    struct tx_source src = {.fd = in_fd};
    struct stat st;
    off64_t pos = 0;

    if (readable_fd(in_fd) < 0)
        return -1;
    if (toe_fd_is_offloaded(in_fd))
        return fail(EINVAL);
    if (fstat(in_fd, &st) < 0)
        return -1;
    if (offset && S_ISFIFO(st.st_mode))
        return fail(ESPIPE);
    if (S_ISFIFO(st.st_mode) || S_ISDIR(st.st_mode))
        return fail(EINVAL); /* like the kernel: a pipe has no splice_read */
    if (offset) {
        pos = *offset;
        if (pos < 0)
            return fail(EINVAL);
        src.pos = &pos;
    }
    if (count > TOE_MAX_RW_COUNT)
        count = TOE_MAX_RW_COUNT;
    ssize_t r = tx_from_source(s, out_fd, &src, count);
    if (offset)
        *offset = pos;
    return r;
}

ssize_t toe_sock_sendfile_in(struct toe_sock *s, int out_fd, int in_fd, off64_t *offset,
                             size_t count)
{
    (void)s;
    (void)out_fd;
    (void)in_fd;
    (void)offset;
    (void)count;
    return fail(EINVAL); /* reading an offloaded socket through sendfile: not supported */
}

#define TOE_SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE | SPLICE_F_GIFT)

ssize_t toe_sock_splice_out(struct toe_sock *s, int fd_in, loff_t *off_in, int fd_out,
                            loff_t *off_out, size_t len, unsigned int flags)
{
    struct tx_source src = {.fd = fd_in, .more = (flags & SPLICE_F_MORE) != 0};
    struct stat st;
    off64_t pos = 0;

    if (flags & ~TOE_SPLICE_FLAGS)
        return fail(EINVAL);
    if (readable_fd(fd_in) < 0)
        return -1;
    if (toe_fd_is_offloaded(fd_in))
        return fail(EINVAL); /* socket to socket: no pipe in between */
    if (fstat(fd_in, &st) < 0)
        return -1;
    if (S_ISFIFO(st.st_mode)) {
        if (off_in)
            return fail(ESPIPE);
        src.is_pipe = 1;
        src.pipe_nowait = (flags & SPLICE_F_NONBLOCK) != 0;
    } else if (S_ISDIR(st.st_mode)) {
        return fail(EINVAL);
    }
    if (off_out)
        return fail(EINVAL); /* a socket has no position */
    /* not a pipe: a file; the kernel wants a pipe on one side, we read() it */
    if (!src.is_pipe && off_in) {
        pos = *off_in;
        if (pos < 0)
            return fail(EINVAL);
        src.pos = &pos;
    }
    if (len > TOE_MAX_RW_COUNT)
        len = TOE_MAX_RW_COUNT;
    ssize_t r = tx_from_source(s, fd_out, &src, len);
    if (src.pos)
        *off_in = pos;
    return r;
}

ssize_t toe_sock_splice_in(struct toe_sock *s, int fd_in, loff_t *off_in, int fd_out,
                           loff_t *off_out, size_t len, unsigned int flags)
{
    struct toe_sock_shm *m = s->shm;
    struct stat st;
    int saved = errno;

    if (flags & ~TOE_SPLICE_FLAGS)
        return fail(EINVAL);
    int ofl = toe_real_fcntl(fd_out, F_GETFL, NULL);
    if (ofl < 0)
        return -1;
    if ((ofl & O_ACCMODE) == O_RDONLY)
        return fail(EBADF);
    if (fstat(fd_out, &st) < 0)
        return -1;
    if (!S_ISFIFO(st.st_mode))
        return fail(EINVAL); /* socket to anything but a pipe */
    if (off_out)
        return fail(ESPIPE);
    if (off_in)
        return fail(EINVAL);
    uint32_t ss = state_of(s);
    if (ss == TOE_SS_LISTEN || ss == TOE_SS_NEW || ss == TOE_SS_BOUND)
        return fail(ENOTCONN);
    if (len == 0)
        return 0;
    if (len > TOE_MAX_RW_COUNT)
        len = TOE_MAX_RW_COUNT;
    int sock_nb = nonblocking(fd_in);
    int pipe_nb = sock_nb || (flags & SPLICE_F_NONBLOCK) || (ofl & O_NONBLOCK);

    for (;;) {
        /* like the kernel: room in the pipe first, then data */
        struct pollfd p = {.fd = fd_out, .events = POLLOUT};
        int pr = poll(&p, 1, 0);
        if (pr == 0) {
            if (pipe_nb)
                return fail(EAGAIN);
            if (poll(&p, 1, -1) < 0)
                return -1; /* EINTR */
        }
        /* data or the end: recv's own waiting, errors and end of file */
        char c;
        struct iovec one = {.iov_base = &c, .iov_len = 1};
        ssize_t r = do_recv(s, fd_in, &one, 1, 1, MSG_PEEK | (sock_nb ? MSG_DONTWAIT : 0));
        if (r <= 0)
            return r;
        size_t moved = 0;
        int e = 0;
        pthread_mutex_lock(&s->rx_lock);
        uint32_t avail = toe_rx_avail(m);
        while (avail && moved < len) {
            uint32_t off = m->rx_head & (m->rx_size - 1);
            size_t span = m->rx_size - off;
            if (span > avail)
                span = avail;
            if (span > len - moved)
                span = len - moved;
            ssize_t w = write_nowait(fd_out, toe_rx_base(m) + off, span);
            if (w <= 0) {
                e = w < 0 ? errno : EAGAIN;
                break;
            }
            rx_consume(s, fd_in, (uint32_t)w);
            moved += (size_t)w;
            avail -= (uint32_t)w;
            if ((size_t)w < span)
                break; /* the pipe is full */
        }
        pthread_mutex_unlock(&s->rx_lock);
        if (moved) {
            errno = saved;
            return (ssize_t)moved;
        }
        if (e && e != EAGAIN)
            return fail(e); /* EPIPE: the pipe write raised SIGPIPE itself */
        if (e == EAGAIN && pipe_nb)
            return fail(EAGAIN);
        /* the pipe filled up, or another reader took the data: again */
    }
}

/* ---------------- recvmmsg / sendmmsg ---------------- */

#define TOE_UIO_MAXIOV 1024

static int ts_valid(const struct timespec *t)
{
    return t->tv_sec >= 0 && t->tv_nsec >= 0 && t->tv_nsec < 1000000000L;
}

/*
 * recvmsg() per entry, like the kernel's loop for a stream socket (an entry
 * at end of file gets 0 and the loop goes on).  MSG_WAITFORONE: entries after
 * the first do not wait.  The timeout is checked after each entry and the
 * time left written back, as the kernel does (it does not bound a blocking
 * wait: the kernel's documented behaviour too).  An error after the first
 * entry ends the call with the count; the kernel would report it on the next
 * call, which a stream socket reports anyway (reset, end of file).
 */
int toe_sock_recvmmsg(struct toe_sock *s, int fd, struct mmsghdr *vec, unsigned int vlen,
                      int flags, struct timespec *timeout)
{
    struct timespec end = {0, 0}, now;
    int saved = errno, f = flags & ~MSG_WAITFORONE;
    unsigned int n = 0;

    if (timeout) {
        if (!ts_valid(timeout))
            return fail(EINVAL);
        clock_gettime(CLOCK_MONOTONIC, &now);
        end.tv_sec = now.tv_sec + timeout->tv_sec;
        end.tv_nsec = now.tv_nsec + timeout->tv_nsec;
        if (end.tv_nsec >= 1000000000L) {
            end.tv_sec++;
            end.tv_nsec -= 1000000000L;
        }
    }
    if (vlen > TOE_UIO_MAXIOV)
        vlen = TOE_UIO_MAXIOV;
    if (vlen && !vec)
        return fail(EFAULT);
    while (n < vlen) {
        ssize_t r = toe_sock_recvmsg(s, fd, &vec[n].msg_hdr, f);
        if (r < 0) {
            if (n)
                break;
            return -1;
        }
        vec[n].msg_len = (unsigned int)r;
        n++;
        if (flags & MSG_WAITFORONE)
            f |= MSG_DONTWAIT;
        if (timeout) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = (long long)(end.tv_sec - now.tv_sec) * 1000000000LL +
                             (end.tv_nsec - now.tv_nsec);
            if (left < 0)
                left = 0;
            timeout->tv_sec = (time_t)(left / 1000000000LL);
            timeout->tv_nsec = (long)(left % 1000000000LL);
            if (left == 0)
                break;
        }
    }
    errno = saved;
    return (int)n;
}

/* sendmsg() per entry; an error after the first entry ends the call with the
 * count (the kernel's rule: an error only when nothing was sent). */
int toe_sock_sendmmsg(struct toe_sock *s, int fd, struct mmsghdr *vec, unsigned int vlen,
                      int flags)
{
    int saved = errno;
    unsigned int n;

    if (vlen > TOE_UIO_MAXIOV)
        vlen = TOE_UIO_MAXIOV;
    if (vlen && !vec)
        return fail(EFAULT);
    for (n = 0; n < vlen; n++) {
        ssize_t r = toe_sock_sendmsg(s, fd, &vec[n].msg_hdr, flags);
        if (r < 0) {
            if (n)
                break;
            return -1;
        }
        vec[n].msg_len = (unsigned int)r;
    }
    errno = saved;
    return (int)n;
}

/* ---------------- shutdown / names ---------------- */

int toe_sock_shutdown(struct toe_sock *s, int fd, int how)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    (void)fd;

    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
        return fail(EINVAL);
    uint32_t st = state_of(s);
    if (st == TOE_SS_NEW || st == TOE_SS_BOUND || st == TOE_SS_CLOSED)
        return fail(ENOTCONN);
    /* the local bits first: a reader woken by the daemon's shutdown of B must
     * find the socket shut whichever order the daemon publishes in */
    unsigned bits = st == TOE_SS_LISTEN ? 0
                    : (how == SHUT_RD ? 0 : TOE_LS_SHUT_WR) | (how == SHUT_WR ? 0 : TOE_LS_SHUT_RD);
    unsigned had = lstate_of(s) & bits;
    lstate_set(s, bits);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_SHUTDOWN;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = how;
    int r = toe_ctl_call(&cmd, NULL, 0, &rsp);
    if (r == 0 && rsp.result < 0) {
        lstate_clear(s, bits & ~had);
        return fail(-rsp.result);
    }
    if (r < 0) /* the daemon cannot be reached: no FIN will go out, say so */
        return fail(EIO);
    return 0;
}

int toe_sock_getsockname(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len)
{
    (void)fd;
    struct toe_sock_shm *m = s->shm;
    return put_sockaddr(addr, len, LOAD(&m->local_addr_be32), LOAD(&m->local_port_be16));
}

int toe_sock_getpeername(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len)
{
    (void)fd;
    struct toe_sock_shm *m = s->shm;
    if (state_of(s) != TOE_SS_CONNECTED)
        return fail(ENOTCONN);
    return put_sockaddr(addr, len, LOAD(&m->remote_addr_be32), LOAD(&m->remote_port_be16));
}

/* ---------------- socket options ---------------- */

/* Copy an option value out like the kernel: truncated to *len, *len set to
 * what was copied. */
static int opt_out(void *val, socklen_t *len, const void *v, size_t vlen)
{
    if (!len)
        return fail(EFAULT);
    int l = (int)*len;
    if (l < 0)
        return fail(EINVAL);
    size_t n = (size_t)l < vlen ? (size_t)l : vlen;
    if (n && !val)
        return fail(EFAULT);
    memcpy(val, v, n);
    *len = (socklen_t)n;
    return 0;
}

static int opt_int(void *val, socklen_t *len, int v)
{
    return opt_out(val, len, &v, sizeof(v));
}

static void record_opt(struct toe_sock *s, int level, int name, const void *val, socklen_t len)
{
    if (len > TOE_OPT_VAL_MAX || (len && !val)) {
        TOE_DBG("setsockopt %d/%d: %u bytes, not recorded for handover", level, name, len);
        return;
    }
    pthread_mutex_lock(&s->opt_lock);
    unsigned i;
    for (i = 0; i < s->nopts; i++)
        if (s->opts[i].level == level && s->opts[i].name == name)
            break;
    if (i == s->nopts) {
        if (s->nopts == TOE_MAX_OPTS) {
            pthread_mutex_unlock(&s->opt_lock);
            TOE_DBG("setsockopt %d/%d: replay list full", level, name);
            return;
        }
        s->nopts++;
    }
    s->opts[i].level = level;
    s->opts[i].name = name;
    s->opts[i].len = len;
    if (len)
        memcpy(s->opts[i].val, val, len);
    pthread_mutex_unlock(&s->opt_lock);
}

/* A recorded value for an option we do not model: 1 and copied out, or 0. */
static int recorded_opt(struct toe_sock *s, int level, int name, void *val, socklen_t *len,
                        int *rc)
{
    struct toe_opt o;
    int found = 0;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        if (s->opts[i].level == level && s->opts[i].name == name) {
            o = s->opts[i];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&s->opt_lock);
    if (found)
        *rc = opt_out(val, len, o.val, o.len);
    return found;
}

static void notify_opt(struct toe_sock *s, int level, int name, const void *val, socklen_t len)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_SETSOCKOPT;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = level;
    cmd.arg1 = name;
    cmd.optlen = (uint16_t)(len < TOE_OPT_BYTES ? len : TOE_OPT_BYTES);
    memcpy(cmd.opt, val, cmd.optlen);
    toe_ctl_call(&cmd, NULL, 0, &rsp); /* the option is recorded either way */
}

/* SO_SNDBUF or TCP_NOTSENT_LOWAT changed: A's writability follows at once.
 * Unwritable now: stuff A; writable: the daemon drains a stuffed A (told). */
static void tx_limits_changed(struct toe_sock *s, int fd, int level, int name, const void *val,
                              socklen_t len)
{
    if (state_of(s) != TOE_SS_CONNECTED)
        return; /* not writable before connect; the connect's completion drains A */
    pthread_mutex_lock(&s->tx_lock);
    tx_settle(s, fd);
    pthread_mutex_unlock(&s->tx_lock);
    notify_opt(s, level, name, val, len);
}

static void set_flag(struct toe_sock *s, uint32_t bit, int on)
{
    if (on)
        __atomic_or_fetch(&s->shm->opt_flags, bit, __ATOMIC_SEQ_CST);
    else
        __atomic_and_fetch(&s->shm->opt_flags, ~bit, __ATOMIC_SEQ_CST);
}

static int has_flag(struct toe_sock *s, uint32_t bit)
{
    return (LOAD(&s->shm->opt_flags) & bit) != 0;
}

/* Field `field` (0-based) of a numeric sysctl, read once into *cache. */
static uint32_t sysctl_field(const char *path, int field, uint32_t *cache, uint32_t dflt)
{
    uint32_t v = __atomic_load_n(cache, __ATOMIC_RELAXED);
    if (v)
        return v;
    v = dflt;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buf[64];
        ssize_t n = toe_real_read(fd, buf, sizeof(buf) - 1);
        if (n > 0) {
            unsigned long x[3] = {0, 0, 0};
            buf[n] = 0;
            if (sscanf(buf, "%lu %lu %lu", &x[0], &x[1], &x[2]) > field && x[field] > 0 &&
                x[field] <= INT_MAX)
                v = (uint32_t)x[field];
        }
        toe_real_close(fd);
    }
    __atomic_store_n(cache, v, __ATOMIC_RELAXED);
    return v;
}

/* net.core.wmem_max / rmem_max ... read once (the kernel's SO_*BUF ceiling). */
static uint32_t sysctl_u32(const char *path, uint32_t *cache, uint32_t dflt)
{
    return sysctl_field(path, 0, cache, dflt);
}

static uint32_t buf_size(int v, int force, const char *sysctl, uint32_t *cache, uint32_t floor)
{
    uint32_t max = sysctl_u32(sysctl, cache, 212992);
    uint32_t u = v < 0 ? 0 : (uint32_t)v;
    if (!force && u > max)
        u = max;
    if (u > INT_MAX / 2)
        u = INT_MAX / 2;
    u *= 2;
    return u < floor ? floor : u;
}

static int is_timeo(int level, int name)
{
    if (level != SOL_SOCKET)
        return 0;
    if (name == SO_RCVTIMEO || name == SO_SNDTIMEO)
        return 1;
#ifdef SO_RCVTIMEO_NEW
    if (name == SO_RCVTIMEO_NEW || name == SO_SNDTIMEO_NEW)
        return 1;
#endif
    return 0;
}

/*
 * Options the adapter does not act on but the shim accepts and records (and
 * replays on handover).  For the int-valued ones the kernel's checks are
 * applied on set, and get answers what the kernel would answer for the
 * recorded value (normalised: booleans, clamps, unit round trips), with the
 * kernel's length rules.
 */
enum { KO_NO, KO_INT, KO_BOOL };

static int known_opt(int level, int name)
{
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_DEBUG:
        case SO_DONTROUTE:
        case SO_BROADCAST:
        case SO_OOBINLINE:
        case SO_NO_CHECK:
        case SO_TIMESTAMP:
        case SO_TIMESTAMPNS:
        case SO_RXQ_OVFL:
        case SO_SELECT_ERR_QUEUE:
        case SO_ZEROCOPY:
            return KO_BOOL;
        case SO_PRIORITY:
        case SO_MARK:
        case SO_RCVLOWAT:
        case SO_SNDLOWAT:
        case SO_BUSY_POLL:
        case SO_INCOMING_CPU:
            return KO_INT;
        default:
            return KO_NO;
        }
    }
    if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_QUICKACK:
            return KO_BOOL;
        case TCP_USER_TIMEOUT:
        case TCP_SYNCNT:
        case TCP_LINGER2:
        case TCP_DEFER_ACCEPT:
        case TCP_WINDOW_CLAMP:
        case TCP_NOTSENT_LOWAT:
        case TCP_THIN_LINEAR_TIMEOUTS:
        case TCP_FASTOPEN:
        case TCP_FASTOPEN_CONNECT:
        case TCP_INQ:
        case TCP_TX_DELAY:
            return KO_INT;
        default:
            return KO_NO;
        }
    }
    if (level == IPPROTO_IP) {
        switch (name) {
        case IP_TOS:
        case IP_TTL:
        case IP_MTU_DISCOVER:
        case IP_MINTTL:
            return KO_INT;
        case IP_RECVERR:
        case IP_RECVTOS:
        case IP_RECVTTL:
        case IP_PKTINFO:
        case IP_RECVOPTS:
        case IP_RETOPTS:
        case IP_FREEBIND:
        case IP_TRANSPARENT:
        case IP_BIND_ADDRESS_NO_PORT:
        case IP_PASSSEC:
        case IP_RECVORIGDSTADDR:
        case IP_MULTICAST_LOOP:
        case IP_MULTICAST_ALL:
        case IP_RECVERR_RFC4884:
            return KO_BOOL;
        default:
            return KO_NO;
        }
    }
    return KO_NO;
}

/* Linux 6.16 restricted SO_PASSCRED to AF_UNIX/AF_NETLINK (EOPNOTSUPP on TCP). */
static int passcred_refused(void)
{
    static int cached; /* 0 unknown, 1 refused, 2 accepted */
    int c = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (!c) {
        struct utsname u;
        int major = 0, minor = 0;
        c = 2;
        if (uname(&u) == 0 && sscanf(u.release, "%d.%d", &major, &minor) == 2 &&
            (major > 6 || (major == 6 && minor >= 16)))
            c = 1;
        __atomic_store_n(&cached, c, __ATOMIC_RELAXED);
    }
    return c == 1;
}

/* The int an option value carries, read like the kernel: IPPROTO_IP takes an
 * int, a single byte, or nothing (0); the other levels need an int. */
static int opt_parse_int(int level, const void *val, socklen_t len, int *v)
{
    if (len >= sizeof(int)) {
        memcpy(v, val, sizeof(int));
        return 0;
    }
    if (level == IPPROTO_IP) {
        *v = len >= 1 ? *(const unsigned char *)val : 0;
        return 0;
    }
    return fail(EINVAL);
}

/* CAP_NET_ADMIN or CAP_NET_RAW in the effective set (the kernel's test for
 * SO_PRIORITY > 6, SO_MARK, IP_TRANSPARENT). */
static int net_capable(void)
{
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct d[2];
    int saved = errno;
    memset(d, 0, sizeof(d));
    long r = syscall(SYS_capget, &h, d);
    errno = saved;
    if (r < 0)
        return geteuid() == 0;
    return (d[0].effective & ((1u << CAP_NET_ADMIN) | (1u << CAP_NET_RAW))) != 0;
}

/* The kernel's set-time checks.  0, or -1 with errno. */
static int known_opt_check(struct toe_sock *s, int level, int name, int v, socklen_t len)
{
    uint32_t st = state_of(s);
    int closed = st == TOE_SS_NEW || st == TOE_SS_BOUND || st == TOE_SS_CLOSED; /* TCP_CLOSE */
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_PRIORITY:
            return ((v >= 0 && v <= 6) || net_capable()) ? 0 : fail(EPERM);
        case SO_MARK:
            return net_capable() ? 0 : fail(EPERM);
        case SO_SNDLOWAT:
            return fail(ENOPROTOOPT); /* not changeable on Linux */
        case SO_BUSY_POLL:
            return v < 0 ? fail(EINVAL) : 0;
        case SO_ZEROCOPY:
            return (v < 0 || v > 1) ? fail(EINVAL) : 0;
        default:
            return 0;
        }
    }
    if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_USER_TIMEOUT:
            return v < 0 ? fail(EINVAL) : 0;
        case TCP_SYNCNT:
            return (v < 1 || v > 127) ? fail(EINVAL) : 0;
        case TCP_THIN_LINEAR_TIMEOUTS:
        case TCP_INQ:
            return (v < 0 || v > 1) ? fail(EINVAL) : 0;
        case TCP_FASTOPEN:
            return (v >= 0 && (closed || st == TOE_SS_LISTEN)) ? 0 : fail(EINVAL);
        case TCP_FASTOPEN_CONNECT:
            return (v < 0 || v > 1 || !closed) ? fail(EINVAL) : 0;
        case TCP_WINDOW_CLAMP:
            return (v == 0 && !closed) ? fail(EINVAL) : 0;
        default:
            return 0;
        }
    }
    if (level == IPPROTO_IP) {
        switch (name) {
        case IP_TTL:
            return (len < 1 || (v != -1 && (v < 1 || v > 255))) ? fail(EINVAL) : 0;
        case IP_MINTTL:
            return (len < 1 || v < 0 || v > 255) ? fail(EINVAL) : 0;
        case IP_MTU_DISCOVER:
            return (v < IP_PMTUDISC_DONT || v > IP_PMTUDISC_OMIT) ? fail(EINVAL) : 0;
        case IP_TRANSPARENT:
            if (v && !net_capable())
                return fail(EPERM);
            return len < 1 ? fail(EINVAL) : 0;
        case IP_MULTICAST_LOOP:
            return len < 1 ? fail(EINVAL) : 0;
        case IP_MULTICAST_ALL:
            return (len < 1 || (v != 0 && v != 1)) ? fail(EINVAL) : 0;
        case IP_RECVERR_RFC4884:
            return (v < 0 || v > 1) ? fail(EINVAL) : 0;
        default:
            return 0;
        }
    }
    return 0;
}

/* The recorded value of (level, name), or 0 when the application set none. */
static int find_opt(struct toe_sock *s, int level, int name, struct toe_opt *o)
{
    int found = 0;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        if (s->opts[i].level == level && s->opts[i].name == name) {
            *o = s->opts[i];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&s->opt_lock);
    return found;
}

/* TCP_DEFER_ACCEPT is kept as SYN-ACK retransmissions: seconds -> count -> seconds. */
static int defer_accept_round_trip(int seconds)
{
    int timeout = 1, rto_max = 120, res = 0, period;
    if (seconds > 0) {
        period = timeout;
        res = 1;
        while (seconds > period && res < 255) {
            res++;
            timeout <<= 1;
            if (timeout > rto_max)
                timeout = rto_max;
            period += timeout;
        }
    }
    timeout = 1;
    period = 0;
    if (res > 0) {
        period = timeout;
        while (--res) {
            timeout <<= 1;
            if (timeout > rto_max)
                timeout = rto_max;
            period += timeout;
        }
    }
    return period;
}

/* What getsockopt reports for a known option: the recorded value as the
 * kernel stores it (have), else the kernel's default. */
static int known_opt_value(struct toe_sock *s, int level, int name, int have, int v)
{
    static uint32_t syn_retries, fin_timeout, somaxconn, ttl;
    if (!have) {
        if (level == SOL_SOCKET)
            return name == SO_RCVLOWAT || name == SO_SNDLOWAT ? 1
                   : name == SO_INCOMING_CPU                  ? -1
                                                              : 0;
        if (level == IPPROTO_TCP) {
            switch (name) {
            case TCP_QUICKACK:
                return 1;
            case TCP_SYNCNT:
                return (int)sysctl_u32("/proc/sys/net/ipv4/tcp_syn_retries", &syn_retries, 6);
            case TCP_LINGER2:
                return (int)sysctl_u32("/proc/sys/net/ipv4/tcp_fin_timeout", &fin_timeout, 60);
            default:
                return 0;
            }
        }
        switch (name) { /* IPPROTO_IP */
        case IP_TTL:
            return (int)sysctl_u32("/proc/sys/net/ipv4/ip_default_ttl", &ttl, 64);
        case IP_MTU_DISCOVER:
            return IP_PMTUDISC_WANT;
        case IP_MULTICAST_LOOP:
        case IP_MULTICAST_ALL:
            return 1;
        default:
            return 0;
        }
    }
    if (known_opt(level, name) == KO_BOOL)
        return v != 0;
    if (level == SOL_SOCKET && name == SO_RCVLOWAT) {
        /* tcp_set_rcvlowat(): negative is INT_MAX, capped at half the receive buffer
         * the application set, else at half of tcp_rmem's maximum; 0 is 1 */
        static uint32_t rmem_max3;
        struct toe_opt o;
        int user = find_opt(s, SOL_SOCKET, SO_RCVBUF, &o) ||
                   find_opt(s, SOL_SOCKET, SO_RCVBUFFORCE, &o);
        int cap = user ? (int)(LOAD(&s->shm->rcvbuf) >> 1)
                       : (int)(sysctl_field("/proc/sys/net/ipv4/tcp_rmem", 2, &rmem_max3,
                                            6291456) >> 1);
        if (v < 0)
            v = INT_MAX;
        if (cap > 0 && v > cap)
            v = cap;
        return v ? v : 1;
    }
    if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_LINGER2:
            if (v < 0)
                return -1;
            if (v == 0)
                return (int)sysctl_u32("/proc/sys/net/ipv4/tcp_fin_timeout", &fin_timeout, 60);
            return v > 120 ? 120 : v; /* TCP_FIN_TIMEOUT_MAX */
        case TCP_DEFER_ACCEPT:
            return defer_accept_round_trip(v);
        case TCP_WINDOW_CLAMP:
            return v == 0 ? 0 : v < TOE_MIN_RCVBUF / 2 ? TOE_MIN_RCVBUF / 2 : v;
        case TCP_FASTOPEN: {
            int max = (int)sysctl_u32("/proc/sys/net/core/somaxconn", &somaxconn, 4096);
            return v > max ? max : v;
        }
        default:
            return v;
        }
    }
    if (level == IPPROTO_IP) {
        switch (name) {
        case IP_TOS:
            return (uint8_t)(v & ~3); /* a stream socket keeps the ECN bits for itself */
        case IP_TTL:
            return v < 0 ? (int)sysctl_u32("/proc/sys/net/ipv4/ip_default_ttl", &ttl, 64) : v;
        default:
            return v;
        }
    }
    return v;
}

/* An int option value out with the level's length rule: IPPROTO_IP answers a
 * single byte to a short buffer when the value fits; the others truncate. */
static int opt_int_level(int level, void *val, socklen_t *len, int v)
{
    if (level == IPPROTO_IP && *len > 0 && *len < sizeof(int) && v >= 0 && v <= 255) {
        unsigned char c = (unsigned char)v;
        return opt_out(val, len, &c, 1);
    }
    return opt_int(val, len, v);
}

static int known_opt_get(struct toe_sock *s, int level, int name, void *val, socklen_t *len)
{
    struct toe_opt o;
    int v = 0, have = find_opt(s, level, name, &o);
    if (have && opt_parse_int(level, o.val, o.len, &v) < 0)
        have = 0;
    return opt_int_level(level, val, len, known_opt_value(s, level, name, have, v));
}

#define TOE_CA_NAME_MAX 16

/* TCP_CONGESTION: a name the kernel knows (tcp_available_congestion_control). */
static int set_congestion(struct toe_sock *s, const void *val, socklen_t len)
{
    char name[TOE_CA_NAME_MAX], avail[512];
    if (len < 1)
        return fail(EINVAL);
    size_t n = len < TOE_CA_NAME_MAX - 1 ? len : TOE_CA_NAME_MAX - 1;
    memcpy(name, val, n);
    name[n] = 0;
    n = strlen(name);
    int fd = open("/proc/sys/net/ipv4/tcp_available_congestion_control", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t r = toe_real_read(fd, avail, sizeof(avail) - 1);
        toe_real_close(fd);
        int ok = 0;
        if (r > 0) {
            avail[r] = 0;
            char *save, *w = strtok_r(avail, " \t\n", &save);
            for (; w; w = strtok_r(NULL, " \t\n", &save))
                if (strcmp(w, name) == 0)
                    ok = 1;
        }
        if (!ok && r > 0)
            return fail(ENOENT);
    }
    record_opt(s, IPPROTO_TCP, TCP_CONGESTION, name, (socklen_t)n);
    return 0;
}

int toe_sock_setsockopt(struct toe_sock *s, int fd, int level, int name, const void *val,
                        socklen_t len)
{
    static uint32_t wmem_max, rmem_max;
    struct toe_sock_shm *m = s->shm;
    int saved = errno, v = 0, notify = 0;

    if (len && !val)
        return fail(EFAULT);
    if ((int)len < 0)
        return fail(EINVAL);
    if (is_timeo(level, name)) {
        /* the timeouts live on A: the kernel applies them to our waits */
        if (toe_real_setsockopt(fd, level, name, val, len) < 0)
            return -1;
        record_opt(s, level, name, val, len);
        errno = saved;
        return 0;
    }
    if (level == IPPROTO_TCP && name == TCP_CONGESTION) {
        if (set_congestion(s, val, len) < 0)
            return -1;
        errno = saved;
        return 0;
    }
    if (known_opt(level, name) != KO_NO) {
        if (opt_parse_int(level, val, len, &v) < 0 || known_opt_check(s, level, name, v, len) < 0)
            return -1;
        record_opt(s, level, name, val, len < sizeof(int) ? len : sizeof(int));
        if (level == IPPROTO_TCP && name == TCP_NOTSENT_LOWAT) {
            /* tcp(7): unsent bytes above it make the socket unwritable; 0 is the
             * sysctl's default, which is "no limit" */
            __atomic_store_n(&m->notsent_lowat, (uint32_t)v, __ATOMIC_RELEASE);
            tx_limits_changed(s, fd, level, name, val, len);
        }
        errno = saved;
        return 0;
    }
    int is_int = (level == SOL_SOCKET &&
                  (name == SO_SNDBUF || name == SO_RCVBUF || name == SO_SNDBUFFORCE ||
                   name == SO_RCVBUFFORCE || name == SO_KEEPALIVE || name == SO_REUSEADDR ||
                   name == SO_REUSEPORT)) ||
                 (level == IPPROTO_TCP &&
                  (name == TCP_NODELAY || name == TCP_CORK || name == TCP_KEEPIDLE ||
                   name == TCP_KEEPINTVL || name == TCP_KEEPCNT || name == TCP_MAXSEG));
    if (level == SOL_SOCKET && (name == SO_ERROR || name == SO_TYPE || name == SO_PROTOCOL ||
                                name == SO_DOMAIN || name == SO_ACCEPTCONN))
        return fail(ENOPROTOOPT);
    if (level == SOL_SOCKET && name == SO_PASSCRED && passcred_refused())
        return fail(EOPNOTSUPP);
    if (level == SOL_SOCKET && name == SO_LINGER && len < sizeof(struct linger))
        return fail(EINVAL);
    if (is_int) {
        if (len < sizeof(int))
            return fail(EINVAL);
        memcpy(&v, val, sizeof(v));
    }

    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_SNDBUF:
        case SO_SNDBUFFORCE:
            /* the doubled value getsockopt reports bounds the bytes queued (toe_tx_room);
             * A's own buffer stays minimal */
            __atomic_store_n(&m->sndbuf,
                             buf_size(v, name == SO_SNDBUFFORCE, "/proc/sys/net/core/wmem_max",
                                      &wmem_max, TOE_MIN_SNDBUF),
                             __ATOMIC_RELEASE);
            record_opt(s, level, name, val, len);
            tx_limits_changed(s, fd, level, name, val, len);
            errno = saved;
            return 0;
        case SO_RCVBUF:
        case SO_RCVBUFFORCE:
            __atomic_store_n(&m->rcvbuf,
                             buf_size(v, name == SO_RCVBUFFORCE, "/proc/sys/net/core/rmem_max",
                                      &rmem_max, TOE_MIN_RCVBUF),
                             __ATOMIC_RELEASE);
            break;
        case SO_KEEPALIVE:
            set_flag(s, TOE_OF_KEEPALIVE, v != 0);
            notify = 1;
            break;
        case SO_REUSEADDR:
            set_flag(s, TOE_OF_REUSEADDR, v != 0);
            break;
        case SO_REUSEPORT:
            set_flag(s, TOE_OF_REUSEPORT, v != 0);
            break;
        case SO_LINGER: {
            struct linger l;
            memcpy(&l, val, sizeof(l));
            __atomic_store_n(&m->linger_s, l.l_linger, __ATOMIC_RELEASE);
            set_flag(s, TOE_OF_LINGER, l.l_onoff != 0);
            notify = 1;
            break;
        }
        default:
            break;
        }
    } else if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_NODELAY:
            set_flag(s, TOE_OF_NODELAY, v != 0);
            notify = 1;
            break;
        case TCP_CORK:
            set_flag(s, TOE_OF_CORK, v != 0);
            notify = 1;
            break;
        case TCP_KEEPIDLE:
        case TCP_KEEPINTVL:
            if (v < 1 || v > 32767)
                return fail(EINVAL);
            __atomic_store_n(name == TCP_KEEPIDLE ? &m->keepidle_s : &m->keepintvl_s, (uint32_t)v,
                             __ATOMIC_RELEASE);
            notify = 1;
            break;
        case TCP_KEEPCNT:
            if (v < 1 || v > 127)
                return fail(EINVAL);
            __atomic_store_n(&m->keepcnt, (uint32_t)v, __ATOMIC_RELEASE);
            notify = 1;
            break;
        case TCP_MAXSEG:
            if (v != 0 && (v < TOE_MIN_MSS || v > 65535))
                return fail(EINVAL);
            __atomic_store_n(&m->user_mss, (uint32_t)v, __ATOMIC_RELEASE);
            break;
        default:
            break;
        }
    }
    /* everything else is accepted and only recorded: never break the program */
    record_opt(s, level, name, val, len);
    if (notify)
        notify_opt(s, level, name, val, len);
    errno = saved;
    return 0;
}

/* The kernel's TCP state numbers (tcpi_state). */
static uint8_t tcpi_state_of(struct toe_sock *s)
{
    uint32_t fl = flags_of(s);
    switch (state_of(s)) {
    case TOE_SS_LISTEN:
        return TCP_LISTEN;
    case TOE_SS_CONNECTING:
        return TCP_SYN_SENT;
    case TOE_SS_CONNECTED:
        if ((fl & TOE_SF_TX_SHUT) && (fl & TOE_SF_RX_EOF))
            return TCP_LAST_ACK;
        if (fl & TOE_SF_TX_SHUT)
            return TCP_FIN_WAIT1;
        if (fl & TOE_SF_RX_EOF)
            return TCP_CLOSE_WAIT;
        return TCP_ESTABLISHED;
    default:
        return TCP_CLOSE;
    }
}

int toe_sock_getsockopt(struct toe_sock *s, int fd, int level, int name, void *val,
                        socklen_t *len)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno, rc;

    if (!len)
        return fail(EFAULT);
    if ((int)*len < 0)
        return fail(EINVAL);
    if (is_timeo(level, name))
        return toe_real_getsockopt(fd, level, name, val, len);
    if (known_opt(level, name) != KO_NO) {
        rc = known_opt_get(s, level, name, val, len);
        goto out;
    }

    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_COOKIE:
            /* A's: unique for the socket's life, the one the daemon knows */
            return toe_real_getsockopt(fd, level, name, val, len);
        case SO_PASSCRED:
            if (passcred_refused())
                return fail(EOPNOTSUPP);
            break;
        case SO_PEERCRED: {
            /* a TCP socket has no peer credentials: pid 0, uid/gid -1 */
            struct ucred uc = {.pid = 0, .uid = (uid_t)-1, .gid = (gid_t)-1};
            rc = opt_out(val, len, &uc, sizeof(uc));
            goto out;
        }
        case SO_ERROR:
            rc = opt_int(val, len, take_so_error(s));
            goto out;
        case SO_TYPE:
            rc = opt_int(val, len, SOCK_STREAM);
            goto out;
        case SO_DOMAIN:
            rc = opt_int(val, len, AF_INET);
            goto out;
        case SO_PROTOCOL:
            rc = opt_int(val, len, IPPROTO_TCP);
            goto out;
        case SO_ACCEPTCONN:
            rc = opt_int(val, len, state_of(s) == TOE_SS_LISTEN);
            goto out;
        case SO_SNDBUF:
            rc = opt_int(val, len, (int)LOAD(&m->sndbuf));
            goto out;
        case SO_RCVBUF:
            rc = opt_int(val, len, (int)LOAD(&m->rcvbuf));
            goto out;
        case SO_KEEPALIVE:
            rc = opt_int(val, len, has_flag(s, TOE_OF_KEEPALIVE));
            goto out;
        case SO_REUSEADDR:
            rc = opt_int(val, len, has_flag(s, TOE_OF_REUSEADDR));
            goto out;
        case SO_REUSEPORT:
            rc = opt_int(val, len, has_flag(s, TOE_OF_REUSEPORT));
            goto out;
        case SO_LINGER: {
            struct linger l = {.l_onoff = has_flag(s, TOE_OF_LINGER), .l_linger = LOAD(&m->linger_s)};
            rc = opt_out(val, len, &l, sizeof(l));
            goto out;
        }
        default:
            break;
        }
    } else if (level == IPPROTO_TCP) {
        switch (name) {
        case TCP_NODELAY:
            rc = opt_int(val, len, has_flag(s, TOE_OF_NODELAY));
            goto out;
        case TCP_CORK:
            rc = opt_int(val, len, has_flag(s, TOE_OF_CORK));
            goto out;
        case TCP_MAXSEG: {
            uint32_t mss = state_of(s) == TOE_SS_CONNECTED ? LOAD(&m->mss) : 0;
            if (!mss)
                mss = LOAD(&m->user_mss);
            rc = opt_int(val, len, mss ? (int)mss : TOE_DEFAULT_MSS);
            goto out;
        }
        case TCP_KEEPIDLE: {
            uint32_t x = LOAD(&m->keepidle_s);
            rc = opt_int(val, len, x ? (int)x : 7200);
            goto out;
        }
        case TCP_KEEPINTVL: {
            uint32_t x = LOAD(&m->keepintvl_s);
            rc = opt_int(val, len, x ? (int)x : 75);
            goto out;
        }
        case TCP_KEEPCNT: {
            uint32_t x = LOAD(&m->keepcnt);
            rc = opt_int(val, len, x ? (int)x : 9);
            goto out;
        }
        case TCP_INFO: {
            struct tcp_info ti;
            uint32_t mss = LOAD(&m->mss);
            memset(&ti, 0, sizeof(ti));
            ti.tcpi_state = tcpi_state_of(s);
            ti.tcpi_snd_mss = mss ? mss : TOE_DEFAULT_MSS;
            ti.tcpi_rcv_mss = ti.tcpi_snd_mss;
            ti.tcpi_total_retrans = (uint32_t)LOAD(&m->retransmits);
            rc = opt_out(val, len, &ti, sizeof(ti));
            goto out;
        }
        case TCP_CONGESTION: {
            /* the kernel copies its 16-byte name field, NUL padded */
            char name16[TOE_CA_NAME_MAX] = "reno";
            struct toe_opt o;
            if (find_opt(s, level, name, &o)) {
                memset(name16, 0, sizeof(name16));
                memcpy(name16, o.val, o.len < TOE_CA_NAME_MAX - 1 ? o.len : TOE_CA_NAME_MAX - 1);
            }
            rc = opt_out(val, len, name16, sizeof(name16));
            goto out;
        }
        default:
            break;
        }
    }

    /* not modelled: what the application set, else the kernel's default */
    if (recorded_opt(s, level, name, val, len, &rc))
        goto out;
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_PEEK_OFF:
            rc = opt_int(val, len, -1);
            goto out;
        case SO_PASSCRED: /* before Linux 6.16 */
            rc = opt_int(val, len, 0);
            goto out;
        case SO_BINDTODEVICE: /* not bound to a device: an empty name */
            *len = 0;
            rc = 0;
            goto out;
        default:
            return fail(ENOPROTOOPT);
        }
    }
    if (level == IPPROTO_TCP || level == IPPROTO_IP)
        return fail(ENOPROTOOPT);
    return fail(EOPNOTSUPP);

out:
    if (rc == 0)
        errno = saved;
    return rc;
}

/* ---------------- fcntl / ioctl / dup / close ---------------- */

int toe_sock_fcntl(struct toe_sock *s, int fd, int cmd, void *arg, int is64)
{
    /* status and descriptor flags live on A: everything goes to A */
    int r = is64 ? toe_real_fcntl64(fd, cmd, arg) : toe_real_fcntl(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && toe_fd_install(r, s) < 0) {
        toe_real_close(r);
        return fail(EMFILE);
    }
    return r;
}

int toe_sock_ioctl(struct toe_sock *s, int fd, unsigned long req, void *arg)
{
    struct toe_sock_shm *m = s->shm;
    int v;

    switch (req) {
    case FIONREAD:    /* SIOCINQ */
    case TIOCOUTQ:    /* SIOCOUTQ */
    case SIOCOUTQNSD:
        if (state_of(s) == TOE_SS_LISTEN)
            return fail(EINVAL);
        if (req == FIONREAD)
            v = (int)toe_rx_avail(m);
        else
            v = (int)(s->shm->tx_tail - LOAD(&m->tx_head));
        break;
    case SIOCATMARK:
        v = 0;
        break;
    default:
        /* FIONBIO, FIOASYNC, FIOCLEX ...: A's business */
        return toe_real_ioctl(fd, req, arg);
    }
    if (!arg)
        return fail(EFAULT);
    memcpy(arg, &v, sizeof(v));
    return 0;
}

int toe_sock_dup(struct toe_sock *s, int fd)
{
    int r = toe_real_dup(fd);
    if (r >= 0 && toe_fd_install(r, s) < 0) {
        toe_real_close(r);
        return fail(EMFILE);
    }
    return r;
}

int toe_sock_close(int fd)
{
    /* lifetime is A's: no command, the daemon sees B's EOF after the last close */
    toe_fd_remove(fd);
    return toe_real_close(fd);
}

/* ---------------- adoption: offloaded sockets inherited across exec ---------------- */

/* Process-local state of an adopted socket, rebuilt from the shared header. */
static unsigned lstate_from_shm(struct toe_sock_shm *m)
{
    uint32_t fl = LOAD(&m->flags);
    unsigned ls = 0;
    switch (LOAD(&m->state)) {
    case TOE_SS_BOUND:
        ls = TOE_LS_BOUND;
        break;
    case TOE_SS_LISTEN:
        ls = TOE_LS_BOUND | TOE_LS_LISTEN;
        break;
    case TOE_SS_CONNECTING:
        ls = TOE_LS_CONNECT;
        break;
    case TOE_SS_CONNECTED:
        ls = TOE_LS_CONNECTED;
        break;
    default:
        break;
    }
    if (fl & TOE_SF_TX_SHUT)
        ls |= TOE_LS_SHUT_WR;
    if (fl & TOE_SF_RX_SHUT)
        ls |= TOE_LS_SHUT_RD;
    return ls;
}

static int ring_size_ok(uint32_t n)
{
    return n >= 4096 && n <= (1u << 30) && (n & (n - 1)) == 0;
}

int toe_sock_adopt_fd(int fd)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    struct stat st;
    int saved = errno, v = 0, mfd = -1, nr = 1;
    socklen_t l = sizeof(v);

    if (fd < 0 || toe_fd_is_offloaded(fd) || toe_ctl_is_channel(fd))
        goto no;
    if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode))
        goto no;
    if (toe_real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &l) < 0 || v != AF_UNIX)
        goto no;
    l = sizeof(v);
    if (toe_real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) < 0 || v != SOCK_STREAM)
        goto no;
    uint64_t cookie = sock_cookie(fd);
    if (!cookie || !toe_fd_fits(fd))
        goto no;
    struct toe_sock *s = toe_fd_find_cookie(cookie);
    if (s) {
        /* another fd of this process is the same socket already (a dup, or received twice) */
        int r = toe_fd_install(fd, s);
        toe_sock_put(s);
        errno = saved;
        return r == 0;
    }
    if (!toe_ctl_up_quiet())
        goto no;
    /* possession is the proof: the daemon reads the cookie of the A end passed */
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_ADOPT;
    if (toe_ctl_call_rfds(&cmd, &fd, 1, &rsp, &mfd, &nr) < 0 || nr != 1)
        goto no;
    if (rsp.result < 0 || !ring_size_ok(rsp.tx_ring_bytes) || !ring_size_ok(rsp.rx_ring_bytes)) {
        toe_real_close(mfd);
        goto no;
    }
    size_t len = TOE_SHM_HDR_SIZE + (size_t)rsp.tx_ring_bytes + rsp.rx_ring_bytes;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    toe_real_close(mfd);
    if (p == MAP_FAILED)
        goto no;
    struct toe_sock_shm *m = p;
    if (m->magic != TOE_SHM_MAGIC || m->abi_version != TOE_ABI_VERSION ||
        m->tx_size != rsp.tx_ring_bytes || m->rx_size != rsp.rx_ring_bytes) {
        TOE_DBG("adopt fd %d: the daemon's mapping does not match its answer", fd);
        munmap(p, len);
        goto no;
    }
    s = toe_sock_alloc();
    if (!s) {
        munmap(p, len);
        goto no;
    }
    s->shm = m;
    s->map_len = len;
    s->sock_id = rsp.sock_id;
    s->cookie = cookie;
    s->lstate = lstate_from_shm(m);
    /* a bound socket's bind is replayed on handover: the port, any address */
    s->bound.sin_family = AF_INET;
    s->bound.sin_port = LOAD(&m->local_port_be16);
    s->bound.sin_addr.s_addr = htonl(INADDR_ANY);
    if (toe_fd_install(fd, s) < 0) {
        toe_sock_put(s);
        goto no;
    }
    toe_sock_put(s);
    TOE_DBG("adopted fd %d -> sock %u (state %u)", fd, rsp.sock_id, LOAD(&m->state));
    errno = saved;
    return 1;

no:
    errno = saved;
    return 0;
}

void toe_sock_adopt_inherited(void)
{
    int saved = errno;
    int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return;
    char buf[4096] __attribute__((aligned(8)));
    int n_adopted = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, dfd, buf, sizeof(buf));
        if (n <= 0)
            break;
        for (long off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            char *end;
            long fd = strtol(d->d_name, &end, 10);
            if (end == d->d_name || *end || fd < 0 || fd > INT_MAX || fd == dfd)
                continue;
            n_adopted += toe_sock_adopt_fd((int)fd);
        }
    }
    toe_real_close(dfd);
    TOE_DBG("adoption: %d inherited socket(s)", n_adopted);
    errno = saved;
}

ssize_t toe_pass_recvmsg(int fd, struct msghdr *msg, int flags)
{
    ssize_t r = toe_real_recvmsg(fd, msg, flags);
    if (r < 0 || !toe_adopting || !msg || !msg->msg_control ||
        msg->msg_controllen < sizeof(struct cmsghdr))
        return r;
    /* an offloaded socket passed by another process: adopt it like an inherited one */
    int saved = errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int rfd;
            memcpy(&rfd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            toe_sock_adopt_fd(rfd);
        }
    }
    errno = saved;
    return r;
}
