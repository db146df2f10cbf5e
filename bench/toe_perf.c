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
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "toe_perf.h"

const char *const test_names[TEST_END] = {
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
void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vdie(2, 0, fmt, ap);
}

/* A runtime failure: "toe_perf: <what> (<strerror(err)>)", exit 1. */
void fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vdie(1, err, fmt, ap);
}

void *xmalloc(size_t len_bytes)
{
    void *p = malloc(len_bytes);
    if (!p)
        fail(ENOMEM, "allocating %zu bytes", len_bytes);
    return p;
}

uint64_t now_ns(void)
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
const uint8_t *pattern_at(uint64_t offset_bytes)
{
    return pattern_buf + offset_bytes % PATTERN_PERIOD;
}

bool pattern_ok(const uint8_t *data, size_t len_bytes, uint64_t offset_bytes)
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

/* ---------------------------------------------------------------- header */

static bool test_has_response(uint32_t test)
{
    return test == TEST_RR || test == TEST_CRR || test == TEST_CALLS_RECV;
}

void header_encode(const struct header *h, uint8_t out[HEADER_BYTES])
{
    memcpy(out, "TOEP", 4);
    put_be32(out + 4, h->test);
    put_be32(out + 8, h->size_bytes);
    put_be32(out + 12, h->param);
}

bool header_decode(const uint8_t in[HEADER_BYTES], struct header *h)
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
