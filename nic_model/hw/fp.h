/*
 * nic_model/hw/fp.h - seed 003's hardware fast path: the units, the CCB they share with the
 * software path, and what they hand back to it.
 *
 * Read by the C compiler (the units, one source file each) and by cffi's
 * cdef() after nic_model/_fp_build.py strips preprocessor lines other than
 * "#define NAME <integer>" and everything inside "#ifndef FP_CDEF".
 *
 *   rx_checker.c   integrity, checksum (verify or offload), classification,
 *                  the fast-path test of a segment against its CCB
 *   ack_number.c   in-order payload straight from the frame into the
 *                  application's RX ring, rcv_nxt, readiness
 *   ack_gen.c      pure ACKs and window updates; the delayed-ACK and
 *                  piggyback policy the software path sets
 *   tx_hdrgen.c    TX buffer manager (segments from the TX ring within
 *                  min(cwnd, peer window), ACKs that free ring space) and the
 *                  header generator with its template per CCB
 *   conn_fsm.c     the connection state unit: the regular parts of setup and
 *                  teardown (the SYN|ACK, the FINs, the application's close)
 *   time_wait.c    TIME-WAIT as records (not CCBs): the segments that can
 *                  still come answered as software's TIME-WAIT answers them
 *   host_cmd.c     the command unit: a CONNECT read from the host's control
 *                  channel and answered here (port, ISN, CCB, SYN), for a
 *                  fresh socket to a known neighbour; the rest is software's
 *   fp_engine.c    the CCB table (hash by connection, map by B descriptor),
 *                  the event loop's wait, doorbells, the deadline scan, and
 *                  the hand-back queue (punts and events for software)
 *
 * Byte order: every field here is host order.
 */
#ifndef FP_H
#define FP_H

#include <stdint.h>

/* frame classes: the same numbers as nic_model/rx.py (ERROR .. OTHER) */
#define FP_CLS_ERROR 0
#define FP_CLS_ARP 1
#define FP_CLS_ICMP 2
#define FP_CLS_TCP_SYN 3
#define FP_CLS_TCP_DATA 4
#define FP_CLS_OTHER 5
#define FP_CLS_UNPARSED 6      /* not IPv4 without options carrying TCP to us: software parses it */

/* drop reasons of the RX checker: names in nic_model/fastpath.py DROP_NAMES */
#define FP_DROP_IP_CHECKSUM 0
#define FP_DROP_IP_LENGTH 1
#define FP_DROP_IP_FRAGMENT 2
#define FP_DROP_NOT_OUR_IP 3   /* classified OTHER */
#define FP_DROP_TCP_OFFSET 4
#define FP_DROP_TCP_FLAGS 5
#define FP_DROP_TCP_PORT 6
#define FP_DROP_TCP_CHECKSUM 7
#define FP_DROP_TCP_OPTION 8
#define FP_NDROPS 9

/* why a frame or a connection went to software: names in PUNT_NAMES */
#define FP_PUNT_UNPARSED 0     /* ARP, ICMP, IP options, another MAC, runts: the software checker */
#define FP_PUNT_SYN 1          /* connection request */
#define FP_PUNT_NO_CCB 2       /* no fast-path CCB: setup, teardown, a software-owned connection */
#define FP_PUNT_FOLLOWS 3      /* the connection was punted earlier: keeps its order */
#define FP_PUNT_FIN 4
#define FP_PUNT_RST 5
#define FP_PUNT_FLAGS 6        /* no ACK, SYN or URG on a connection */
#define FP_PUNT_OPTIONS 7      /* TCP options (timestamps, SACK: not in hardware yet) */
#define FP_PUNT_OUT_OF_ORDER 8
#define FP_PUNT_OLD_ACK 9      /* acknowledges less than snd_una */
#define FP_PUNT_ACK_UNSENT 10  /* acknowledges more than was sent */
#define FP_PUNT_DUP_ACK 11     /* loss recovery is software's */
#define FP_PUNT_BEYOND_WINDOW 12
#define FP_PUNT_ZERO_WINDOW 13 /* the peer closed its window: the persist timer is software's */
#define FP_PUNT_CORK 14        /* a partial segment held by TCP_CORK / MSG_MORE (a timer) */
#define FP_PUNT_RTO 15         /* the retransmission timer expired */
#define FP_PUNT_CLOSE 16       /* B hung up: the application closed the socket */
#define FP_PUNT_FORCED 17      /* software took the connection back (a command, a timer, stat) */
#define FP_PUNT_HANDSHAKE 18   /* a SYN|ACK the units leave to software (a wrong ACK, data, keepalive on) */
#define FP_PUNT_STATE 19       /* a segment the units do not take in this state (data after a FIN) */
#define FP_PUNT_TEARDOWN 20    /* the connection ended (LAST-ACK acked) or waits on a timer (FIN-WAIT-2, TIME-WAIT) */
#define FP_NPUNTS 21

/* TCP states (struct fp_ccb.state): offload_daemon/tcp_ccb.py's State numbers */
#define FP_ST_SYN_SENT 2
#define FP_ST_ESTABLISHED 4
#define FP_ST_FIN_WAIT_1 5
#define FP_ST_FIN_WAIT_2 6
#define FP_ST_CLOSE_WAIT 7
#define FP_ST_CLOSING 8        /* only on the way to software (conn_fsm.c fp_peer_fin) */
#define FP_ST_LAST_ACK 9
#define FP_ST_TIME_WAIT 10

/* struct fp_ccb.cflags */
#define FP_CF_RX_FIN 1         /* the peer's FIN is in (rcv_nxt counts it) */
#define FP_CF_FIN_WANTED 2     /* the application closed: our FIN follows the TX ring */
#define FP_CF_FIN_SENT 4       /* our FIN is out, at fin_seq */
#define FP_CF_ORPHAN 8         /* the application closed the socket: B is out of the epoll set (b_fd -1) */
#define FP_CF_B_SHUT 16        /* B is shut for writing (the application reads EOF) */
#define FP_CF_SEND_SYN 32      /* at push (SYN-SENT): the units send the SYN */
#define FP_CF_TW 64            /* TIME-WAIT is a record of the units' now (time_wait.c) */

/* hand-back records (struct fp_event.kind) */
#define FP_EV_FD 1             /* an epoll event for software: fd, events */
#define FP_EV_FRAME 2          /* a frame for software: buf, len, reason, slot (-1: none) */
#define FP_EV_CONN 3           /* a fast connection needs software: slot, reason */
#define FP_EV_CONNECT 4        /* the command unit made a connection: buf = its record (fp_hc_conns) */

#define FP_NO_WSCALE 255
#define FP_PSH_MAX 64          /* = PSH_ENDS_MAX of the software path */
#define FP_TMPL_LEN 66         /* virtio header 12 + Ethernet 14 + IPv4 20 + TCP 20 */
#define FP_MAX_EVENTS 1024
#define FP_RX_BATCH 64
#define FP_POLL_FDS 256
#define FP_SPIN_BULK 16384     /* bytes read in a pass that make it bulk: no busy poll after it */

/*
 * One fast-path connection: the CCB cache entry both paths see.
 *
 * Ownership: a connection is in the table (in_use = 1) only while the units
 * own it.  Software copies its CCB in with fp_push() and takes it back with
 * fp_pull(); in between it writes nothing here and reads only through
 * fp_peek() (a snapshot for `toe stat`).  While the units own it:
 *   - identity, ring geometry, MSS and window scales, the template: written
 *     by software at push, read-only for the units;
 *   - snd_*, tx_head, cwnd/ssthresh, RTT, rto_deadline, psh_ends: the TX
 *     buffer manager (ACK processing, try_send);
 *   - rcv_nxt, bytes_in, last_rx, last_data_rx: the ACK-number unit;
 *   - rcv_adv, wnd_wait, ack_pending, rcv_unacked, pingpong, dack_deadline:
 *     the ACK generator (also set by the others when they send an ACK);
 *   - state, irs, cflags, fin_seq: the connection state unit (conn_fsm.c), which also
 *     sets mss, the window scales, max_seg and b_fd (-1 once the application closed);
 *   - punted, punt_reason: any unit; once set the units leave the connection
 *     alone (frames and doorbells go to software) until software pulls it.
 * A unit decides to punt before it changes anything: a punted frame meets in
 * software exactly the CCB the units had.
 */
struct fp_ccb {
    /* identity (software, at push) */
    uint32_t in_use;
    uint32_t conn_id;
    uint32_t local_ip;
    uint32_t remote_ip;
    uint32_t local_port;
    uint32_t remote_port;
    int32_t b_fd;
    uint32_t tx_size;          /* the daemon's own copy of the ring sizes */
    uint32_t rx_size;
    uint64_t shm_addr;         /* struct toe_sock_shm * of the socket's mapping */
    uint8_t peer_mac[8];
    uint32_t mss;              /* send MSS */
    uint32_t snd_wscale;
    uint32_t rcv_wscale;
    uint32_t max_seg;          /* the most payload one frame carries (TSO: a multiple of mss) */
    uint32_t adv_mss;          /* the MSS our SYN offered: the send MSS's ceiling */
    /* connection state unit */
    uint32_t state;            /* FP_ST_* */
    uint32_t cflags;           /* FP_CF_* */
    uint32_t irs;
    uint32_t fin_seq;
    /* TX buffer manager */
    uint32_t snd_una;
    uint32_t snd_nxt;
    uint32_t snd_max;
    uint32_t snd_wnd;
    uint32_t snd_wl1;
    uint32_t snd_wl2;
    uint32_t tx_head;
    uint32_t snd_sml;
    uint32_t cwnd;
    uint32_t ssthresh;
    uint32_t retries;
    uint32_t rtt_valid;        /* rtt_seq is being timed */
    uint32_t rtt_seq;
    uint32_t psh_n;
    double rtt_time;
    double srtt;
    double rttvar;
    double rto;
    double rto_deadline;       /* 0: not armed */
    uint32_t psh_ends[FP_PSH_MAX];
    /* ACK-number unit and ACK generator */
    uint32_t rcv_nxt;
    uint32_t rcv_adv;
    uint32_t wnd_wait;
    uint32_t ack_pending;
    uint32_t rcv_unacked;      /* in-order bytes received since the last ACK we sent */
    uint32_t pingpong;         /* interactive: ACKs wait for a reply to ride on */
    double last_rx;
    double last_data_rx;
    double dack_deadline;      /* 0: no delayed ACK due */
    double wnd_poll_at;        /* wnd_wait: look at the RX ring again then */
    /* counters */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t segs_in;
    uint64_t segs_out;
    uint64_t data_fast;        /* data segments (in + out) the units handled */
    /* hand-back */
    uint32_t punted;
    uint32_t punt_reason;
    int32_t hnext;             /* hash chain */
    uint32_t ack_now;          /* an ACK is owed at the end of this burst */
    int32_t ack_next;          /* list of connections owing one */
    uint32_t uid;              /* the socket owner's (software, at push: `toe stat` per user) */
    /* header template (the header generator's CCB cache line) */
    uint32_t ip_base;          /* one's-complement sum of the constant IPv4 words */
    uint32_t pseudo_base;      /* ... of the pseudo-header's constant words */
    uint8_t tmpl[72];
};

/* what the units hand back to software, in the order it happened */
struct fp_event {
    uint32_t kind;             /* FP_EV_* */
    int32_t fd;
    uint32_t events;
    uint32_t buf;
    uint32_t len;
    uint32_t reason;
    int32_t slot;
    uint32_t pad;
};

struct fp_counters {
    /* TAP port */
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t rx_gso_frames;
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t tx_gso_frames;
    uint64_t tx_errors;
    /* RX checker (hot-path frames only: the rest is counted by software) */
    uint64_t cls[7];
    uint64_t drops[FP_NDROPS];
    uint64_t csum_verified;
    uint64_t csum_offloaded;
    /* ACK-number unit */
    uint64_t rx_segments;      /* segments the units took */
    uint64_t rx_data_segments;
    uint64_t rx_payload_bytes;
    uint64_t rx_placed;        /* payloads the TAP read placed straight into an RX ring (no copy) */
    uint64_t rx_misplaced;     /* ... read there for a guess that was wrong, copied out again */
    uint64_t tokens;
    /* connection state unit */
    uint64_t syns;             /* SYNs sent at push (software's connect) */
    uint64_t syn_acks;         /* handshakes ended here (SYN-SENT -> ESTABLISHED) */
    uint64_t fins_in;          /* the peer's FIN, in order (-> CLOSE-WAIT) */
    uint64_t fins_out;         /* our FIN after the application's close */
    uint64_t app_closes;       /* closes taken here (B hung up) */
    uint64_t closes;           /* LAST-ACK acked: the connection ended in the units */
    /* ACK generator */
    uint64_t pure_acks;
    uint64_t piggybacked;
    uint64_t delayed_acks;
    uint64_t window_updates;
    /* TX buffer manager + header generator */
    uint64_t segments;
    uint64_t data_segments;
    uint64_t payload_bytes;
    uint64_t ccb_cache_hits;
    uint64_t ccb_cache_misses;
    uint64_t sw_checksums;
    uint64_t ring_frees;       /* ACKs that freed TX ring space */
    uint64_t writer_wakeups;   /* ... and woke a waiting writer */
    /* engine */
    uint64_t punts[FP_NPUNTS];
    uint64_t pushes;
    uint64_t pulls;
    uint64_t doorbells;
    uint64_t waits;            /* epoll waits that slept (wake-ups of the adapter) */
    uint64_t spins;            /* busy-poll looks (poll_us) */
    uint64_t spin_misses;      /* spins that found nothing before poll_us ran out */
    uint64_t sw_events;        /* records handed to software */
    uint64_t scans;
    uint64_t table_full;
    /* buffers (seed 002): with no_reuse, one mapping per packet each way */
    uint64_t dma_maps;
    uint64_t dma_unmaps;
    /* TIME-WAIT records (time_wait.c) */
    uint64_t tw_entered;       /* connections that waited here instead of in software */
    uint64_t tw_segments;      /* segments for a record */
    uint64_t tw_acks;          /* ... answered with an ACK */
    uint64_t tw_reopened;      /* ... a new incarnation's SYN (the record went) */
    uint64_t tw_expired;
};

/* A connection in TIME-WAIT kept by the units (time_wait.c) */
struct fp_tw {
    uint32_t in_use;
    uint32_t conn_id;
    uint32_t uid;
    uint32_t local_ip;
    uint32_t remote_ip;
    uint16_t local_port;
    uint16_t remote_port;
    uint32_t snd_nxt;
    uint32_t rcv_nxt;
    uint32_t rcv_adv;
    uint16_t rcv_wscale;
    uint16_t mss;
    uint8_t peer_mac[8];
    int32_t hnext;
    int32_t prev;
    int32_t next;
    double expires;
    uint64_t bytes_in;         /* the connection's, for `toe stat` */
    uint64_t bytes_out;
};

struct fp_state {
    int32_t tap_fd;
    int32_t ep_fd;
    uint32_t my_ip;
    uint32_t offloads;         /* TSO and checksum offload with the kernel */
    uint8_t my_mac[8];
    uint32_t max_payload;      /* the most payload of one TSO frame */
    uint32_t capacity;         /* CCB slots */
    uint32_t active;           /* slots in use */
    uint32_t hash_mask;
    uint32_t fd_map_len;
    uint32_t ip_id;
    uint32_t nbufs;            /* frame buffers (the software path's pool) */
    uint32_t buf_size;
    double delack_s;           /* the longest an ACK waits for data to ride on */
    double ato_s;              /* reply within this of data received: interactive */
    double wnd_poll_s;
    uint32_t poll_us;          /* busy-poll this long before sleeping (0: sleep at once) */
    uint32_t no_reuse;         /* seed 002's other side: map and unmap a buffer per packet */
    int32_t place_slot;        /* the connection whose RX ring the next frame's payload is read into */
    uint32_t spin_misses;      /* busy-poll spins in a row that found nothing ... */
    uint32_t spin_skip;        /* ... and the waits that sleep at once because of them */
    uint32_t kick_kept;        /* doorbell bytes a doorbell may leave in B (fp_new's probe: 1 if one
                                * byte unread leaves A writable, else 0) */
    double next_scan;          /* earliest deadline the scan may find (0: none) */
    double now;                /* the clock at the last wait */
    uint64_t rx_mark;          /* rx_bytes when the last wait returned (a pass that read
                                * FP_SPIN_BULK more was bulk: the next wait does not spin) */
    uint32_t nevents;
    int32_t ack_head;          /* connections owing an ACK at the end of the burst */
    struct fp_ccb *ccbs;
    int32_t *hash;
    int32_t *fd_map;
    int32_t *free_slots;       /* a stack of the free CCB slots (the last freed on top) */
    uint32_t nfree;
    uint32_t pad3;
    uint64_t *bufs;            /* frame buffer addresses */
    struct fp_event *events;
    uint8_t *txbuf;            /* a frame whose checksum the units compute (offloads off) */
    struct fp_counters counters;
    void *proc;                /* seed 003's second processor (tx_proc.c), or NULL: one */
    void *tw;                  /* TIME-WAIT records (time_wait.c), or NULL: software's */
    void *hc;                  /* the command unit (host_cmd.c), or NULL: every command is software's */
};

/* The numbers software and the command unit both hand out (one counter each, shared):
 * RFC 6056 algorithm 3's secret and counter for ephemeral ports, and connection ids */
struct fp_ids {
    uint64_t eph_secret;
    uint32_t eph_next;
    uint32_t conn_id;          /* the last id handed out */
};

/* A connection the command unit made (FP_EV_CONNECT): what software learns of it */
struct fp_hc_conn {
    int32_t b_fd;              /* its socket (the B end software registered) */
    int32_t slot;              /* its CCB, in SYN-SENT, the SYN sent */
    uint32_t sock_id;
    uint32_t conn_id;
    uint32_t remote_ip;
    uint32_t local_port;
    uint32_t remote_port;
    uint32_t iss;
    uint32_t adv_mss;
    uint32_t lost;             /* the answer could not be sent: the channel must go */
    int32_t owed;              /* a blocking connect's channel, its answer owed to the pass's end; -1 */
    uint8_t peer_mac[8];
    double now;
};

struct fp_hc_counters {
    uint64_t looked;           /* commands looked at (MSG_PEEK) */
    uint64_t connects;         /* CONNECTs answered here */
    uint64_t passed;           /* commands left to software: another op, descriptors, a size */
    uint64_t not_fresh;        /* CONNECTs left to software: a socket software has used, or another channel's */
    uint64_t no_neighbour;     /* ... the peer not in the neighbour copy (or stale), or not a host of the subnet */
    uint64_t no_port;          /* ... no port without any user within the probes */
    uint64_t no_room;          /* ... CCB table or hand-back records full */
    uint64_t lost_answers;     /* answers the channel did not take (it goes) */
    uint64_t fresh_stuffed;    /* a fresh socket's A stuffed by the shim (B readable): nothing to do */
    uint64_t completed;        /* blocking connects answered 0: the handshake ended in the same pass */
};

/* engine (fp_engine.c) */
struct fp_state *fp_new(uint32_t capacity, int tap_fd, int ep_fd, uint32_t my_ip, const uint8_t *my_mac,
                        int offloads, uint32_t max_payload, uint32_t nbufs, uint32_t buf_size);
void fp_free(struct fp_state *st);
int fp_set_buf(struct fp_state *st, uint32_t i, uint64_t addr);
int fp_push(struct fp_state *st, const struct fp_ccb *src);
int fp_pull(struct fp_state *st, int slot, struct fp_ccb *dst);
int fp_peek(struct fp_state *st, int slot, struct fp_ccb *dst);
int fp_poll(struct fp_state *st, int timeout_ms);
int fp_rx_frame(struct fp_state *st, uint32_t buf, uint32_t len, double now);
int fp_doorbell(struct fp_state *st, int slot, double now);
void fp_scan(struct fp_state *st, double now);
void fp_end_burst(struct fp_state *st);
int fp_find(struct fp_state *st, uint32_t remote_ip, uint32_t remote_port, uint32_t local_port);
int fp_hangup(struct fp_state *st, int slot, double now);

/* TIME-WAIT records (time_wait.c) */
int fp_tw_setup(struct fp_state *st, uint32_t cap, double duration, uint32_t space);
void fp_tw_free(struct fp_state *st);
void fp_tw_set_sw(struct fp_state *st, uint32_t n);
uint32_t fp_tw_count(struct fp_state *st);
int fp_tw_find(struct fp_state *st, uint32_t remote_ip, uint32_t remote_port, uint32_t local_port);
int fp_tw_enter(struct fp_state *st, const struct fp_ccb *c, double now);
int fp_tw_next(struct fp_state *st, int i, struct fp_tw *out);

/* the command unit (host_cmd.c) */
int fp_hc_setup(struct fp_state *st, uint32_t prefix_len, uint32_t our_mss, uint32_t eph_lo, uint32_t eph_hi,
                struct fp_ids *ids, uint32_t *ports, const struct fp_ccb *tmpl);
void fp_hc_free(struct fp_state *st);
struct fp_hc_conn *fp_hc_conns(struct fp_state *st);
int fp_hc_channel(struct fp_state *st, int fd, uint32_t gen);
int fp_hc_sock(struct fp_state *st, uint32_t sock_id, int b_fd, int chan_fd, uint64_t shm_addr,
               uint32_t tx_size, uint32_t rx_size, uint32_t uid);
void fp_hc_unsock(struct fp_state *st, int b_fd);
int fp_hc_neighbour(struct fp_state *st, uint32_t ip, const uint8_t *mac, double until);
void fp_hc_counters(struct fp_state *st, struct fp_hc_counters *out);
int fp_hc_event(struct fp_state *st, int fd, uint32_t ev, double now);
int fp_hc_owed(const struct fp_state *st);
void fp_hc_settle(struct fp_state *st);
void fp_isn_key(const uint8_t *key);
uint32_t fp_isn(uint32_t local_ip, uint32_t local_port, uint32_t remote_ip, uint32_t remote_port, double now);
uint32_t fp_eph_start(const struct fp_ids *ids, uint32_t remote_ip, uint32_t remote_port);

/* seed 003's two processors (tx_proc.c): a TX processor thread takes the doorbells of the
 * units' connections; this one (the RX processor) the TAP, the deadlines and software */
int fp_proc_start(struct fp_state *st);
void fp_proc_stop(struct fp_state *st);
void fp_counters_sum(struct fp_state *st, struct fp_counters *out);
int fp_proc_counters(struct fp_state *st, struct fp_counters *out);

/* RX checker (rx_checker.c): the parse of one frame, without a CCB */
struct fp_seg {
    uint32_t src;
    uint32_t dst;
    uint32_t sport;
    uint32_t dport;
    uint32_t seq;
    uint32_t ack;
    uint32_t flags;
    uint32_t window;
    uint32_t hlen;
    uint32_t payload_off;
    uint32_t payload_len;
    uint32_t drop;             /* FP_DROP_* when the class is ERROR or OTHER */
    uint32_t has_options;
    uint32_t csum_offloaded;
    uint32_t has_ts;           /* a well-formed timestamp option (RFC 7323): */
    uint32_t tsval;
    uint32_t tsecr;
    uint32_t mss_opt;          /* the MSS option (0: none) */
    uint32_t ws_opt;           /* the window scale option (FP_NO_WSCALE: none) */
};
int fp_rx_parse(const uint8_t *frame, uint32_t len, uint32_t my_ip, const uint8_t *my_mac,
                struct fp_seg *out);

#ifndef FP_CDEF
#include "toe_ring.h"

#define FP_VNET_LEN 12
#define FP_ETH_OFF FP_VNET_LEN
#define FP_IP_OFF (FP_VNET_LEN + 14)
#define FP_TCP_OFF (FP_IP_OFF + 20)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20

static inline int seq_lt(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }
static inline int seq_le(uint32_t a, uint32_t b) { return (int32_t)(a - b) <= 0; }
static inline int seq_gt(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }
static inline int seq_ge(uint32_t a, uint32_t b) { return (int32_t)(a - b) >= 0; }

#include <pthread.h>

/* The second processor: its own view of the units (struct fp_state with its own counters,
 * frame buffer and hand-back records; the same CCB table), its epoll set (the B ends of the
 * units' connections), and a lock per CCB slot that the two processors take around every
 * use of a CCB.  The table itself (hash, fd map, slots in use) changes only on the RX
 * processor, under table_lock, which the TX processor takes to find a slot. */
struct fp_proc {
    struct fp_state *main;     /* the RX processor's view */
    struct fp_state tx;        /* the TX processor's view */
    pthread_t thread;
    int tx_ep;                 /* the TX processor's epoll set */
    int wake_fd;               /* eventfd in main's epoll set: hand-back records wait */
    int stop_fd;               /* eventfd in tx_ep: stop */
    pthread_mutex_t table_lock;
    pthread_mutex_t hb_lock;   /* the hand-back queue below */
    struct fp_event *hb;
    uint32_t hb_n;
    double hb_deadline;        /* the earliest deadline the TX processor set (0: none) */
    double main_sleeps_until;  /* the RX processor's wait: 0 awake, -1 no timeout */
    pthread_mutex_t *locks;    /* one per CCB slot */
    uint64_t handoffs;
};

static inline void fp_lock(struct fp_state *st, int slot)
{
    if (st->proc)
        pthread_mutex_lock(&((struct fp_proc *)st->proc)->locks[slot]);
}

static inline void fp_unlock(struct fp_state *st, int slot)
{
    if (st->proc)
        pthread_mutex_unlock(&((struct fp_proc *)st->proc)->locks[slot]);
}

/* tx_proc.c, for the engine */
void fp_proc_moved(struct fp_state *st, int b_fd, int to_tx);
void fp_proc_collect(struct fp_state *st);
int fp_proc_sleep(struct fp_state *st, int timeout_ms, double now);
void fp_proc_awake(struct fp_state *st);
/* fp_engine.c, for tx_proc.c */
double fp_mono(void);
struct fp_event *fp_event_new(struct fp_state *st, uint32_t kind);
void fp_doorbell_locked(struct fp_state *st, int slot, double now);
int fp_hangup_locked(struct fp_state *st, struct fp_ccb *c, double now);
int fp_scan_timeout(struct fp_state *st, int timeout_ms, double now);

/* a connection's hash (remote ip, remote port, local port): the CCB table's and the
 * TIME-WAIT records' */
static inline uint32_t fp_conn_hash(uint32_t rip, uint32_t rport, uint32_t lport)
{
    uint32_t h = rip * 0x9e3779b1u ^ (rport << 16 | lport) * 0x85ebca6bu;
    return h ^ (h >> 15);
}

static inline struct toe_sock_shm *fp_shm(const struct fp_ccb *c)
{
    return (struct toe_sock_shm *)(uintptr_t)c->shm_addr;
}

/* shared between the units (each defined in the file of its unit) */
int fp_rx_fast_ok(const struct fp_ccb *c, const struct fp_seg *g);  /* rx_checker.c */
int fp_rx_in_order(const struct fp_ccb *c, const struct fp_seg *g);
uint32_t fp_csum_add(const uint8_t *p, uint32_t len, uint32_t sum);   /* tx_hdrgen.c */
uint16_t fp_csum_fold(uint32_t sum);
uint32_t fp_rcv_space(const struct fp_ccb *c);                        /* ack_gen.c */
uint32_t fp_rcv_buf(const struct fp_ccb *c);
uint32_t fp_window(struct fp_state *st, struct fp_ccb *c);
void fp_ack_sent(struct fp_state *st, struct fp_ccb *c, int with_data);
void fp_send_ack(struct fp_state *st, struct fp_ccb *c);
void fp_ack_policy(struct fp_state *st, struct fp_ccb *c, uint32_t n, double now);
void fp_window_update(struct fp_state *st, struct fp_ccb *c, double now);
void fp_rtt_sample(struct fp_ccb *c, double r);
int fp_fsm_check(const struct fp_ccb *c, const struct fp_seg *g);  /* conn_fsm.c */
void fp_synack(struct fp_state *st, struct fp_ccb *c, const struct fp_seg *g, double now);
void fp_peer_fin(struct fp_state *st, struct fp_ccb *c);
int fp_app_close(struct fp_state *st, struct fp_ccb *c, double now);
void fp_send_fin(struct fp_state *st, struct fp_ccb *c, double now);
void fp_send_syn(struct fp_state *st, struct fp_ccb *c, double now);
void fp_fin_acked(struct fp_state *st, struct fp_ccb *c);
int fp_tw_rx(struct fp_state *st, const struct fp_seg *g, double now);
void fp_hc_port(struct fp_state *st, uint32_t port, int delta);
void fp_hc_begin(struct fp_state *st);
void fp_tw_expire(struct fp_state *st, double now);
void fp_deliver(struct fp_state *st, struct fp_ccb *c, const uint8_t *p, uint32_t n, double now); /* ack_number.c */
void fp_deliver_placed(struct fp_state *st, struct fp_ccb *c, uint32_t n, double now);
void fp_wake(struct fp_ccb *c);
void fp_drain(struct fp_ccb *c, int limit);
uint32_t fp_kick_probe(void);
int fp_ack_check(const struct fp_ccb *c, const struct fp_seg *g);    /* tx_hdrgen.c */
void fp_ack_process(struct fp_state *st, struct fp_ccb *c, const struct fp_seg *g, double now);
void fp_try_send(struct fp_state *st, struct fp_ccb *c, double now);
void fp_emit(struct fp_state *st, struct fp_ccb *c, uint32_t seq, uint32_t flags,
             const uint8_t *p1, uint32_t n1, const uint8_t *p2, uint32_t n2);
void fp_emit_opts(struct fp_state *st, struct fp_ccb *c, uint32_t seq, uint32_t flags, const uint8_t *opts,
                  uint32_t optlen, const uint8_t *p1, uint32_t n1, const uint8_t *p2, uint32_t n2);
void fp_build_template(struct fp_state *st, struct fp_ccb *c);
void fp_punt_conn(struct fp_state *st, struct fp_ccb *c, int slot, uint32_t reason); /* fp_engine.c */
void fp_deadline(struct fp_state *st, double when);
void fp_owe_ack(struct fp_state *st, struct fp_ccb *c);
uint8_t *fp_map_buffer(struct fp_state *st, size_t len);
void fp_unmap_buffer(struct fp_state *st, uint8_t *p, size_t len);
#endif

#endif /* FP_H */
