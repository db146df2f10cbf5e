/* toe_perf_server.c - the server mode of toe_perf (see toe_perf.c). */
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "toe_perf.h"

/* ---------------------------------------------------------------- server */

/* Read to EOF (or error), discarding. */
static void drain(int fd, uint8_t *buf)
{
    while (recv_some(fd, buf, MAX_MSG_BYTES) > 0)
        ;
}

static void serve_stream_send(int fd, uint8_t *buf)
{
    uint64_t count_bytes = 0;
    bool intact = true;
    ssize_t n;
    while ((n = recv_some(fd, buf, MAX_MSG_BYTES)) > 0) {
        intact = intact && pattern_ok(buf, (size_t)n, count_bytes);
        count_bytes += (uint64_t)n;
    }
    if (n < 0)
        return;
    uint64_t reply_be = htobe64(intact ? count_bytes : UINT64_MAX);
    send_all(fd, &reply_be, sizeof reply_be);
}

static void serve_stream_recv(int fd, const struct header *h, uint8_t *buf)
{
    uint64_t end_ns = now_ns() + (uint64_t)h->param * 1000000u, offset_bytes = 0;
    do {
        if (send_all(fd, pattern_at(offset_bytes), h->size_bytes) < 0)
            return;
        offset_bytes += h->size_bytes;
    } while (now_ns() < end_ns);
    shutdown(fd, SHUT_WR);
    drain(fd, buf);
}

/* Read `in_bytes`, answer with `out_bytes`: false at EOF or on error. */
static bool serve_exchange(int fd, uint8_t *buf, uint32_t in_bytes, uint32_t out_bytes)
{
    return recv_full(fd, buf, in_bytes) == (ssize_t)in_bytes &&
           send_all(fd, pattern_at(0), out_bytes) == 0;
}

/* Serve one connection whose header was read, then close it. */
static void serve_conn(int fd, const struct header *h, uint8_t *buf)
{
    switch (h->test) {
    case TEST_STREAM_SEND:
        serve_stream_send(fd, buf);
        break;
    case TEST_STREAM_RECV:
        serve_stream_recv(fd, h, buf);
        break;
    case TEST_RR:
        while (serve_exchange(fd, buf, h->size_bytes, h->param))
            ;
        break;
    case TEST_CRR:
        serve_exchange(fd, buf, h->size_bytes, h->param);
        break;
    case TEST_CALLS_SEND:
        while (serve_exchange(fd, buf, h->size_bytes, 1))
            ;
        break;
    case TEST_CALLS_RECV:
        while (serve_exchange(fd, buf, 1, h->param))
            ;
        break;
    }
    close(fd);
}

struct conn {
    int fd;
    struct header hdr;
};

static void *conn_thread(void *arg)
{
    struct conn *c = arg;
    uint8_t *buf = malloc(MAX_MSG_BYTES);
    if (buf)
        serve_conn(c->fd, &c->hdr, buf);
    else
        close(c->fd);
    free(buf);
    free(c);
    return NULL;
}

static void spawn_conn_thread(int fd, const struct header *h, const pthread_attr_t *detached)
{
    pthread_t tid;
    struct conn *c = malloc(sizeof *c);
    if (c) {
        c->fd = fd;
        c->hdr = *h;
        if (pthread_create(&tid, detached, conn_thread, c) == 0)
            return;
    }
    close(fd);
    free(c);
}

static void on_stop_signal(int sig)
{
    (void)sig;
    _exit(0);
}

static void serve_forever(int listen_fd)
{
    uint8_t *crr_buf = xmalloc(MAX_MSG_BYTES);
    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    for (;;) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EBADF || errno == EINVAL || errno == ENOTSOCK || errno == EFAULT)
                fail(errno, "accept");
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(1000); /* out of fds or memory: let connections end */
            continue;
        }
        uint8_t raw[HEADER_BYTES];
        struct header h;
        if (recv_full(fd, raw, HEADER_BYTES) != HEADER_BYTES || !header_decode(raw, &h)) {
            close(fd);
            continue;
        }
        if (!is_stream(h.test))
            set_nodelay(fd);
        if (h.test == TEST_CRR)
            serve_conn(fd, &h, crr_buf);
        else
            spawn_conn_thread(fd, &h, &detached);
    }
}

void run_server(const struct addrinfo *bind_ai)
{
    struct sigaction sa = {.sa_handler = on_stop_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int listen_fd = listen_on(bind_ai);
    printf("ready %u\n", local_port(listen_fd));
    fflush(stdout);
    serve_forever(listen_fd);
}
