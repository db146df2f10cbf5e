/*
 * conn.c - connection calls: bind, listen, connect, accept, shutdown, getsockname/getpeername.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

/* ---------------- bind / listen / connect / accept ---------------- */

/* BIND/CONNECT: 0 when the adapter serves the address (rsp holds its answer), else
 * why the socket goes to the kernel. */
static int ask_adapter(struct toe_cmd *cmd, struct toe_rsp *rsp)
{
    if (toe_ctl_call(cmd, NULL, 0, rsp) < 0)
        return TOE_HO_NO_DAEMON;
    return (rsp->flags & TOE_RF_HANDOVER) ? TOE_HO_DAEMON : 0;
}

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
    reason = ask_adapter(&cmd, &rsp);
    if (reason)
        goto handover;
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
int wait_connect_done(struct toe_sock *s, int fd)
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

    /* a blocking connect says so: the adapter may then answer when the handshake is over
     * (one wake-up instead of the answer's and A's) */
    int nb = nonblocking(fd);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_CONNECT;
    cmd.sock_id = s->sock_id;
    cmd.addr_be32 = dst;
    cmd.port_be16 = sin.sin_port;
    cmd.arg1 = nb ? 0 : TOE_CONNECT_WAIT;
    reason = ask_adapter(&cmd, &rsp);
    if (reason)
        goto handover;
    lstate_clear(s, TOE_LS_CONNFAIL);
    if (rsp.result == 0) {
        lstate_set(s, TOE_LS_CONNECTED);
        errno = saved;
        return 0;
    }
    if (rsp.result != -EINPROGRESS)
        return fail(-rsp.result);
    lstate_set(s, TOE_LS_CONNECT);
    if (nb)
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

        int a, bm[3] = {-1, -1, -1};
        /* the child: a pooled socket (named in the command), else one made now (passed) */
        struct toe_sock *c = toe_pool_take(flags, &a);
        int pooled = c != NULL;
        if (!c && !(c = make_sock(flags, &a, bm)))
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
        int r;
        if (pooled) {
            cmd.arg1 = (int32_t)c->sock_id;
            r = toe_ctl_call(&cmd, NULL, 0, &rsp);
        } else {
            c->cookie = sock_cookie(a);
            r = toe_ctl_call(&cmd, bm, 3, &rsp);
            close_pair_side(bm);
        }
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

