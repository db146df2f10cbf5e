/*
 * TX buffer manager and header generator (seed 003).
 *
 * The buffer manager sends what the TX ring, the peer's window and cwnd
 * allow (Linux's tcp_write_xmit rules, as offload_daemon/tcp_output.py's
 * try_send: Nagle after Minshall, sender SWS avoidance, PSH at the end of a
 * write, TSO frames of whole MSS), and takes ACKs: snd_una moves, acked ring
 * bytes are freed (a waiting writer wakes), RTT is sampled (RFC 6298), cwnd
 * grows (RFC 5681 slow start per byte, congestion avoidance).  What needs a
 * timer other than the RTO (cork, MSG_MORE, the persist timer) or loss
 * recovery is the software path's: the connection is punted.
 *
 * The header generator keeps a template per connection (its CCB cache entry:
 * virtio header, Ethernet addresses, the constant IPv4 words and their sum,
 * the ports) and fills in the per-segment words; the payload is gathered
 * from the ring by writev, never copied, when the kernel computes the
 * checksum (offloads on); with offloads off each segment is at most one MSS
 * and its checksum is computed here.
 */
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fp.h"

#define RTO_MIN 0.2
#define RTO_MAX 60.0
#define CWND_MAX 0x7fffffffu

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline uint32_t fold(uint32_t s)
{
    s = (s & 0xffff) + (s >> 16);
    return (s & 0xffff) + (s >> 16);
}

void fp_build_template(struct fp_state *st, struct fp_ccb *c)
{
    uint8_t *h = c->tmpl;
    memset(h, 0, sizeof(c->tmpl));
    memcpy(h + FP_ETH_OFF, c->peer_mac, 6);
    memcpy(h + FP_ETH_OFF + 6, st->my_mac, 6);
    put16(h + FP_ETH_OFF + 12, 0x0800);
    uint8_t *ip = h + FP_IP_OFF;
    ip[0] = 0x45;
    put16(ip + 6, 0x4000);                     /* DF */
    ip[8] = 64;
    ip[9] = 6;
    put32(ip + 12, c->local_ip);
    put32(ip + 16, c->remote_ip);
    uint8_t *t = h + FP_TCP_OFF;
    put16(t, c->local_port);
    put16(t + 2, c->remote_port);
    t[12] = 5 << 4;
    uint32_t addrs = (c->local_ip >> 16) + (c->local_ip & 0xffff) + (c->remote_ip >> 16) +
                     (c->remote_ip & 0xffff);
    c->ip_base = 0x4500 + 0x4000 + (64 << 8 | 6) + addrs;
    c->pseudo_base = addrs + 6;
    st->counters.ccb_cache_misses++;
}

/* One segment of n1 + n2 payload bytes (a TSO frame when longer than an MSS). */
void fp_emit(struct fp_state *st, struct fp_ccb *c, uint32_t seq, uint32_t flags,
             const uint8_t *p1, uint32_t n1, const uint8_t *p2, uint32_t n2)
{
    fp_emit_opts(st, c, seq, flags, NULL, 0, p1, n1, p2, n2);
}

/* ... with optlen (a multiple of 4, at most 40) bytes of TCP options.  A SYN's window is
 * never scaled (RFC 7323 2.2). */
void fp_emit_opts(struct fp_state *st, struct fp_ccb *c, uint32_t seq, uint32_t flags, const uint8_t *opts,
                  uint32_t optlen, const uint8_t *p1, uint32_t n1, const uint8_t *p2, uint32_t n2)
{
    uint32_t n = n1 + n2, ack = 0, window = 0;
    if (flags & TCP_ACK) {
        ack = c->rcv_nxt;
        window = fp_window(st, c);
        fp_ack_sent(st, c, n > 0);
    } else if (flags & TCP_SYN) {
        uint32_t space = fp_rcv_space(c);
        window = space > 0xffff ? 0xffff : space;
        c->rcv_adv = c->rcv_nxt + window;
    }
    if (optlen > 40 || optlen % 4)
        optlen = 0;
    uint8_t hdr[FP_TMPL_LEN + 40];
    memcpy(hdr, c->tmpl, FP_TMPL_LEN);
    if (optlen) {
        memcpy(hdr + FP_TMPL_LEN, opts, optlen);
        hdr[FP_TCP_OFF + 12] = (uint8_t)((5 + optlen / 4) << 4);
    }
    uint32_t hlen = FP_TMPL_LEN + optlen;
    uint32_t tcp_len = 20 + optlen + n, total = 20 + tcp_len;
    uint32_t id = st->ip_id = (st->ip_id + 1) & 0xffff;
    uint8_t *ip = hdr + FP_IP_OFF, *t = hdr + FP_TCP_OFF;
    put16(ip + 2, total);
    put16(ip + 4, id);
    put16(ip + 10, 0xffff - fold(c->ip_base + total + id));
    put32(t + 4, seq);
    put32(t + 8, ack);
    t[13] = (uint8_t)flags;
    put16(t + 14, window);
    struct fp_counters *k = &st->counters;
    struct iovec iov[3];
    int niov = 1;
    int gso = 0;
    if (st->offloads) {
        put16(t + 16, fold(c->pseudo_base + tcp_len));
        gso = n > c->mss;
        hdr[0] = 1;                            /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        hdr[1] = gso ? 1 : 0;                  /* GSO_TCPV4 */
        uint32_t hdr_len = gso ? hlen - FP_VNET_LEN : 0, gso_size = gso ? c->mss : 0;
        memcpy(hdr + 2, &(uint16_t){(uint16_t)hdr_len}, 2);    /* little-endian fields */
        memcpy(hdr + 4, &(uint16_t){(uint16_t)gso_size}, 2);
        memcpy(hdr + 6, &(uint16_t){FP_TCP_OFF - FP_VNET_LEN}, 2);
        memcpy(hdr + 8, &(uint16_t){16}, 2);
        iov[0] = (struct iovec){hdr, hlen};
        if (n1)
            iov[niov++] = (struct iovec){(void *)p1, n1};
        if (n2)
            iov[niov++] = (struct iovec){(void *)p2, n2};
    }
    if (!st->offloads || st->no_reuse) {
        /* one contiguous frame: its checksum is computed here (offloads off), or it goes
         * out of a buffer mapped for this packet alone (no_reuse, seed 002's other side) */
        uint8_t *fr = st->no_reuse ? fp_map_buffer(st, hlen + n) : st->txbuf;
        if (!fr) {
            k->tx_errors++;
            return;
        }
        memcpy(fr, hdr, hlen);
        if (n1)
            memcpy(fr + hlen, p1, n1);
        if (n2)
            memcpy(fr + hlen + n1, p2, n2);
        if (!st->offloads) {
            put16(fr + FP_TCP_OFF + 16, toe_csum_fold(fr + FP_TCP_OFF, tcp_len, c->pseudo_base + tcp_len));
            k->sw_checksums++;
        }
        iov[0] = (struct iovec){fr, hlen + n};
        niov = 1;
    }
    k->segments++;
    k->ccb_cache_hits++;
    k->payload_bytes += n;
    c->segs_out++;
    if (n) {
        k->data_segments++;
        c->data_fast++;
    }
    ssize_t r;
    do
        r = writev(st->tap_fd, iov, niov);
    while (r < 0 && errno == EINTR);
    if (st->no_reuse)
        fp_unmap_buffer(st, iov[0].iov_base, iov[0].iov_len);
    if (r < 0) {
        k->tx_errors++;
        return;
    }
    k->tx_frames++;
    k->tx_bytes += hlen - FP_VNET_LEN + n;
    if (gso)
        k->tx_gso_frames++;
}

/* -1: the units may take this ACK; otherwise why not (nothing is changed). */
int fp_ack_check(const struct fp_ccb *c, const struct fp_seg *g)
{
    uint32_t ack = g->ack, una = c->snd_una;
    if (seq_gt(ack, c->snd_max))
        return FP_PUNT_ACK_UNSENT;
    if (seq_lt(ack, una))
        return FP_PUNT_OLD_ACK;
    if (ack == una && g->payload_len == 0 && c->snd_nxt != una &&
        (g->window << c->snd_wscale) == c->snd_wnd)
        return FP_PUNT_DUP_ACK;
    return -1;
}

/* RFC 6298 2.2-2.4 (the software path's _rtt_sample, the same arithmetic). */
void fp_rtt_sample(struct fp_ccb *c, double r)
{
    if (r < 0)
        return;
    if (c->srtt == 0.0) {
        c->srtt = r;
        c->rttvar = r / 2;
    } else {
        double d = c->srtt - r;
        c->rttvar = 0.75 * c->rttvar + 0.25 * (d < 0 ? -d : d);
        c->srtt = 0.875 * c->srtt + 0.125 * r;
    }
    double v = 4 * c->rttvar;
    double rto = c->srtt + (v > 0.001 ? v : 0.001);
    c->rto = rto < RTO_MIN ? RTO_MIN : rto > RTO_MAX ? RTO_MAX : rto;
}

/* RFC 9293 3.10.7.4's fifth check for an ACK fp_ack_check let through. */
void fp_ack_process(struct fp_state *st, struct fp_ccb *c, const struct fp_seg *g, double now)
{
    uint32_t ack = g->ack, una = c->snd_una;
    uint32_t window = g->window << c->snd_wscale;
    struct toe_sock_shm *shm = fp_shm(c);
    int fin_acked = 0;
    if (seq_lt(una, ack)) {
        uint32_t acked = ack - una;
        fin_acked = (c->cflags & FP_CF_FIN_SENT) && seq_gt(ack, c->fin_seq);
        c->snd_una = ack;
        if (seq_lt(c->snd_nxt, ack))
            c->snd_nxt = ack;
        c->retries = 0;
        c->tx_head += acked - (uint32_t)fin_acked;     /* the FIN takes a number, no ring byte */
        st->counters.ring_frees++;
        if (toe_tx_release(shm, c->tx_head)) {
            fp_drain(c, -1);
            st->counters.writer_wakeups++;
        }
        uint32_t k = 0;
        while (k < c->psh_n && seq_le(c->psh_ends[k], ack))
            k++;
        if (k) {
            memmove(c->psh_ends, c->psh_ends + k, (c->psh_n - k) * sizeof(uint32_t));
            c->psh_n -= k;
        }
        if (c->rtt_valid && seq_ge(ack, c->rtt_seq)) {
            fp_rtt_sample(c, now - c->rtt_time);
            c->rtt_valid = 0;
        }
        if (c->cwnd < c->ssthresh) {
            uint64_t w = (uint64_t)c->cwnd + acked;
            c->cwnd = w > CWND_MAX ? CWND_MAX : (uint32_t)w;
        } else {
            uint64_t inc = (uint64_t)c->mss * acked / c->cwnd;
            uint64_t w = (uint64_t)c->cwnd + (inc ? inc : 1);
            c->cwnd = w > CWND_MAX ? CWND_MAX : (uint32_t)w;
        }
        if (c->snd_una == c->snd_nxt) {
            c->rto_deadline = 0;
        } else {
            c->rto_deadline = now + c->rto;
            fp_deadline(st, c->rto_deadline);
        }
    }
    if (fin_acked) {
        int over = c->state == FP_ST_LAST_ACK;
        fp_fin_acked(st, c);
        if (over)
            return;                                /* the connection is over: nothing else to take */
    }
    if (seq_lt(c->snd_wl1, g->seq) || (c->snd_wl1 == g->seq && seq_le(c->snd_wl2, ack))) {
        c->snd_wnd = window;
        c->snd_wl1 = g->seq;
        c->snd_wl2 = ack;
    }
    fp_try_send(st, c, now);
}

static void note_push(struct fp_ccb *c, uint32_t end)
{
    if (c->psh_n && !seq_gt(end, c->psh_ends[c->psh_n - 1]))
        return;
    if (c->psh_n == FP_PSH_MAX) {
        memmove(c->psh_ends, c->psh_ends + 1, (FP_PSH_MAX - 1) * sizeof(uint32_t));
        c->psh_n--;
    }
    c->psh_ends[c->psh_n++] = end;
}

/* Send what the ring, the peer's window and cwnd allow (see the top of this file). */
void fp_try_send(struct fp_state *st, struct fp_ccb *c, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    uint8_t *ring = toe_tx_base(shm);
    uint32_t size = c->tx_size, mss = c->mss;
    uint32_t opt = TOE_LOAD_RLX(&shm->opt_flags);
    int nodelay = opt & TOE_OF_NODELAY, corked = opt & TOE_OF_CORK;
    uint32_t snd_max0 = c->snd_max;
    if (c->punted || (c->state != FP_ST_ESTABLISHED && c->state != FP_ST_CLOSE_WAIT))
        return;                                    /* connecting, or our FIN is out */
again:;
    uint32_t tail = 0;
    int64_t unsent = 0;
    for (;;) {
        tail = TOE_LOAD_ACQ(&shm->tx_tail);
        uint32_t push = TOE_LOAD_ACQ(&shm->tx_push);
        uint32_t in_ring = tail - c->tx_head;
        if (in_ring > size)
            in_ring = size;                        /* a tail past the ring is the application's lie */
        uint32_t flight = c->snd_nxt - c->snd_una;
        unsent = (int64_t)in_ring - flight;
        if (unsent <= 0)
            break;
        uint32_t lim = c->snd_wnd < c->cwnd ? c->snd_wnd : c->cwnd;
        int64_t room = (int64_t)lim - flight;
        if (room <= 0) {
            if (c->snd_wnd == 0 && flight == 0 && c->rto_deadline == 0)
                fp_punt_conn(st, c, -1, FP_PUNT_ZERO_WINDOW);   /* the persist timer */
            break;
        }
        uint32_t start = c->tx_head + flight;
        uint32_t pushable = push - start;
        if (pushable > unsent)
            pushable = 0;                          /* the mark lies behind: all of it is MSG_MORE */
        int64_t n64 = unsent < room ? unsent : room;
        if (n64 > c->max_seg)
            n64 = c->max_seg;
        uint32_t n = (uint32_t)n64, partial = n % mss;
        /* the data before the FIN of a closed socket is never held (tcp_nagle_test) */
        int final = (c->cflags & FP_CF_FIN_WANTED) && n == unsent;
        if (partial) {
            if (n < mss && n < unsent && flight > 0)
                break;                             /* sender SWS avoidance (RFC 9293 3.8.6.2.1) */
            /* a partial segment waits (tcp_output.py _hold_partial): under TCP_CORK or MSG_MORE
             * (the timer is software's: the connection goes there for the tail), or under
             * Nagle (Minshall) while a partial segment is out.  Whole segments before it go. */
            int more = !final && (corked || n > pushable);
            int nagle = !final && !more && !nodelay && flight > 0 && seq_gt(c->snd_sml, c->snd_una) &&
                        seq_le(c->snd_sml, c->snd_nxt);
            if (more && n < mss) {
                fp_punt_conn(st, c, -1, FP_PUNT_CORK);
                break;
            }
            if (more || nagle) {
                if (n < mss)
                    break;
                n -= partial;
            }
        }
        uint32_t off = start & (size - 1), first = size - off < n ? size - off : n;
        uint32_t flags = TCP_ACK;
        if (pushable > 0 && pushable <= n) {
            flags |= TCP_PSH;
            note_push(c, c->snd_nxt + n);
        }
        fp_emit(st, c, c->snd_nxt, flags, ring + off, first, ring, n - first);
        if (!c->rtt_valid) {
            c->rtt_valid = 1;
            c->rtt_seq = c->snd_nxt + n;
            c->rtt_time = now;
        }
        c->snd_nxt += n;
        if (n % mss)
            c->snd_sml = c->snd_nxt;
        if (seq_gt(c->snd_nxt, c->snd_max)) {
            c->bytes_out += c->snd_nxt - c->snd_max;
            c->snd_max = c->snd_nxt;
        }
        if (c->rto_deadline == 0) {
            c->rto_deadline = now + c->rto;
            fp_deadline(st, c->rto_deadline);
        }
        if (now - c->last_data_rx < st->ato_s)
            c->pingpong = 1;                       /* a reply: interactive (tcp_event_data_sent) */
    }
    if (c->snd_max != snd_max0) {
        if (toe_tx_sent(shm, c->tx_head + (c->snd_max - c->snd_una)))
            fp_drain(c, -1);
        snd_max0 = c->snd_max;
    }
    if (unsent > 0 || c->punted)
        return;
    if (c->cflags & FP_CF_FIN_WANTED) {
        fp_send_fin(st, c, now);                   /* the application closed: nothing more comes */
        return;
    }
    if (toe_tx_arm_doorbell(shm) != tail)
        goto again;
}
