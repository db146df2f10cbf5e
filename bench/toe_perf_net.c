/* toe_perf_net.c - socket helpers of toe_perf (see toe_perf.c). */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include "toe_perf.h"

/* ---------------------------------------------------------------- socket I/O */

/* Send all of buf: 0, or -1 with errno. */
int send_all(int fd, const void *buf, size_t len_bytes)
{
    const uint8_t *p = buf;
    while (len_bytes > 0) {
        ssize_t n = send(fd, p, len_bytes, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        p += n;
        len_bytes -= (size_t)n;
    }
    return 0;
}

/* One recv(), retried on EINTR. */
ssize_t recv_some(int fd, void *buf, size_t len_bytes)
{
    ssize_t n;
    while ((n = recv(fd, buf, len_bytes, 0)) < 0 && errno == EINTR)
        ;
    return n;
}

/* Receive len_bytes, fewer only at EOF: the count, or -1 with errno. */
ssize_t recv_full(int fd, void *buf, size_t len_bytes)
{
    size_t got_bytes = 0;
    while (got_bytes < len_bytes) {
        ssize_t n = recv_some(fd, (uint8_t *)buf + got_bytes, len_bytes - got_bytes);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got_bytes += (size_t)n;
    }
    return (ssize_t)got_bytes;
}

/* Stream tests keep Nagle on, as netperf's TCP_STREAM does; the others
 * (one message in flight, or timed calls) set TCP_NODELAY on both ends. */
bool is_stream(uint32_t test)
{
    return test == TEST_STREAM_SEND || test == TEST_STREAM_RECV;
}

int set_nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int listen_on(const struct addrinfo *ai)
{
    int one = 1;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd < 0)
        fail(errno, "socket");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        fail(errno, "setsockopt SO_REUSEADDR");
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0)
        fail(errno, "bind");
    if (listen(fd, LISTEN_BACKLOG) < 0)
        fail(errno, "listen");
    return fd;
}

unsigned local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        fail(errno, "getsockname");
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* After an interrupted connect: wait for it to complete, 0 or -1 with errno. */
static int wait_connected(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t len = sizeof err;
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return -1;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

int connect_or_fail(const struct client_opts *o)
{
    const struct addrinfo *ai = o->server;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd < 0)
        fail(errno, "socket");
    if (!is_stream(o->test) && set_nodelay(fd) < 0)
        fail(errno, "setsockopt TCP_NODELAY");
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && (errno != EINTR || wait_connected(fd) < 0))
        fail(errno, "connect to %s", o->server_text);
    return fd;
}

void send_or_fail(int fd, const void *buf, size_t len_bytes)
{
    if (send_all(fd, buf, len_bytes) < 0)
        fail(errno, "send");
}

void recv_exact_or_fail(int fd, void *buf, size_t len_bytes, const char *what)
{
    ssize_t n = recv_full(fd, buf, len_bytes);
    if (n < 0)
        fail(errno, "%s", what);
    if ((size_t)n < len_bytes)
        fail(EPROTO, "%s: connection closed after %zd of %zu bytes", what, n, len_bytes);
}

void expect_eof_or_fail(int fd, uint8_t *buf)
{
    ssize_t n = recv_some(fd, buf, 1);
    if (n < 0)
        fail(errno, "waiting for the server to close");
    if (n > 0)
        fail(EPROTO, "server sent more than the response");
}

/* One send() call of the whole buffer, completed if short: true if short. */
bool send_call(int fd, const uint8_t *data, size_t len_bytes)
{
    ssize_t n;
    while ((n = send(fd, data, len_bytes, 0)) < 0 && errno == EINTR)
        ;
    if (n < 0)
        fail(errno, "send");
    if ((size_t)n == len_bytes)
        return false;
    send_or_fail(fd, data + n, len_bytes - (size_t)n);
    return true;
}

/* One recv() call for len_bytes, completed if short: true if short. */
bool recv_call(int fd, uint8_t *buf, size_t len_bytes)
{
    ssize_t n = recv_some(fd, buf, len_bytes);
    if (n < 0)
        fail(errno, "recv");
    if (n == 0)
        fail(EPROTO, "recv: connection closed before the response");
    if ((size_t)n == len_bytes)
        return false;
    recv_exact_or_fail(fd, buf + n, len_bytes - (size_t)n, "recv");
    return true;
}

/* Wait until len_bytes are buffered on fd, without consuming them. */
void wait_buffered(int fd, uint8_t *buf, size_t len_bytes)
{
    ssize_t seen_bytes = -1; /* what the last peek saw, since seen_ns */
    uint64_t seen_ns = now_ns();
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 1000) < 0 && errno != EINTR)
            fail(errno, "poll");
        ssize_t n = recv(fd, buf, len_bytes, MSG_PEEK | MSG_DONTWAIT);
        if (n == (ssize_t)len_bytes)
            return;
        if (n == 0)
            fail(EPROTO, "connection closed before the response");
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            fail(errno, "recv MSG_PEEK");
        if (n != seen_bytes) {
            seen_bytes = n;
            seen_ns = now_ns();
        } else if (now_ns() - seen_ns > STALL_LIMIT_NS) {
            fail(ETIMEDOUT, "a %zu-byte response never arrived whole (receive buffer too small?)",
                 len_bytes);
        }
    }
}
