/*
 * ACK-number unit (seed 003): in-order payload goes straight from the frame
 * buffer into the application's RX ring, rcv_nxt moves, and the socket
 * becomes readable (docs/abi.md: a token into B when none is outstanding).
 *
 * The RX ring's indices are checked against the daemon's own ring sizes
 * (toe_d_rx_push): whatever the application wrote into its header, nothing
 * is written outside its ring.
 */
#include <errno.h>
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
