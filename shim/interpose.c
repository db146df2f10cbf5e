/*
 * interpose.c - the functions libtoe_shim.so exports, and nothing else.
 *
 * Every one has the same shape: fd-table lookup (lock-free; it is NULL until
 * the first offloaded socket exists, so no initialisation is needed) ->
 * offloaded operation (toe_sock_*, toe_shim.h), or the real libc function.  The dup2/dup3/
 * close family goes to the table when either fd is offloaded (close_range and
 * closefrom always: the range may hold any).  Calls with two descriptors
 * (sendfile, splice) look up the one that matters first, then the other.
 * No logic here.
 */
#undef _FORTIFY_SOURCE /* we define read(), recv() ...: no inline wrappers */

#include <fcntl.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "toe_shim.h"

/* <sys/socket.h> gives GNU C a transparent union for address arguments */
#if defined(__USE_GNU) && !defined(__cplusplus)
#define SA(a) ((a).__sockaddr__)
#else
#define SA(a) (a)
#endif

/* the fortified entry points (declared by glibc only under _FORTIFY_SOURCE) */
TOE_EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen);
TOE_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags);
TOE_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                                  struct sockaddr *addr, socklen_t *len);

/* Offloaded fd: run `call` (which may use `s`) with a reference held. */
#define OFFLOAD(type, fd, call)                  \
    do {                                         \
        struct toe_sock *s = toe_fd_get(fd);     \
        if (s) {                                 \
            type r_ = (call);                    \
            toe_sock_put(s);                     \
            return r_;                           \
        }                                        \
    } while (0)

TOE_EXPORT int socket(int domain, int type, int protocol)
{
    if (toe_sock_wanted(domain, type, protocol))
        return toe_sock_socket(domain, type, protocol);
    return toe_real_socket(domain, type, protocol);
}

TOE_EXPORT int bind(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    OFFLOAD(int, fd, toe_sock_bind(s, fd, SA(addr), len));
    return toe_real_bind(fd, SA(addr), len);
}

TOE_EXPORT int listen(int fd, int backlog)
{
    OFFLOAD(int, fd, toe_sock_listen(s, fd, backlog));
    return toe_real_listen(fd, backlog);
}

TOE_EXPORT int accept(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len)
{
    OFFLOAD(int, fd, toe_sock_accept(s, fd, SA(addr), len, 0));
    return toe_real_accept(fd, SA(addr), len);
}

TOE_EXPORT int accept4(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len, int flags)
{
    OFFLOAD(int, fd, toe_sock_accept(s, fd, SA(addr), len, flags));
    return toe_real_accept4(fd, SA(addr), len, flags);
}

TOE_EXPORT int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    OFFLOAD(int, fd, toe_sock_connect(s, fd, SA(addr), len));
    return toe_real_connect(fd, SA(addr), len);
}

TOE_EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    OFFLOAD(ssize_t, fd, toe_sock_recv(s, fd, buf, n, 0));
    return toe_real_read(fd, buf, n);
}

TOE_EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    OFFLOAD(ssize_t, fd, toe_sock_read_chk(s, fd, buf, n, buflen));
    return toe_real_read_chk(fd, buf, n, buflen);
}

TOE_EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    OFFLOAD(ssize_t, fd, toe_sock_send(s, fd, buf, n, 0));
    return toe_real_write(fd, buf, n);
}

TOE_EXPORT ssize_t readv(int fd, const struct iovec *iov, int iovcnt)
{
    OFFLOAD(ssize_t, fd, toe_sock_readv(s, fd, iov, iovcnt));
    return toe_real_readv(fd, iov, iovcnt);
}

TOE_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    OFFLOAD(ssize_t, fd, toe_sock_writev(s, fd, iov, iovcnt));
    return toe_real_writev(fd, iov, iovcnt);
}

TOE_EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    OFFLOAD(ssize_t, fd, toe_sock_send(s, fd, buf, n, flags));
    return toe_real_send(fd, buf, n, flags);
}

TOE_EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    OFFLOAD(ssize_t, fd, toe_sock_recv(s, fd, buf, n, flags));
    return toe_real_recv(fd, buf, n, flags);
}

TOE_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    OFFLOAD(ssize_t, fd, toe_sock_recv_chk(s, fd, buf, n, buflen, flags));
    return toe_real_recv_chk(fd, buf, n, buflen, flags);
}

TOE_EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, __CONST_SOCKADDR_ARG addr,
                          socklen_t len)
{
    OFFLOAD(ssize_t, fd, toe_sock_sendto(s, fd, buf, n, flags, SA(addr), len));
    return toe_real_sendto(fd, buf, n, flags, SA(addr), len);
}

TOE_EXPORT ssize_t recvfrom(int fd, void *__restrict buf, size_t n, int flags, __SOCKADDR_ARG addr,
                            socklen_t *__restrict len)
{
    OFFLOAD(ssize_t, fd, toe_sock_recvfrom(s, fd, buf, n, flags, SA(addr), len));
    return toe_real_recvfrom(fd, buf, n, flags, SA(addr), len);
}

TOE_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                                  struct sockaddr *addr, socklen_t *len)
{
    OFFLOAD(ssize_t, fd, toe_sock_recvfrom_chk(s, fd, buf, n, buflen, flags, addr, len));
    return toe_real_recvfrom_chk(fd, buf, n, buflen, flags, addr, len);
}

TOE_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    OFFLOAD(ssize_t, fd, toe_sock_sendmsg(s, fd, msg, flags));
    return toe_real_sendmsg(fd, msg, flags);
}

TOE_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    OFFLOAD(ssize_t, fd, toe_sock_recvmsg(s, fd, msg, flags));
    return toe_pass_recvmsg(fd, msg, flags);
}

TOE_EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
                        struct timespec *timeout)
{
    OFFLOAD(int, fd, toe_sock_recvmmsg(s, fd, vec, vlen, flags, timeout));
    return toe_real_recvmmsg(fd, vec, vlen, flags, timeout);
}

TOE_EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags)
{
    OFFLOAD(int, fd, toe_sock_sendmmsg(s, fd, vec, vlen, flags));
    return toe_real_sendmmsg(fd, vec, vlen, flags);
}

TOE_EXPORT ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    OFFLOAD(ssize_t, out_fd, toe_sock_sendfile(s, out_fd, in_fd, offset, count));
    OFFLOAD(ssize_t, in_fd, toe_sock_sendfile_in(s, out_fd, in_fd, offset, count));
    return toe_real_sendfile(out_fd, in_fd, offset, count);
}

TOE_EXPORT ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count)
{
    OFFLOAD(ssize_t, out_fd, toe_sock_sendfile(s, out_fd, in_fd, offset, count));
    OFFLOAD(ssize_t, in_fd, toe_sock_sendfile_in(s, out_fd, in_fd, offset, count));
    return toe_real_sendfile64(out_fd, in_fd, offset, count);
}

TOE_EXPORT ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
                          unsigned int flags)
{
    OFFLOAD(ssize_t, fd_out, toe_sock_splice_out(s, fd_in, off_in, fd_out, off_out, len, flags));
    OFFLOAD(ssize_t, fd_in, toe_sock_splice_in(s, fd_in, off_in, fd_out, off_out, len, flags));
    return toe_real_splice(fd_in, off_in, fd_out, off_out, len, flags);
}

TOE_EXPORT int close(int fd)
{
    if (toe_fd_is_offloaded(fd))
        return toe_sock_close(fd);
    return toe_fd_close_other(fd);
}

TOE_EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    return toe_fd_close_range(first, last, flags);
}

TOE_EXPORT void closefrom(int lowfd)
{
    toe_fd_closefrom(lowfd);
}

TOE_EXPORT int shutdown(int fd, int how)
{
    OFFLOAD(int, fd, toe_sock_shutdown(s, fd, how));
    return toe_real_shutdown(fd, how);
}

TOE_EXPORT int getsockname(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len)
{
    OFFLOAD(int, fd, toe_sock_getsockname(s, fd, SA(addr), len));
    return toe_real_getsockname(fd, SA(addr), len);
}

TOE_EXPORT int getpeername(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len)
{
    OFFLOAD(int, fd, toe_sock_getpeername(s, fd, SA(addr), len));
    return toe_real_getpeername(fd, SA(addr), len);
}

TOE_EXPORT int getsockopt(int fd, int level, int name, void *__restrict val,
                          socklen_t *__restrict len)
{
    OFFLOAD(int, fd, toe_sock_getsockopt(s, fd, level, name, val, len));
    return toe_real_getsockopt(fd, level, name, val, len);
}

TOE_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    OFFLOAD(int, fd, toe_sock_setsockopt(s, fd, level, name, val, len));
    return toe_real_setsockopt(fd, level, name, val, len);
}

TOE_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    OFFLOAD(int, fd, toe_sock_fcntl(s, fd, cmd, arg, 0));
    return toe_real_fcntl(fd, cmd, arg);
}

TOE_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    OFFLOAD(int, fd, toe_sock_fcntl(s, fd, cmd, arg, 1));
    return toe_real_fcntl64(fd, cmd, arg);
}

TOE_EXPORT int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    OFFLOAD(int, fd, toe_sock_ioctl(s, fd, req, arg));
    return toe_real_ioctl(fd, req, arg);
}

TOE_EXPORT int dup(int fd)
{
    OFFLOAD(int, fd, toe_sock_dup(s, fd));
    return toe_real_dup(fd);
}

TOE_EXPORT int dup2(int oldfd, int newfd)
{
    if (newfd >= 0 && oldfd != newfd)
        toe_pool_forget((unsigned)newfd, (unsigned)newfd); /* the kernel closes a pooled one there */
    if (toe_fd_is_offloaded(oldfd) || toe_fd_is_offloaded(newfd))
        return toe_fd_dup2(oldfd, newfd, 0, 0);
    return toe_real_dup2(oldfd, newfd);
}

TOE_EXPORT int dup3(int oldfd, int newfd, int flags)
{
    if (newfd >= 0 && oldfd != newfd)
        toe_pool_forget((unsigned)newfd, (unsigned)newfd);
    if (toe_fd_is_offloaded(oldfd) || toe_fd_is_offloaded(newfd))
        return toe_fd_dup2(oldfd, newfd, flags, 1);
    return toe_real_dup3(oldfd, newfd, flags);
}
