/*
 * recv.c - receive: recv/read/readv/recvmsg and the _chk variants, sendfile/splice from the
 * socket, recvmmsg.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

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
int iov_total(const struct iovec *iov, int iovcnt, size_t *total)
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

int msg_total(const struct msghdr *msg, size_t *total)
{
    if (!msg)
        return fail(EFAULT);
    if (msg->msg_iovlen > INT_MAX)
        return fail(EMSGSIZE);
    return iov_total(msg->msg_iov, (int)msg->msg_iovlen, total);
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
        kick(s, fd);
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
        if (toe_poll_us && nb < 0)
            nb = nonblocking(fd);          /* opted in: an event loop's EAGAIN must not wait */
        if (toe_poll_us && nb == 0) {
            pthread_mutex_unlock(&s->rx_lock);
            if (spin_readable(m))
                continue;
            pthread_mutex_lock(&s->rx_lock);
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
        if (w < 0 && errno == ECONNRESET) {
            /* B was closed with bytes unread in it (a doorbell, a kick): the daemon died;
             * the kernel reports that once on A, the shim reports it once too */
            lstate_set(s, TOE_LS_GONE);
        }
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
    if (msg_total(msg, &total) < 0)
        return -1;
    ssize_t r = do_recv(s, fd, msg->msg_iov, (int)msg->msg_iovlen, total, flags);
    if (r >= 0) {
        msg->msg_namelen = 0;
        msg->msg_controllen = 0;
        msg->msg_flags = 0;
    }
    return r;
}

/* ---------------- sendfile / splice from the socket ---------------- */

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

/* ---------------- recvmmsg ---------------- */


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

