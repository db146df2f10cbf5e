/*
 * toe_ring.h - ring and readiness primitives shared by the shim and the
 * daemon's cffi module.  Both sides compile these same inline functions, so
 * the memory-ordering rules of docs/abi.md exist in exactly one place.
 *
 * Rings are single-producer/single-consumer byte rings inside the socket's
 * shared mapping.  Indices are free-running uint32 counters.  A producer
 * publishes its index with a release store after copying the bytes; a
 * consumer reads the peer's index with an acquire load.  Where a side stores
 * one word and then loads another that the peer stores (the token and
 * doorbell hand-offs) a full fence sits between them: x86 reorders exactly
 * that pair.
 */
#ifndef TOE_RING_H
#define TOE_RING_H

#include <stdint.h>
#include <string.h>
#include "toe_abi.h"

#define TOE_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define TOE_LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define TOE_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define TOE_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline uint8_t *toe_tx_base(struct toe_sock_shm *s)
{
    return (uint8_t *)s + TOE_SHM_HDR_SIZE;
}

static inline uint8_t *toe_rx_base(struct toe_sock_shm *s)
{
    return (uint8_t *)s + TOE_SHM_HDR_SIZE + s->tx_size;
}

/* Copy len bytes into ring[idx ...], wrapping. */
static inline void toe_ring_copy_in(uint8_t *ring, uint32_t size, uint32_t idx,
                                    const uint8_t *src, uint32_t len)
{
    uint32_t off = idx & (size - 1);
    uint32_t first = size - off;
    if (first > len)
        first = len;
    memcpy(ring + off, src, first);
    if (len > first)
        memcpy(ring, src + first, len - first);
}

/* Copy len bytes out of ring[idx ...], wrapping. */
static inline void toe_ring_copy_out(const uint8_t *ring, uint32_t size, uint32_t idx,
                                     uint8_t *dst, uint32_t len)
{
    uint32_t off = idx & (size - 1);
    uint32_t first = size - off;
    if (first > len)
        first = len;
    memcpy(dst, ring + off, first);
    if (len > first)
        memcpy(dst + first, ring, len - first);
}

/* ---------------- TX ring: shim produces, daemon consumes ---------------- */

/* Free bytes in the TX ring (the ring's own limit, before the socket's). */
static inline uint32_t toe_tx_space(struct toe_sock_shm *s)
{
    return s->tx_size - (s->tx_tail - TOE_LOAD_ACQ(&s->tx_head));
}

/* The send buffer: the ring, or SO_SNDBUF's value when that is smaller. */
static inline uint32_t toe_tx_limit(struct toe_sock_shm *s)
{
    uint32_t sndbuf = TOE_LOAD_RLX(&s->sndbuf);
    return sndbuf && sndbuf < s->tx_size ? sndbuf : s->tx_size;
}

/*
 * Bytes a write may queue now (Linux's sk_stream_memory_free, per byte
 * instead of per skb): queued = unacknowledged + unsent stays within the
 * send buffer, and with TCP_NOTSENT_LOWAT the unsent bytes within the low
 * water mark.  Either side may call it; the tail is the shim's.
 */
static inline uint32_t toe_tx_room(struct toe_sock_shm *s)
{
    uint32_t tail = TOE_LOAD_ACQ(&s->tx_tail);
    uint32_t queued = tail - TOE_LOAD_ACQ(&s->tx_head), limit = toe_tx_limit(s);
    uint32_t room = queued < limit ? limit - queued : 0;
    uint32_t lowat = TOE_LOAD_RLX(&s->notsent_lowat);
    if (lowat) {
        uint32_t notsent = tail - TOE_LOAD_ACQ(&s->tx_sent);
        uint32_t r = notsent < lowat ? lowat - notsent : 0;
        if (r < room)
            room = r;
    }
    return room;
}

/*
 * Writable, as tcp_poll() says it (__sk_stream_is_writeable(sk, 1)): the
 * free part of the send buffer is at least half the queued part, and with
 * TCP_NOTSENT_LOWAT fewer than lowat/2 bytes are unsent.  A writer that had
 * to wait is woken only then, not by every freed byte.
 */
static inline int toe_tx_writable(struct toe_sock_shm *s)
{
    uint32_t tail = TOE_LOAD_ACQ(&s->tx_tail);
    uint32_t queued = tail - TOE_LOAD_ACQ(&s->tx_head), limit = toe_tx_limit(s);
    if (queued >= limit || limit - queued < queued / 2)
        return 0;
    uint32_t lowat = TOE_LOAD_RLX(&s->notsent_lowat);
    return !lowat || 2 * (uint64_t)(tail - TOE_LOAD_ACQ(&s->tx_sent)) < lowat;
}

/*
 * Shim: publish n bytes already written into the ring at tx_tail (by a copy,
 * or by a read()/pread() straight into the free span: sendfile, splice).
 * `push`: the write ends here without MSG_MORE, so tx_push follows the tail
 * (stored first: a daemon that sees the tail sees the mark).  Returns 1 when
 * the daemon asked for a doorbell (the caller writes one byte into A).
 */
static inline int toe_tx_commit(struct toe_sock_shm *s, uint32_t n, int push)
{
    uint32_t tail = s->tx_tail + n;
    if (push)
        TOE_STORE_REL(&s->tx_push, tail);
    TOE_STORE_REL(&s->tx_tail, tail);
    TOE_FENCE();
    return TOE_LOAD_RLX(&s->tx_doorbell_armed) &&
           __atomic_exchange_n(&s->tx_doorbell_armed, 0, __ATOMIC_SEQ_CST);
}

/*
 * Shim: copy up to len bytes into the TX ring (as much as toe_tx_room()
 * allows) and publish them.  Returns the number of bytes queued;
 * *ring_doorbell is set to 1 when the daemon asked for a doorbell.
 */
static inline uint32_t toe_tx_put(struct toe_sock_shm *s, const uint8_t *src, uint32_t len,
                                  int push, int *ring_doorbell)
{
    uint32_t space = toe_tx_room(s);
    uint32_t n = len < space ? len : space;
    *ring_doorbell = 0;
    if (n == 0)
        return 0;
    toe_ring_copy_in(toe_tx_base(s), s->tx_size, s->tx_tail, src, n);
    *ring_doorbell = toe_tx_commit(s, n, push);
    return n;
}

/*
 * Daemon: arm the doorbell before going idle on this socket, then re-read
 * the tail.  Returns the tail seen after arming: if it moved past what the
 * daemon consumed, the daemon must keep working (and may disarm).
 */
static inline uint32_t toe_tx_arm_doorbell(struct toe_sock_shm *s)
{
    __atomic_store_n(&s->tx_doorbell_armed, 1, __ATOMIC_SEQ_CST);
    TOE_FENCE();
    return TOE_LOAD_ACQ(&s->tx_tail);
}

/* Daemon, after tx_head or tx_sent moved: 1 when the shim waits with A
 * stuffed and the socket is writable now (the daemon must then drain B). */
static inline int toe_tx_wake(struct toe_sock_shm *s)
{
    TOE_FENCE();
    if (TOE_LOAD_RLX(&s->tx_full_wait) && toe_tx_writable(s)) {
        __atomic_store_n(&s->tx_full_wait, 0, __ATOMIC_SEQ_CST);
        return 1;
    }
    return 0;
}

/* Daemon: bytes acknowledged; frees ring space.  Returns toe_tx_wake(). */
static inline int toe_tx_release(struct toe_sock_shm *s, uint32_t new_head)
{
    TOE_STORE_REL(&s->tx_head, new_head);
    return toe_tx_wake(s);
}

/* Daemon: bytes up to new_sent went out (TCP_NOTSENT_LOWAT counts the rest).
 * Returns toe_tx_wake(). */
static inline int toe_tx_sent(struct toe_sock_shm *s, uint32_t new_sent)
{
    TOE_STORE_REL(&s->tx_sent, new_sent);
    return TOE_LOAD_RLX(&s->notsent_lowat) ? toe_tx_wake(s) : 0;
}

/*
 * Shim: declare "A is (about to be) stuffed: drain B once writable", then
 * re-check.  Returns 1 when the socket is writable after the declaration:
 * the caller must then not wait.
 */
static inline int toe_tx_declare_full(struct toe_sock_shm *s)
{
    __atomic_store_n(&s->tx_full_wait, 1, __ATOMIC_SEQ_CST);
    TOE_FENCE();
    return toe_tx_writable(s);
}

/* ---------------- RX ring: daemon produces, shim consumes ---------------- */

static inline uint32_t toe_rx_avail(struct toe_sock_shm *s)
{
    return TOE_LOAD_ACQ(&s->rx_tail) - s->rx_head;
}

static inline uint32_t toe_rx_space(struct toe_sock_shm *s)
{
    return s->rx_size - (s->rx_tail - TOE_LOAD_ACQ(&s->rx_head));
}

/*
 * Daemon: append len bytes (the caller checked the space) and publish.
 * Returns 1 when a readiness token must be written into B (no token is
 * outstanding); the caller then counts it with toe_rx_token_sent() FIRST and
 * writes the byte into B after (docs/abi.md: the other order could leave a
 * byte in A that nobody counted, and an edge-triggered reader would hang).
 */
static inline int toe_rx_push(struct toe_sock_shm *s, const uint8_t *src, uint32_t len)
{
    if (len) {
        toe_ring_copy_in(toe_rx_base(s), s->rx_size, s->rx_tail, src, len);
        TOE_STORE_REL(&s->rx_tail, s->rx_tail + len);
    }
    TOE_FENCE();
    return TOE_LOAD_ACQ(&s->tok_taken) == s->tok_sent;
}

/* Daemon: a token byte is about to be written into B (count, then write). */
static inline void toe_rx_token_sent(struct toe_sock_shm *s)
{
    TOE_STORE_REL(&s->tok_sent, s->tok_sent + 1);
}

/*
 * Shim: n bytes were consumed from the RX ring.  Returns 1 when the daemon
 * asked to hear about freed space (the caller rings a doorbell).
 */
static inline int toe_rx_consumed(struct toe_sock_shm *s, uint32_t n)
{
    TOE_STORE_REL(&s->rx_head, s->rx_head + n);
    TOE_FENCE();
    if (TOE_LOAD_RLX(&s->rx_wnd_wait) && (int32_t)(s->rx_head - TOE_LOAD_ACQ(&s->rx_wnd_at)) >= 0 &&
        __atomic_exchange_n(&s->rx_wnd_wait, 0, __ATOMIC_SEQ_CST))
        return 1;
    return 0;
}

/* Shim: tokens outstanding in A (written by the daemon, not yet read). */
static inline uint32_t toe_tokens_outstanding(struct toe_sock_shm *s)
{
    return TOE_LOAD_ACQ(&s->tok_sent) - TOE_LOAD_ACQ(&s->tok_taken);
}

/*
 * Shim: n token bytes were read out of A.  Returns 1 when, after that, the
 * socket is readable again (data or EOF) with no token outstanding: the
 * daemon may have skipped a token in the window, so the caller must kick it
 * (write one byte into A).
 */
static inline int toe_tokens_taken(struct toe_sock_shm *s, uint32_t n)
{
    /* atomic add: processes sharing a listening socket (nginx workers) may
     * take tokens concurrently */
    uint32_t taken = __atomic_add_fetch(&s->tok_taken, n, __ATOMIC_SEQ_CST);
    if (TOE_LOAD_ACQ(&s->tok_sent) != taken)
        return 0;
    return (TOE_LOAD_ACQ(&s->rx_tail) != s->rx_head) ||
           (TOE_LOAD_ACQ(&s->flags) & (TOE_SF_RX_EOF | TOE_SF_RESET)) ||
           TOE_LOAD_ACQ(&s->accept_pending) != 0;
}

/* Daemon: ask for a doorbell once rx_head reaches `at` (the mark is stored before the
 * flag), then re-read the consumer index. */
static inline uint32_t toe_rx_arm_window_at(struct toe_sock_shm *s, uint32_t at)
{
    TOE_STORE_REL(&s->rx_wnd_at, at);
    __atomic_store_n(&s->rx_wnd_wait, 1, __ATOMIC_SEQ_CST);
    TOE_FENCE();
    return TOE_LOAD_ACQ(&s->rx_head);
}

/* ... ring on the next read, whatever it frees. */
static inline uint32_t toe_rx_arm_window(struct toe_sock_shm *s)
{
    TOE_STORE_REL(&s->rx_wnd_at, s->rx_head);
    __atomic_store_n(&s->rx_wnd_wait, 1, __ATOMIC_SEQ_CST);
    TOE_FENCE();
    return TOE_LOAD_ACQ(&s->rx_head);
}

/* ---------------- daemon side: the checksum unit; the RX ring against a lying header ---------------- */

/*
 * RFC 1071 Internet checksum of buf, starting from `initial` (a one's-complement
 * sum of big-endian 16-bit words, e.g. the pseudo-header).  Returns the
 * checksum as a host integer, to be stored big-endian.
 */
static inline uint16_t toe_csum_fold(const uint8_t *buf, size_t len, uint32_t initial)
{
    uint64_t init = initial;
    while (init >> 16)
        init = (init & 0xffff) + (init >> 16);
    /* the loop below sums little-endian words: move `initial` into that domain */
    uint64_t sum = ((init >> 8) | (init << 8)) & 0xffff;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, buf, 8);
        sum += (w & 0xffffffffu) + (w >> 32);
        buf += 8;
        len -= 8;
    }
    while (len >= 2) {
        uint16_t w;
        memcpy(&w, buf, 2);
        sum += w;
        buf += 2;
        len -= 2;
    }
    if (len)
        sum += *buf;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    /* the sum was taken over host-order (little-endian) words: swap back */
    uint16_t r = (uint16_t)~sum;
    return (uint16_t)((r >> 8) | (r << 8));
}

/*
 * The daemon's side of the RX ring, safe against the shim: the shared header is
 * writable by the application, so the sizes come from the daemon's own copy
 * (checked when the socket was registered) and a consumer index that makes no
 * sense (more used than the ring holds) leaves no space.  Whatever the shim
 * writes into the header, the daemon never writes outside the ring.
 */
static inline uint32_t toe_d_rx_space(struct toe_sock_shm *s, uint32_t rx_size)
{
    uint32_t used = s->rx_tail - TOE_LOAD_ACQ(&s->rx_head);
    return used > rx_size ? 0 : rx_size - used;
}

/* toe_rx_push() with the daemon's sizes; -1 (nothing written) if len does not fit. */
static inline int toe_d_rx_push(struct toe_sock_shm *s, uint32_t tx_size, uint32_t rx_size, const uint8_t *src,
                  uint32_t len)
{
    if (len) {
        if (len > toe_d_rx_space(s, rx_size))
            return -1;
        uint32_t tail = s->rx_tail;
        toe_ring_copy_in((uint8_t *)s + TOE_SHM_HDR_SIZE + tx_size, rx_size, tail, src, len);
        TOE_STORE_REL(&s->rx_tail, tail + len);
    }
    TOE_FENCE();
    return TOE_LOAD_ACQ(&s->tok_taken) == s->tok_sent;
}

#endif /* TOE_RING_H */
