/*
 * toe_perf.c - a netperf-style benchmark: one server, one client.
 *
 * An ordinary sockets program (plain POSIX sockets, blocking I/O, nothing
 * toe-specific). `toe bench` runs the server on a kernel peer and the client
 * once through the kernel and once under the LD_PRELOAD shim, and compares.
 *
 * Usage
 *   toe_perf server [--bind IP] --port P
 *   toe_perf client --host IP --port P --test T --size N [--rsize M]
 *                   [--duration S] [--verify]
 *   T  stream-send stream-recv rr crr calls-send calls-recv
 *   N  message size, 1..1048576 bytes
 *   M  response size of rr, crr and calls-recv, 1..1048576 (default N);
 *      rejected for the other tests
 *   S  seconds, 0.001..86400 (float, default 2)
 *   --verify  the client checks the payload it receives (the server always
 *             checks a stream-send stream)
 * The server listens (--bind default 0.0.0.0; --port 0: the kernel picks),
 * prints "ready <port>\n" and serves until SIGTERM or SIGINT (exit 0).
 * Bad arguments: one line "toe_perf: <what is wrong>" on stderr, exit 2.
 * A failed run: one line "toe_perf: <what> (<strerror>)", exit 1, no result.
 *
 * Wire protocol
 *   Each connection starts with a 16-byte header from the client: "TOEP",
 *   then big-endian u32 test id (1 stream-send, 2 stream-recv, 3 rr, 4 crr,
 *   5 calls-send, 6 calls-recv), u32 size, u32 param (M for rr, crr and
 *   calls-recv; the duration in ms for stream-recv; else 0). It travels in
 *   the same write as the client's first payload (crr: header + request in
 *   one write), except for calls-send, whose send() calls are timed.
 *   Payload is pattern data: the byte at stream offset i is i % 251; each
 *   message of rr, crr and calls-* starts at offset 0.
 *   stream-send  client: N-byte messages for S s, then shutdown(SHUT_WR);
 *                server: reads to EOF, answers the u64 big-endian byte count
 *                (all ones if the pattern was wrong), closes.
 *   stream-recv  server: N-byte messages for param ms, then shutdown(SHUT_WR),
 *                reads to EOF; client: reads to EOF, closes.
 *   rr           repeat: N-byte request, M-byte response; EOF ends.
 *   crr          a connection per transaction: header + request, response,
 *                then the SERVER closes first, so TIME-WAIT stays on the
 *                server (the kernel peer), not on the client under test.
 *   calls-send   repeat: N-byte message, 1-byte ack.
 *   calls-recv   repeat: 1-byte trigger, M-byte response.
 *   Both ends set TCP_NODELAY except in the stream tests, which keep Nagle
 *   on as netperf's TCP_STREAM does.
 *   The server reads the header in its accept loop (so a client that
 *   connects and sends nothing stalls it), serves crr inline and every other
 *   test in a detached thread.
 *
 * Measurement (client)
 *   CLOCK_MONOTONIC. The measured phase runs from just before the first
 *   connect to the end of the test's last transaction (stream-send: the
 *   count received; stream-recv: EOF); getrusage(RUSAGE_SELF) brackets the
 *   same window. rr and crr time each transaction (crr: socket to close);
 *   calls-send times one send() of N bytes; calls-recv times one recv() of M
 *   bytes that have all arrived (waited for with poll and MSG_PEEK, untimed;
 *   SO_RCVLOWAT M lets the kernel grow its receive buffer to hold them; if
 *   the path cannot buffer M bytes, the run fails after 10 s without
 *   progress). A call that returns short is completed by more calls, timed
 *   with it, and counted in short_calls. Every test runs at least one
 *   transaction. A run still going 30 s after its duration fails (a
 *   watchdog alarm), so a stalled path never hangs the caller.
 *
 * Output (client): one JSON object on one line, e.g.
 *   {"test":"rr","size":64,"rsize":64,"duration_s":2,"elapsed_s":2.0003,
 *    "bytes":1234,"transactions":30000,"short_calls":0,
 *    "lat_ns":{"min":..,"p50":..,"p90":..,"p99":..,"mean":..,"max":..},
 *    "cpu_user_s":0.1,"cpu_sys_s":0.5}
 *   rsize is 0 for tests without an M-byte response. bytes: payload moved,
 *   headers excluded (stream: the one direction; rr/crr: requests and
 *   responses; calls-*: the timed direction). transactions: messages sent
 *   (stream-send), recv() calls that returned data (stream-recv), else
 *   transactions or calls. lat_ns: null for stream tests; percentiles by
 *   nearest rank over the first 10 million samples, min/mean/max over all.
 */
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADER_BYTES 16
#define MAX_MSG_BYTES (1u << 20)
#define PATTERN_PERIOD 251u
#define LISTEN_BACKLOG 1024
#define MAX_SAMPLES 10000000u
#define MIN_DURATION_S 0.001
#define MAX_DURATION_S 86400.0
#define NS_PER_S 1000000000ull
#define STALL_LIMIT_NS (10 * NS_PER_S)
#define WATCHDOG_GRACE_S 30 /* a client still running this long after its duration gives up */
#define STR(x) #x
#define XSTR(x) STR(x)

enum test_id {
    TEST_STREAM_SEND = 1,
    TEST_STREAM_RECV,
    TEST_RR,
    TEST_CRR,
    TEST_CALLS_SEND,
    TEST_CALLS_RECV,
    TEST_END
};

static const char *const test_names[TEST_END] = {
    [TEST_STREAM_SEND] = "stream-send", [TEST_STREAM_RECV] = "stream-recv",
    [TEST_RR] = "rr",                   [TEST_CRR] = "crr",
    [TEST_CALLS_SEND] = "calls-send",   [TEST_CALLS_RECV] = "calls-recv",
};

/* Filled once in main() before any thread starts; read-only afterwards. */
static uint8_t pattern_buf[MAX_MSG_BYTES + PATTERN_PERIOD];

/* ---------------------------------------------------------------- helpers */

static void vdie(int status, int err, const char *fmt, va_list ap) __attribute__((noreturn));
static void vdie(int status, int err, const char *fmt, va_list ap)
{
    fputs("toe_perf: ", stderr);
    vfprintf(stderr, fmt, ap);
    if (err)
        fprintf(stderr, " (%s)", strerror(err));
    fputc('\n', stderr);
    exit(status);
}

/* Bad arguments: "toe_perf: <what is wrong>", exit 2. */
static void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vdie(2, 0, fmt, ap);
}

/* A runtime failure: "toe_perf: <what> (<strerror(err)>)", exit 1. */
static void fail(int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vdie(1, err, fmt, ap);
}

static void *xmalloc(size_t len_bytes)
{
    void *p = malloc(len_bytes);
    if (!p)
        fail(ENOMEM, "allocating %zu bytes", len_bytes);
    return p;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void pattern_init(void)
{
    for (size_t i = 0; i < sizeof pattern_buf; i++)
        pattern_buf[i] = (uint8_t)(i % PATTERN_PERIOD);
}

/* Pattern data for stream offset `offset_bytes`, valid for MAX_MSG_BYTES. */
static const uint8_t *pattern_at(uint64_t offset_bytes)
{
    return pattern_buf + offset_bytes % PATTERN_PERIOD;
}

static bool pattern_ok(const uint8_t *data, size_t len_bytes, uint64_t offset_bytes)
{
    return memcmp(data, pattern_at(offset_bytes), len_bytes) == 0;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, sizeof v);
}

static uint32_t get_be32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return be32toh(v);
}

/* ---------------------------------------------------------------- socket I/O */

/* Send all of buf: 0, or -1 with errno. */
static int send_all(int fd, const void *buf, size_t len_bytes)
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
static ssize_t recv_some(int fd, void *buf, size_t len_bytes)
{
    ssize_t n;
    while ((n = recv(fd, buf, len_bytes, 0)) < 0 && errno == EINTR)
        ;
    return n;
}

/* Receive len_bytes, fewer only at EOF: the count, or -1 with errno. */
static ssize_t recv_full(int fd, void *buf, size_t len_bytes)
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
static bool is_stream(uint32_t test)
{
    return test == TEST_STREAM_SEND || test == TEST_STREAM_RECV;
}

static int set_nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ---------------------------------------------------------------- header */

struct header {
    uint32_t test;
    uint32_t size_bytes;
    uint32_t param;
};

static bool test_has_response(uint32_t test)
{
    return test == TEST_RR || test == TEST_CRR || test == TEST_CALLS_RECV;
}

static void header_encode(const struct header *h, uint8_t out[HEADER_BYTES])
{
    memcpy(out, "TOEP", 4);
    put_be32(out + 4, h->test);
    put_be32(out + 8, h->size_bytes);
    put_be32(out + 12, h->param);
}

static bool header_decode(const uint8_t in[HEADER_BYTES], struct header *h)
{
    h->test = get_be32(in + 4);
    h->size_bytes = get_be32(in + 8);
    h->param = get_be32(in + 12);
    if (memcmp(in, "TOEP", 4) != 0 || h->test < 1 || h->test >= TEST_END)
        return false;
    if (h->size_bytes < 1 || h->size_bytes > MAX_MSG_BYTES)
        return false;
    return !test_has_response(h->test) || (h->param >= 1 && h->param <= MAX_MSG_BYTES);
}

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

static int listen_on(const struct addrinfo *ai)
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

static unsigned local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        fail(errno, "getsockname");
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
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

static void run_server(const struct addrinfo *bind_ai)
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

/* ---------------------------------------------------------------- client */

struct client_opts {
    const struct addrinfo *server;
    const char *server_text; /* "host:port", for messages */
    uint32_t test;
    uint32_t size_bytes;
    uint32_t rsize_bytes; /* 0: the test has no response message */
    double duration_s;
    bool verify;
};

struct latency {
    uint64_t *samples_ns; /* the first MAX_SAMPLES, unsorted until reported */
    size_t count, cap;
    uint64_t calls, sum_ns, min_ns, max_ns;
};

struct result {
    uint64_t start_ns, elapsed_ns, bytes, transactions, short_calls;
    struct rusage ru_start, ru_end;
    struct latency lat;
};

static void latency_add(struct latency *lat, uint64_t ns)
{
    if (lat->calls == 0 || ns < lat->min_ns)
        lat->min_ns = ns;
    if (ns > lat->max_ns)
        lat->max_ns = ns;
    lat->sum_ns += ns;
    lat->calls++;
    if (lat->count == MAX_SAMPLES)
        return;
    if (lat->count == lat->cap) {
        size_t cap = lat->cap ? lat->cap * 2 : 4096;
        uint64_t *grown = realloc(lat->samples_ns, cap * sizeof *grown);
        if (!grown)
            fail(ENOMEM, "recording latency samples");
        lat->samples_ns = grown;
        lat->cap = cap;
    }
    lat->samples_ns[lat->count++] = ns;
}

static void phase_begin(struct result *r)
{
    getrusage(RUSAGE_SELF, &r->ru_start);
    r->start_ns = now_ns();
}

static void phase_end(struct result *r)
{
    r->elapsed_ns = now_ns() - r->start_ns;
    getrusage(RUSAGE_SELF, &r->ru_end);
}

static uint64_t deadline_ns(const struct client_opts *o, const struct result *r)
{
    return r->start_ns + (uint64_t)(o->duration_s * 1e9);
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

static int connect_or_fail(const struct client_opts *o)
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

static void send_or_fail(int fd, const void *buf, size_t len_bytes)
{
    if (send_all(fd, buf, len_bytes) < 0)
        fail(errno, "send");
}

static void recv_exact_or_fail(int fd, void *buf, size_t len_bytes, const char *what)
{
    ssize_t n = recv_full(fd, buf, len_bytes);
    if (n < 0)
        fail(errno, "%s", what);
    if ((size_t)n < len_bytes)
        fail(EPROTO, "%s: connection closed after %zd of %zu bytes", what, n, len_bytes);
}

static void expect_eof_or_fail(int fd, uint8_t *buf)
{
    ssize_t n = recv_some(fd, buf, 1);
    if (n < 0)
        fail(errno, "waiting for the server to close");
    if (n > 0)
        fail(EPROTO, "server sent more than the response");
}

static void verify_response(const struct client_opts *o, const uint8_t *buf)
{
    if (o->verify && !pattern_ok(buf, o->rsize_bytes, 0))
        fail(EBADMSG, "response payload differs from the pattern");
}

/* One send() call of the whole buffer, completed if short: true if short. */
static bool send_call(int fd, const uint8_t *data, size_t len_bytes)
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
static bool recv_call(int fd, uint8_t *buf, size_t len_bytes)
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
static void wait_buffered(int fd, uint8_t *buf, size_t len_bytes)
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

/* One client connection (or, for crr, the current one). */
struct session {
    const struct client_opts *o;
    const uint8_t *tx; /* the header, then one request of pattern data */
    uint8_t *buf;      /* MAX_MSG_BYTES + 1 */
    int fd;
    bool first; /* nothing sent on fd yet: the next message carries the header */
    struct result *r;
};

/* Send payload_bytes of the request, preceded by the header if first. */
static void send_message(struct session *s, size_t payload_bytes)
{
    size_t skip_bytes = s->first ? 0 : HEADER_BYTES;
    send_or_fail(s->fd, s->tx + skip_bytes, HEADER_BYTES + payload_bytes - skip_bytes);
    s->first = false;
}

static void session_connect(struct session *s)
{
    s->fd = connect_or_fail(s->o);
    s->first = true;
}

static uint64_t record_latency(struct session *s, uint64_t t0_ns)
{
    uint64_t t1_ns = now_ns();
    latency_add(&s->r->lat, t1_ns - t0_ns);
    return t1_ns;
}

static void run_stream_send(struct session *s)
{
    const struct client_opts *o = s->o;
    struct result *r = s->r;
    phase_begin(r);
    uint64_t end_ns = deadline_ns(o, r), sent_bytes = 0;
    session_connect(s);
    do {
        if (s->first)
            send_message(s, o->size_bytes); /* pattern from offset 0 */
        else
            send_or_fail(s->fd, pattern_at(sent_bytes), o->size_bytes);
        sent_bytes += o->size_bytes;
        r->transactions++;
    } while (now_ns() < end_ns);
    if (shutdown(s->fd, SHUT_WR) < 0)
        fail(errno, "shutdown");
    uint64_t reply_be;
    recv_exact_or_fail(s->fd, &reply_be, sizeof reply_be, "reading the server's byte count");
    phase_end(r);
    uint64_t counted_bytes = be64toh(reply_be);
    if (counted_bytes == UINT64_MAX)
        fail(EBADMSG, "the server received payload that differs from the pattern");
    if (counted_bytes != sent_bytes)
        fail(EPROTO, "the server counted %" PRIu64 " bytes, the client sent %" PRIu64,
             counted_bytes, sent_bytes);
    r->bytes = sent_bytes;
    close(s->fd);
}

static void run_stream_recv(struct session *s)
{
    struct result *r = s->r;
    ssize_t n;
    phase_begin(r);
    session_connect(s);
    send_message(s, 0);
    while ((n = recv_some(s->fd, s->buf, s->o->size_bytes)) > 0) {
        if (s->o->verify && !pattern_ok(s->buf, (size_t)n, r->bytes))
            fail(EBADMSG, "payload differs from the pattern after byte %" PRIu64, r->bytes);
        r->bytes += (uint64_t)n;
        r->transactions++;
    }
    if (n < 0)
        fail(errno, "recv");
    phase_end(r);
    if (r->bytes == 0)
        fail(EPROTO, "the server sent nothing");
    close(s->fd);
}

/* A step is one timed transaction or call: it records its latency and
 * returns its end time. */
typedef uint64_t (*step_fn)(struct session *s);

static uint64_t step_rr(struct session *s)
{
    uint64_t t0_ns = now_ns();
    send_message(s, s->o->size_bytes);
    recv_exact_or_fail(s->fd, s->buf, s->o->rsize_bytes, "reading the response");
    uint64_t t1_ns = record_latency(s, t0_ns);
    verify_response(s->o, s->buf);
    return t1_ns;
}

static uint64_t step_crr(struct session *s)
{
    uint64_t t0_ns = now_ns();
    session_connect(s);
    send_message(s, s->o->size_bytes);
    recv_exact_or_fail(s->fd, s->buf, s->o->rsize_bytes, "reading the response");
    expect_eof_or_fail(s->fd, s->buf + s->o->rsize_bytes);
    close(s->fd);
    uint64_t t1_ns = record_latency(s, t0_ns);
    verify_response(s->o, s->buf);
    return t1_ns;
}

static uint64_t step_calls_send(struct session *s)
{
    if (s->first)
        send_message(s, 0); /* the header alone: every timed send() is N bytes */
    uint64_t t0_ns = now_ns();
    s->r->short_calls += send_call(s->fd, pattern_at(0), s->o->size_bytes);
    uint64_t t1_ns = record_latency(s, t0_ns);
    recv_exact_or_fail(s->fd, s->buf, 1, "reading the ack");
    return t1_ns;
}

static uint64_t step_calls_recv(struct session *s)
{
    if (s->first) { /* a hint for poll(); the kernel also grows its receive buffer */
        int lowat_bytes = (int)s->o->rsize_bytes;
        setsockopt(s->fd, SOL_SOCKET, SO_RCVLOWAT, &lowat_bytes, sizeof lowat_bytes);
    }
    send_message(s, 1); /* the 1-byte trigger */
    wait_buffered(s->fd, s->buf, s->o->rsize_bytes);
    uint64_t t0_ns = now_ns();
    s->r->short_calls += recv_call(s->fd, s->buf, s->o->rsize_bytes);
    uint64_t t1_ns = record_latency(s, t0_ns);
    verify_response(s->o, s->buf);
    return t1_ns;
}

/* rr, crr, calls-*: steps until the duration is over (at least one), on one
 * connection, except crr, whose steps connect themselves. */
static void run_steps(struct session *s, step_fn step, uint64_t bytes_per_step)
{
    struct result *r = s->r;
    bool one_connection = step != step_crr;
    phase_begin(r);
    uint64_t end_ns = deadline_ns(s->o, r);
    if (one_connection)
        session_connect(s);
    while (step(s) < end_ns)
        ;
    phase_end(r);
    r->transactions = r->lat.calls;
    r->bytes = r->lat.calls * bytes_per_step;
    if (one_connection) {
        shutdown(s->fd, SHUT_WR);
        close(s->fd);
    }
}

static void on_watchdog(int sig)
{
    static const char msg[] = "toe_perf: the test did not end within " XSTR(WATCHDOG_GRACE_S)
                              " s after its duration (Timer expired)\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    (void)sig;
    _exit(1);
}

/* A stalled connection ends the run with an error instead of hanging it. */
static void arm_watchdog(double duration_s)
{
    struct sigaction sa = {.sa_handler = on_watchdog};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm((unsigned)duration_s + 1 + WATCHDOG_GRACE_S);
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples (count >= 1). */
static uint64_t percentile_ns(const struct latency *lat, unsigned pct)
{
    return lat->samples_ns[(lat->count * pct + 99) / 100 - 1];
}

static double cpu_s(struct timeval from, struct timeval to)
{
    return (double)(to.tv_sec - from.tv_sec) + (double)(to.tv_usec - from.tv_usec) / 1e6;
}

static void print_result(const struct client_opts *o, struct result *r)
{
    struct latency *lat = &r->lat;
    printf("{\"test\":\"%s\",\"size\":%" PRIu32 ",\"rsize\":%" PRIu32 ",\"duration_s\":%.9g,"
           "\"elapsed_s\":%.9g,\"bytes\":%" PRIu64 ",\"transactions\":%" PRIu64
           ",\"short_calls\":%" PRIu64 ",\"lat_ns\":",
           test_names[o->test], o->size_bytes, o->rsize_bytes, o->duration_s,
           (double)r->elapsed_ns / 1e9, r->bytes, r->transactions, r->short_calls);
    if (lat->count == 0) {
        fputs("null", stdout);
    } else {
        qsort(lat->samples_ns, lat->count, sizeof *lat->samples_ns, compare_u64);
        printf("{\"min\":%" PRIu64 ",\"p50\":%" PRIu64 ",\"p90\":%" PRIu64 ",\"p99\":%" PRIu64
               ",\"mean\":%.9g,\"max\":%" PRIu64 "}",
               lat->min_ns, percentile_ns(lat, 50), percentile_ns(lat, 90), percentile_ns(lat, 99),
               (double)lat->sum_ns / (double)lat->calls, lat->max_ns);
    }
    printf(",\"cpu_user_s\":%.9g,\"cpu_sys_s\":%.9g}\n",
           cpu_s(r->ru_start.ru_utime, r->ru_end.ru_utime),
           cpu_s(r->ru_start.ru_stime, r->ru_end.ru_stime));
    if (fflush(stdout) != 0)
        fail(errno, "writing the result");
}

static void run_client(const struct client_opts *o)
{
    struct header h = {.test = o->test, .size_bytes = o->size_bytes, .param = o->rsize_bytes};
    if (o->test == TEST_STREAM_RECV)
        h.param = (uint32_t)(o->duration_s * 1000.0 + 0.5); /* ms: >= 1, as duration >= 0.001 s */
    uint8_t *tx = xmalloc(HEADER_BYTES + o->size_bytes);
    header_encode(&h, tx);
    memcpy(tx + HEADER_BYTES, pattern_at(0), o->size_bytes);
    struct result r = {0};
    struct session s = {.o = o, .tx = tx, .buf = xmalloc(MAX_MSG_BYTES + 1), .fd = -1, .r = &r};
    uint64_t exchange_bytes = (uint64_t)o->size_bytes + o->rsize_bytes;
    arm_watchdog(o->duration_s);
    switch (o->test) {
    case TEST_STREAM_SEND:
        run_stream_send(&s);
        break;
    case TEST_STREAM_RECV:
        run_stream_recv(&s);
        break;
    case TEST_RR:
        run_steps(&s, step_rr, exchange_bytes);
        break;
    case TEST_CRR:
        run_steps(&s, step_crr, exchange_bytes);
        break;
    case TEST_CALLS_SEND:
        run_steps(&s, step_calls_send, o->size_bytes);
        break;
    case TEST_CALLS_RECV:
        run_steps(&s, step_calls_recv, o->rsize_bytes);
        break;
    }
    alarm(0);
    print_result(o, &r);
    free(r.lat.samples_ns);
    free(s.buf);
    free(tx);
}

/* ---------------------------------------------------------------- arguments */

enum opt { OPT_BIND, OPT_HOST, OPT_PORT, OPT_TEST, OPT_SIZE, OPT_RSIZE, OPT_DURATION, OPT_VERIFY, OPT_COUNT };
#define OPT_VAL_BASE 256
#define SERVER_OPTS (1u << OPT_BIND | 1u << OPT_PORT)
#define CLIENT_OPTS (~SERVER_OPTS | 1u << OPT_PORT)

static const struct option long_opts[] = {
    {"bind", required_argument, NULL, OPT_VAL_BASE + OPT_BIND},
    {"host", required_argument, NULL, OPT_VAL_BASE + OPT_HOST},
    {"port", required_argument, NULL, OPT_VAL_BASE + OPT_PORT},
    {"test", required_argument, NULL, OPT_VAL_BASE + OPT_TEST},
    {"size", required_argument, NULL, OPT_VAL_BASE + OPT_SIZE},
    {"rsize", required_argument, NULL, OPT_VAL_BASE + OPT_RSIZE},
    {"duration", required_argument, NULL, OPT_VAL_BASE + OPT_DURATION},
    {"verify", no_argument, NULL, OPT_VAL_BASE + OPT_VERIFY},
    {NULL, 0, NULL, 0},
};

/* Option values as given (NULL: absent; --verify: ""), checked against `allowed`. */
static void parse_options(int argc, char **argv, const char *mode, unsigned allowed,
                          const char *value[OPT_COUNT])
{
    int c;
    opterr = 0;
    optind = 2; /* argv[1] is the mode */
    while ((c = getopt_long(argc, argv, ":", long_opts, NULL)) != -1) {
        if (c == '?')
            usage_error("unknown option '%s'", argv[optind - 1]);
        if (c == ':')
            usage_error("option '%s' needs a value", argv[optind - 1]);
        int opt = c - OPT_VAL_BASE;
        if (!(allowed & 1u << opt))
            usage_error("--%s is not a %s option", long_opts[opt].name, mode);
        value[opt] = optarg ? optarg : "";
    }
    if (optind < argc)
        usage_error("unexpected argument '%s'", argv[optind]);
}

static uint32_t parse_u32(const char *text, const char *what, uint32_t min, uint32_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (text[0] < '0' || text[0] > '9' || *end || errno || v < min || v > max)
        usage_error("bad %s '%s' (want %" PRIu32 "..%" PRIu32 ")", what, text, min, max);
    return (uint32_t)v;
}

static double parse_duration_s(const char *text)
{
    char *end;
    double v = strtod(text, &end);
    if (end == text || *end || !isfinite(v) || v < MIN_DURATION_S || v > MAX_DURATION_S)
        usage_error("bad --duration '%s' (want seconds, %g..%g)", text, MIN_DURATION_S, MAX_DURATION_S);
    return v;
}

static uint32_t parse_test(const char *text)
{
    for (uint32_t t = TEST_STREAM_SEND; t < TEST_END; t++)
        if (strcmp(text, test_names[t]) == 0)
            return t;
    usage_error("unknown --test '%s' (want stream-send, stream-recv, rr, crr, calls-send or calls-recv)",
                text);
}

/* A numeric address and port; freed at exit. */
static struct addrinfo *resolve(const char *host, const char *port_text, const char *what)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    if (getaddrinfo(host, port_text, &hints, &ai) != 0)
        usage_error("bad %s '%s' (want a numeric IPv4 or IPv6 address)", what, host);
    return ai;
}

static void require(const char *value[OPT_COUNT], enum opt opt, const char *mode)
{
    if (!value[opt])
        usage_error("%s needs --%s", mode, long_opts[opt].name);
}

static void client_main(int argc, char **argv)
{
    const char *value[OPT_COUNT] = {0};
    parse_options(argc, argv, "client", CLIENT_OPTS, value);
    require(value, OPT_HOST, "client");
    require(value, OPT_PORT, "client");
    require(value, OPT_TEST, "client");
    require(value, OPT_SIZE, "client");
    struct client_opts o = {
        .test = parse_test(value[OPT_TEST]),
        .size_bytes = parse_u32(value[OPT_SIZE], "--size", 1, MAX_MSG_BYTES),
        .duration_s = value[OPT_DURATION] ? parse_duration_s(value[OPT_DURATION]) : 2.0,
        .verify = value[OPT_VERIFY] != NULL,
    };
    parse_u32(value[OPT_PORT], "--port", 1, 65535);
    if (test_has_response(o.test))
        o.rsize_bytes = value[OPT_RSIZE] ? parse_u32(value[OPT_RSIZE], "--rsize", 1, MAX_MSG_BYTES)
                                         : o.size_bytes;
    else if (value[OPT_RSIZE])
        usage_error("--rsize applies only to rr, crr and calls-recv");
    struct addrinfo *server = resolve(value[OPT_HOST], value[OPT_PORT], "--host");
    char text[128];
    bool v6 = server->ai_family == AF_INET6;
    snprintf(text, sizeof text, "%s%s%s:%s", v6 ? "[" : "", value[OPT_HOST], v6 ? "]" : "",
             value[OPT_PORT]);
    o.server = server;
    o.server_text = text;
    signal(SIGPIPE, SIG_IGN); /* a closed connection is an error message, not a silent death */
    run_client(&o);
    freeaddrinfo(server);
}

static void server_main(int argc, char **argv)
{
    const char *value[OPT_COUNT] = {0};
    parse_options(argc, argv, "server", SERVER_OPTS, value);
    require(value, OPT_PORT, "server");
    parse_u32(value[OPT_PORT], "--port", 0, 65535);
    const char *bind_host = value[OPT_BIND] ? value[OPT_BIND] : "0.0.0.0";
    struct addrinfo *bind_ai = resolve(bind_host, value[OPT_PORT], "--bind");
    signal(SIGPIPE, SIG_IGN);
    run_server(bind_ai); /* returns only by exiting */
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage_error("usage: toe_perf server|client [options] (see the source's header)");
    pattern_init();
    if (strcmp(argv[1], "server") == 0)
        server_main(argc, argv);
    else if (strcmp(argv[1], "client") == 0)
        client_main(argc, argv);
    else
        usage_error("unknown mode '%s' (want server or client)", argv[1]);
    return 0;
}
