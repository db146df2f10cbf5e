/*
 * ACK-number unit (seed 003): in-order payload goes straight from the frame
 * buffer into the application's RX ring, rcv_nxt moves, and the socket
 * becomes readable (docs/abi.md: a token into B when none is outstanding).
 *
 * The RX ring's indices are checked against the daemon's own ring sizes
 * (toe_d_rx_push): whatever the application wrote into its header, nothing
 * is written outside its ring.  The doorbells on B (the application wrote,
 * read or kicked) are this unit's too: B drained, A's readiness kept.
 */
#include <errno.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fp.h"

static void token(struct fp_ccb *c)
{
    static const uint8_t one = 1;
    toe_rx_token_sent(fp_shm(c));     /* count first, then write (docs/abi.md) */
    ssize_t r = write(c->b_fd, &one, 1);
    (void)r;                          /* B full: A is readable anyway */
}

/* Readability changed without data: make sure a token is outstanding. */
void fp_wake(struct fp_ccb *c)
{
    if (c->b_fd >= 0 && !(c->cflags & FP_CF_B_SHUT) &&
        toe_d_rx_push(fp_shm(c), c->tx_size, c->rx_size, NULL, 0) > 0)
        token(c);
}

/* Read out of B (A becomes writable): everything (limit < 0) or the first `limit` bytes. */
void fp_drain(struct fp_ccb *c, int limit)
{
    uint8_t buf[4096];
    while (limit != 0) {
        size_t want = limit < 0 || limit > (int)sizeof(buf) ? sizeof(buf) : (size_t)limit;
        ssize_t r = read(c->b_fd, buf, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        if (limit > 0)
            limit -= (int)r;
    }
}

static void delivered(struct fp_state *st, struct fp_ccb *c, int r, uint32_t n, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    if (r > 0 && c->b_fd >= 0 && !(c->cflags & FP_CF_B_SHUT)) {
        token(c);
        st->counters.tokens++;
    }
    shm->bytes_in += n;
    c->rcv_nxt += n;
    c->bytes_in += n;
    st->counters.rx_payload_bytes += n;
    fp_ack_policy(st, c, n, now);
}

/* n in-order bytes the TAP read already placed at the ring's tail (the caller checked
 * that they fit the ring's free space when it placed them): publish them. */
void fp_deliver_placed(struct fp_state *st, struct fp_ccb *c, uint32_t n, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    TOE_STORE_REL(&shm->rx_tail, shm->rx_tail + n);
    TOE_FENCE();
    delivered(st, c, TOE_LOAD_ACQ(&shm->tok_taken) == shm->tok_sent, n, now);
    st->counters.rx_placed++;
}

/* n in-order bytes at p (the caller checked the receive space). */
void fp_deliver(struct fp_state *st, struct fp_ccb *c, const uint8_t *p, uint32_t n, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    /* r < 0: the application moved its index to nonsense; nothing is written and its
     * stream has a hole, as in the software path (HostSocket.push) */
    delivered(st, c, toe_d_rx_push(shm, c->tx_size, c->rx_size, p, n), n, now);
    st->place_slot = (int32_t)(c - st->ccbs);    /* its next frame goes straight into its ring */
}

/*
 * Does one byte unread in B leave A writable, A's send buffer at the kernel's minimum as
 * the shim makes it?  Then a doorbell's byte may stay in B (fp_doorbell_locked): reading
 * it frees A's send buffer, and the kernel then wakes every recv() asleep on A (a stream
 * socket's reader waits without a filter) -- the application waiting for its reply would
 * wake for nothing, once per request.
 */
uint32_t fp_kick_probe(void)
{
    int sv[2], one = 1;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return 0;
    uint32_t ok = 0;
    if (setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one)) == 0 &&
        send(sv[0], &one, 1, MSG_NOSIGNAL) == 1) {
        struct pollfd p = {.fd = sv[0], .events = POLLOUT};
        ok = poll(&p, 1, 0) == 1 && (p.revents & POLLOUT);
    }
    close(sv[0]);
    close(sv[1]);
    return ok;
}

/* A doorbell on B: the application wrote, or read (RX space), or kicked. */
int fp_doorbell(struct fp_state *st, int slot, double now)
{
    if (slot < 0 || (uint32_t)slot >= st->capacity)
        return 0;
    fp_lock(st, slot);
    int ours = st->ccbs[slot].in_use && !st->ccbs[slot].punted;
    if (ours)
        fp_doorbell_locked(st, slot, now);
    fp_unlock(st, slot);
    return ours;
}

void fp_doorbell_locked(struct fp_state *st, int slot, double now)
{
    struct fp_ccb *c = &st->ccbs[slot];
    struct toe_sock_shm *shm = fp_shm(c);
    st->counters.doorbells++;
    /* drain B (A writable again) unless the shim waits, stuffed, for writability; only the
     * bytes counted before the header is read (HostSocket.drain's rule).  One doorbell
     * byte may stay (kick_kept): A is writable with it, and its read would wake a recv()
     * asleep on A for nothing; the next doorbell drains both */
    int queued = 0;
    if (ioctl(c->b_fd, FIONREAD, &queued) < 0)
        queued = 0;
    int sending = c->state == FP_ST_ESTABLISHED || c->state == FP_ST_CLOSE_WAIT;
    uint32_t waiting = TOE_LOAD_ACQ(&shm->tx_full_wait);
    if (sending && (!waiting || toe_tx_writable(shm))) {
        if (queued > (waiting ? 0 : (int)st->kick_kept))
            fp_drain(c, queued);               /* (connecting: A stays stuffed until connected) */
    }
    fp_try_send(st, c, now);
    if (c->wnd_wait)
        fp_window_update(st, c, now);
    if (TOE_LOAD_ACQ(&shm->rx_tail) != TOE_LOAD_ACQ(&shm->rx_head) ||
        (TOE_LOAD_ACQ(&shm->flags) & (TOE_SF_RX_EOF | TOE_SF_RESET)))
        fp_wake(c);
}
