/*
 * real.c - the libc definitions behind the functions the shim interposes.
 *
 * Each toe_real_X() resolves X with dlsym(RTLD_NEXT) the first time it is
 * needed (thread-safe: the race is benign, every thread stores the same
 * pointer) and calls it.  This works before the constructor has run.  If the
 * lookup is impossible (dlsym re-entered on this thread, e.g. by a malloc
 * interposer that does I/O while dlsym allocates) the call goes straight to
 * the system call instead.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "toe_shim.h"

extern void __chk_fail(void) __attribute__((noreturn));

static __thread int in_dlsym __attribute__((tls_model("initial-exec")));

static void *resolve(void **slot, const char *name)
{
    void *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (p)
        return p;
    if (in_dlsym)
        return NULL;
    int saved = errno;
    in_dlsym = 1;
    p = dlsym(RTLD_NEXT, name);
    in_dlsym = 0;
    errno = saved;
    if (p)
        __atomic_store_n(slot, p, __ATOMIC_RELEASE);
    return p;
}

/* SLOT(name) holds the resolved pointer; LOOKUP(type, name) yields it as `f`. */
#define SLOT(name) static void *slot_##name
#define LOOKUP(type, name) __typeof__(type) f = (__typeof__(type))resolve(&slot_##name, #name)

SLOT(socket);
SLOT(bind);
SLOT(listen);
SLOT(accept);
SLOT(accept4);
SLOT(connect);
SLOT(read);
SLOT(write);
SLOT(readv);
SLOT(writev);
SLOT(send);
SLOT(recv);
SLOT(sendto);
SLOT(recvfrom);
SLOT(sendmsg);
SLOT(recvmsg);
SLOT(close);
SLOT(shutdown);
SLOT(getsockname);
SLOT(getpeername);
SLOT(getsockopt);
SLOT(setsockopt);
SLOT(fcntl);
SLOT(fcntl64);
SLOT(ioctl);
SLOT(dup);
SLOT(dup2);
SLOT(dup3);
SLOT(__read_chk);
SLOT(__recv_chk);
SLOT(__recvfrom_chk);
SLOT(sendfile);
SLOT(sendfile64);
SLOT(splice);
SLOT(close_range);
SLOT(closefrom);
SLOT(recvmmsg);
SLOT(sendmmsg);

void toe_real_init(void)
{
    static void **const slots[] = {
        &slot_socket, &slot_bind, &slot_listen, &slot_accept, &slot_accept4,
        &slot_connect, &slot_read, &slot_write, &slot_readv, &slot_writev,
        &slot_send, &slot_recv, &slot_sendto, &slot_recvfrom, &slot_sendmsg,
        &slot_recvmsg, &slot_close, &slot_shutdown, &slot_getsockname,
        &slot_getpeername, &slot_getsockopt, &slot_setsockopt, &slot_fcntl,
        &slot_fcntl64, &slot_ioctl, &slot_dup, &slot_dup2, &slot_dup3,
        &slot___read_chk, &slot___recv_chk, &slot___recvfrom_chk,
        &slot_sendfile, &slot_sendfile64, &slot_splice, &slot_close_range, &slot_closefrom,
        &slot_recvmmsg, &slot_sendmmsg,
    };
    static const char *const names[] = {
        "socket", "bind", "listen", "accept", "accept4",
        "connect", "read", "write", "readv", "writev",
        "send", "recv", "sendto", "recvfrom", "sendmsg",
        "recvmsg", "close", "shutdown", "getsockname",
        "getpeername", "getsockopt", "setsockopt", "fcntl",
        "fcntl64", "ioctl", "dup", "dup2", "dup3",
        "__read_chk", "__recv_chk", "__recvfrom_chk",
        "sendfile", "sendfile64", "splice", "close_range", "closefrom",
        "recvmmsg", "sendmmsg",
    };
    _Static_assert(sizeof(slots) / sizeof(slots[0]) == sizeof(names) / sizeof(names[0]),
                   "slot table");
    for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++)
        resolve(slots[i], names[i]);
}

int toe_real_socket(int domain, int type, int protocol)
{
    LOOKUP(int (*)(int, int, int), socket);
    return f ? f(domain, type, protocol) : (int)syscall(SYS_socket, domain, type, protocol);
}

int toe_real_bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    LOOKUP(int (*)(int, const struct sockaddr *, socklen_t), bind);
    return f ? f(fd, addr, len) : (int)syscall(SYS_bind, fd, addr, len);
}

int toe_real_listen(int fd, int backlog)
{
    LOOKUP(int (*)(int, int), listen);
    return f ? f(fd, backlog) : (int)syscall(SYS_listen, fd, backlog);
}

int toe_real_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    LOOKUP(int (*)(int, struct sockaddr *, socklen_t *), accept);
    return f ? f(fd, addr, len) : (int)syscall(SYS_accept4, fd, addr, len, 0);
}

int toe_real_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    LOOKUP(int (*)(int, struct sockaddr *, socklen_t *, int), accept4);
    return f ? f(fd, addr, len, flags) : (int)syscall(SYS_accept4, fd, addr, len, flags);
}

int toe_real_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    LOOKUP(int (*)(int, const struct sockaddr *, socklen_t), connect);
    return f ? f(fd, addr, len) : (int)syscall(SYS_connect, fd, addr, len);
}

ssize_t toe_real_read(int fd, void *buf, size_t n)
{
    LOOKUP(ssize_t (*)(int, void *, size_t), read);
    return f ? f(fd, buf, n) : syscall(SYS_read, fd, buf, n);
}

ssize_t toe_real_write(int fd, const void *buf, size_t n)
{
    LOOKUP(ssize_t (*)(int, const void *, size_t), write);
    return f ? f(fd, buf, n) : syscall(SYS_write, fd, buf, n);
}

ssize_t toe_real_readv(int fd, const struct iovec *iov, int iovcnt)
{
    LOOKUP(ssize_t (*)(int, const struct iovec *, int), readv);
    return f ? f(fd, iov, iovcnt) : syscall(SYS_readv, fd, iov, iovcnt);
}

ssize_t toe_real_writev(int fd, const struct iovec *iov, int iovcnt)
{
    LOOKUP(ssize_t (*)(int, const struct iovec *, int), writev);
    return f ? f(fd, iov, iovcnt) : syscall(SYS_writev, fd, iov, iovcnt);
}

ssize_t toe_real_send(int fd, const void *buf, size_t n, int flags)
{
    LOOKUP(ssize_t (*)(int, const void *, size_t, int), send);
    return f ? f(fd, buf, n, flags) : syscall(SYS_sendto, fd, buf, n, flags, NULL, 0);
}

ssize_t toe_real_recv(int fd, void *buf, size_t n, int flags)
{
    LOOKUP(ssize_t (*)(int, void *, size_t, int), recv);
    return f ? f(fd, buf, n, flags) : syscall(SYS_recvfrom, fd, buf, n, flags, NULL, NULL);
}

ssize_t toe_real_sendto(int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *addr, socklen_t len)
{
    LOOKUP(ssize_t (*)(int, const void *, size_t, int, const struct sockaddr *, socklen_t),
           sendto);
    return f ? f(fd, buf, n, flags, addr, len) : syscall(SYS_sendto, fd, buf, n, flags, addr, len);
}

ssize_t toe_real_recvfrom(int fd, void *buf, size_t n, int flags,
                          struct sockaddr *addr, socklen_t *len)
{
    LOOKUP(ssize_t (*)(int, void *, size_t, int, struct sockaddr *, socklen_t *), recvfrom);
    return f ? f(fd, buf, n, flags, addr, len)
             : syscall(SYS_recvfrom, fd, buf, n, flags, addr, len);
}

ssize_t toe_real_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    LOOKUP(ssize_t (*)(int, const struct msghdr *, int), sendmsg);
    return f ? f(fd, msg, flags) : syscall(SYS_sendmsg, fd, msg, flags);
}

ssize_t toe_real_recvmsg(int fd, struct msghdr *msg, int flags)
{
    LOOKUP(ssize_t (*)(int, struct msghdr *, int), recvmsg);
    return f ? f(fd, msg, flags) : syscall(SYS_recvmsg, fd, msg, flags);
}

int toe_real_close(int fd)
{
    LOOKUP(int (*)(int), close);
    return f ? f(fd) : (int)syscall(SYS_close, fd);
}

int toe_real_shutdown(int fd, int how)
{
    LOOKUP(int (*)(int, int), shutdown);
    return f ? f(fd, how) : (int)syscall(SYS_shutdown, fd, how);
}

int toe_real_getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    LOOKUP(int (*)(int, struct sockaddr *, socklen_t *), getsockname);
    return f ? f(fd, addr, len) : (int)syscall(SYS_getsockname, fd, addr, len);
}

int toe_real_getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    LOOKUP(int (*)(int, struct sockaddr *, socklen_t *), getpeername);
    return f ? f(fd, addr, len) : (int)syscall(SYS_getpeername, fd, addr, len);
}

int toe_real_getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    LOOKUP(int (*)(int, int, int, void *, socklen_t *), getsockopt);
    return f ? f(fd, level, name, val, len) : (int)syscall(SYS_getsockopt, fd, level, name, val, len);
}

int toe_real_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    LOOKUP(int (*)(int, int, int, const void *, socklen_t), setsockopt);
    return f ? f(fd, level, name, val, len) : (int)syscall(SYS_setsockopt, fd, level, name, val, len);
}

int toe_real_fcntl(int fd, int cmd, void *arg)
{
    LOOKUP(int (*)(int, int, ...), fcntl);
    return f ? f(fd, cmd, arg) : (int)syscall(SYS_fcntl, fd, cmd, arg);
}

int toe_real_fcntl64(int fd, int cmd, void *arg)
{
    LOOKUP(int (*)(int, int, ...), fcntl64);
    return f ? f(fd, cmd, arg) : toe_real_fcntl(fd, cmd, arg);
}

int toe_real_ioctl(int fd, unsigned long req, void *arg)
{
    LOOKUP(int (*)(int, unsigned long, ...), ioctl);
    return f ? f(fd, req, arg) : (int)syscall(SYS_ioctl, fd, req, arg);
}

int toe_real_dup(int fd)
{
    LOOKUP(int (*)(int), dup);
    return f ? f(fd) : (int)syscall(SYS_dup, fd);
}

int toe_real_dup2(int oldfd, int newfd)
{
    LOOKUP(int (*)(int, int), dup2);
    if (f)
        return f(oldfd, newfd);
    if (oldfd == newfd)
        return (int)syscall(SYS_fcntl, oldfd, F_GETFD) < 0 ? -1 : newfd;
    return (int)syscall(SYS_dup3, oldfd, newfd, 0);
}

int toe_real_dup3(int oldfd, int newfd, int flags)
{
    LOOKUP(int (*)(int, int, int), dup3);
    return f ? f(oldfd, newfd, flags) : (int)syscall(SYS_dup3, oldfd, newfd, flags);
}

ssize_t toe_real_read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    LOOKUP(ssize_t (*)(int, void *, size_t, size_t), __read_chk);
    if (f)
        return f(fd, buf, n, buflen);
    if (n > buflen)
        __chk_fail();
    return toe_real_read(fd, buf, n);
}

ssize_t toe_real_recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    LOOKUP(ssize_t (*)(int, void *, size_t, size_t, int), __recv_chk);
    if (f)
        return f(fd, buf, n, buflen, flags);
    if (n > buflen)
        __chk_fail();
    return toe_real_recv(fd, buf, n, flags);
}

ssize_t toe_real_recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *addr, socklen_t *len)
{
    LOOKUP(ssize_t (*)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *),
           __recvfrom_chk);
    if (f)
        return f(fd, buf, n, buflen, flags, addr, len);
    if (n > buflen)
        __chk_fail();
    return toe_real_recvfrom(fd, buf, n, flags, addr, len);
}

ssize_t toe_real_sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    LOOKUP(ssize_t (*)(int, int, off_t *, size_t), sendfile);
    return f ? f(out_fd, in_fd, offset, count)
             : syscall(SYS_sendfile, out_fd, in_fd, offset, count);
}

ssize_t toe_real_sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count)
{
    LOOKUP(ssize_t (*)(int, int, off64_t *, size_t), sendfile64);
    return f ? f(out_fd, in_fd, offset, count)
             : syscall(SYS_sendfile, out_fd, in_fd, offset, count);
}

ssize_t toe_real_splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
                        unsigned int flags)
{
    LOOKUP(ssize_t (*)(int, loff_t *, int, loff_t *, size_t, unsigned int), splice);
    return f ? f(fd_in, off_in, fd_out, off_out, len, flags)
             : syscall(SYS_splice, fd_in, off_in, fd_out, off_out, len, flags);
}

int toe_real_close_range(unsigned int first, unsigned int last, int flags)
{
    LOOKUP(int (*)(unsigned int, unsigned int, int), close_range);
    return f ? f(first, last, flags) : (int)syscall(SYS_close_range, first, last, flags);
}

void toe_real_closefrom(int lowfd)
{
    LOOKUP(void (*)(int), closefrom);
    if (f)
        f(lowfd);
    else
        syscall(SYS_close_range, lowfd < 0 ? 0 : lowfd, ~0U, 0);
}

int toe_real_recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
                      struct timespec *timeout)
{
    LOOKUP(int (*)(int, struct mmsghdr *, unsigned int, int, struct timespec *), recvmmsg);
    return f ? f(fd, vec, vlen, flags, timeout)
             : (int)syscall(SYS_recvmmsg, fd, vec, vlen, flags, timeout);
}

int toe_real_sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags)
{
    LOOKUP(int (*)(int, struct mmsghdr *, unsigned int, int), sendmmsg);
    return f ? f(fd, vec, vlen, flags) : (int)syscall(SYS_sendmmsg, fd, vec, vlen, flags);
}
