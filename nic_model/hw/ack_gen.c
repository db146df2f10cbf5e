/*
 * ACK generator (seed 003): the receive window we advertise, pure ACKs,
 * window updates, and when an ACK goes out.
 *
 * The policy is Linux's, and the software path runs the same one
 * (offload_daemon/tcp_output.py, _ack_policy): in-order data is acknowledged
 * at the end of the burst that brought it, unless the connection is
 * interactive (we replied within ato of the last data: "pingpong") and at
 * most one MSS is unacknowledged; then the ACK waits up to delack_s for a
 * reply to ride on (piggyback).  A delayed ACK that had to go out alone ends
 * the interactive mode (tcp_delack_timer: "delayed ACK missed").
 */
#include "fp.h"

/* What the receive window is cut from: the RX ring, or half of SO_RCVBUF below it. */
uint32_t fp_rcv_buf(const struct fp_ccb *c)
{
    if (!c->shm_addr)
        return c->rx_size;                     /* no socket (TIME-WAIT, time_wait.c) */
    uint32_t rcvbuf = TOE_LOAD_RLX(&fp_shm(c)->rcvbuf);
    return rcvbuf && rcvbuf < c->rx_size ? rcvbuf / 2 : c->rx_size;
}

uint32_t fp_rcv_space(const struct fp_ccb *c)
{
    if (!c->shm_addr)
        return c->rx_size;
    uint32_t space = toe_d_rx_space(fp_shm(c), c->rx_size), buf = fp_rcv_buf(c);
    if (buf == c->rx_size)
        return space;
    uint32_t used = c->rx_size - space;
    return buf > used ? buf - used : 0;
}

/* A doorbell once the application has freed enough for an update to be worth sending:
 * the window doubled (Linux's tcp_cleanup_rbuf) or, from under an MSS, one MSS open. */
static void wait_for_window(struct fp_state *st, struct fp_ccb *c, uint32_t space)
{
    uint32_t adv = c->rcv_adv - c->rcv_nxt;
    uint64_t want = adv < c->mss ? c->mss : 2 * (uint64_t)adv;
    uint64_t need = want > space ? want - space : 1;
    struct toe_sock_shm *shm = fp_shm(c);
    c->wnd_wait = 1;
    toe_rx_arm_window_at(shm, TOE_LOAD_RLX(&shm->rx_head) + (uint32_t)need);
    c->wnd_poll_at = st->now + st->wnd_poll_s;     /* the doorbell can be lost while A is stuffed */
    fp_deadline(st, c->wnd_poll_at);
}

/* The window field of a segment we send (never a SYN here); records the right edge. */
uint32_t fp_window(struct fp_state *st, struct fp_ccb *c)
{
    uint32_t space = fp_rcv_space(c);
    uint32_t w = space >> c->rcv_wscale;
    if (w > 0xffff)
        w = 0xffff;
    uint32_t edge = c->rcv_nxt + (w << c->rcv_wscale);
    if (seq_lt(edge, c->rcv_adv)) {                /* never shrink the window (RFC 9293 3.8.6.2.2) */
        w = (c->rcv_adv - c->rcv_nxt) >> c->rcv_wscale;
        if (w > 0xffff)
            w = 0xffff;
        edge = c->rcv_adv;
    }
    c->rcv_adv = edge;
    if (space < fp_rcv_buf(c) / 2 && !c->wnd_wait)
        wait_for_window(st, c, space);
    return w;
}

/* Every segment that carries an ACK settles what was owed. */
void fp_ack_sent(struct fp_state *st, struct fp_ccb *c, int with_data)
{
    if (c->ack_pending && with_data)
        st->counters.piggybacked++;
    c->ack_pending = 0;
    c->rcv_unacked = 0;
    c->dack_deadline = 0;               /* ack_now stays: it is membership of the burst's list */
}

void fp_send_ack(struct fp_state *st, struct fp_ccb *c)
{
    fp_emit(st, c, c->snd_nxt, TCP_ACK, NULL, 0, NULL, 0);
    st->counters.pure_acks++;
}

/* In-order data of n bytes arrived: now, at the end of the burst, or later. */
void fp_ack_policy(struct fp_state *st, struct fp_ccb *c, uint32_t n, double now)
{
    c->rcv_unacked += n;
    c->last_data_rx = now;
    c->ack_pending = 1;
    if (!c->pingpong || c->rcv_unacked > c->mss) {
        fp_owe_ack(st, c);
    } else if (c->dack_deadline == 0) {
        c->dack_deadline = now + st->delack_s;
        fp_deadline(st, c->dack_deadline);
    }
}

/* The application freed RX space: advertise it if it grew enough (RFC 9293 3.8.6.2.2). */
void fp_window_update(struct fp_state *st, struct fp_ccb *c, double now)
{
    (void)now;
    int64_t space = fp_rcv_space(c), buf = fp_rcv_buf(c);
    int64_t adv = (uint32_t)(c->rcv_adv - c->rcv_nxt), mss = c->mss;
    c->wnd_wait = 0;
    c->wnd_poll_at = 0;
    if ((adv < mss && mss <= space) || (adv >= mss && space >= 2 * adv)) {
        st->counters.window_updates++;
        fp_send_ack(st, c);
    } else if (space < buf / 2) {
        wait_for_window(st, c, (uint32_t)space);
    }
}
