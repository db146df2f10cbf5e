/* toe_perf_client.c - the client mode of toe_perf (see toe_perf.c). */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "toe_perf.h"

/* ---------------------------------------------------------------- client */

static uint64_t deadline_ns(const struct client_opts *o, const struct result *r)
{
    return r->start_ns + (uint64_t)(o->duration_s * 1e9);
}

static void verify_response(const struct client_opts *o, const uint8_t *buf)
{
    if (o->verify && !pattern_ok(buf, o->rsize_bytes, 0))
        fail(EBADMSG, "response payload differs from the pattern");
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

void run_client(const struct client_opts *o)
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
