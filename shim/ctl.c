/*
 * ctl.c - the per-process control channel to the adapter daemon.
 *
 * One AF_UNIX/SOCK_SEQPACKET connection to $TOE_SOCK (default
 * /run/toe/toe0.sock), opened lazily on the first command and greeted with
 * HELLO.  Each command/response pair runs under one process-wide mutex; the
 * daemon never blocks a command, so the mutex is never held across a wait for
 * the network.  The channel fd is close-on-exec and lives at fd >= 500, out
 * of the way of programs that expect small fds.  After fork() the child
 * closes its copy and reconnects on its first command (pthread_atfork).
 *
 * If the daemon cannot be reached (or a HELLO fails), one line goes to stderr
 * and every socket of the process goes to the kernel from then on.
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
#define TOE_CTL_MIN_FD 500

enum { CTL_UNKNOWN, CTL_UP, CTL_DOWN };

int toe_debug;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t ctl_mu = PTHREAD_MUTEX_INITIALIZER;
static int ctl_fd = -1;             /* under ctl_mu */
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

/* The one line on stderr, once per process. */
static void warn_once(const char *fmt, ...)
{
    if (__atomic_exchange_n(&warned, 1, __ATOMIC_SEQ_CST))
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    say(buf, (size_t)n);
}

static void atfork_child(void)
{
    pthread_mutex_init(&ctl_mu, NULL);
    if (ctl_fd >= 0) {
        int saved = errno;
        toe_real_close(ctl_fd);
        errno = saved;
        ctl_fd = -1;
    }
    if (__atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UP)
        __atomic_store_n(&ctl_state, CTL_UNKNOWN, __ATOMIC_RELAXED);
    toe_fd_atfork_child();
}

static void do_init(void)
{
    int saved = errno;
    const char *d = getenv("TOE_DEBUG");
    toe_debug = d && *d && strcmp(d, "0") != 0;
    const char *p = getenv("TOE_SOCK");
    if (!p || !*p)
        p = TOE_DEFAULT_SOCK;
    snprintf(ctl_path, sizeof(ctl_path), "%s", p);
    toe_real_init();
    pthread_atfork(NULL, NULL, atfork_child);
    errno = saved;
}

void toe_ctl_init(void)
{
    pthread_once(&init_once, do_init);
}

__attribute__((constructor)) static void toe_shim_constructor(void)
{
    toe_ctl_init();
}

const struct toe_adapter *toe_ctl_adapter(void)
{
    return &adapter;
}

/*
 * Send one command and read its response.  *sent tells whether the command
 * left (a failure after that must not be retried).  0 or -errno.
 */
static int xfer_locked(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp,
                       int *sent)
{
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = cmd, .iov_len = sizeof(*cmd)};
    struct msghdr mh;
    ssize_t r;

    *sent = 0;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
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
    do
        r = toe_real_sendmsg(ctl_fd, &mh, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    *sent = 1;
    if (r != (ssize_t)sizeof(*cmd))
        return -EPROTO;

    struct iovec riov = {.iov_base = rsp, .iov_len = sizeof(*rsp)};
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &riov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof(u.buf);
    do
        r = toe_real_recvmsg(ctl_fd, &mh, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    /* the protocol sends no descriptors back: never leak any */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                toe_real_close(fd);
            }
        }
    }
    if (r == 0)
        return -ECONNRESET;
    if (r != (ssize_t)sizeof(*rsp) || (mh.msg_flags & MSG_TRUNC))
        return -EPROTO;
    return 0;
}

static int valid_ring(uint32_t n)
{
    return n >= 4096 && n <= (1u << 30) && (n & (n - 1)) == 0;
}

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
    ctl_fd = fd;

    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HELLO;
    cmd.pid = (uint32_t)getpid();
    r = xfer_locked(&cmd, NULL, 0, &rsp, &sent);
    if (r == 0 && rsp.result < 0)
        r = rsp.result;
    if (r == 0 && rsp.abi_version != TOE_ABI_VERSION) {
        warn_once("toe: the adapter at %s speaks ABI %u, this shim %u; sockets use the kernel",
                  ctl_path, rsp.abi_version, TOE_ABI_VERSION);
        r = -EPROTO;
    }
    if (r == 0 && (!valid_ring(rsp.tx_ring_bytes) || !valid_ring(rsp.rx_ring_bytes)))
        r = -EPROTO;
    if (r < 0) {
        toe_real_close(ctl_fd);
        ctl_fd = -1;
        return r;
    }
    adapter.addr_be32 = rsp.addr_be32;
    adapter.netmask_be32 = rsp.netmask_be32;
    adapter.tx_ring_bytes = rsp.tx_ring_bytes;
    adapter.rx_ring_bytes = rsp.rx_ring_bytes;
    adapter.daemon_pid = rsp.daemon_pid;
    __atomic_store_n(&ctl_state, CTL_UP, __ATOMIC_RELEASE);
    TOE_DBG("control channel fd %d to %s (daemon pid %u, rings %u/%u)", ctl_fd, ctl_path,
            rsp.daemon_pid, rsp.tx_ring_bytes, rsp.rx_ring_bytes);
    return 0;
}

static void go_down_locked(int err, int was_up)
{
    __atomic_store_n(&ctl_state, CTL_DOWN, __ATOMIC_RELEASE);
    if (was_up)
        warn_once("toe: lost the adapter at %s (%s); new sockets use the kernel", ctl_path,
                  strerror(err));
    else
        warn_once("toe: no adapter at %s (%s); sockets use the kernel", ctl_path, strerror(err));
}

int toe_ctl_up(void)
{
    int st = __atomic_load_n(&ctl_state, __ATOMIC_ACQUIRE);
    if (st != CTL_UNKNOWN)
        return st == CTL_UP;
    toe_ctl_init();
    int saved = errno;
    pthread_mutex_lock(&ctl_mu);
    if (__atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UNKNOWN) {
        int r = connect_locked();
        if (r < 0)
            go_down_locked(-r, 0);
    }
    pthread_mutex_unlock(&ctl_mu);
    errno = saved;
    return __atomic_load_n(&ctl_state, __ATOMIC_ACQUIRE) == CTL_UP;
}

int toe_ctl_call(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp)
{
    int saved = errno, r = -ENOTCONN, sent;
    toe_ctl_init();
    pthread_mutex_lock(&ctl_mu);
    for (int attempt = 0; __atomic_load_n(&ctl_state, __ATOMIC_RELAXED) != CTL_DOWN; attempt++) {
        int was_up = 1;
        if (ctl_fd < 0) {
            was_up = __atomic_load_n(&ctl_state, __ATOMIC_RELAXED) == CTL_UP;
            r = connect_locked();
            if (r < 0) {
                go_down_locked(-r, was_up || attempt > 0);
                break;
            }
        }
        r = xfer_locked(cmd, fds, nfds, rsp, &sent);
        if (r == 0)
            break;
        toe_real_close(ctl_fd);
        ctl_fd = -1;
        if (sent || attempt > 0) {
            go_down_locked(-r, 1);
            break;
        }
        /* the command never left (channel closed under us): reconnect once */
    }
    pthread_mutex_unlock(&ctl_mu);
    if (r == 0)
        TOE_DBG("cmd op=%u sock=%u -> result=%d flags=%u sock=%u", cmd->op, cmd->sock_id,
                rsp->result, rsp->flags, rsp->sock_id);
    else
        TOE_DBG("cmd op=%u sock=%u -> channel error %d", cmd->op, cmd->sock_id, -r);
    errno = saved;
    return r;
}
