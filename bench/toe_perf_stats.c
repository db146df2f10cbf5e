/* toe_perf_stats.c - latency samples, percentiles, CPU time and the JSON result of toe_perf (see toe_perf.c). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "toe_perf.h"

void latency_add(struct latency *lat, uint64_t ns)
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

void phase_begin(struct result *r)
{
    getrusage(RUSAGE_SELF, &r->ru_start);
    r->start_ns = now_ns();
}

void phase_end(struct result *r)
{
    r->elapsed_ns = now_ns() - r->start_ns;
    getrusage(RUSAGE_SELF, &r->ru_end);
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

void print_result(const struct client_opts *o, struct result *r)
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
