/*
 * toe_perf.h - what the parts of toe_perf share: constants, the wire header,
 * the client's options and results, and the functions called across files.
 * The program is described in the header comment of toe_perf.c.
 *   toe_perf.c         main, arguments, common helpers, the wire header
 *   toe_perf_server.c  the server mode
 *   toe_perf_client.c  the client mode: sessions, tests, watchdog
 *   toe_perf_stats.c   latency samples, percentiles, CPU time, the JSON result
 *   toe_perf_net.c     socket helpers
 */
#ifndef TOE_PERF_H
#define TOE_PERF_H

#include <netdb.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

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

extern const char *const test_names[TEST_END];

struct header {
    uint32_t test;
    uint32_t size_bytes;
    uint32_t param;
};

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

/* toe_perf.c */
void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void fail(int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
void *xmalloc(size_t len_bytes);
uint64_t now_ns(void);
const uint8_t *pattern_at(uint64_t offset_bytes);
bool pattern_ok(const uint8_t *data, size_t len_bytes, uint64_t offset_bytes);
void header_encode(const struct header *h, uint8_t out[HEADER_BYTES]);
bool header_decode(const uint8_t in[HEADER_BYTES], struct header *h);

/* toe_perf_net.c */
int send_all(int fd, const void *buf, size_t len_bytes);
ssize_t recv_some(int fd, void *buf, size_t len_bytes);
ssize_t recv_full(int fd, void *buf, size_t len_bytes);
bool is_stream(uint32_t test);
int set_nodelay(int fd);
int listen_on(const struct addrinfo *ai);
unsigned local_port(int fd);
int connect_or_fail(const struct client_opts *o);
void send_or_fail(int fd, const void *buf, size_t len_bytes);
void recv_exact_or_fail(int fd, void *buf, size_t len_bytes, const char *what);
void expect_eof_or_fail(int fd, uint8_t *buf);
bool send_call(int fd, const uint8_t *data, size_t len_bytes);
bool recv_call(int fd, uint8_t *buf, size_t len_bytes);
void wait_buffered(int fd, uint8_t *buf, size_t len_bytes);

/* toe_perf_stats.c */
void latency_add(struct latency *lat, uint64_t ns);
void phase_begin(struct result *r);
void phase_end(struct result *r);
void print_result(const struct client_opts *o, struct result *r);

/* toe_perf_server.c */
void run_server(const struct addrinfo *bind_ai);

/* toe_perf_client.c */
void run_client(const struct client_opts *o);

#endif
