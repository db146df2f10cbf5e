/*
 * ctl.c - the per-process control channel to the adapter daemon.
 *
 * One AF_UNIX/SOCK_SEQPACKET connection to $TOE_SOCK (default
 * /run/toe/toe0.sock), opened lazily on the first command and greeted with
 * HELLO.  Each command/response pair runs under one process-wide mutex; the
 * daemon never blocks a command, so the mutex is never held across a wait for
 * the network.  The channel fd is close-on-exec and lives at fd >= 500, out
 * of the way of programs that expect small fds.
 *
 * fork(): a process that holds offloaded sockets asks the daemon for a new
 * channel (FORK) in the prepare handler; the child inherits it and uses it
 * from its first command, holding the same sockets.  So a child that
 * chroots, changes user or enters a seccomp sandbox before that command
 * keeps working: it never has to connect(), and commands without
 * descriptors travel with send()/recv(), the calls a sandbox allows on a
 * socket.  Without sockets (or if FORK fails) the child connects its own
 * channel on first use, as an exec'd program does.
 *
 * If the daemon cannot be reached (or a HELLO fails), one line goes to stderr
 * and every socket of the process goes to the kernel from then on (with
 * TOE_STRICT: every TCP socket() fails instead).
 *
 * fork(): the prepare handler takes the channel and table locks so that no
 * other thread is inside a command or a table update at the fork; parent and
 * child release/reinitialise them (the mutexes are error-checking, so a fork
 * from a signal handler that interrupted the shim on this thread does not
 * deadlock on its own lock).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "toe_shim.h"

#define TOE_DEFAULT_SOCK "/run/toe/toe0.sock"
#define TOE_CTL_MIN_FD TOE_HIGH_FD

enum { CTL_UNKNOWN, CTL_UP, CTL_DOWN };

int toe_debug;
int toe_strict;
unsigned toe_poll_us;
int toe_adopting;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t ctl_mu = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP;
static int ctl_mu_taken_for_fork;   /* the prepare handler holds ctl_mu */
static int fork_chan = -1;          /* FORK's channel for the child, between prepare and parent/child */
static int ctl_fd = -1;             /* written under ctl_mu (atomic stores: read without it) */
static int ctl_state = CTL_UNKNOWN; /* atomic; written under ctl_mu */
static int warned;                  /* atomic: the one stderr line was printed */
static struct toe_adapter adapter;  /* valid once ctl_state has been CTL_UP */
static char ctl_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];

static void say(const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t r = toe_real_write(2, buf, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        buf += r;
        n -= (size_t)r;
    }
}

void toe_dbg(const char *fmt, ...)
{
    int saved = errno;
    char buf[512];
    int n = snprintf(buf, sizeof(buf), "toe[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    say(buf, (size_t)n);
    errno = saved;
}

/* One formatted line on stderr (no stdio: one write()). */
static void vsay(const char *fmt, va_list ap)
{
    char buf[512];
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    say(buf, (size_t)n);
}

void toe_say(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
    errno = saved;
}

/* A posted command (the pool's REUSE, refilled ahead of need: toe_ctl_post_ids): sent
 * without waiting, its answer flagged TOE_RF_POSTED and possibly after the answers of
 * later commands (the daemon answers it when idle).  Whoever reads an answer keeps that
 * one here for the pool (toe_ctl_posted).  All under ctl_mu. */
static int posted;                  /* an answer is owed on this channel */
static int posted_have;             /* ... and was read: posted_rsp */
static int posted_lost;             /* the channel went with an answer owed */
static int daemon_posts;            /* HELLO said the daemon answers posted commands */
static struct toe_rsp posted_rsp;

static void set_ctl_fd(int fd)
{
    if (posted && !posted_have)
        posted_lost = 1;            /* (a new channel never gets the old one's answer) */
    else if (posted)
        posted_lost = 0;
    posted = posted_have = 0;
    __atomic_store_n(&ctl_fd, fd, __ATOMIC_RELEASE);
}

int toe_ctl_is_channel(int fd)
{
    return fd >= 0 && fd == __atomic_load_n(&ctl_fd, __ATOMIC_ACQUIRE);
}

int toe_ctl_channel_fd(void)
{
    return __atomic_load_n(&ctl_fd, __ATOMIC_ACQUIRE);
}

/* The one line on stderr, once per process. */
static void warn_once(const char *fmt, ...)
{
    if (__atomic_exchange_n(&warned, 1, __ATOMIC_SEQ_CST))
        return;
    va_list ap;
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
}

static int xfer_locked(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                       struct toe_rsp *rsp, int *sent, int *rfds, int *nrfds);
static int send_locked(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds, int *sent);
static int recv_locked(struct toe_rsp *rsp, int *rfds, int *nrfds, void *cbuf, size_t clen);
static int recv_one_locked(struct toe_rsp *rsp, int *rfds, int *nrfds, void *cbuf, size_t clen, int flags);
static void go_down_locked(int err, int was_up);

/* FORK: a channel for the child, holding this process's sockets (ctl_mu held).
 * -1 when there is nothing to share or the daemon cannot make one. */
static int fork_channel_locked(void)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int fd = -1, n = 1, sent;
    if (__atomic_load_n(&ctl_state, __ATOMIC_RELAXED) != CTL_UP || ctl_fd < 0 || !toe_fd_any())
        return -1;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_FORK;
    if (xfer_locked(&cmd, NULL, 0, NULL, 0, &rsp, &sent, &fd, &n) < 0 || n != 1)
        return -1;
    if (rsp.result < 0) {
        toe_real_close(fd);
        return -1;
    }
    int hi = toe_real_fcntl(fd, F_DUPFD_CLOEXEC, (void *)(long)TOE_CTL_MIN_FD);
    if (hi >= 0) {
        toe_real_close(fd);
        fd = hi;
    }
    return fd;
}

/* Lock order: the pool before ctl_mu, ctl_mu before the table locks (nothing takes them
 * the other way). */
static void atfork_prepare(void)
{
    int saved = errno;
    toe_pool_atfork_prepare(); /* before ctl_mu: a batch holds the pool while it asks */
    ctl_mu_taken_for_fork = pthread_mutex_lock(&ctl_mu) == 0;
    fork_chan = ctl_mu_taken_for_fork ? fork_channel_locked() : -1;
    toe_fd_atfork_prepare();
    errno = saved;
}

static void atfork_parent(void)
{
    int saved = errno;
    if (fork_chan >= 0)
        toe_real_close(fork_chan); /* the child's now (or nobody's: fork failed) */
    fork_chan = -1;
    toe_fd_atfork_parent();
    if (ctl_mu_taken_for_fork)
        pthread_mutex_unlock(&ctl_mu);
    ctl_mu_taken_for_fork = 0;
    toe_pool_atfork_parent();
    errno = saved;
}

static void atfork_child(void)
{
    int saved = errno;
    toe_mutex_init_ec(&ctl_mu);
    ctl_mu_taken_for_fork = 0;
    posted = posted_have = posted_lost = 0;   /* the parent's answer, on the parent's channel */
    if (ctl_fd >= 0) {
        toe_real_close(ctl_fd);
        set_ctl_fd(-1);
    }
    if (fork_chan >= 0) {
        set_ctl_fd(fork_chan); /* the parent's sockets come with it; the state stays UP */
        fork_chan = -1;
    } else if (__atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UP) {
        __atomic_store_n(&ctl_state, CTL_UNKNOWN, __ATOMIC_RELAXED);
    }
    toe_fd_atfork_child();
    toe_pool_atfork_child(); /* the parent's: this process makes its own */
    errno = saved;
}

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static void do_init(void)
{
    int saved = errno;
    toe_debug = env_flag("TOE_DEBUG");
    toe_strict = env_flag("TOE_STRICT");
    const char *pu = getenv("TOE_POLL_US");
    if (pu && *pu) {
        char *end;
        unsigned long v = strtoul(pu, &end, 10);
        toe_poll_us = *end == 0 && v <= 1000000 ? (unsigned)v : 0;
    }
    const char *p = getenv("TOE_SOCK");
    toe_adopting = p && *p;
    if (!p || !*p)
        p = TOE_DEFAULT_SOCK;
    snprintf(ctl_path, sizeof(ctl_path), "%s", p);
    toe_real_init();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    errno = saved;
}

void toe_ctl_init(void)
{
    pthread_once(&init_once, do_init);
}

__attribute__((constructor)) static void toe_shim_constructor(void)
{
    toe_ctl_init();
    toe_fd_adopt_once();
}

const struct toe_adapter *toe_ctl_adapter(void)
{
    return &adapter;
}

/*
 * Send one command and read its response.  *sent tells whether the command
 * left (a failure after that must not be retried).  0 or -errno.
 */
static int xfer_locked(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                       struct toe_rsp *rsp, int *sent, int *rfds, int *nrfds)
{
    union {
        char buf[CMSG_SPACE(3 * TOE_POOL_BATCH * sizeof(int))];
        struct cmsghdr align;
    } u;
    int r = send_locked(cmd, ids, nids, fds, nfds, sent);
    if (r < 0)
        return r;
    return recv_locked(rsp, rfds, nrfds, &u, sizeof(u.buf));
}

/* The command (and REUSE's ids after it, in the same message) with its descriptors:
 * 0 or -errno; *sent once something left. */
static int send_locked(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds, int *sent)
{
    union {
        char buf[CMSG_SPACE(3 * TOE_POOL_BATCH * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov[2] = {{.iov_base = cmd, .iov_len = sizeof(*cmd)},
                           {.iov_base = (void *)ids, .iov_len = (size_t)nids * sizeof(*ids)}};
    size_t len = sizeof(*cmd) + iov[1].iov_len;
    struct msghdr mh;
    ssize_t r;

    *sent = 0;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = iov;
    mh.msg_iovlen = nids > 0 ? 2 : 1;
    if (nfds > 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    }
    /* without descriptors: send(), the call a sandboxed child may still make */
    do
        r = nfds > 0 || nids > 0 ? toe_real_sendmsg(ctl_fd, &mh, MSG_NOSIGNAL)
                                 : toe_real_send(ctl_fd, cmd, sizeof(*cmd), MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    *sent = 1;
    return r != (ssize_t)len ? -EPROTO : 0;
}

/* One answer for the command just sent; a posted command's answer that comes first is kept
 * for the pool (posted_rsp) and the next one read.  `cbuf`: room for descriptors. */
static int recv_locked(struct toe_rsp *rsp, int *rfds, int *nrfds, void *cbuf, size_t clen)
{
    int want = rfds ? *nrfds : 0;
    for (;;) {
        if (rfds)
            *nrfds = want;
        int r = recv_one_locked(rsp, rfds, nrfds, cbuf, clen, 0);
        if (r < 0 || !(posted && !posted_have && (rsp->flags & TOE_RF_POSTED)))
            return r;
        posted_rsp = *rsp;
        posted_have = 1;
        if (rfds)                   /* (a posted answer carries none: nothing kept) */
            while (*nrfds > 0)
                toe_real_close(rfds[--*nrfds]);
    }
}

static int recv_one_locked(struct toe_rsp *rsp, int *rfds, int *nrfds, void *cbuf, size_t clen, int flags)
{
    struct msghdr mh;
    ssize_t r;
    struct iovec riov = {.iov_base = rsp, .iov_len = sizeof(*rsp)};
    if (!rfds) {
        /* no descriptors expected: recv() (any the daemon sent would be discarded) */
        do
            r = toe_real_recv(ctl_fd, rsp, sizeof(*rsp), MSG_TRUNC | flags);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return -errno;
        return r == 0 ? -ECONNRESET : r != (ssize_t)sizeof(*rsp) ? -EPROTO : 0;
    }
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &riov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = clen;
    int want = *nrfds;
    *nrfds = 0;
    do
        r = toe_real_recvmsg(ctl_fd, &mh, MSG_CMSG_CLOEXEC | flags);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    /* keep what the caller asked for (ADOPT's memfd), never leak the rest */
    int got = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                if (got < want)
                    rfds[got++] = fd;
                else
                    toe_real_close(fd);
            }
        }
    }
    int bad = r == 0 ? -ECONNRESET
                     : (r != (ssize_t)sizeof(*rsp) || (mh.msg_flags & MSG_TRUNC)) ? -EPROTO : 0;
    if (bad) {
        while (got > 0)
            toe_real_close(rfds[--got]);
        return bad;
    }
    *nrfds = got;
    return 0;
}

/*
 * The pool's REUSE sent ahead of need: no answer is waited for now (toe_ctl_posted
 * collects it).  Only on a channel that is up, to a daemon that said it answers posted
 * commands, one at a time: -EAGAIN otherwise (the caller refills the usual way later).
 */
int toe_ctl_post_ids(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds)
{
    int saved = errno, sent = 0, r = -EAGAIN;
    toe_ctl_init();
    pthread_mutex_lock(&ctl_mu);
    if (ctl_fd >= 0 && daemon_posts && !posted && !posted_lost &&
        __atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UP) {
        r = send_locked(cmd, ids, nids, fds, nfds, &sent);
        if (r == 0) {
            posted = 1;
        } else if (sent) {          /* half a message: the channel is not usable any more */
            toe_real_close(ctl_fd);
            set_ctl_fd(-1);
            go_down_locked(-r, 1);
        }
    }
    pthread_mutex_unlock(&ctl_mu);
    errno = saved;
    return r;
}

/*
 * The posted command's answer: 0 and *rsp; -EAGAIN if it has not come yet (wait = 0);
 * -errno if it never will (the channel went; -ENOENT: nothing was posted).
 */
int toe_ctl_posted(struct toe_rsp *rsp, int wait)
{
    int saved = errno, r;
    pthread_mutex_lock(&ctl_mu);
    if (posted_lost) {
        posted_lost = 0;
        r = -ECONNRESET;
    } else if (!posted) {
        r = -ENOENT;
    } else if (posted_have) {
        r = 0;
    } else {
        /* nothing else is in flight (every call completes under ctl_mu): the next answer
         * on the channel is the posted one */
        r = recv_one_locked(&posted_rsp, NULL, NULL, NULL, 0, wait ? 0 : MSG_DONTWAIT);
        if (r == -EWOULDBLOCK)
            r = -EAGAIN;
        else if (r == 0 && !(posted_rsp.flags & TOE_RF_POSTED))
            r = -EPROTO;
        if (r < 0 && r != -EAGAIN) {
            toe_real_close(ctl_fd);
            set_ctl_fd(-1);
            posted_lost = 0;
            go_down_locked(-r, 1);
        }
    }
    if (r == 0) {
        *rsp = posted_rsp;
        posted = posted_have = 0;
    }
    pthread_mutex_unlock(&ctl_mu);
    errno = saved;
    return r;
}

static int valid_ring(uint32_t n)
{
    return n >= 4096 && n <= (1u << 30) && (n & (n - 1)) == 0;
}

static void reclaim_locked(void);

/* Connect and say HELLO.  0, or -errno with the channel closed. */
static int connect_locked(void)
{
    struct sockaddr_un sun;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int fd, r, sent;

    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    if (strlen(ctl_path) >= sizeof(sun.sun_path))
        return -ENAMETOOLONG;
    memcpy(sun.sun_path, ctl_path, strlen(ctl_path));
    fd = toe_real_socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (toe_real_connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 && errno != EISCONN) {
        r = -errno;
        toe_real_close(fd);
        return r;
    }
    int hi = toe_real_fcntl(fd, F_DUPFD_CLOEXEC, (void *)(long)TOE_CTL_MIN_FD);
    if (hi >= 0) {
        toe_real_close(fd);
        fd = hi;
    }
    set_ctl_fd(fd);

    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HELLO;
    cmd.pid = (uint32_t)getpid();
    r = xfer_locked(&cmd, NULL, 0, NULL, 0, &rsp, &sent, NULL, NULL);
    if (r == 0 && rsp.result < 0)
        r = rsp.result;
    if (r == -EACCES)
        warn_once("toe: this user (uid %u) may not use the adapter at %s; sockets use the kernel",
                  (unsigned)getuid(), ctl_path);
    if (r == 0 && rsp.abi_version != TOE_ABI_VERSION) {
        warn_once("toe: the adapter at %s speaks ABI %u, this shim %u; sockets use the kernel",
                  ctl_path, rsp.abi_version, TOE_ABI_VERSION);
        r = -EPROTO;
    }
    if (r == 0 && (!valid_ring(rsp.tx_ring_bytes) || !valid_ring(rsp.rx_ring_bytes)))
        r = -EPROTO;
    if (r < 0) {
        toe_real_close(ctl_fd);
        set_ctl_fd(-1);
        return r;
    }
    reclaim_locked();
    adapter.addr_be32 = rsp.addr_be32;
    adapter.netmask_be32 = rsp.netmask_be32;
    adapter.tx_ring_bytes = rsp.tx_ring_bytes;
    adapter.rx_ring_bytes = rsp.rx_ring_bytes;
    adapter.daemon_pid = rsp.daemon_pid;
    daemon_posts = (rsp.flags & TOE_RF_POSTED) != 0;
    __atomic_store_n(&ctl_state, CTL_UP, __ATOMIC_RELEASE);
    TOE_DBG("control channel fd %d to %s (daemon pid %u, rings %u/%u)", ctl_fd, ctl_path,
            rsp.daemon_pid, rsp.tx_ring_bytes, rsp.rx_ring_bytes);
    return 0;
}

/*
 * A new channel in a process that already holds offloaded sockets (a fork
 * whose FORK failed, a reconnect): the channel may name only what it proves
 * it holds, so pass each fd to ADOPT.  The mapping is there already: the
 * memfd that comes back is closed.
 */
static void reclaim_locked(void)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    int n = 0;
    for (int fd = toe_fd_next(0); fd >= 0; fd = toe_fd_next(fd + 1)) {
        int mfd = -1, nr = 1, sent;
        memset(&cmd, 0, sizeof(cmd));
        cmd.op = TOE_OP_ADOPT;
        if (xfer_locked(&cmd, NULL, 0, &fd, 1, &rsp, &sent, &mfd, &nr) < 0)
            return;
        if (nr == 1)
            toe_real_close(mfd);
        n += rsp.result == 0;
    }
    if (n)
        TOE_DBG("new control channel: %d inherited socket(s) reclaimed", n);
}

static void go_down_locked(int err, int was_up)
{
    __atomic_store_n(&ctl_state, CTL_DOWN, __ATOMIC_RELEASE);
    const char *then = toe_strict ? (was_up ? "new TCP sockets fail" : "TCP sockets fail")
                       : was_up   ? "new sockets use the kernel"
                                  : "sockets use the kernel";
    if (err == EACCES || err == EPERM)
        warn_once("toe: %sthis user (uid %u) may not use the adapter at %s (%s); %s",
                  toe_strict ? "strict: " : "", (unsigned)getuid(), ctl_path, strerror(err), then);
    else
        warn_once("toe: %s%s adapter at %s (%s); %s", toe_strict ? "strict: " : "",
                  was_up ? "lost the" : "no", ctl_path, strerror(err), then);
}

/* Out of a resource of this process: the call fails, the adapter is not "down". */
static int transient(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOMEM || err == ENOBUFS;
}

/* Connect the control channel if nobody tried yet.  Loud: a failure marks the adapter
 * down and says so once (unless it is transient: then -errno).  Quiet (adoption at
 * start-up): a failure leaves the state unknown, without a word, to be asked again
 * later. */
static int ctl_up(int quiet)
{
    int st = __atomic_load_n(&ctl_state, __ATOMIC_ACQUIRE);
    if (st != CTL_UNKNOWN)
        return st == CTL_UP;
    toe_ctl_init();
    int saved = errno, r = 0;
    pthread_mutex_lock(&ctl_mu);
    if (__atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UNKNOWN && (!quiet || ctl_fd < 0)) {
        r = connect_locked();
        if (r < 0 && !quiet && !transient(-r))
            go_down_locked(-r, 0);
    }
    pthread_mutex_unlock(&ctl_mu);
    errno = saved;
    if (__atomic_load_n(&ctl_state, __ATOMIC_ACQUIRE) == CTL_UP)
        return 1;
    return r < 0 && transient(-r) ? r : 0;
}

int toe_ctl_up(void)
{
    return ctl_up(0);
}

int toe_ctl_up_quiet(void)
{
    return ctl_up(1) > 0;
}

static int call(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                struct toe_rsp *rsp, int *rfds, int *nrfds);

int toe_ctl_call(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp)
{
    return call(cmd, NULL, 0, fds, nfds, rsp, NULL, NULL);
}

int toe_ctl_call_rfds(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp,
                      int *rfds, int *nrfds)
{
    return call(cmd, NULL, 0, fds, nfds, rsp, rfds, nrfds);
}

int toe_ctl_call_ids(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                     struct toe_rsp *rsp)
{
    return call(cmd, ids, nids, fds, nfds, rsp, NULL, NULL);
}

static int call(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                struct toe_rsp *rsp, int *rfds, int *nrfds)
{
    int saved = errno, r = -ENOTCONN, sent, want = rfds ? *nrfds : 0;
    toe_ctl_init();
    pthread_mutex_lock(&ctl_mu);
    for (int attempt = 0; __atomic_load_n(&ctl_state, __ATOMIC_RELAXED) != CTL_DOWN; attempt++) {
        int was_up = 1;
        if (ctl_fd < 0) {
            was_up = __atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UP;
            r = connect_locked();
            if (r < 0) {
                if (!transient(-r))
                    go_down_locked(-r, was_up || attempt > 0);
                break;
            }
        }
        if (rfds)
            *nrfds = want;
        r = xfer_locked(cmd, ids, nids, fds, nfds, rsp, &sent, rfds, nrfds);
        if (r == 0)
            break;
        toe_real_close(ctl_fd);
        set_ctl_fd(-1);
        if (sent || attempt > 0) {
            go_down_locked(-r, 1);
            break;
        }
        /* the command never left (channel closed under us): reconnect once */
    }
    pthread_mutex_unlock(&ctl_mu);
    if (r < 0 && rfds)
        *nrfds = 0;
    if (r == 0)
        TOE_DBG("cmd op=%u sock=%u -> result=%d flags=%u sock=%u", cmd->op, cmd->sock_id,
                rsp->result, rsp->flags, rsp->sock_id);
    else
        TOE_DBG("cmd op=%u sock=%u -> channel error %d", cmd->op, cmd->sock_id, -r);
    errno = saved;
    return r;
}
