/*
 * sock_life.c - socket life: creation (socket()) and adoption of offloaded sockets inherited
 * across exec or passed by SCM_RIGHTS.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

/* ---------------- creation ---------------- */

/*
 * A new socket object: the pair (A with the application's SOCK_NONBLOCK /
 * SOCK_CLOEXEC), the memfd with its header filled in (sealed: its size can
 * never change under the daemon's mapping), the mapping.
 * bm[] receives [B, memfd, A] for SCM_RIGHTS; the caller closes bm[0..1].
 */
int make_pair(int flags, int sv[2])
{
    int one = 1;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        return -1;
    int e = EMFILE;
    if (!toe_fd_fits(sv[0]))
        goto fail;
    if ((!(flags & SOCK_NONBLOCK) && toe_real_fcntl(sv[0], F_SETFL, NULL) < 0) ||
        (!(flags & SOCK_CLOEXEC) && toe_real_fcntl(sv[0], F_SETFD, NULL) < 0)) {
        e = errno;
        goto fail;
    }
    /* the kernel clamps to its minimum: a little filler makes A unwritable */
    toe_real_setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
    return 0;
fail:
    toe_real_close(sv[0]);
    toe_real_close(sv[1]);
    errno = e;
    return -1;
}

struct toe_sock *make_sock(int flags, int *a, int bm[3])
{
    const struct toe_adapter *ad = toe_ctl_adapter();
    size_t len = TOE_SHM_HDR_SIZE + (size_t)ad->tx_ring_bytes + ad->rx_ring_bytes;
    int sv[2], mfd = -1, e;
    void *p = MAP_FAILED;
    struct toe_sock *s;

    if (make_pair(flags, sv) < 0)
        return NULL;
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
    s->recyclable = 1;
    s->gen = toe_pool_gen();
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

void close_pair_side(int bm[3])
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
uint64_t sock_cookie(int fd)
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

/* The new socket s (its A end a) into the fd table; the caller's reference is dropped. */
static int install_new(struct toe_sock *s, int a, int saved)
{
    if (toe_fd_install(a, s) < 0) {
        int e = errno;
        toe_real_close(a);
        toe_sock_put(s);
        return fail(e);
    }
    TOE_DBG("socket fd %d -> sock %u", a, s->sock_id);
    toe_sock_put(s);
    errno = saved;
    return a;
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
    struct toe_sock *s = toe_pool_take(type, &a);
    if (s)                              /* ready: made and registered in a batch */
        return install_new(s, a, saved);
    s = make_sock(type, &a, bm);
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
    return install_new(s, a, saved);
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
