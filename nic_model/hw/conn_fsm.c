/*
 * Connection state unit: the regular parts of a connection's setup and teardown.
 *
 * Seed 003 gives the units a connection once it is established and takes it back for
 * anything else.  A connection that lives for one request then pays for its handshake and
 * its close in software: frames parsed and built in Python, four or five of them.  A TOE
 * takes the common case of both in hardware; so does this unit:
 *
 *   SYN-SENT      the SYN|ACK that acknowledges our SYN: the peer's MSS and window scale,
 *                 the RTT sample, our ACK, and the socket is connected (its header says so
 *                 and A becomes writable, as set_connected does in software);
 *   ESTABLISHED   the peer's FIN in order: EOF for the application (B shut for writing),
 *                 CLOSE-WAIT, an ACK at the end of the burst;
 *   close         the application's A end is gone (B hung up) in ESTABLISHED or CLOSE-WAIT
 *                 with nothing unread and no SO_LINGER: B leaves the epoll set, the rest of
 *                 the TX ring goes out, then our FIN (FIN-WAIT-1 / LAST-ACK);
 *   our FIN acked LAST-ACK is over; FIN-WAIT-1 becomes FIN-WAIT-2.  Both hand the
 *                 connection back (FP_PUNT_TEARDOWN): software releases the socket, or
 *                 waits for the peer's FIN with the orphan's timer (tcp_fin_timeout);
 *   FIN-WAIT-1    the peer's FIN in the segment that acknowledges ours (the peer closed
 *                 as soon as it read our FIN): our ACK, TIME-WAIT, handed back
 *                 (FP_PUNT_TEARDOWN): an orphan's TIME-WAIT is then a record of the
 *                 units' (time_wait.c, FP_CF_TW) and software frees the connection; a
 *                 socket still open (SHUT_WR), or a full table, is software's timer.
 *
 * Everything else in these states is software's, as before: an RST, a SYN|ACK that does
 * not acknowledge our SYN, simultaneous open, keepalive to arm, data for a closed socket,
 * a retransmitted FIN, the peer's FIN before ours is acknowledged (simultaneous close,
 * CLOSING) or after a segment that did (FIN-WAIT-2 is software's), an RTO.  The rules are the
 * software path's (offload_daemon/tcp_input.py: _in_syn_sent, _established, _fin;
 * tcp.py: app_closed; tcp_output.py: try_send's FIN), so that a connection punted at any
 * point meets in software the state software would have made.
 */
#include <sys/epoll.h>
#include <sys/socket.h>

#include "fp.h"

#define INIT_CWND_SEGS 10
#define WSCALE_MAX 14

/* -1: the units take this segment of a connection in a state other than ESTABLISHED, or
 * of a FIN in ESTABLISHED; otherwise the FP_PUNT_* reason it goes to software.  Nothing
 * is changed here. */
int fp_fsm_check(const struct fp_ccb *c, const struct fp_seg *g)
{
    uint32_t f = g->flags;
    if (f & TCP_RST)
        return FP_PUNT_RST;
    if (c->state == FP_ST_SYN_SENT) {
        if ((f & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_URG)) != (TCP_SYN | TCP_ACK) || g->ack != c->snd_nxt ||
            g->payload_len)
            return FP_PUNT_HANDSHAKE;
        if (TOE_LOAD_RLX(&fp_shm(c)->opt_flags) & TOE_OF_KEEPALIVE)
            return FP_PUNT_HANDSHAKE;          /* its timer is software's */
        return -1;
    }
    int why = fp_rx_in_order(c, g);
    if (why >= 0)
        return why;
    switch (c->state) {
    case FP_ST_ESTABLISHED:                    /* with a FIN: the hot path took the rest */
        if (g->payload_len && g->payload_len > fp_rcv_space(c))
            return FP_PUNT_BEYOND_WINDOW;
        break;
    case FP_ST_FIN_WAIT_1:
        /* the application closed (software resets data for it); the peer's FIN is the
         * units' with the ACK of ours (TIME-WAIT), software's before it (CLOSING) */
        if (g->payload_len)
            return FP_PUNT_STATE;
        if ((f & TCP_FIN) && (!(c->cflags & FP_CF_FIN_SENT) || g->ack != c->snd_max || c->snd_nxt != c->snd_max))
            return FP_PUNT_FIN;
        break;
    case FP_ST_CLOSE_WAIT:
    case FP_ST_LAST_ACK:
        /* after the peer's FIN (a retransmission), or for a socket the application closed */
        if (f & TCP_FIN)
            return FP_PUNT_FIN;
        if (g->payload_len)
            return FP_PUNT_STATE;
        break;
    default:
        return FP_PUNT_STATE;
    }
    return fp_ack_check(c, g);
}

/* SYN-SENT: the SYN|ACK fp_fsm_check let through (RFC 9293 3.10.7.3; the software path's
 * _in_syn_sent and _established). */
void fp_synack(struct fp_state *st, struct fp_ccb *c, const struct fp_seg *g, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    c->segs_in++;
    c->last_rx = now;
    c->irs = g->seq;
    c->rcv_nxt = g->seq + 1;
    c->rcv_adv = c->rcv_nxt;
    uint32_t peer = g->mss_opt ? g->mss_opt : 536;   /* absent: 536 (RFC 9293 3.7.1) */
    uint32_t mss = peer < c->adv_mss ? peer : c->adv_mss;
    c->mss = mss < 64 ? 64 : mss;
    c->max_seg = st->offloads && st->max_payload >= c->mss ? st->max_payload / c->mss * c->mss : c->mss;
    if (g->ws_opt != FP_NO_WSCALE)
        c->snd_wscale = g->ws_opt > WSCALE_MAX ? WSCALE_MAX : g->ws_opt;   /* RFC 7323 2.3 */
    else
        c->snd_wscale = c->rcv_wscale = 0;
    c->snd_una = g->ack;
    c->snd_wnd = g->window;                    /* a SYN's window is never scaled (RFC 7323 2.2) */
    c->snd_wl1 = g->seq;
    c->snd_wl2 = g->ack;
    if (c->rtt_valid)                          /* the SYN was not resent (Karn) */
        fp_rtt_sample(c, now - c->rtt_time);
    c->rtt_valid = 0;
    c->state = FP_ST_ESTABLISHED;
    c->retries = 0;
    c->snd_sml = c->snd_una;
    c->cwnd = INIT_CWND_SEGS * c->mss;
    c->rto_deadline = 0;
    c->tx_head = TOE_LOAD_ACQ(&shm->tx_head);
    st->counters.syn_acks++;
    fp_send_ack(st, c);
    TOE_STORE_REL(&shm->mss, c->mss);
    TOE_STORE_REL(&shm->state, TOE_SS_CONNECTED);
    fp_drain(c, -1);                           /* A writable: connect() returns */
    fp_try_send(st, c, now);
}

/* The peer's FIN, in order, after the segment's ACK and payload were taken (RFC 9293
 * 3.10.7.4's eighth check; the software path's _fin): in ESTABLISHED, or in FIN-WAIT-2
 * that this segment's ACK of our FIN has just made (fp_fin_acked handed it back). */
void fp_peer_fin(struct fp_state *st, struct fp_ccb *c)
{
    struct toe_sock_shm *shm = fp_shm(c);
    c->rcv_nxt++;
    c->cflags |= FP_CF_RX_FIN;
    /* EOF without a token: shutting B makes A readable with POLLIN and POLLRDHUP in one
     * wake-up, as the kernel's FIN does (HostSocket.set_eof) */
    __atomic_fetch_or(&shm->flags, TOE_SF_RX_EOF, __ATOMIC_RELEASE);
    if (c->b_fd >= 0 && !(c->cflags & FP_CF_B_SHUT)) {
        shutdown(c->b_fd, SHUT_WR);
        c->cflags |= FP_CF_B_SHUT;
    }
    c->dack_deadline = 0;                      /* a FIN is acknowledged at once */
    st->counters.fins_in++;
    if (c->state == FP_ST_FIN_WAIT_1) {
        /* our FIN went out while this segment was taken (its ACK opened the window for the
         * rest of the TX ring and the FIN the application's close was waiting for), so the
         * peer's FIN does not acknowledge it: simultaneous close, CLOSING, software's (as
         * its _fin makes it: the ACK processing first, then the FIN) */
        c->state = FP_ST_CLOSING;
        c->ack_pending = 1;
        fp_owe_ack(st, c);
        fp_punt_conn(st, c, -1, FP_PUNT_STATE);
        return;
    }
    if (c->state == FP_ST_FIN_WAIT_2) {        /* TIME-WAIT: the ACK now, then a record here */
        c->state = FP_ST_TIME_WAIT;
        fp_send_ack(st, c);
        c->ack_pending = 0;
        if ((c->cflags & FP_CF_ORPHAN) && fp_tw_enter(st, c, st->now) == 0)
            c->cflags |= FP_CF_TW;             /* else the timer is software's */
        return;
    }
    c->state = FP_ST_CLOSE_WAIT;
    c->ack_pending = 1;
    fp_owe_ack(st, c);
}

/* B hung up: the application closed the socket.  0: the units go on with the close;
 * -1: software's (the caller punts), nothing changed. */
int fp_app_close(struct fp_state *st, struct fp_ccb *c, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    if (st->proc || c->b_fd < 0)
        return -1;                             /* two processors: B may be in the TX processor's set */
    if (c->state != FP_ST_ESTABLISHED && c->state != FP_ST_CLOSE_WAIT)
        return -1;
    if (TOE_LOAD_ACQ(&shm->rx_tail) != TOE_LOAD_ACQ(&shm->rx_head))
        return -1;                             /* unread data: the close aborts (an RST) */
    if (TOE_LOAD_RLX(&shm->opt_flags) & TOE_OF_LINGER)
        return -1;
    epoll_ctl(st->ep_fd, EPOLL_CTL_DEL, c->b_fd, NULL);
    if ((uint32_t)c->b_fd < st->fd_map_len)
        st->fd_map[c->b_fd] = -1;
    c->b_fd = -1;                              /* B stays open, software's: it closes it at the pull */
    c->cflags |= FP_CF_ORPHAN | FP_CF_FIN_WANTED;
    c->wnd_wait = 0;
    st->counters.app_closes++;
    fp_try_send(st, c, now);                   /* the rest of the TX ring, then the FIN */
    return 0;
}

/* Software's connect(), pushed in SYN-SENT with FP_CF_SEND_SYN: the SYN, with the options
 * software's _send_syn gives it (MSS, window scale: tcp_output.py _syn_options). */
void fp_send_syn(struct fp_state *st, struct fp_ccb *c, double now)
{
    uint8_t opts[8] = {2, 4, (uint8_t)(c->adv_mss >> 8), (uint8_t)c->adv_mss, 1, 3, 3, (uint8_t)c->rcv_wscale};
    c->rcv_adv = 0;
    fp_emit_opts(st, c, c->snd_una, TCP_SYN, opts, sizeof(opts), NULL, 0, NULL, 0);
    c->rto_deadline = now + c->rto;
    fp_deadline(st, c->rto_deadline);
    st->counters.syns++;
}

/* The TX ring is all sent and the application closed: our FIN (try_send calls this). */
void fp_send_fin(struct fp_state *st, struct fp_ccb *c, double now)
{
    if (c->cflags & FP_CF_FIN_SENT)
        return;
    c->fin_seq = c->snd_nxt;
    fp_emit(st, c, c->snd_nxt, TCP_FIN | TCP_ACK, NULL, 0, NULL, 0);
    c->snd_nxt++;
    if (seq_gt(c->snd_nxt, c->snd_max))
        c->snd_max = c->snd_nxt;
    c->cflags |= FP_CF_FIN_SENT;
    c->state = c->state == FP_ST_ESTABLISHED ? FP_ST_FIN_WAIT_1 : FP_ST_LAST_ACK;
    if (c->rto_deadline == 0) {
        c->rto_deadline = now + c->rto;
        fp_deadline(st, c->rto_deadline);
    }
    st->counters.fins_out++;
}

/* The ACK processing found our FIN acknowledged (the software path's _our_fin_acked):
 * FIN-WAIT-1 becomes FIN-WAIT-2; a LAST-ACK connection is over (its state stays LAST-ACK
 * with the FIN acked, as software's record of it says).  Software takes it from here. */
void fp_fin_acked(struct fp_state *st, struct fp_ccb *c)
{
    if (c->state == FP_ST_LAST_ACK)
        st->counters.closes++;
    else if (c->state == FP_ST_FIN_WAIT_1)
        c->state = FP_ST_FIN_WAIT_2;
    fp_punt_conn(st, c, -1, FP_PUNT_TEARDOWN);
}
