/*
 * ready.c - readiness on A (docs/abi.md "Readiness"): stuffing, doorbells, tokens, the kernel's
 * waits.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

const uint8_t toe_filler[2048];

/*
 * Write filler into A until the kernel refuses: A is then not writable.
 * With tx (the send-buffer case) stop as soon as the socket is writable
 * again: the daemon freed space and drained B meanwhile, so stuffing on would
 * only make it drain again.
 */
void stuff(int fd, struct toe_sock_shm *tx)
{
    int saved = errno;
    for (int i = 0; i < 64; i++) {
        if (toe_real_send(fd, toe_filler, sizeof(toe_filler), MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
            errno != EINTR)
            break;
        if (tx && toe_tx_writable(tx))
            break;
    }
    errno = saved;
}

/* One byte into A: a doorbell or a kick.  EAGAIN (A stuffed) is dropped. */
void bell(int fd)
{
    int saved = errno;
    toe_real_send(fd, toe_filler, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    errno = saved;
}

/*
 * The daemon may have skipped a token: have it look at the socket again.  The byte goes
 * into A, as a doorbell does; but a stuffed A (a listener always, a writer waiting for
 * space) refuses it, and a dropped kick is a lost wake-up: a listener's next connection
 * would wait for the one after it.  Then the kick goes through the control channel (WAKE,
 * a round trip; only in that race).
 */
void kick(struct toe_sock *s, int fd)
{
    int saved = errno;
    ssize_t r;
    do
        r = toe_real_send(fd, toe_filler, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        struct toe_cmd cmd;
        struct toe_rsp rsp;
        memset(&cmd, 0, sizeof(cmd));
        cmd.op = TOE_OP_WAKE;
        cmd.sock_id = s->sock_id;
        toe_ctl_call(&cmd, NULL, 0, &rsp); /* nothing to do if it fails: the daemon is gone */
    }
    errno = saved;
}

/* Read the outstanding token bytes out of A (those that arrived: a counted
 * token may still be on its way).  Returns how many were read. */
uint32_t read_tokens(struct toe_sock_shm *m, int fd)
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
void take_tokens(struct toe_sock *s, int fd)
{
    struct toe_sock_shm *m = s->shm;
    int saved = errno;
    uint32_t got = read_tokens(m, fd);
    if (toe_tokens_taken(m, got))
        kick(s, fd);
    errno = saved;
}

/*
 * TOE_POLL_US: before a blocking receive sleeps, look at the RX ring for up to
 * toe_poll_us microseconds (Onload's EF_POLL_USEC): data the adapter publishes
 * meanwhile is taken without a wake-up.  1 when the socket became readable.
 */
int spin_readable(struct toe_sock_shm *m)
{
    /* no back-off here, unlike the adapter's spin: measured, a receive that sleeps after a
     * missed spin cost more on a quiet machine (16 -> 30 µs p50) than it saved under load */
    if (!toe_poll_us)
        return 0;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (toe_rx_avail(m) || (TOE_LOAD_ACQ(&m->flags) & (TOE_SF_RX_EOF | TOE_SF_RESET)))
                return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 >= (long)toe_poll_us)
            return 0;
    }
}

/* Block until A is readable.  1: a token; 0: B was shut down; -1: errno
 * (EINTR, EAGAIN on SO_RCVTIMEO ...) exactly as the kernel reports it. */
int wait_readable(int fd)
{
    char c;
    ssize_t r = toe_real_recv(fd, &c, 1, MSG_PEEK);
    if (r < 0)
        return -1;
    return r > 0;
}

/* A reads end-of-file although the daemon published neither EOF nor a reset:
 * the daemon went away (crash, `toe down`).  Only asked on slow paths. */
int daemon_gone(struct toe_sock *s, int fd)
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
int wait_writable(int fd)
{
    return toe_real_send(fd, toe_filler, 1, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

