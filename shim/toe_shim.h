/*
 * toe_shim.h - internals of the preloaded shim (libtoe_shim.so).
 *
 * Nothing here is ABI: it is shared by the shim's own translation units only.
 *
 *   real.c      the libc functions we interpose, resolved with dlsym(RTLD_NEXT)
 *   fdtable.c   fd -> struct toe_sock, lifetime of struct toe_sock
 *   ctl.c       the per-process control channel to the adapter daemon
 *   the offloaded socket operations (toe_sock_*), one room each, sharing
 *   sock_int.h:
 *     sock_life.c socket(): creation; adoption of inherited / passed sockets
 *     ready.c     readiness on A: stuffing, doorbells, tokens, waits
 *     handover.c  the socket given to the kernel (or refused, TOE_STRICT)
 *     conn.c      bind, listen, connect, accept, shutdown, names
 *     recv.c      recv and friends, sendfile/splice from the socket, recvmmsg
 *     send.c      send and friends, sendfile/splice to the socket, sendmmsg
 *     sockopt.c   setsockopt, getsockopt (one table of options)
 *     sockopt_kernel.c  the kernel's option rules: sysctls, capabilities
 *     fdcalls.c   fcntl, ioctl, dup, close
 *   interpose.c the exported entry points (dispatch only)
 *
 * Reference counting: a struct toe_sock holds one reference per fd of this
 * process that points at it (fd table entries) plus one per operation in
 * flight (toe_fd_get() .. toe_sock_put()).  The last reference unmaps the
 * shared memory (or keeps it for the pool's REUSE, pool.c) and recycles the
 * struct onto a free list: struct toe_sock
 * memory is never returned to malloc, which is what makes the lock-free
 * lookup safe (see fdtable.c).
 */
#ifndef TOE_SHIM_H
#define TOE_SHIM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <netinet/in.h>

#include "toe_abi.h"

#define TOE_EXPORT __attribute__((visibility("default")))

/* handover reasons (TOE_HO_*) are part of the ABI: toe_abi.h */

/* the shim's own descriptors (control channel, kernel listeners) live at or above this */
#define TOE_HIGH_FD 500

/* struct toe_sock.lstate: process-local state bits */
#define TOE_LS_BOUND 1          /* bind() succeeded on the adapter; s->bound is valid */
#define TOE_LS_LISTEN 2         /* listen() succeeded */
#define TOE_LS_CONNECT 4        /* a CONNECT was issued and its outcome not yet reported */
#define TOE_LS_CONNECTED 8      /* connect() reported success: next connect() is EISCONN */
#define TOE_LS_SHUT_WR 16       /* shutdown(SHUT_WR|SHUT_RDWR) called */
#define TOE_LS_SHUT_RD 32       /* shutdown(SHUT_RD|SHUT_RDWR) called */
#define TOE_LS_GONE 64          /* the daemon vanished under the socket: reset reported */
#define TOE_LS_CONNFAIL 128     /* connect() reported a failure: unconnected again (ENOTCONN) */

#define TOE_MAX_OPTS 32         /* recorded setsockopt() calls replayed on handover */
#define TOE_OPT_VAL_MAX 32      /* longer option values are not recorded */

struct toe_opt {
    int level;
    int name;
    socklen_t len;
    uint8_t val[TOE_OPT_VAL_MAX];
};

struct toe_sock {
    int refs;                   /* atomic; see the top of this file */
    uint32_t sock_id;           /* the daemon's id */
    struct toe_sock_shm *shm;   /* header + TX ring + RX ring */
    size_t map_len;
    unsigned lstate;            /* atomic TOE_LS_* */
    pthread_mutex_t rx_lock;    /* one RX consumer per process at a time */
    pthread_mutex_t tx_lock;    /* one TX producer per process at a time */
    pthread_mutex_t opt_lock;   /* opts[], nopts, bound */
    struct sockaddr_in bound;   /* address the application bound (replayed on handover) */
    unsigned nopts;
    struct toe_opt opts[TOE_MAX_OPTS];
    uint64_t cookie;            /* SO_COOKIE of A (0: unknown); finds adopted duplicates */
    int kfd;                    /* INADDR_ANY listener: kernel listening socket on the same port, or -1 */
    struct toe_sock *free_next; /* free list link */
    unsigned gen;               /* the fork generation it was made in (pool.c: recycling) */
    unsigned char recyclable;   /* made by this process (not adopted): its mapping may be reused */
    unsigned char recycle_age;  /* refills that found it closed but not yet reset */
};

/* What HELLO told us about the adapter. */
struct toe_adapter {
    uint32_t addr_be32;
    uint32_t netmask_be32;
    uint32_t tx_ring_bytes;
    uint32_t rx_ring_bytes;
    uint32_t daemon_pid;
};

/* ---------------- real.c: the next definitions (libc) ---------------- */

void toe_real_init(void);
int toe_real_socket(int domain, int type, int protocol);
int toe_real_bind(int fd, const struct sockaddr *addr, socklen_t len);
int toe_real_listen(int fd, int backlog);
int toe_real_accept(int fd, struct sockaddr *addr, socklen_t *len);
int toe_real_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
int toe_real_connect(int fd, const struct sockaddr *addr, socklen_t len);
ssize_t toe_real_read(int fd, void *buf, size_t n);
ssize_t toe_real_write(int fd, const void *buf, size_t n);
ssize_t toe_real_readv(int fd, const struct iovec *iov, int iovcnt);
ssize_t toe_real_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t toe_real_send(int fd, const void *buf, size_t n, int flags);
ssize_t toe_real_recv(int fd, void *buf, size_t n, int flags);
ssize_t toe_real_sendto(int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *addr, socklen_t len);
ssize_t toe_real_recvfrom(int fd, void *buf, size_t n, int flags,
                          struct sockaddr *addr, socklen_t *len);
ssize_t toe_real_sendmsg(int fd, const struct msghdr *msg, int flags);
ssize_t toe_real_recvmsg(int fd, struct msghdr *msg, int flags);
int toe_real_close(int fd);
int toe_real_shutdown(int fd, int how);
int toe_real_getsockname(int fd, struct sockaddr *addr, socklen_t *len);
int toe_real_getpeername(int fd, struct sockaddr *addr, socklen_t *len);
int toe_real_getsockopt(int fd, int level, int name, void *val, socklen_t *len);
int toe_real_setsockopt(int fd, int level, int name, const void *val, socklen_t len);
int toe_real_fcntl(int fd, int cmd, void *arg);
int toe_real_fcntl64(int fd, int cmd, void *arg);
int toe_real_ioctl(int fd, unsigned long req, void *arg);
int toe_real_dup(int fd);
int toe_real_dup2(int oldfd, int newfd);
int toe_real_dup3(int oldfd, int newfd, int flags);
ssize_t toe_real_read_chk(int fd, void *buf, size_t n, size_t buflen);
ssize_t toe_real_recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags);
ssize_t toe_real_recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *addr, socklen_t *len);
ssize_t toe_real_sendfile(int out_fd, int in_fd, off_t *offset, size_t count);
ssize_t toe_real_sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count);
ssize_t toe_real_splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
                        unsigned int flags);
int toe_real_close_range(unsigned int first, unsigned int last, int flags);
void toe_real_closefrom(int lowfd);
int toe_real_recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
                      struct timespec *timeout);
int toe_real_sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags);

/* ---------------- fdtable.c ---------------- */

/* Socket behind fd with an operation reference taken, or NULL (not offloaded).
 * Lock-free; the caller drops the reference with toe_sock_put(). */
struct toe_sock *toe_fd_get(int fd);
/* Non-zero when fd is offloaded right now (no reference taken). */
int toe_fd_is_offloaded(int fd);
/* Non-zero when fd can be entered in the table (it is below its size). */
int toe_fd_fits(int fd);
/* Enter fd -> s; the table takes a new reference on s.  An entry already
 * there is dropped.  Returns 0, or -1 with errno (fd beyond the table). */
int toe_fd_install(int fd, struct toe_sock *s);
/* Remove fd's entry (lock-free, signal-safe) and drop its reference. */
void toe_fd_remove(int fd);
/* dup2/dup3 with the table kept consistent: the real call and the table
 * update happen under the table mutex. */
int toe_fd_dup2(int oldfd, int newfd, int flags, int is_dup3);
/* Make every fd of this process that points at s point at kernel socket k
 * instead (dup3 over it, keeping each fd's FD_CLOEXEC) and drop the
 * entries.  Returns 0, or -1 with errno if fd itself could not be replaced. */
int toe_fd_replace_all(struct toe_sock *s, int fd, int k);
/* close_range()/closefrom(): drop the entries in [first, last] (unless
 * CLOSE_RANGE_CLOEXEC), then the real call, sparing the control channel. */
int toe_fd_close_range(unsigned int first, unsigned int last, int flags);
void toe_fd_closefrom(int lowfd);
/* close() of an fd that is not offloaded (the control channel is not the
 * application's to close: EBADF, as if it were not open). */
int toe_fd_close_other(int fd);
/* The lowest offloaded fd >= from, or -1. */
int toe_fd_next(int from);
/* Non-zero once any offloaded socket was entered (FORK shares them with a child). */
int toe_fd_any(void);
/* The socket with this SO_COOKIE already in the table (a reference taken), or NULL. */
struct toe_sock *toe_fd_find_cookie(uint64_t cookie);
/* Adopt inherited offloaded sockets once per process image (exec): run by the
 * constructor, or by the first fd lookup that misses before it ran. */
void toe_fd_adopt_once(void);
/* fork(): hold the table locks across it (prepare/parent); reinitialise
 * process-local locks in the child. */
void toe_fd_atfork_prepare(void);
/* Initialise an error-checking mutex (the shim's locks; a fork child's again). */
void toe_mutex_init_ec(pthread_mutex_t *m);
void toe_fd_atfork_parent(void);
void toe_fd_atfork_child(void);

/* A zeroed struct toe_sock holding one reference (the caller's), locks
 * initialised, or NULL (ENOMEM). */
struct toe_sock *toe_sock_alloc(void);
/* Drop one reference; the last one unmaps the shared memory, or keeps the mapping for
 * recycling (toe_pool_keep).  Keeps errno. */
void toe_sock_put(struct toe_sock *s);
/* A struct without references (a kept one): unmapped, onto the free list.  Keeps errno. */
void toe_sock_free(struct toe_sock *s);
/* A kept struct made new again, its mapping kept, holding one reference (the caller's). */
void toe_sock_revive(struct toe_sock *s);

/* ---------------- pool.c: ready sockets for socket() ---------------- */

/* Is fd a pooled A end (open, but not the application's)? */
int toe_pool_owns(int fd);
/* Descriptors [first, last] are about to be closed or replaced: their pooled sockets leave. */
void toe_pool_forget(unsigned int first, unsigned int last);
/* The last reference of s is gone: 1 if its mapping is kept for REUSE (s is the pool's). */
int toe_pool_keep(struct toe_sock *s);
/* The fork generation: sockets made before the last fork() are never recycled. */
unsigned toe_pool_gen(void);
void toe_pool_atfork_prepare(void);
void toe_pool_atfork_parent(void);
void toe_pool_atfork_child(void);

/* ---------------- ctl.c ---------------- */

extern int toe_debug;
extern int toe_strict;      /* TOE_STRICT: a would-be kernel socket is an error */
extern unsigned toe_poll_us; /* TOE_POLL_US: a blocking receive spins this long before it sleeps */
extern int toe_adopting;    /* TOE_SOCK is set: look for inherited offloaded sockets */
void toe_ctl_init(void);
/* 1 when the adapter is reachable (connects and says HELLO on first use);
 * 0 when sockets must go to the kernel (the warning has been printed);
 * -errno when this process is out of a resource the channel needs (EMFILE,
 * ENFILE, ENOMEM, ENOBUFS): the call fails as the kernel's would, nothing is
 * remembered. */
int toe_ctl_up(void);
/* Like toe_ctl_up(), but a failure to connect is silent and not remembered
 * (adoption asks on behalf of sockets the program may never use). */
int toe_ctl_up_quiet(void);
const struct toe_adapter *toe_ctl_adapter(void);
/* One command, one response.  fds (0..3) travel with SCM_RIGHTS.
 * Returns 0 when rsp is valid, or -errno when the channel failed. */
int toe_ctl_call(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp);
/* The same, also receiving up to *nrfds descriptors (close-on-exec) from the
 * response; *nrfds is set to the number received.  Extra ones are closed. */
int toe_ctl_call_rfds(struct toe_cmd *cmd, const int *fds, int nfds, struct toe_rsp *rsp,
                      int *rfds, int *nrfds);
/* The same with nids uint32 ids after the command in its message (REUSE). */
int toe_ctl_call_ids(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds,
                     struct toe_rsp *rsp);
/* The pool's REUSE ahead of need: sent, its answer collected later by toe_ctl_posted
 * (wait: block for it; -EAGAIN: not yet).  -EAGAIN when posting is not possible now. */
int toe_ctl_post_ids(struct toe_cmd *cmd, const uint32_t *ids, int nids, const int *fds, int nfds);
int toe_ctl_posted(struct toe_rsp *rsp, int wait);
/* Non-zero when fd is this process's control channel. */
int toe_ctl_is_channel(int fd);
/* The current channel fd, or -1. */
int toe_ctl_channel_fd(void);
/* Trace on stderr when TOE_DEBUG is set.  Keeps errno. */
void toe_dbg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One line on stderr, always.  Keeps errno. */
void toe_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define TOE_DBG(...) do { if (toe_debug) toe_dbg(__VA_ARGS__); } while (0)

/* ---------------- offloaded operations (the rooms sock_int.h lists) ---------------- */

/* Is this socket() call one we offload? */
int toe_sock_wanted(int domain, int type, int protocol);
int toe_sock_socket(int domain, int type, int protocol);
int toe_sock_bind(struct toe_sock *s, int fd, const struct sockaddr *addr, socklen_t len);
int toe_sock_listen(struct toe_sock *s, int fd, int backlog);
int toe_sock_accept(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len, int flags);
int toe_sock_connect(struct toe_sock *s, int fd, const struct sockaddr *addr, socklen_t len);
ssize_t toe_sock_recv(struct toe_sock *s, int fd, void *buf, size_t n, int flags);
ssize_t toe_sock_read_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen);
ssize_t toe_sock_recv_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen,
                          int flags);
ssize_t toe_sock_recvfrom(struct toe_sock *s, int fd, void *buf, size_t n, int flags,
                          struct sockaddr *addr, socklen_t *len);
ssize_t toe_sock_recvfrom_chk(struct toe_sock *s, int fd, void *buf, size_t n, size_t buflen,
                              int flags, struct sockaddr *addr, socklen_t *len);
ssize_t toe_sock_readv(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt);
ssize_t toe_sock_recvmsg(struct toe_sock *s, int fd, struct msghdr *msg, int flags);
ssize_t toe_sock_send(struct toe_sock *s, int fd, const void *buf, size_t n, int flags);
ssize_t toe_sock_sendto(struct toe_sock *s, int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *addr, socklen_t len);
ssize_t toe_sock_writev(struct toe_sock *s, int fd, const struct iovec *iov, int iovcnt);
ssize_t toe_sock_sendmsg(struct toe_sock *s, int fd, const struct msghdr *msg, int flags);
int toe_sock_shutdown(struct toe_sock *s, int fd, int how);
int toe_sock_getsockname(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len);
int toe_sock_getpeername(struct toe_sock *s, int fd, struct sockaddr *addr, socklen_t *len);
int toe_sock_getsockopt(struct toe_sock *s, int fd, int level, int name, void *val,
                        socklen_t *len);
int toe_sock_setsockopt(struct toe_sock *s, int fd, int level, int name, const void *val,
                        socklen_t len);
int toe_sock_fcntl(struct toe_sock *s, int fd, int cmd, void *arg, int is64);
int toe_sock_ioctl(struct toe_sock *s, int fd, unsigned long req, void *arg);
int toe_sock_dup(struct toe_sock *s, int fd);
int toe_sock_close(int fd);
ssize_t toe_sock_sendfile(struct toe_sock *s, int out_fd, int in_fd, off64_t *offset,
                          size_t count);
/* sendfile() whose in_fd is offloaded (and out_fd is not): EINVAL. */
ssize_t toe_sock_sendfile_in(struct toe_sock *s, int out_fd, int in_fd, off64_t *offset,
                             size_t count);
/* splice() into an offloaded fd_out (from a pipe or a file) / out of an
 * offloaded fd_in (into a pipe). */
ssize_t toe_sock_splice_out(struct toe_sock *s, int fd_in, loff_t *off_in, int fd_out,
                            loff_t *off_out, size_t len, unsigned int flags);
ssize_t toe_sock_splice_in(struct toe_sock *s, int fd_in, loff_t *off_in, int fd_out,
                           loff_t *off_out, size_t len, unsigned int flags);
int toe_sock_recvmmsg(struct toe_sock *s, int fd, struct mmsghdr *vec, unsigned int vlen,
                      int flags, struct timespec *timeout);
int toe_sock_sendmmsg(struct toe_sock *s, int fd, struct mmsghdr *vec, unsigned int vlen,
                      int flags);
/* recvmsg() on a socket that is not offloaded: the real call, then offloaded
 * sockets received with SCM_RIGHTS are adopted. */
ssize_t toe_pass_recvmsg(int fd, struct msghdr *msg, int flags);
/* Ask the daemon for the socket behind inherited/received AF_UNIX fd (by its
 * SO_COOKIE) and enter it in the table.  1 adopted, 0 not ours. */
int toe_sock_adopt_fd(int fd);
/* Every fd of /proc/self/fd through toe_sock_adopt_fd(). */
void toe_sock_adopt_inherited(void);

#endif /* TOE_SHIM_H */
