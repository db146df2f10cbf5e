/*
 * tx_proc.c - seed 003's second processor: TX and RX on two processors sharing the CCBs.
 *
 * Seed 003's adapter has two embedded processors, one per direction.  Here the RX
 * processor is the thread that runs fp_poll (the TAP, the ACKs, the deadlines, and the
 * hand-back to software), and the TX processor is a thread of its own that takes the
 * doorbells of the units' connections: the application wrote (segments go out), read
 * (a window update), or closed (handed back).  A connection's B end is in the TX
 * processor's epoll set while the units own it, and in the daemon's otherwise
 * (fp_proc_moved, at push and pull).
 *
 * What the two share, and how:
 *  - a CCB: a lock per slot (struct fp_proc.locks), taken by whichever processor uses it,
 *    for the whole use: a segment is built and written under it, so frames of one
 *    connection leave in sequence order.
 *  - the table (hash, fd map, slots in use): changed only by the RX processor, under
 *    table_lock; the TX processor takes it only to turn a descriptor into a locked slot.
 *  - the hand-back: the TX processor's records (a punted connection, a closed socket) go
 *    into a queue under hb_lock and the RX processor is woken through wake_fd; so does a
 *    deadline (an RTO armed by a send) earlier than the one the RX processor sleeps
 *    towards.
 * Each processor has its own counters, frame buffer, ACK list and records (its own
 * struct fp_state view); fp_counters_sum adds them up.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fp.h"

#define EP_B_EVENTS (EPOLLIN | EPOLLET | EPOLLRDHUP) /* the daemon's own flags for a B end */

static void poke(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(fd, &one, sizeof(one));
    while (r < 0 && errno == EINTR);
}

/* The TX processor's records and deadline, to the RX processor. */
static void hand_back(struct fp_proc *p)
{
    struct fp_state *tx = &p->tx;
    double d = tx->next_scan;
    if (!tx->nevents && !d)
        return;
    int wake = 0;
    pthread_mutex_lock(&p->hb_lock);
    if (tx->nevents) {
        /* at most one record per connection before it is software's: the queue holds
         * 2 * capacity + FP_MAX_EVENTS, more than can ever wait */
        memcpy(p->hb + p->hb_n, tx->events, tx->nevents * sizeof(struct fp_event));
        p->hb_n += tx->nevents;
        tx->nevents = 0;
        wake = 1;
    }
    if (d) {
        if (p->hb_deadline == 0 || d < p->hb_deadline)
            p->hb_deadline = d;
        double sl = p->main_sleeps_until;
        if (sl < 0 || (sl > 0 && d < sl))
            wake = 1;
        tx->next_scan = 0;
    }
    pthread_mutex_unlock(&p->hb_lock);
    if (wake) {
        p->handoffs++;
        poke(p->wake_fd);
    }
}

static void tx_event(struct fp_proc *p, int fd, uint32_t ev, double now)
{
    struct fp_state *tx = &p->tx, *m = p->main;
    pthread_mutex_lock(&p->table_lock);
    int slot = fd >= 0 && (uint32_t)fd < m->fd_map_len ? m->fd_map[fd] : -1;
    if (slot < 0) {
        pthread_mutex_unlock(&p->table_lock);
        return; /* pulled meanwhile: B went back to the daemon's set, which sees it */
    }
    fp_lock(tx, slot);
    pthread_mutex_unlock(&p->table_lock);
    struct fp_ccb *c = &tx->ccbs[slot];
    if (c->in_use && !c->punted && c->b_fd == fd) {
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            fp_hangup_locked(tx, c, now);      /* software's here (conn_fsm.c: two processors) */
            struct fp_event *e = fp_event_new(tx, FP_EV_FD);
            if (e) {
                e->fd = fd;
                e->events = ev;
                e->slot = slot;
            }
        } else {
            fp_doorbell_locked(tx, slot, now);
        }
    }
    fp_unlock(tx, slot);
}

static void *tx_main(void *arg)
{
    struct fp_proc *p = arg;
    struct epoll_event evs[FP_POLL_FDS];
    for (;;) {
        int n = epoll_wait(p->tx_ep, evs, FP_POLL_FDS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        double now = p->tx.now = fp_mono();
        p->tx.counters.waits++;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == p->stop_fd)
                return NULL;
            tx_event(p, evs[i].data.fd, evs[i].events, now);
        }
        hand_back(p);
    }
}

int fp_proc_start(struct fp_state *st)
{
    if (st->proc)
        return 0;
    struct fp_proc *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->main = st;
    p->tx_ep = epoll_create1(EPOLL_CLOEXEC);
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->hb = calloc(2 * (size_t)st->capacity + FP_MAX_EVENTS, sizeof(struct fp_event));
    p->locks = calloc(st->capacity, sizeof(pthread_mutex_t));
    struct fp_state *tx = &p->tx;
    *tx = *st;
    memset(&tx->counters, 0, sizeof(tx->counters));
    tx->events = calloc(FP_MAX_EVENTS, sizeof(struct fp_event));
    tx->txbuf = malloc(65536 + 256);
    tx->nevents = 0;
    tx->ack_head = -1;
    tx->place_slot = -1;
    tx->next_scan = 0;
    tx->ip_id = st->ip_id + 0x8000;
    tx->proc = p;
    tx->tw = NULL;                             /* TIME-WAIT records are the RX processor's */
    int err = -ENOMEM;
    if (p->tx_ep < 0 || p->wake_fd < 0 || p->stop_fd < 0 || !p->hb || !p->locks || !tx->events || !tx->txbuf)
        goto fail;
    for (uint32_t i = 0; i < st->capacity; i++)
        pthread_mutex_init(&p->locks[i], NULL);
    pthread_mutex_init(&p->table_lock, NULL);
    pthread_mutex_init(&p->hb_lock, NULL);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = p->stop_fd};
    if (epoll_ctl(p->tx_ep, EPOLL_CTL_ADD, p->stop_fd, &e) < 0)
        goto fail_errno;
    e.data.fd = p->wake_fd;
    if (epoll_ctl(st->ep_fd, EPOLL_CTL_ADD, p->wake_fd, &e) < 0)
        goto fail_errno;
    /* connections the units own already: their B ends move to the TX processor */
    st->proc = p;
    if ((err = -pthread_create(&p->thread, NULL, tx_main, p)) != 0) {
        st->proc = NULL;
        epoll_ctl(st->ep_fd, EPOLL_CTL_DEL, p->wake_fd, NULL);
        goto fail;
    }
    for (uint32_t i = 0; i < st->capacity; i++)
        if (st->ccbs[i].in_use && !st->ccbs[i].punted)
            fp_proc_moved(st, st->ccbs[i].b_fd, 1);
    return 0;
fail_errno:
    err = -errno;
fail:
    if (p->tx_ep >= 0)
        close(p->tx_ep);
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    free(p->hb);
    free(p->locks);
    free(tx->events);
    free(tx->txbuf);
    free(p);
    return err;
}

void fp_proc_stop(struct fp_state *st)
{
    struct fp_proc *p = st->proc;
    if (!p)
        return;
    poke(p->stop_fd);
    pthread_join(p->thread, NULL);
    fp_proc_collect(st);                       /* what it handed back last */
    struct fp_counters total;
    fp_counters_sum(st, &total);
    st->counters = total;                      /* its counts stay in the totals */
    st->proc = NULL;
    for (uint32_t i = 0; i < st->capacity; i++)
        if (st->ccbs[i].in_use) {
            struct epoll_event e = {.events = EP_B_EVENTS, .data.fd = st->ccbs[i].b_fd};
            epoll_ctl(st->ep_fd, EPOLL_CTL_ADD, st->ccbs[i].b_fd, &e);
        }
    epoll_ctl(st->ep_fd, EPOLL_CTL_DEL, p->wake_fd, NULL);
    close(p->tx_ep);
    close(p->wake_fd);
    close(p->stop_fd);
    for (uint32_t i = 0; i < st->capacity; i++)
        pthread_mutex_destroy(&p->locks[i]);
    free(p->hb);
    free(p->locks);
    free(p->tx.events);
    free(p->tx.txbuf);
    free(p);
}

/* A B end changes sets: to the TX processor's (push) or back to the daemon's (pull). */
void fp_proc_moved(struct fp_state *st, int b_fd, int to_tx)
{
    struct fp_proc *p = st->proc;
    struct epoll_event e = {.events = EP_B_EVENTS, .data.fd = b_fd};
    epoll_ctl(to_tx ? st->ep_fd : p->tx_ep, EPOLL_CTL_DEL, b_fd, NULL);
    /* adding looks at the descriptor: a doorbell that came meanwhile is reported */
    epoll_ctl(to_tx ? p->tx_ep : st->ep_fd, EPOLL_CTL_ADD, b_fd, &e);
}

/* The RX processor takes the TX processor's records (as many as fit; the rest next time)
 * and its deadline. */
void fp_proc_collect(struct fp_state *st)
{
    struct fp_proc *p = st->proc;
    uint64_t v;
    while (read(p->wake_fd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&p->hb_lock);
    uint32_t room = st->nevents + 8 < FP_MAX_EVENTS ? FP_MAX_EVENTS - 8 - st->nevents : 0;
    uint32_t n = p->hb_n < room ? p->hb_n : room;
    memcpy(st->events + st->nevents, p->hb, n * sizeof(struct fp_event));
    st->nevents += n;
    memmove(p->hb, p->hb + n, (p->hb_n - n) * sizeof(struct fp_event));
    p->hb_n -= n;
    if (p->hb_deadline) {
        fp_deadline(st, p->hb_deadline);
        p->hb_deadline = 0;
    }
    int more = p->hb_n > 0;
    pthread_mutex_unlock(&p->hb_lock);
    if (more)
        poke(p->wake_fd);
}

/* The RX processor is about to wait (timeout_ms: software's; -1 none), or (awake) has
 * woken: the TX processor wakes it for an earlier deadline only while it sleeps.  The
 * deadline folds in and the wait's timeout is computed in the same critical section, so
 * one set in between is not missed.  Returns the wait's timeout. */
int fp_proc_sleep(struct fp_state *st, int timeout_ms, double now)
{
    struct fp_proc *p = st->proc;
    pthread_mutex_lock(&p->hb_lock);
    if (p->hb_deadline) {
        fp_deadline(st, p->hb_deadline);
        p->hb_deadline = 0;
    }
    timeout_ms = fp_scan_timeout(st, timeout_ms, now);
    p->main_sleeps_until = timeout_ms < 0 ? -1 : now + timeout_ms / 1000.0 + 1e-9;
    pthread_mutex_unlock(&p->hb_lock);
    return timeout_ms;
}

void fp_proc_awake(struct fp_state *st)
{
    struct fp_proc *p = st->proc;
    pthread_mutex_lock(&p->hb_lock);
    p->main_sleeps_until = 0;
    pthread_mutex_unlock(&p->hb_lock);
}

/* The TX processor's own counts (a snapshot, as below); -1 when it does not run. */
static void add_tx_counts(struct fp_proc *p, struct fp_counters *out)
{
    uint64_t *o = (uint64_t *)out;
    const uint64_t *t = (const uint64_t *)&p->tx.counters;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        o[i] += __atomic_load_n(&t[i], __ATOMIC_RELAXED);
}

int fp_proc_counters(struct fp_state *st, struct fp_counters *out)
{
    struct fp_proc *p = st->proc;
    if (!p)
        return -1;
    memset(out, 0, sizeof(*out));
    add_tx_counts(p, out);
    return 0;
}

/* Both processors' counts.  The running TX processor's are read without a lock: a snapshot
 * for statistics, each word read whole. */
void fp_counters_sum(struct fp_state *st, struct fp_counters *out)
{
    *out = st->counters;
    if (st->proc)
        add_tx_counts(st->proc, out);
}
