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
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "toe_shim.h"

#define TOE_FD_MAX (1 << 20)

static struct toe_sock **tbl;     /* published with a release store */
static int tbl_size;              /* written before tbl is published */
static int hiwater = -1;          /* highest fd ever entered */
static pthread_mutex_t tbl_mu = PTHREAD_MUTEX_INITIALIZER;

static struct toe_sock *free_head;                    /* lock-free push */
static pthread_mutex_t pop_mu = PTHREAD_MUTEX_INITIALIZER; /* pops are serialised: no ABA */

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
    __atomic_store_n(&tbl, (struct toe_sock **)p, __ATOMIC_RELEASE);
    return p;
}

static void note_fd(int fd)
{
    int h = __atomic_load_n(&hiwater, __ATOMIC_RELAXED);
    while (fd > h && !__atomic_compare_exchange_n(&hiwater, &h, fd, 1, __ATOMIC_RELAXED,
                                                  __ATOMIC_RELAXED))
        ;
}

struct toe_sock *toe_fd_get(int fd)
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

int toe_fd_is_offloaded(int fd)
{
    struct toe_sock **t = table();
    return t && in_table(fd) && __atomic_load_n(&t[fd], __ATOMIC_RELAXED) != NULL;
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
    if (!t || !in_table(fd))
        return;
    struct toe_sock *old = __atomic_exchange_n(&t[fd], NULL, __ATOMIC_ACQ_REL);
    if (old)
        toe_sock_put(old);
}

int toe_fd_dup2(int oldfd, int newfd, int flags, int is_dup3)
{
    struct toe_sock *s = toe_fd_get(oldfd);
    struct toe_sock *dropped = NULL;
    int r;

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

void toe_fd_atfork_child(void)
{
    pthread_mutex_init(&tbl_mu, NULL);
    pthread_mutex_init(&pop_mu, NULL);
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
    /* refs stays 0 while we clear the rest: racing lookups cannot take it */
    memset((char *)s + sizeof(s->refs), 0, sizeof(*s) - sizeof(s->refs));
    pthread_mutex_init(&s->rx_lock, NULL);
    pthread_mutex_init(&s->tx_lock, NULL);
    pthread_mutex_init(&s->opt_lock, NULL);
    __atomic_store_n(&s->refs, 1, __ATOMIC_RELEASE);
    return s;
}

void toe_sock_put(struct toe_sock *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
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
