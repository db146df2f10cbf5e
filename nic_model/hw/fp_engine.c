/*
 * The fast path's engine: the CCB table, the adapter's wait, and the
 * hand-back to software.
 *
 * fp_poll() is the event loop's wait: it runs epoll_wait on the daemon's
 * epoll set itself and handles, without returning to Python, what the units
 * own: frames from the TAP (up to FP_RX_BATCH per wake-up) and doorbells of
 * fast connections (their B ends).  Everything else is handed back as
 * struct fp_event records, in order: epoll events of other descriptors,
 * frames for software (in the frame buffers software lent the units; a
 * punted frame keeps its buffer until the next fp_poll), and connections
 * that need software.  At the end of the burst each connection that owes an
 * ACK sends one; then deadlines (RTO expiry, delayed ACKs, RX window
 * polling) are looked at when one may be due.
 *
 * Lookups: a hash of (remote ip, remote port, local port) to the slot, and
 * a map from the B descriptor to the slot.  No global state besides the
 * table and the counters: several engines could each own a partition of the
 * connections.
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fp.h"

double fp_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct fp_state *fp_new(uint32_t capacity, int tap_fd, int ep_fd, uint32_t my_ip, const uint8_t *my_mac,
                        int offloads, uint32_t max_payload, uint32_t nbufs, uint32_t buf_size)
{
    if (capacity == 0 || capacity > (1u << 24) || nbufs < 2 || buf_size < FP_TMPL_LEN + 1500)
        return NULL;
    struct fp_state *st = calloc(1, sizeof(*st));
    if (!st)
        return NULL;
    uint32_t hsize = 1;
    while (hsize < 2 * capacity)
        hsize <<= 1;
    st->tap_fd = tap_fd;
    st->ep_fd = ep_fd;
    st->my_ip = my_ip;
    memcpy(st->my_mac, my_mac, 6);
    st->offloads = offloads != 0;
    st->max_payload = max_payload;
    st->capacity = capacity;
    st->hash_mask = hsize - 1;
    st->nbufs = nbufs;
    st->buf_size = buf_size;
    st->delack_s = 0.040;
    st->ato_s = 0.040;
    st->wnd_poll_s = 0.005;
    st->ack_head = -1;
    st->place_slot = -1;
    st->kick_kept = fp_kick_probe();
    st->fd_map_len = 1024;
    st->ccbs = calloc(capacity, sizeof(struct fp_ccb));
    st->hash = malloc(hsize * sizeof(int32_t));
    st->fd_map = malloc(st->fd_map_len * sizeof(int32_t));
    st->free_slots = malloc(capacity * sizeof(int32_t));
    st->bufs = calloc(nbufs, sizeof(uint64_t));
    st->events = calloc(FP_MAX_EVENTS, sizeof(struct fp_event));
    st->txbuf = malloc(65536 + 256);
    if (!st->ccbs || !st->hash || !st->fd_map || !st->free_slots || !st->bufs || !st->events || !st->txbuf) {
        fp_free(st);
        return NULL;
    }
    for (uint32_t i = 0; i < capacity; i++)    /* slot 0 on top: the table stays dense at its start */
        st->free_slots[i] = (int32_t)(capacity - 1 - i);
    st->nfree = capacity;
    memset(st->hash, 0xff, hsize * sizeof(int32_t));
    memset(st->fd_map, 0xff, st->fd_map_len * sizeof(int32_t));
    return st;
}

void fp_free(struct fp_state *st)
{
    if (!st)
        return;
    fp_proc_stop(st);
    fp_tw_free(st);
    fp_hc_free(st);
    free(st->ccbs);
    free(st->hash);
    free(st->fd_map);
    free(st->free_slots);
    free(st->bufs);
    free(st->events);
    free(st->txbuf);
    free(st);
}

int fp_set_buf(struct fp_state *st, uint32_t i, uint64_t addr)
{
    if (i >= st->nbufs)
        return -1;
    st->bufs[i] = addr;
    return 0;
}

int fp_find(struct fp_state *st, uint32_t rip, uint32_t rport, uint32_t lport)
{
    int32_t i = st->hash[fp_conn_hash(rip, rport, lport) & st->hash_mask];
    while (i >= 0) {
        struct fp_ccb *c = &st->ccbs[i];
        if (c->remote_ip == rip && c->remote_port == rport && c->local_port == lport)
            return i;
        i = c->hnext;
    }
    return -1;
}

static int slot_of(struct fp_state *st, const struct fp_ccb *c)
{
    return (int)(c - st->ccbs);
}

static int valid_slot(struct fp_state *st, int slot)
{
    return slot >= 0 && (uint32_t)slot < st->capacity && st->ccbs[slot].in_use;
}

/* Software hands a connection to the units: its CCB is copied into a free slot. */
int fp_push(struct fp_state *st, const struct fp_ccb *src)
{
    if (st->ack_head >= 0)
        fp_end_burst(st);                      /* the list of owed ACKs goes through the slots */
    if (src->b_fd < 0 || src->mss == 0 || src->tx_size == 0 || (src->tx_size & (src->tx_size - 1)) ||
        src->rx_size == 0 || !src->shm_addr || src->max_seg < src->mss || (src->cflags & FP_CF_ORPHAN))
        return -EINVAL;
    switch (src->state) {                      /* the states the units know (conn_fsm.c) */
    case FP_ST_SYN_SENT:
    case FP_ST_ESTABLISHED:
    case FP_ST_CLOSE_WAIT:
    case FP_ST_FIN_WAIT_1:
    case FP_ST_LAST_ACK:
        break;
    default:
        return -EINVAL;
    }
    if (fp_find(st, src->remote_ip, src->remote_port, src->local_port) >= 0)
        return -EEXIST;
    if ((uint32_t)src->b_fd >= st->fd_map_len) {
        uint32_t len = st->fd_map_len;
        while (len <= (uint32_t)src->b_fd)
            len *= 2;
        struct fp_proc *pr = st->proc;       /* the TX processor reads the map under the lock */
        if (pr)
            pthread_mutex_lock(&pr->table_lock);
        int32_t *m = realloc(st->fd_map, len * sizeof(int32_t));
        if (m) {
            memset(m + st->fd_map_len, 0xff, (len - st->fd_map_len) * sizeof(int32_t));
            st->fd_map = m;
            st->fd_map_len = len;
        }
        if (pr)
            pthread_mutex_unlock(&pr->table_lock);
        if (!m)
            return -ENOMEM;
    }
    if (st->fd_map[src->b_fd] >= 0)
        return -EEXIST;
    if (st->nfree == 0) {
        st->counters.table_full++;
        return -ENOSPC;
    }
    uint32_t slot = (uint32_t)st->free_slots[--st->nfree];   /* O(1), whatever the table holds */
    struct fp_proc *p = st->proc;
    if (p)
        pthread_mutex_lock(&p->table_lock);
    fp_lock(st, (int)slot);
    struct fp_ccb *c = &st->ccbs[slot];
    *c = *src;
    c->in_use = 1;
    c->punted = 0;
    c->punt_reason = 0;
    c->ack_now = 0;
    if (c->psh_n > FP_PSH_MAX)
        c->psh_n = FP_PSH_MAX;
    fp_build_template(st, c);
    uint32_t h = fp_conn_hash(c->remote_ip, c->remote_port, c->local_port) & st->hash_mask;
    c->hnext = st->hash[h];
    st->hash[h] = (int32_t)slot;
    st->fd_map[c->b_fd] = (int32_t)slot;
    st->active++;
    st->counters.pushes++;
    if (c->rto_deadline)
        fp_deadline(st, c->rto_deadline);
    if (c->dack_deadline)
        fp_deadline(st, c->dack_deadline);
    if (c->wnd_wait) {
        c->wnd_poll_at = st->now + st->wnd_poll_s;
        fp_deadline(st, c->wnd_poll_at);
    }
    if (c->cflags & FP_CF_SEND_SYN) {
        c->cflags &= ~FP_CF_SEND_SYN;
        if (c->state == FP_ST_SYN_SENT)
            fp_send_syn(st, c, st->now > 0 ? st->now : fp_mono());   /* software's clock (FastPath.send_syn) */
    }
    int b_fd = c->b_fd;
    fp_unlock(st, (int)slot);
    if (p) {
        pthread_mutex_unlock(&p->table_lock);
        fp_proc_moved(st, b_fd, 1);
    }
    return (int)slot;
}

int fp_peek(struct fp_state *st, int slot, struct fp_ccb *dst)
{
    if (!valid_slot(st, slot))
        return -1;
    fp_lock(st, slot);
    *dst = st->ccbs[slot];
    fp_unlock(st, slot);
    return 0;
}

/* Software takes a connection back: its CCB is copied out and the slot freed. */
int fp_pull(struct fp_state *st, int slot, struct fp_ccb *dst)
{
    if (!valid_slot(st, slot))
        return -1;
    if (st->ack_head >= 0)
        fp_end_burst(st);
    struct fp_proc *pr = st->proc;
    if (pr)
        pthread_mutex_lock(&pr->table_lock);
    fp_lock(st, slot);
    struct fp_ccb *c = &st->ccbs[slot];
    *dst = *c;
    int32_t *p = &st->hash[fp_conn_hash(c->remote_ip, c->remote_port, c->local_port) & st->hash_mask];
    while (*p >= 0 && *p != slot)
        p = &st->ccbs[*p].hnext;
    if (*p == slot)
        *p = c->hnext;
    if ((uint32_t)c->b_fd < st->fd_map_len)
        st->fd_map[c->b_fd] = -1;
    c->in_use = 0;
    c->ack_now = 0;
    if (st->place_slot == slot)
        st->place_slot = -1;
    st->free_slots[st->nfree++] = slot;
    st->active--;
    st->counters.pulls++;
    fp_unlock(st, slot);
    if (pr) {
        pthread_mutex_unlock(&pr->table_lock);
        fp_proc_moved(st, dst->b_fd, 0);
    }
    return 0;
}

struct fp_event *fp_event_new(struct fp_state *st, uint32_t kind)
{
    if (st->nevents >= FP_MAX_EVENTS)
        return NULL;                           /* cannot happen: the budgets below keep room */
    struct fp_event *e = &st->events[st->nevents++];
    memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->slot = -1;
    e->fd = -1;
    st->counters.sw_events++;
    return e;
}

void fp_punt_conn(struct fp_state *st, struct fp_ccb *c, int slot, uint32_t reason)
{
    (void)slot;
    if (c->punted)
        return;
    c->punted = 1;
    c->punt_reason = reason;
    st->counters.punts[reason]++;
    struct fp_event *e = fp_event_new(st, FP_EV_CONN);
    if (e) {
        e->slot = slot_of(st, c);
        e->reason = reason;
    }
}

void fp_deadline(struct fp_state *st, double when)
{
    if (st->next_scan == 0 || when < st->next_scan)
        st->next_scan = when;
}

void fp_owe_ack(struct fp_state *st, struct fp_ccb *c)
{
    if (c->ack_now)
        return;
    c->ack_now = 1;
    c->ack_next = st->ack_head;
    st->ack_head = slot_of(st, c);
}

/* End of a burst: one ACK per connection that still owes one. */
void fp_end_burst(struct fp_state *st)
{
    int32_t i = st->ack_head;
    st->ack_head = -1;
    for (uint32_t n = 0; i >= 0 && n < st->capacity; n++) {   /* each slot is on the list once */
        struct fp_ccb *c = &st->ccbs[i];
        fp_lock(st, i);
        i = c->ack_next;
        if (c->in_use && c->ack_now && c->ack_pending) {
            if (!c->punted)
                fp_send_ack(st, c);
            else
                c->dack_deadline = 0;          /* still owed now: software sends it (FastPath.own) */
        }
        c->ack_now = 0;
        fp_unlock(st, slot_of(st, c));
    }
}

static void punt_frame(struct fp_state *st, uint32_t buf, uint32_t len, uint32_t reason, int slot)
{
    st->counters.punts[reason]++;
    struct fp_event *e = fp_event_new(st, FP_EV_FRAME);
    if (e) {
        e->buf = buf;
        e->len = len;
        e->reason = reason;
        e->slot = slot;
    }
}

/* A fresh "DMA-mapped" buffer for one packet (no_reuse), or NULL. */
uint8_t *fp_map_buffer(struct fp_state *st, size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    st->counters.dma_maps++;
    return p;
}

void fp_unmap_buffer(struct fp_state *st, uint8_t *p, size_t len)
{
    munmap(p, len);
    st->counters.dma_unmaps++;
}

static int rx_frame(struct fp_state *st, const uint8_t *f, uint32_t len, uint32_t buf, double now);

/* One frame in buffer `buf`. Returns 1 when the frame went to software (its buffer is lent). */
int fp_rx_frame(struct fp_state *st, uint32_t buf, uint32_t len, double now)
{
    if (buf >= st->nbufs || len > st->buf_size)
        return 0;
    return rx_frame(st, (const uint8_t *)(uintptr_t)st->bufs[buf], len, buf, now);
}

/* A frame for software goes into its buffer `buf` (where it is unless it came in a
 * buffer of its own: no_reuse). */
static void lend(struct fp_state *st, const uint8_t *f, uint32_t len, uint32_t buf)
{
    uint8_t *dst = (uint8_t *)(uintptr_t)st->bufs[buf];
    if (dst != f)
        memcpy(dst, f, len);
}

/* A segment the units take (fp_rx_fast_ok said so): its ACK, then its payload, which is at
 * `payload` or, when NULL, already at the RX ring's tail (direct placement). */
static void take(struct fp_state *st, struct fp_ccb *c, const struct fp_seg *g, const uint8_t *payload,
                 double now)
{
    st->counters.rx_segments++;
    c->segs_in++;
    c->last_rx = now;
    fp_ack_process(st, c, g, now);
    if (!g->payload_len)
        return;
    st->counters.rx_data_segments++;
    c->data_fast++;
    if (payload)
        fp_deliver(st, c, payload, g->payload_len, now);
    else
        fp_deliver_placed(st, c, g->payload_len, now);
}

static int rx_frame(struct fp_state *st, const uint8_t *f, uint32_t len, uint32_t buf, double now)
{
    struct fp_seg g;
    int cls = fp_rx_parse(f, len, st->my_ip, st->my_mac, &g);
    struct fp_counters *k = &st->counters;
    if (cls == FP_CLS_UNPARSED) {
        lend(st, f, len, buf);
        punt_frame(st, buf, len, FP_PUNT_UNPARSED, -1);
        return 1;
    }
    k->cls[cls]++;
    if (cls == FP_CLS_ERROR || cls == FP_CLS_OTHER) {
        k->drops[g.drop]++;
        return 0;
    }
    if (g.csum_offloaded)
        k->csum_offloaded++;
    else
        k->csum_verified++;
    if (cls == FP_CLS_TCP_SYN) {
        if (st->tw && fp_tw_rx(st, &g, now))
            return 0;                          /* a TIME-WAIT record's (time_wait.c) */
        lend(st, f, len, buf);
        punt_frame(st, buf, len, FP_PUNT_SYN, -1);
        return 1;
    }
    int slot = fp_find(st, g.src, g.sport, g.dport);
    if (slot < 0) {
        if (st->tw && fp_tw_rx(st, &g, now))
            return 0;
        lend(st, f, len, buf);
        punt_frame(st, buf, len, FP_PUNT_NO_CCB, -1);
        return 1;
    }
    struct fp_ccb *c = &st->ccbs[slot];
    fp_lock(st, slot);
    int hot = c->state == FP_ST_ESTABLISHED && !(g.flags & TCP_FIN);
    int why = c->punted ? FP_PUNT_FOLLOWS : hot ? fp_rx_fast_ok(c, &g) : fp_fsm_check(c, &g);
    if (why >= 0) {
        if (!c->punted) {
            c->punted = 1;                     /* its later frames follow it to software */
            c->punt_reason = (uint32_t)why;
        }
        fp_unlock(st, slot);
        lend(st, f, len, buf);
        punt_frame(st, buf, len, (uint32_t)why, slot);
        return 1;
    }
    if (c->state == FP_ST_SYN_SENT) {
        fp_synack(st, c, &g, now);
    } else {
        /* fp_fsm_check passed a FIN only in these (FIN-WAIT-1: with the ACK of ours) */
        int fin = !hot && (g.flags & TCP_FIN) &&
                  (c->state == FP_ST_ESTABLISHED || c->state == FP_ST_FIN_WAIT_1);
        take(st, c, &g, f + g.payload_off, now);
        if (fin)
            fp_peer_fin(st, c);                /* even if the ACK punted it: the segment is taken */
    }
    fp_unlock(st, slot);
    return 0;
}

/* B of a slot hung up: the application closed the socket.  1: the units go on with the
 * close (conn_fsm.c); 0: software's (the connection is punted, `close`, and the epoll
 * event goes to software). */
int fp_hangup(struct fp_state *st, int slot, double now)
{
    if (slot < 0 || (uint32_t)slot >= st->capacity)
        return 0;
    struct fp_ccb *c = &st->ccbs[slot];
    fp_lock(st, slot);
    int taken = c->in_use && !c->punted && fp_hangup_locked(st, c, now);
    fp_unlock(st, slot);
    return taken;
}

/* The same for a connection the units own, its slot locked (either processor). */
int fp_hangup_locked(struct fp_state *st, struct fp_ccb *c, double now)
{
    if (fp_app_close(st, c, now) == 0)
        return 1;
    c->punted = 1;                             /* the application closed it: software's */
    c->punt_reason = FP_PUNT_CLOSE;
    st->counters.punts[FP_PUNT_CLOSE]++;
    return 0;
}

/* One connection's deadlines (its lock held): an expired RTO punts it; a delayed ACK and
 * a window poll are the units'.  *next: the earliest deadline still to come. */
static void scan_one(struct fp_state *st, struct fp_ccb *c, double now, double *next)
{
    if (c->punted)
        return;
    if (c->rto_deadline && now >= c->rto_deadline) {
        fp_punt_conn(st, c, slot_of(st, c), FP_PUNT_RTO);
        return;
    }
    if (c->dack_deadline && now >= c->dack_deadline) {
        c->dack_deadline = 0;
        if (c->ack_pending) {
            c->pingpong = 0;                   /* delayed ACK missed: not interactive after all */
            st->counters.delayed_acks++;
            fp_send_ack(st, c);
        }
    }
    if (c->wnd_wait && c->wnd_poll_at && now >= c->wnd_poll_at)
        fp_window_update(st, c, now);
    double d[3] = {c->rto_deadline, c->dack_deadline, c->wnd_wait ? c->wnd_poll_at : 0};
    for (int j = 0; j < 3; j++)
        if (d[j] && (*next == 0 || d[j] < *next))
            *next = d[j];
}

/* Deadlines: RTO expiry goes to software; delayed ACKs and window polls are the units'. */
void fp_scan(struct fp_state *st, double now)
{
    double next = 0;
    uint32_t seen = 0;
    st->counters.scans++;
    for (uint32_t i = 0; i < st->capacity && seen < st->active; i++) {
        struct fp_ccb *c = &st->ccbs[i];
        if (!c->in_use)
            continue;
        seen++;
        if (st->nevents + 8 >= FP_MAX_EVENTS) {
            next = now;                        /* no room to hand more back: go on next time */
            break;
        }
        fp_lock(st, (int)i);
        scan_one(st, c, now, &next);
        fp_unlock(st, (int)i);
    }
    st->next_scan = next;
    fp_tw_expire(st, now);
}

/*
 * Header split with direct placement, as a NIC's DMA engine does it: the frame is read
 * with its headers into a small buffer and its payload straight into the free part of
 * the RX ring of the connection that got the last in-order data (a guess: during a bulk
 * transfer, the right one), the rest into frame buffer `buf`.  If the frame is in-order
 * data for that connection the units take, the payload is already where it belongs:
 * publishing rx_tail delivers it, one copy fewer.  Otherwise the frame is put together in
 * `buf` and goes the usual way.  0: no frame; 1: a frame, its buffer kept; 2: lent.
 */
static int rx_placed(struct fp_state *st, struct fp_ccb *c, uint32_t buf, double now)
{
    struct toe_sock_shm *shm = fp_shm(c);
    uint8_t hdr[FP_TMPL_LEN];
    uint8_t *ring = toe_tx_base(shm) + c->tx_size;
    uint8_t *rest = (uint8_t *)(uintptr_t)st->bufs[buf];
    uint32_t space = toe_d_rx_space(shm, c->rx_size), off = shm->rx_tail & (c->rx_size - 1);
    uint32_t first = c->rx_size - off < space ? c->rx_size - off : space;
    struct iovec iov[4] = {{hdr, sizeof(hdr)}, {ring + off, first}, {ring, space - first},
                           {rest, st->buf_size - sizeof(hdr)}};
    ssize_t n;
    do
        n = readv(st->tap_fd, iov, 4);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;
    struct fp_counters *k = &st->counters;
    k->rx_frames++;
    k->rx_bytes += (uint64_t)n - (n >= FP_VNET_LEN ? FP_VNET_LEN : (uint64_t)n);
    if (n > 1 && hdr[1])
        k->rx_gso_frames++;
    uint32_t payload = n > FP_TMPL_LEN ? (uint32_t)n - FP_TMPL_LEN : 0;
    /* the parse below reads only the 66 header bytes: a frame whose checksum the kernel
     * vouches for, without IP or TCP options, of which the payload is all in the ring */
    if (n > FP_TMPL_LEN && payload <= space && (hdr[0] & 3) && hdr[FP_IP_OFF] == 0x45 &&
        (hdr[FP_TCP_OFF + 12] >> 4) == 5) {
        struct fp_seg g;
        int cls = fp_rx_parse(hdr, (uint32_t)n, st->my_ip, st->my_mac, &g);
        int slot = slot_of(st, c);
        if (cls == FP_CLS_TCP_DATA && g.payload_len == payload && fp_find(st, g.src, g.sport, g.dport) == slot) {
            fp_lock(st, slot);
            if (!c->punted && fp_rx_fast_ok(c, &g) < 0) {
                k->cls[cls]++;
                k->csum_offloaded++;
                take(st, c, &g, NULL, now);
                fp_unlock(st, slot);
                return 1;
            }
            fp_unlock(st, slot);
        }
    }
    /* not for the guess: the frame together in `buf`, then the usual way */
    if ((size_t)n > st->buf_size) {
        k->rx_misplaced++;
        return 1;                              /* longer than any frame buffer: dropped */
    }
    uint32_t in_ring = payload < space ? payload : space;
    uint32_t tail = payload - in_ring;
    memmove(rest + FP_TMPL_LEN + in_ring, rest, tail);
    memcpy(rest, hdr, (size_t)n < sizeof(hdr) ? (size_t)n : sizeof(hdr));
    if (in_ring) {
        uint32_t a = in_ring < first ? in_ring : first;
        memcpy(rest + FP_TMPL_LEN, ring + off, a);
        memcpy(rest + FP_TMPL_LEN + a, ring, in_ring - a);
    }
    if (payload)
        k->rx_misplaced++;
    return rx_frame(st, rest, (uint32_t)n, buf, now) ? 2 : 1;
}

static void rx_burst(struct fp_state *st, uint32_t *next_buf, double now)
{
    struct fp_counters *k = &st->counters;
    for (int i = 0; i < FP_RX_BATCH; i++) {
        /* room for what this frame may hand back (a frame, a connection) */
        if (*next_buf >= st->nbufs || st->nevents + 4 >= FP_MAX_EVENTS)
            return;                            /* the TAP stays readable: the next wait sees it */
        int ps = st->place_slot, guess = 0;
        if (!st->no_reuse && ps >= 0) {
            fp_lock(st, ps);                   /* the TX processor may punt it */
            guess = st->ccbs[ps].in_use && !st->ccbs[ps].punted;
            fp_unlock(st, ps);
        }
        if (guess) {
            int r = rx_placed(st, &st->ccbs[ps], *next_buf, now);
            if (r == 0)
                return;
            if (r == 2)
                (*next_buf)++;
            continue;
        }
        uint8_t *buf = (uint8_t *)(uintptr_t)st->bufs[*next_buf];
        if (st->no_reuse && !(buf = fp_map_buffer(st, st->buf_size)))
            return;
        ssize_t n = read(st->tap_fd, buf, st->buf_size);
        if (n <= 0) {
            int again = n < 0 && errno == EINTR;
            if (st->no_reuse)
                fp_unmap_buffer(st, buf, st->buf_size);
            if (again)
                continue;
            return;
        }
        k->rx_frames++;
        k->rx_bytes += (uint64_t)n - (n >= FP_VNET_LEN ? FP_VNET_LEN : (uint64_t)n);
        if (n > 1 && buf[1])
            k->rx_gso_frames++;
        int lent = rx_frame(st, buf, (uint32_t)n, *next_buf, now);
        if (st->no_reuse)
            fp_unmap_buffer(st, buf, st->buf_size);
        if (lent)
            (*next_buf)++;
    }
}

/* The wait's timeout: software's (timeout_ms, -1 none), or sooner for the next deadline. */
int fp_scan_timeout(struct fp_state *st, int timeout_ms, double now)
{
    if (st->next_scan) {
        double ms = ceil((st->next_scan - now) * 1000.0);
        int t = ms <= 0 ? 0 : ms > 3600e3 ? 3600000 : (int)ms;
        if (timeout_ms < 0 || t < timeout_ms)
            timeout_ms = t;
    }
    return timeout_ms;
}

/* One epoll wait and what it brings; returns with st->nevents records for software. */
static int wait_once(struct fp_state *st, int timeout_ms)
{
    struct epoll_event evs[FP_POLL_FDS];
    double now = fp_mono();
    timeout_ms = st->proc ? fp_proc_sleep(st, timeout_ms, now) : fp_scan_timeout(st, timeout_ms, now);
    int n = 0;
    /* after a pass of bulk data, sleep: frames gather meanwhile and the application wakes
     * once for them all (a NIC's interrupt moderation), instead of once per frame that a
     * spin would hand over on its own; latency-bound traffic (small frames) spins */
    int bulk = st->counters.rx_bytes - st->rx_mark >= FP_SPIN_BULK;
    if (st->poll_us && timeout_ms != 0 && (bulk || st->spin_skip)) {
        st->spin_skip -= !bulk;
    } else if (st->poll_us && timeout_ms != 0) {
        /* busy-poll before sleeping (Onload's EF_POLL_USEC): a reply that comes within
         * poll_us finds the adapter awake, with no wake-up to pay.  Only while it pays: a
         * spin that found nothing makes the next 1, 3, 7 ... 63 waits sleep at once (idle
         * links, or CPUs so busy that replies come late: spinning would only take the CPU
         * the peer needs) */
        double spin_until = now + st->poll_us * 1e-6;
        do {
            n = epoll_wait(st->ep_fd, evs, FP_POLL_FDS, 0);
            st->counters.spins++;
        } while (n == 0 && fp_mono() < spin_until);
        if (n == 0) {
            st->counters.spin_misses++;
            st->spin_misses = st->spin_misses < 6 ? st->spin_misses + 1 : 6;
            st->spin_skip = (1u << st->spin_misses) - 1;
        } else {
            st->spin_misses = 0;
        }
    }
    if (n == 0) {
        n = epoll_wait(st->ep_fd, evs, FP_POLL_FDS, timeout_ms);
        st->counters.waits++;
    }
    struct fp_proc *p = st->proc;
    if (p)
        fp_proc_awake(st);
    st->now = now = fp_mono();
    st->rx_mark = st->counters.rx_bytes;
    uint32_t next_buf = 0;
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        uint32_t ev = evs[i].events;
        if (fd == st->tap_fd) {
            rx_burst(st, &next_buf, now);
            continue;
        }
        if (p && fd == p->wake_fd) {
            fp_proc_collect(st);               /* the TX processor handed something back */
            continue;
        }
        /* a B end of the units' (with two processors, only until it has moved to the TX
         * processor's set) */
        int slot = fd >= 0 && (uint32_t)fd < st->fd_map_len ? st->fd_map[fd] : -1;
        if (slot >= 0 && !(ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && fp_doorbell(st, slot, now))
            continue;                          /* else punted: software's doorbell */
        if (slot >= 0 && (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && fp_hangup(st, slot, now))
            continue;                          /* the units close it (conn_fsm.c) */
        if (slot < 0 && fp_hc_event(st, fd, ev, now))
            continue;                          /* the command unit's (host_cmd.c) */
        struct fp_event *e = fp_event_new(st, FP_EV_FD);
        if (e) {
            e->fd = fd;
            e->events = ev;
            e->slot = slot;
        }
    }
    fp_end_burst(st);
    if (fp_hc_owed(st)) {
        /* blocking connects answered at the pass's end: a peer behind the TAP has usually
         * queued its SYN|ACK while the SYN was written, so take it first (host_cmd.c) */
        rx_burst(st, &next_buf, now);
        fp_end_burst(st);
        fp_hc_settle(st);
    }
    if (st->next_scan && now >= st->next_scan)
        fp_scan(st, now);                      /* its ACKs go out directly: nothing owed after */
    return n;
}

/*
 * The event loop's wait: returns when there is something for software (the
 * number of records in st->events) or when timeout_ms (software's next timer;
 * -1: none) has passed, having handled in the meantime, without returning to
 * Python, everything the units own.  A signal returns it at once (EINTR), and
 * the signal's wake-up descriptor is in the set.
 */
int fp_poll(struct fp_state *st, int timeout_ms)
{
    st->nevents = 0;
    fp_hc_begin(st);                           /* the command unit's records went with the events */
    double until = timeout_ms < 0 ? 0 : fp_mono() + timeout_ms / 1000.0;
    for (;;) {
        if (wait_once(st, timeout_ms) < 0 || st->nevents)
            break;                             /* a signal (EINTR), or work for software */
        if (timeout_ms >= 0) {
            double left = until - st->now;
            if (left <= 0)
                break;
            timeout_ms = (int)ceil(left * 1000.0);
        }
    }
    return (int)st->nevents;
}
