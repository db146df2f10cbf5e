/*
 * TIME-WAIT in the units (seed 003: the regular part of teardown is hardware's).
 *
 * A connection in TIME-WAIT after the application closed it (the units': the peer's FIN
 * with the ACK of ours, conn_fsm.c; or software's, handed over with its CCB's fields: the
 * other ways there) needs neither its socket nor its CCB any more:
 * only what answers the segments that can still come (RFC 9293 3.10.7.4, Linux's
 * tcp_timewait_sock).  That is a record here, 88 bytes, instead of a CCB slot and a
 * software connection that live for 2 MSL: a server that closes first at thousands of
 * connections a second keeps tens of thousands of them.
 *
 * The records are a table of `cap` entries (software's --max-time-wait, less what
 * software itself holds in TIME-WAIT), hashed by connection, and a list in expiry order:
 * every record waits the same time, so a new or restarted one goes to the tail and the
 * head is always the next to expire.  A segment for a record gets what the software
 * path's _in_time_wait (offload_daemon/tcp_input.py) gives it:
 *   RST                    ignored (the record stays);
 *   SYN above rcv_nxt      a new incarnation: the record goes, the SYN is software's;
 *   FIN                    the ACK again, and the wait starts over;
 *   data, or another seq   an ACK (an old duplicate: Linux's TCP_TW_ACK);
 *   anything else          dropped.
 * The ACK is software's too: seq snd_nxt, ack rcv_nxt, the window of a connection
 * without a socket (tcp_output.py _rcv_space: the pre-accept buffer's), never shrinking.
 * Only the RX processor touches the table (frames, the deadline scan, software's calls).
 */
#include <stdlib.h>
#include <string.h>

#include "fp.h"

struct fp_tw_table {
    uint32_t cap;
    uint32_t n;
    uint32_t sw;               /* connections in software's TIME-WAIT: they share the limit */
    uint32_t hash_mask;
    uint32_t nfree;
    int32_t head;              /* expiry order: the head expires first */
    int32_t tail;
    uint32_t pad;
    double duration;
    uint32_t space;            /* the window a connection without a socket offers */
    uint32_t pad2;
    int32_t *hash;
    int32_t *free_slots;
    struct fp_tw *e;
};

void fp_tw_free(struct fp_state *st)
{
    struct fp_tw_table *t = st->tw;
    if (!t)
        return;
    free(t->hash);
    free(t->free_slots);
    free(t->e);
    free(t);
    st->tw = NULL;
}

int fp_tw_setup(struct fp_state *st, uint32_t cap, double duration, uint32_t space)
{
    fp_tw_free(st);
    if (cap == 0)
        return 0;                              /* off: TIME-WAIT stays software's */
    if (cap > (1u << 22))
        return -1;
    struct fp_tw_table *t = calloc(1, sizeof(*t));
    if (!t)
        return -1;
    uint32_t hsize = 1;
    while (hsize < 2 * cap)
        hsize <<= 1;
    t->hash = malloc(hsize * sizeof(int32_t));
    t->free_slots = malloc(cap * sizeof(int32_t));
    t->e = calloc(cap, sizeof(struct fp_tw));
    st->tw = t;
    if (!t->hash || !t->free_slots || !t->e) {
        fp_tw_free(st);
        return -1;
    }
    memset(t->hash, 0xff, hsize * sizeof(int32_t));
    t->cap = cap;
    t->hash_mask = hsize - 1;
    for (uint32_t i = 0; i < cap; i++)
        t->free_slots[i] = (int32_t)(cap - 1 - i);
    t->nfree = cap;
    t->head = t->tail = -1;
    t->duration = duration;
    t->space = space;
    return 0;
}

void fp_tw_set_sw(struct fp_state *st, uint32_t n)
{
    if (st->tw)
        ((struct fp_tw_table *)st->tw)->sw = n;
}

uint32_t fp_tw_count(struct fp_state *st)
{
    return st->tw ? ((struct fp_tw_table *)st->tw)->n : 0;
}

int fp_tw_find(struct fp_state *st, uint32_t rip, uint32_t rport, uint32_t lport)
{
    struct fp_tw_table *t = st->tw;
    if (!t)
        return -1;
    int32_t i = t->hash[fp_conn_hash(rip, rport, lport) & t->hash_mask];
    while (i >= 0) {
        struct fp_tw *w = &t->e[i];
        if (w->remote_ip == rip && w->remote_port == rport && w->local_port == lport)
            return i;
        i = w->hnext;
    }
    return -1;
}

/* The records in expiry order, for `toe stat`: record `i`'s successor (-1 at the end;
 * i = -1: the first), copied into *out. */
int fp_tw_next(struct fp_state *st, int i, struct fp_tw *out)
{
    struct fp_tw_table *t = st->tw;
    if (!t || i >= (int)t->cap || (i >= 0 && !t->e[i].in_use))
        return -1;
    int j = i < 0 ? t->head : t->e[i].next;
    if (j >= 0)
        *out = t->e[j];
    return j;
}

static void unlink_expiry(struct fp_tw_table *t, int32_t i)
{
    struct fp_tw *w = &t->e[i];
    if (w->prev >= 0)
        t->e[w->prev].next = w->next;
    else
        t->head = w->next;
    if (w->next >= 0)
        t->e[w->next].prev = w->prev;
    else
        t->tail = w->prev;
}

static void append_expiry(struct fp_tw_table *t, int32_t i, double expires)
{
    struct fp_tw *w = &t->e[i];
    w->expires = expires;
    w->next = -1;
    w->prev = t->tail;
    if (t->tail >= 0)
        t->e[t->tail].next = i;
    else
        t->head = i;
    t->tail = i;
}

static void tw_remove(struct fp_state *st, int32_t i)
{
    struct fp_tw_table *t = st->tw;
    struct fp_tw *w = &t->e[i];
    int32_t *p = &t->hash[fp_conn_hash(w->remote_ip, w->remote_port, w->local_port) & t->hash_mask];
    while (*p >= 0 && *p != i)
        p = &t->e[*p].hnext;
    if (*p == i)
        *p = w->hnext;
    unlink_expiry(t, i);
    fp_hc_port(st, w->local_port, -1);         /* the record held its port (host_cmd.c) */
    w->in_use = 0;
    t->free_slots[t->nfree++] = i;
    t->n--;
}

/* The connection's CCB, in TIME-WAIT with its last ACK sent, becomes a record (the
 * identity, snd_nxt, rcv_nxt, rcv_adv, rcv_wscale, mss, peer_mac, conn_id, uid and the
 * byte counts are read): 0, or -1 when the table is full or has it already (software keeps it). */
int fp_tw_enter(struct fp_state *st, const struct fp_ccb *c, double now)
{
    struct fp_tw_table *t = st->tw;
    if (!t || t->nfree == 0 || t->n + t->sw >= t->cap ||
        fp_tw_find(st, c->remote_ip, c->remote_port, c->local_port) >= 0)
        return -1;
    int32_t i = t->free_slots[--t->nfree];
    struct fp_tw *w = &t->e[i];
    memset(w, 0, sizeof(*w));
    w->in_use = 1;
    w->conn_id = c->conn_id;
    w->uid = c->uid;
    w->local_ip = c->local_ip;
    w->remote_ip = c->remote_ip;
    w->local_port = c->local_port;
    w->remote_port = c->remote_port;
    w->snd_nxt = c->snd_nxt;
    w->rcv_nxt = c->rcv_nxt;
    w->rcv_adv = c->rcv_adv;
    w->rcv_wscale = c->rcv_wscale > 14 ? 14 : c->rcv_wscale;  /* (RFC 7323: 14 at most) */
    w->mss = c->mss;
    w->bytes_in = c->bytes_in;
    w->bytes_out = c->bytes_out;
    memcpy(w->peer_mac, c->peer_mac, 6);
    int32_t *h = &t->hash[fp_conn_hash(w->remote_ip, w->remote_port, w->local_port) & t->hash_mask];
    w->hnext = *h;
    *h = i;
    append_expiry(t, i, now + t->duration);
    t->n++;
    fp_hc_port(st, w->local_port, 1);
    st->counters.tw_entered++;
    fp_deadline(st, t->e[t->head].expires);
    return 0;
}

/* software's send_ack for a connection without a socket: a CCB made for the one frame */
static void tw_ack(struct fp_state *st, struct fp_tw_table *t, struct fp_tw *w)
{
    struct fp_ccb c;
    memset(&c, 0, sizeof(c));
    c.local_ip = w->local_ip;
    c.remote_ip = w->remote_ip;
    c.local_port = w->local_port;
    c.remote_port = w->remote_port;
    memcpy(c.peer_mac, w->peer_mac, 6);
    c.mss = w->mss;
    c.rx_size = t->space;                      /* shm_addr 0: the window is cut from this */
    c.rcv_wscale = w->rcv_wscale;
    c.snd_nxt = w->snd_nxt;
    c.rcv_nxt = w->rcv_nxt;
    c.rcv_adv = w->rcv_adv;
    fp_build_template(st, &c);
    fp_send_ack(st, &c);
    w->rcv_adv = c.rcv_adv;
    st->counters.tw_acks++;
}

/* A segment for this adapter that no CCB takes: 1 when it was a record's (answered or
 * dropped), 0 when it goes on as before (no record, or a new incarnation's SYN). */
int fp_tw_rx(struct fp_state *st, const struct fp_seg *g, double now)
{
    struct fp_tw_table *t = st->tw;
    if (!t || t->n == 0)
        return 0;
    int32_t i = fp_tw_find(st, g->src, g->sport, g->dport);
    if (i < 0)
        return 0;
    struct fp_tw *w = &t->e[i];
    st->counters.tw_segments++;
    if (g->flags & TCP_RST)
        return 1;
    if ((g->flags & TCP_SYN) && seq_gt(g->seq, w->rcv_nxt)) {
        tw_remove(st, i);                      /* a new incarnation: let it in */
        st->counters.tw_reopened++;
        return 0;
    }
    if (g->flags & TCP_FIN) {
        tw_ack(st, t, w);
        unlink_expiry(t, i);
        append_expiry(t, i, now + t->duration);
        fp_deadline(st, t->e[t->head].expires);
    } else if (g->payload_len || g->seq != w->rcv_nxt) {
        tw_ack(st, t, w);
    }
    return 1;
}

/* The records whose 2 MSL is over go (the deadline scan calls this). */
void fp_tw_expire(struct fp_state *st, double now)
{
    struct fp_tw_table *t = st->tw;
    if (!t)
        return;
    while (t->head >= 0 && t->e[t->head].expires <= now) {
        tw_remove(st, t->head);
        st->counters.tw_expired++;
    }
    if (t->head >= 0)
        fp_deadline(st, t->e[t->head].expires);
}
