/*
 * send.c - send: send/write/writev/sendmsg, sendfile/splice to the socket, sendmmsg.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

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
void tx_settle(struct toe_sock *s, int fd)
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
    if (msg_total(msg, &total) < 0)
        return -1;
    return do_send(s, fd, msg->msg_iov, (int)msg->msg_iovlen, total, flags);
}

/* ---------------- sendfile / splice ---------------- */

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

/* ---------------- sendmmsg ---------------- */

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

