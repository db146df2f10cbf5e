/*
 * pool.c - ready sockets, made in batches (seed 002's principle applied to sockets).
 *
 * socket() takes a socket the adapter already knows: its pair made, its memfd sealed
 * and mapped on both sides, registered with one SOCKETS command for the whole batch.
 * So socket() itself costs no round trip to the daemon, only moving A to the
 * descriptor number the kernel's socket() would have returned (the lowest free one).
 *
 * A pooled A waits at a high descriptor number (TOE_HIGH_FD and up, close-on-exec), so
 * that it takes no number the application expects.  The application never sees it
 * until socket() hands it out: close() of it is EBADF, as for a descriptor that is not
 * open; dup2()/dup3() onto it and close_range()/closefrom() over it take it out of the
 * pool (the daemon frees the socket when its last A closes).
 *
 * Batches grow as the process asks for sockets (1, 2, 4 ... TOE_POOL_BATCH), so a
 * process that makes one socket pays for one.  A fork() child does not inherit the
 * pool (its copies are closed); exec closes it (close-on-exec).
 *
 * Recycling: a closed socket keeps its mapping (toe_pool_keep, from the last
 * toe_sock_put) in one of TOE_RECYCLE_MAX slots.  When its connection no longer needs
 * the rings, the daemon resets the header (state TOE_SS_RECYCLED) and keeps its own
 * mapping; the next refill takes such sockets first, with a new pair each, in one
 * REUSE command: no memfd, no mapping on either side.  Only sockets this process made
 * since its last fork() are kept (a fork child has every mapping the parent had then),
 * and the slots are emptied at every fork, in the parent and in the child.  A kept
 * socket the daemon does not reset within KEPT_AGE_MAX refills (it released it, or the
 * connection lingers) is unmapped.
 */
#include "sock_int.h"

#define POOL_MAX (2 * TOE_POOL_BATCH)

struct pool_ent {
    int a;
    struct toe_sock *s;
    int pending;               /* in a posted REUSE, not answered yet: not to be handed out */
    int bit;                   /* ... its bit in the answer */
};

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct pool_ent pool[POOL_MAX];
static int npool;
/* the pooled descriptors, for close() to look at without pool_mu (a refill holds it for a
 * round trip): -1 or a pooled A, written under pool_mu, read with atomic loads */
static int owned[POOL_MAX] = {[0 ... POOL_MAX - 1] = -1};

static void publish_locked(void)
{
    for (int i = 0; i < POOL_MAX; i++)
        __atomic_store_n(&owned[i], i < npool ? pool[i].a : -1, __ATOMIC_RELEASE);
}
static int next_batch = 1;
static int inflight;          /* a posted REUSE waits for its answer (its entries pending) */
#define KEPT_AGE_MAX 8

/* closed sockets whose mappings wait for the daemon's reset: atomic slots, filled by a
 * compare-and-swap from NULL (any thread, no lock: close() may run in a signal handler),
 * emptied only under pool_mu */
static struct toe_sock *kept[TOE_RECYCLE_MAX];
static unsigned gen_now; /* atomic: bumped at every fork() */
static pid_t pool_pid;
static int pool_off;          /* the daemon refused a batch: make sockets one by one */

static int make_locked(int n);

static void drop_locked(int i, int close_a)
{
    if (close_a)
        toe_real_close(pool[i].a);
    if (pool[i].pending)
        toe_sock_free(pool[i].s);   /* a kept mapping not registered yet (never revived) */
    else
        toe_sock_put(pool[i].s);
    pool[i] = pool[--npool];
    publish_locked();
}

/* A moved to a high descriptor (close-on-exec) that takes no number the application
 * expects; A itself is closed either way.  The high descriptor, or -1. */
static int to_high(int a)
{
    int hi = toe_real_fcntl(a, F_DUPFD_CLOEXEC, (void *)(long)TOE_HIGH_FD);
    if (hi >= 0 && !toe_fd_fits(hi)) {
        toe_real_close(hi);
        hi = -1;
    }
    toe_real_close(a);
    return hi;
}

/* A registered socket into the pool (pool_mu held), its A at the high descriptor a. */
static void add_locked(int a, struct toe_sock *s)
{
    stuff(a, NULL); /* an unconnected socket is not writable */
    pool[npool].a = a;
    pool[npool].s = s;
    pool[npool].pending = 0;
    npool++;
    publish_locked();
}

static int ready_locked(void)
{
    int n = 0;
    for (int i = 0; i < npool; i++)
        n += !pool[i].pending;
    return n;
}

unsigned toe_pool_gen(void)
{
    return __atomic_load_n(&gen_now, __ATOMIC_ACQUIRE);
}

int toe_pool_keep(struct toe_sock *s)
{
    if (!s->recyclable || !s->shm || !s->sock_id || s->gen != toe_pool_gen())
        return 0;
    s->recycle_age = 0;
    for (int i = 0; i < TOE_RECYCLE_MAX; i++) {
        struct toe_sock *none = NULL;
        if (__atomic_compare_exchange_n(&kept[i], &none, s, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return 1;
    }
    return 0;
}

/* Kept sockets the daemon has reset, at most n, out of their slots (pool_mu held); those it
 * will not reset (made before a fork, or waiting too long) are unmapped. */
static int take_kept(struct toe_sock **out, int n, int all)
{
    unsigned gen = toe_pool_gen();
    int k = 0;
    for (int i = 0; i < TOE_RECYCLE_MAX && (all || k < n); i++) {
        struct toe_sock *s = __atomic_load_n(&kept[i], __ATOMIC_ACQUIRE);
        if (!s)
            continue;
        int ready = !all && s->gen == gen && LOAD(&s->shm->state) == TOE_SS_RECYCLED;
        if (!ready && !all && s->gen == gen && ++s->recycle_age < KEPT_AGE_MAX)
            continue;
        __atomic_store_n(&kept[i], NULL, __ATOMIC_RELEASE); /* only we empty slots */
        if (ready)
            out[k++] = s;
        else
            toe_sock_free(s);
    }
    return k;
}

/* A new pair for each of the n kept sockets ks[] (those without one are unmapped): m, with
 * ks[0..m) the sockets, ids[] their old ids, fds[] [B, A at a high descriptor] each. */
static int new_pairs(struct toe_sock **ks, int n, uint32_t *ids, int *fds)
{
    int m = 0;
    for (int i = 0; i < n; i++) {
        int sv[2], hi = -1;
        if (make_pair(SOCK_NONBLOCK | SOCK_CLOEXEC, sv) == 0 && (hi = to_high(sv[0])) < 0)
            toe_real_close(sv[1]);
        if (hi < 0) {
            toe_sock_free(ks[i]);
            continue;
        }
        ids[m] = ks[i]->sock_id;
        ks[m] = ks[i];
        fds[2 * m] = sv[1];
        fds[2 * m + 1] = hi;
        m++;
    }
    return m;
}

/* A kept socket the daemon took under its new id, A at a: alive again. */
static void revived(struct toe_sock *s, int a, uint32_t id)
{
    toe_sock_revive(s);
    s->sock_id = id;
    s->recyclable = 1;
    s->cookie = sock_cookie(a);
}

/* The n kept sockets ks[] into the pool (pool_mu held): a new pair each, one REUSE command
 * naming them by their old ids.  The ones the daemon does not take are unmapped. */
static int reuse_locked(struct toe_sock **ks, int n)
{
    uint32_t ids[TOE_POOL_BATCH];
    int fds[2 * TOE_POOL_BATCH];
    int m = new_pairs(ks, n, ids, fds);
    if (!m)
        return 0;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_REUSE;
    cmd.arg0 = m;
    int r = toe_ctl_call_ids(&cmd, ids, m, fds, 2 * m, &rsp);
    uint32_t taken = r == 0 && rsp.result > 0 ? (uint32_t)rsp.result : 0;
    int got = 0;
    for (int i = 0; i < m; i++) {
        struct toe_sock *s = ks[i];
        int a = fds[2 * i + 1];
        uint32_t id = LOAD(&s->shm->sock_id);
        toe_real_close(fds[2 * i]);
        if (!(taken >> i & 1) || !id) {
            toe_real_close(a);
            toe_sock_free(s);
            continue;
        }
        revived(s, a, id);
        s->gen = toe_pool_gen();
        add_locked(a, s);
        got++;
    }
    return got;
}

/* n more sockets into the pool (pool_mu held): the kept ones the daemon has reset (REUSE),
 * then new ones (SOCKETS) for the rest.  The process's sockets grow until a batch is all
 * kept ones (two batches' worth: TOE_RECYCLE_MAX), then a refill is one REUSE. */
static int refill_locked(int n)
{
    struct toe_sock *ks[TOE_POOL_BATCH];
    int nk = take_kept(ks, n, 0);
    int got = nk ? reuse_locked(ks, nk) : 0;
    if (got < n && make_locked(n - got) == 0)
        got++;
    return got ? 0 : -1;
}

/* n new sockets into the pool (pool_mu held): one SOCKETS command for them all. */
static int make_locked(int n)
{
    struct toe_sock *socks[TOE_POOL_BATCH];
    int as[TOE_POOL_BATCH], fds[3 * TOE_POOL_BATCH], made = 0;
    for (; made < n; made++) {
        int bm[3], a;
        struct toe_sock *s = make_sock(SOCK_NONBLOCK | SOCK_CLOEXEC, &a, bm);
        if (!s)
            break;
        int hi = to_high(a);
        if (hi < 0) {
            close_pair_side(bm);
            toe_sock_put(s);
            break;
        }
        s->cookie = sock_cookie(hi);
        socks[made] = s;
        as[made] = hi;
        fds[3 * made] = bm[0];
        fds[3 * made + 1] = bm[1];
        fds[3 * made + 2] = hi;
    }
    if (!made)
        return -1;
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_SOCKETS;
    cmd.arg0 = made;
    cmd.shm_bytes = (uint32_t)socks[0]->map_len;
    int r = toe_ctl_call(&cmd, fds, 3 * made, &rsp);
    int got = r == 0 && rsp.result > 0 ? (rsp.result < made ? rsp.result : made) : 0;
    if (r == 0 && rsp.result == -EOPNOTSUPP)
        pool_off = 1;
    for (int i = 0; i < made; i++) {
        toe_real_close(fds[3 * i]);
        toe_real_close(fds[3 * i + 1]);
        uint32_t id = LOAD(&socks[i]->shm->sock_id);
        if (i < got && id) {
            socks[i]->sock_id = id;
            add_locked(as[i], socks[i]);
        } else {
            toe_real_close(as[i]);
            toe_sock_put(socks[i]);
        }
    }
    return got ? 0 : -1;
}

/*
 * Refill ahead of need (a steady stream of sockets, the pool half empty): the kept
 * sockets the daemon has reset go out in one posted REUSE (pool_mu held), their A ends
 * in the pool as pending entries; the daemon answers it when idle, after the commands
 * that follow it (docs/abi.md "The pool"), and settle_locked takes the answer.
 */
/* kept sockets the daemon has reset (what a REUSE would take now), without taking them */
static int kept_ready(void)
{
    unsigned gen = toe_pool_gen();
    int k = 0;
    for (int i = 0; i < TOE_RECYCLE_MAX; i++) {
        struct toe_sock *s = __atomic_load_n(&kept[i], __ATOMIC_ACQUIRE);
        k += s && s->gen == gen && LOAD(&s->shm->state) == TOE_SS_RECYCLED;
    }
    return k;
}

static void post_locked(void)
{
    struct toe_sock *ks[TOE_POOL_BATCH];
    uint32_t ids[TOE_POOL_BATCH];
    int fds[2 * TOE_POOL_BATCH], room = POOL_MAX - npool;
    int nk = take_kept(ks, room < TOE_POOL_BATCH ? room : TOE_POOL_BATCH, 0);
    int m = new_pairs(ks, nk, ids, fds);
    if (!m)
        return;
    struct toe_cmd cmd;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_REUSE;
    cmd.arg0 = m;
    cmd.arg1 = TOE_REUSE_POSTED;
    int r = toe_ctl_post_ids(&cmd, ids, m, fds, 2 * m);
    unsigned gen = toe_pool_gen();
    for (int i = 0; i < m; i++) {
        toe_real_close(fds[2 * i]);  /* B: the daemon's copy is in the message */
        if (r < 0) {                 /* not posted: kept again for the next refill */
            toe_real_close(fds[2 * i + 1]);
            if (!toe_pool_keep(ks[i]))
                toe_sock_free(ks[i]);
            continue;
        }
        ks[i]->gen = gen;            /* (made before a fork that may come: not kept after it) */
        pool[npool].a = fds[2 * i + 1];
        pool[npool].s = ks[i];
        pool[npool].pending = 1;
        pool[npool].bit = i;
        npool++;
    }
    if (r == 0)
        inflight = 1;
    publish_locked();
}

/* The posted REUSE's answer, if it came (wait: block for it): the sockets the daemon took
 * join the pool, the others are unmapped (pool_mu held). */
static void settle_locked(int wait)
{
    if (!inflight)
        return;
    struct toe_rsp rsp;
    int r = toe_ctl_posted(&rsp, wait);
    if (r == -EAGAIN)
        return;
    uint32_t taken = r == 0 && rsp.result > 0 ? (uint32_t)rsp.result : 0;
    inflight = 0;
    for (int i = npool - 1; i >= 0; i--) {
        if (!pool[i].pending)
            continue;
        struct toe_sock *s = pool[i].s;
        int a = pool[i].a;
        uint32_t id = LOAD(&s->shm->sock_id);
        if (!(taken >> pool[i].bit & 1) || !id) {
            drop_locked(i, 1);
            continue;
        }
        revived(s, a, id);           /* (its gen: the post's) */
        stuff(a, NULL);              /* an unconnected socket is not writable */
        pool[i].pending = 0;
    }
    publish_locked();
}

/*
 * A pooled socket for socket(type): *a is its A end at the lowest free descriptor, with
 * the type's SOCK_NONBLOCK and SOCK_CLOEXEC.  NULL when the pool cannot give one (the
 * caller then makes a socket the single way).
 */
struct toe_sock *toe_pool_take(int type, int *a)
{
    int saved = errno;
    pid_t me = getpid();
    struct toe_sock *s = NULL;
    int hi = -1;
    pthread_mutex_lock(&pool_mu);
    if (pool_pid && pool_pid != me) {  /* a vfork child: our memory, not our descriptors */
        pthread_mutex_unlock(&pool_mu);
        errno = saved;
        return NULL;
    }
    pool_pid = me;
    settle_locked(0);
    if (!ready_locked() && inflight)
        settle_locked(1);            /* nothing else to give: wait for the posted batch */
    if (!ready_locked() && !pool_off && refill_locked(next_batch) == 0 && next_batch < TOE_POOL_BATCH)
        next_batch *= 2;
    for (int i = npool - 1; i >= 0; i--) {
        if (pool[i].pending)
            continue;
        hi = pool[i].a;
        s = pool[i].s;
        pool[i] = pool[--npool];
        publish_locked();
        break;
    }
    if (s && next_batch >= TOE_POOL_BATCH && !inflight && !pool_off && ready_locked() <= TOE_POOL_BATCH / 2 &&
        kept_ready() >= TOE_POOL_BATCH)
        post_locked();               /* the next batch while this one lasts */
    pthread_mutex_unlock(&pool_mu);
    if (!s) {
        errno = saved;
        return NULL;
    }
    int fd = toe_real_fcntl(hi, (type & SOCK_CLOEXEC) ? F_DUPFD_CLOEXEC : F_DUPFD, (void *)0L);
    if (fd < 0 || !toe_fd_fits(fd) ||
        (!(type & SOCK_NONBLOCK) && toe_real_fcntl(fd, F_SETFL, (void *)0L) < 0)) {
        int e = fd < 0 ? errno : EMFILE;
        if (fd >= 0)
            toe_real_close(fd);
        toe_real_close(hi);
        toe_sock_put(s);
        errno = e;
        return NULL;
    }
    toe_real_close(hi);
    *a = fd;
    errno = saved;
    return s;
}

/* Is fd a pooled A (not the application's)? */
int toe_pool_owns(int fd)
{
    if (fd < TOE_HIGH_FD)
        return 0;
    for (int i = 0; i < POOL_MAX; i++)
        if (__atomic_load_n(&owned[i], __ATOMIC_ACQUIRE) == fd)
            return 1;
    return 0;
}

/* [first, last] is about to be closed or replaced by the kernel (dup2 onto it, close_range):
 * the pooled sockets there leave the pool (their A ends are closed by that call). */
void toe_pool_forget(unsigned int first, unsigned int last)
{
    if (last < TOE_HIGH_FD)
        return;
    pthread_mutex_lock(&pool_mu);
    for (int i = npool - 1; i >= 0; i--)
        if ((unsigned int)pool[i].a >= first && (unsigned int)pool[i].a <= last)
            drop_locked(i, 0);
    pthread_mutex_unlock(&pool_mu);
}

/* fork(): the pool stays the parent's (held across the fork, so no batch is half made). */
void toe_pool_atfork_prepare(void)
{
    pthread_mutex_lock(&pool_mu);
    __atomic_add_fetch(&gen_now, 1, __ATOMIC_ACQ_REL); /* what exists now is the child's too */
}

void toe_pool_atfork_parent(void)
{
    take_kept(NULL, 0, 1);
    pthread_mutex_unlock(&pool_mu);
}

void toe_pool_atfork_child(void)
{
    toe_mutex_init_ec(&pool_mu);
    inflight = 0;                    /* the parent's batch: its answer is on the parent's channel */
    take_kept(NULL, 0, 1);
    while (npool)
        drop_locked(npool - 1, 1);
    publish_locked();
    pool_pid = 0;
    next_batch = 1;
}
