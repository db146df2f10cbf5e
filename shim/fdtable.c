/*
 * fdtable.c - fd -> struct toe_sock, and the lifetime of struct toe_sock.
 *
 * The table is an array of atomic pointers indexed by fd, sized from
 * RLIMIT_NOFILE's hard limit (at most 1 << 20 entries) and mapped with
 * MAP_NORESERVE, so untouched pages cost nothing.  Every read()/write() of
 * the process looks its fd up here: a lookup is one acquire load of the table
 * pointer and one of the entry, no lock.  Updates that must be atomic with a
 * system call (dup2/dup3, handover) run under a mutex; removal on close() is
 * a single atomic exchange so close() never takes a lock.
 *
 * Safety of lock-free lookup: struct toe_sock memory is recycled through a
 * free list, never freed, so a lookup that races with the last close may
 * touch a recycled struct.  It takes its reference with increment-if-not-zero
 * and then checks that the entry still points at the same struct; if not it
 * drops the reference and looks again.
 *
 * vfork: a vfork child (CPython's subprocess, posix_spawn users) shares this
 * memory, so this table, but has its own descriptors.  Its close/close_range/
 * dup2/dup must not touch the table: that would drop or invent entries of the
 * parent.  The child is recognised by getpid() differing from the pid that
 * owns the table (a fork() child takes ownership in the atfork handler); only
 * the mutating paths ask, never a lookup.  What the child execs adopts its
 * inherited sockets.
 *
 * Adoption (exec): an fd table starts empty in a new program image, even when
 * the program inherited offloaded sockets.  The constructor asks the daemon
 * about them (toe_sock_adopt_inherited); a lookup that misses before the
 * constructor ran (another library's constructor) runs it first.  Once done,
 * the check costs one relaxed load on the miss path only.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <linux/close_range.h>

#include "toe_shim.h"

#define TOE_FD_MAX (1 << 20)

static struct toe_sock **tbl;     /* published with a release store */
static int tbl_size;              /* written before tbl is published */
static int hiwater = -1;          /* highest fd ever entered */
static pthread_mutex_t tbl_mu = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP;

static struct toe_sock *free_head;                    /* lock-free push */
/* pops are serialised: no ABA */
static pthread_mutex_t pop_mu = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP;
static int tbl_mu_forked, pop_mu_forked;              /* taken by the fork prepare handler */
static pid_t tbl_pid;                                 /* the process the table belongs to */

enum { ADOPT_PENDING, ADOPT_RUNNING, ADOPT_DONE };
static int adopt_state;                               /* atomic ADOPT_* */
static __thread int adopt_self __attribute__((tls_model("initial-exec"))); /* this thread runs it */

static inline struct toe_sock **table(void)
{
    return __atomic_load_n(&tbl, __ATOMIC_ACQUIRE);
}

static inline int in_table(int fd)
{
    return (unsigned)fd < (unsigned)__atomic_load_n(&tbl_size, __ATOMIC_RELAXED);
}

/* Called with tbl_mu held. */
static struct toe_sock **table_create_locked(void)
{
    struct toe_sock **t = __atomic_load_n(&tbl, __ATOMIC_RELAXED);
    if (t)
        return t;
    rlim_t n = TOE_FD_MAX;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max != RLIM_INFINITY && rl.rlim_max < n)
        n = rl.rlim_max;
    if (n < 64)
        n = 64;
    void *p = mmap(NULL, (size_t)n * sizeof(*t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    __atomic_store_n(&tbl_size, (int)n, __ATOMIC_RELAXED);
    __atomic_store_n(&tbl_pid, getpid(), __ATOMIC_RELAXED);
    __atomic_store_n(&tbl, (struct toe_sock **)p, __ATOMIC_RELEASE);
    return p;
}

/* Running in a vfork child of the table's owner (shared memory, own fds). */
static int vfork_child(void)
{
    pid_t p = __atomic_load_n(&tbl_pid, __ATOMIC_RELAXED);
    if (!p)
        return 0;
    int saved = errno;
    int r = getpid() != p;
    errno = saved;
    return r;
}

static void note_fd(int fd)
{
    int h = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    while (fd > h && !__atomic_compare_exchange_n(&hiwater, &h, fd, 1, __ATOMIC_RELAXED,
                                                  __ATOMIC_RELAXED))
        ;
}

static struct toe_sock *lookup(int fd)
{
    struct toe_sock **t = table();
    if (!t || !in_table(fd))
        return NULL;
    struct toe_sock *s = __atomic_load_n(&t[fd], __ATOMIC_ACQUIRE);
    while (s) {
        int r = __atomic_load_n(&s->refs, __ATOMIC_RELAXED);
        while (r > 0 && !__atomic_compare_exchange_n(&s->refs, &r, r + 1, 1, __ATOMIC_ACQUIRE,
                                                     __ATOMIC_RELAXED))
            ;
        if (r > 0) {
            if (__atomic_load_n(&t[fd], __ATOMIC_ACQUIRE) == s)
                return s;
            toe_sock_put(s);
        }
        s = __atomic_load_n(&t[fd], __ATOMIC_ACQUIRE);
    }
    return NULL;
}

struct toe_sock *toe_fd_get(int fd)
{
    struct toe_sock *s = lookup(fd);
    if (s || __builtin_expect(__atomic_load_n(&adopt_state, __ATOMIC_RELAXED) == ADOPT_DONE, 1))
        return s;
    toe_fd_adopt_once();
    return lookup(fd);
}

void toe_fd_adopt_once(void)
{
    int st = __atomic_load_n(&adopt_state, __ATOMIC_ACQUIRE);
    if (st == ADOPT_DONE || adopt_self)
        return;
    if (st == ADOPT_PENDING &&
        __atomic_compare_exchange_n(&adopt_state, &st, ADOPT_RUNNING, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
        int saved = errno;
        adopt_self = 1;
        toe_ctl_init();
        if (toe_adopting)
            toe_sock_adopt_inherited();
        adopt_self = 0;
        __atomic_store_n(&adopt_state, ADOPT_DONE, __ATOMIC_RELEASE);
        errno = saved;
        return;
    }
    /* another thread is adopting (only possible before main): wait for it */
    while (__atomic_load_n(&adopt_state, __ATOMIC_ACQUIRE) != ADOPT_DONE)
        sched_yield();
}

struct toe_sock *toe_fd_find_cookie(uint64_t cookie)
{
    struct toe_sock **t = table();
    if (!t || !cookie)
        return NULL;
    int hw = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    for (int i = 0; i <= hw; i++) {
        struct toe_sock *s = __atomic_load_n(&t[i], __ATOMIC_ACQUIRE);
        if (s && s->cookie == cookie) {
            s = lookup(i);
            if (s && s->cookie == cookie)
                return s;
            if (s)
                toe_sock_put(s);
        }
    }
    return NULL;
}

int toe_fd_next(int from)
{
    struct toe_sock **t = table();
    int hw = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    for (int i = from < 0 ? 0 : from; t && i <= hw; i++)
        if (__atomic_load_n(&t[i], __ATOMIC_RELAXED))
            return i;
    return -1;
}

int toe_fd_is_offloaded(int fd)
{
    struct toe_sock **t = table();
    return t && in_table(fd) && __atomic_load_n(&t[fd], __ATOMIC_RELAXED) != NULL;
}

int toe_fd_any(void)
{
    return __atomic_load_n(&hiwater, __ATOMIC_RELAXED) >= 0;
}

int toe_fd_fits(int fd)
{
    pthread_mutex_lock(&tbl_mu);
    struct toe_sock **t = table_create_locked();
    pthread_mutex_unlock(&tbl_mu);
    return t && in_table(fd);
}

int toe_fd_install(int fd, struct toe_sock *s)
{
    if (vfork_child())
        return 0; /* the parent's table: the fd stays a bare A end (adopted after exec) */
    pthread_mutex_lock(&tbl_mu);
    struct toe_sock **t = table_create_locked();
    if (!t || !in_table(fd)) {
        pthread_mutex_unlock(&tbl_mu);
        errno = t ? EMFILE : ENOMEM;
        return -1;
    }
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
    struct toe_sock *old = __atomic_exchange_n(&t[fd], s, __ATOMIC_ACQ_REL);
    note_fd(fd);
    pthread_mutex_unlock(&tbl_mu);
    if (old)
        toe_sock_put(old);
    return 0;
}

void toe_fd_remove(int fd)
{
    struct toe_sock **t = table();
    if (!t || !in_table(fd) || vfork_child())
        return;
    struct toe_sock *old = __atomic_exchange_n(&t[fd], NULL, __ATOMIC_ACQ_REL);
    if (old)
        toe_sock_put(old);
}

int toe_fd_close_other(int fd)
{
    if (toe_ctl_is_channel(fd) || toe_pool_owns(fd)) {
        errno = EBADF; /* not the application's: as if it were not open */
        return -1;
    }
    return toe_real_close(fd);
}

static void remove_range(unsigned int first, unsigned int last)
{
    struct toe_sock **t = table();
    if (!t || vfork_child())
        return;
    int hw = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    if (hw < 0 || first > (unsigned int)hw)
        return;
    if (last > (unsigned int)hw)
        last = (unsigned int)hw;
    for (unsigned int i = first; i <= last; i++) {
        if (__atomic_load_n(&t[i], __ATOMIC_RELAXED)) {
            struct toe_sock *old = __atomic_exchange_n(&t[i], NULL, __ATOMIC_ACQ_REL);
            if (old)
                toe_sock_put(old);
        }
    }
}

/* The real close_range over [first, last] minus the control channel. */
static int close_range_sparing(unsigned int first, unsigned int last, int flags)
{
    int c = toe_ctl_channel_fd();
    if (c < 0 || (unsigned int)c < first || (unsigned int)c > last)
        return toe_real_close_range(first, last, flags);
    int r = 0;
    if ((unsigned int)c > first)
        r = toe_real_close_range(first, (unsigned int)c - 1, flags);
    if (r == 0 && (unsigned int)c < last)
        r = toe_real_close_range((unsigned int)c + 1, last, flags);
    return r;
}

int toe_fd_close_range(unsigned int first, unsigned int last, int flags)
{
    /* validate first: entries must not be dropped for a call the kernel refuses */
    if (first > last || (flags & ~(CLOSE_RANGE_UNSHARE | CLOSE_RANGE_CLOEXEC))) {
        errno = EINVAL;
        return -1;
    }
    /* CLOEXEC closes nothing; UNSHARE closes in a private copy of the descriptor
     * table (a thread about to exec): the other threads keep the sockets */
    if (!(flags & (CLOSE_RANGE_CLOEXEC | CLOSE_RANGE_UNSHARE))) {
        remove_range(first, last);
        toe_pool_forget(first, last);
    }
    return close_range_sparing(first, last, flags);
}

void toe_fd_closefrom(int lowfd)
{
    unsigned int first = lowfd < 0 ? 0 : (unsigned int)lowfd;
    remove_range(first, ~0U);
    toe_pool_forget(first, ~0U);
    int saved = errno;
    if (close_range_sparing(first, ~0U, 0) == 0) {
        errno = saved;
        return;
    }
    toe_real_closefrom(lowfd); /* no close_range (old kernel): glibc's fallback */
    errno = saved;
}

int toe_fd_dup2(int oldfd, int newfd, int flags, int is_dup3)
{
    struct toe_sock *s = toe_fd_get(oldfd);
    struct toe_sock *dropped = NULL;
    int r;

    if (vfork_child()) {
        if (s)
            toe_sock_put(s);
        return is_dup3 ? toe_real_dup3(oldfd, newfd, flags) : toe_real_dup2(oldfd, newfd);
    }
    if (s && oldfd != newfd && !in_table(newfd)) {
        toe_sock_put(s);
        errno = EBADF;
        return -1;
    }
    pthread_mutex_lock(&tbl_mu);
    r = is_dup3 ? toe_real_dup3(oldfd, newfd, flags) : toe_real_dup2(oldfd, newfd);
    if (r >= 0 && oldfd != newfd) {
        struct toe_sock **t = table();
        if (t && in_table(newfd)) {
            if (s)
                __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
            dropped = __atomic_exchange_n(&t[newfd], s, __ATOMIC_ACQ_REL);
            if (s)
                note_fd(newfd);
        }
    }
    pthread_mutex_unlock(&tbl_mu);
    int saved = errno;
    if (dropped)
        toe_sock_put(dropped);
    if (s)
        toe_sock_put(s);
    errno = saved;
    return r;
}

/* Called with tbl_mu held: dup3 k over fd (keeping fd's FD_CLOEXEC), drop fd's entry. */
static int replace_one(struct toe_sock **t, int fd, int k)
{
    int fdfl = toe_real_fcntl(fd, F_GETFD, NULL);
    if (toe_real_dup3(k, fd, (fdfl > 0 && (fdfl & FD_CLOEXEC)) ? O_CLOEXEC : 0) < 0)
        return -1;
    struct toe_sock *old = __atomic_exchange_n(&t[fd], NULL, __ATOMIC_ACQ_REL);
    if (old)
        toe_sock_put(old); /* the caller's reference keeps the socket alive */
    return 0;
}

int toe_fd_replace_all(struct toe_sock *s, int fd, int k)
{
    int rc = -1, err = EBADF;
    pthread_mutex_lock(&tbl_mu);
    struct toe_sock **t = table();
    /* fd first: if it cannot be replaced nothing changes */
    if (t && in_table(fd) && __atomic_load_n(&t[fd], __ATOMIC_RELAXED) == s) {
        rc = replace_one(t, fd, k);
        err = errno;
    }
    if (rc == 0) {
        int hw = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
        for (int i = 0; i <= hw; i++)
            if (i != fd && __atomic_load_n(&t[i], __ATOMIC_RELAXED) == s)
                replace_one(t, i, k); /* a dup that cannot follow keeps the old socket */
    }
    pthread_mutex_unlock(&tbl_mu);
    if (rc)
        errno = err;
    return rc;
}

/* An error-checking mutex (a fork child reinitialises its locks with this). */
void toe_mutex_init_ec(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
}

/* Called by the fork prepare handler with the channel lock held. */
void toe_fd_atfork_prepare(void)
{
    tbl_mu_forked = pthread_mutex_lock(&tbl_mu) == 0;
    pop_mu_forked = pthread_mutex_lock(&pop_mu) == 0;
}

void toe_fd_atfork_parent(void)
{
    if (pop_mu_forked)
        pthread_mutex_unlock(&pop_mu);
    if (tbl_mu_forked)
        pthread_mutex_unlock(&tbl_mu);
    pop_mu_forked = tbl_mu_forked = 0;
}

void toe_fd_atfork_child(void)
{
    toe_mutex_init_ec(&tbl_mu);
    toe_mutex_init_ec(&pop_mu);
    pop_mu_forked = tbl_mu_forked = 0;
    if (__atomic_load_n(&tbl_pid, __ATOMIC_RELAXED))
        __atomic_store_n(&tbl_pid, getpid(), __ATOMIC_RELAXED);
    /* an adoption interrupted by the fork (another thread ran it): run it again
     * on demand; fds already entered are skipped */
    if (__atomic_load_n(&adopt_state, __ATOMIC_RELAXED) == ADOPT_RUNNING && !adopt_self)
        __atomic_store_n(&adopt_state, ADOPT_PENDING, __ATOMIC_RELAXED);
    struct toe_sock **t = table();
    int hw = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    for (int i = 0; t && i <= hw; i++) {
        struct toe_sock *s = t[i];
        if (s) {
            pthread_mutex_init(&s->rx_lock, NULL);
            pthread_mutex_init(&s->tx_lock, NULL);
            pthread_mutex_init(&s->opt_lock, NULL);
        }
    }
}

static void renew(struct toe_sock *s);

struct toe_sock *toe_sock_alloc(void)
{
    pthread_mutex_lock(&pop_mu);
    struct toe_sock *s = __atomic_load_n(&free_head, __ATOMIC_ACQUIRE);
    while (s && !__atomic_compare_exchange_n(&free_head, &s, s->free_next, 0, __ATOMIC_ACQUIRE,
                                             __ATOMIC_ACQUIRE))
        ;
    pthread_mutex_unlock(&pop_mu);
    if (!s) {
        s = malloc(sizeof(*s));
        if (!s)
            return NULL;
        __atomic_store_n(&s->refs, 0, __ATOMIC_RELAXED);
    }
    renew(s);
    return s;
}

/* Everything but refs cleared (refs is 0 meanwhile: racing lookups cannot take it), the
 * locks initialised, then the caller's reference. */
static void renew(struct toe_sock *s)
{
    memset((char *)s + sizeof(s->refs), 0, sizeof(*s) - sizeof(s->refs));
    s->kfd = -1;
    pthread_mutex_init(&s->rx_lock, NULL);
    pthread_mutex_init(&s->tx_lock, NULL);
    pthread_mutex_init(&s->opt_lock, NULL);
    __atomic_store_n(&s->refs, 1, __ATOMIC_RELEASE);
}

void toe_sock_revive(struct toe_sock *s)
{
    struct toe_sock_shm *shm = s->shm;
    size_t len = s->map_len;
    renew(s);
    s->shm = shm;
    s->map_len = len;
}

void toe_sock_put(struct toe_sock *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    int saved = errno;
    if (s->kfd >= 0)
        toe_real_close(s->kfd);
    s->kfd = -1;
    errno = saved;
    if (!toe_pool_keep(s))
        toe_sock_free(s);
}

void toe_sock_free(struct toe_sock *s)
{
    int saved = errno;
    if (s->shm)
        munmap(s->shm, s->map_len);
    s->shm = NULL;
    errno = saved;
    struct toe_sock *h = __atomic_load_n(&free_head, __ATOMIC_RELAXED);
    do {
        s->free_next = h;
    } while (!__atomic_compare_exchange_n(&free_head, &h, s, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
}
