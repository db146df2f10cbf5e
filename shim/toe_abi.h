/*
 * toe_abi.h - the shared-memory and command ABI between the shim and the daemon.
 *
 * This file is read by two consumers:
 *   - the C compiler (shim, and the daemon's cffi module), and
 *   - cffi's cdef(), after the build script strips every preprocessor line
 *     except "#define NAME <integer>".
 * So: plain structs and integer #defines only; no typedefs of arrays, no
 * expressions in #defines, no inline code (that lives in toe_ring.h).
 *
 * Byte order: fields named *_be32 / *_be16 are network byte order, every
 * other field is host order.  Ring indices are free-running uint32 byte
 * counters; occupancy is (tail - head) modulo 2^32, ring sizes are powers of
 * two no larger than 2^30.
 *
 * See docs/abi.md for the protocol (tokens, filler, doorbells, lifetime).
 */
#ifndef TOE_ABI_H
#define TOE_ABI_H

#include <stdint.h>

#define TOE_ABI_VERSION 6
#define TOE_SHM_MAGIC 1414481200

/* Sizes checked on both sides (_Static_assert below, ffi.sizeof in Python). */
#define TOE_CMD_SIZE 64
#define TOE_RSP_SIZE 64
#define TOE_SHM_HDR_SIZE 4096
#define TOE_OPT_BYTES 16

/* ---- control channel operations (struct toe_cmd.op) ---- */
#define TOE_OP_HELLO 1
#define TOE_OP_SOCKET 2
#define TOE_OP_BIND 3
#define TOE_OP_LISTEN 4
#define TOE_OP_CONNECT 5
#define TOE_OP_ACCEPT 6
#define TOE_OP_SHUTDOWN 7
#define TOE_OP_SETSOCKOPT 8
#define TOE_OP_HANDOVER 9
#define TOE_OP_ADOPT 10
#define TOE_OP_FORK 11
#define TOE_OP_WAKE 12 /* a kick that cannot go through A (A is stuffed) */
#define TOE_OP_SOCKETS 13 /* a batch of sockets for the shim's pool */
#define TOE_OP_REUSE 14   /* a batch of recycled sockets for the shim's pool */

/* SOCKETS registers at most this many sockets (3 descriptors each), REUSE this many
 * recycled ones (2 descriptors each) */
#define TOE_POOL_BATCH 16

/* recycled mappings kept per process, on either side (a closed socket's memfd, mapped) */
#define TOE_RECYCLE_MAX 32

/* struct toe_cmd.arg0 of HANDOVER: why a socket went to the kernel */
#define TOE_HO_LOOPBACK 1    /* connect() to 127.0.0.0/8 or 0.0.0.0 */
#define TOE_HO_OFF_SUBNET 2  /* connect() outside the adapter's subnet */
#define TOE_HO_BIND_ADDR 3   /* bind() to an address that is not the adapter's */
#define TOE_HO_DAEMON 4      /* the daemon answered BIND/CONNECT/LISTEN with HANDOVER */
#define TOE_HO_NO_DAEMON 5   /* the control channel failed during BIND/CONNECT/LISTEN */
#define TOE_HO_KERNEL_PATH 6 /* accept() on an INADDR_ANY listener: the connection came through the kernel */

/* struct toe_rsp.flags */
#define TOE_RF_HANDOVER 1
#define TOE_RF_POSTED 2   /* the answer of a posted command (below); in HELLO's: the daemon answers them */

/* struct toe_cmd.arg1 of REUSE: posted, sent ahead of need; the daemon may answer it
 * after later commands (when idle), its answer flagged TOE_RF_POSTED */
#define TOE_REUSE_POSTED 1

/* struct toe_cmd.arg1 of CONNECT: the caller blocks until the handshake ends (A is not
 * O_NONBLOCK); the adapter may then answer 0, connected, when the handshake ended while
 * it answered (the SYN|ACK came in the same pass), instead of -EINPROGRESS */
#define TOE_CONNECT_WAIT 1

/* ---- socket state as the shim sees it (struct toe_sock_shm.state) ---- */
#define TOE_SS_NEW 0
#define TOE_SS_BOUND 1
#define TOE_SS_LISTEN 2
#define TOE_SS_CONNECTING 3
#define TOE_SS_CONNECTED 4
#define TOE_SS_CLOSED 5
#define TOE_SS_RECYCLED 6 /* the daemon reset this closed socket's header for REUSE */

/* ---- struct toe_sock_shm.flags (daemon-written bits) ---- */
#define TOE_SF_RX_EOF 1
#define TOE_SF_RESET 2
#define TOE_SF_TX_SHUT 4
#define TOE_SF_RX_SHUT 8

/* ---- struct toe_sock_shm.opt_flags (shim-written bits) ---- */
#define TOE_OF_NODELAY 1
#define TOE_OF_KEEPALIVE 2
#define TOE_OF_REUSEADDR 4
#define TOE_OF_REUSEPORT 8
#define TOE_OF_CORK 16
#define TOE_OF_LINGER 32

/*
 * One command, shim -> daemon, over the per-process SOCK_SEQPACKET control
 * channel.  Every command gets exactly one struct toe_rsp back, in order.
 * SOCKET and ACCEPT carry three descriptors with SCM_RIGHTS: [B end, memfd,
 * A end] (the daemon reads A's SO_COOKIE itself and closes its copy of A).
 * ADOPT carries [A end] and proves possession of the socket: the answer has
 * the memfd with SCM_RIGHTS, sock_id, and the ring sizes in
 * tx_ring_bytes/rx_ring_bytes.  FORK's answer carries a new channel holding
 * the same sockets, for a forked child.  A command may name (sock_id) only a
 * socket its channel created, accepted, adopted or inherited through FORK.
 *
 * REUSE (ABI 6) is followed, in the same message, by arg0 uint32 ids (at most
 * TOE_POOL_BATCH): closed sockets of this channel whose header the daemon reset
 * (state TOE_SS_RECYCLED).  It carries [B end, A end] of a new pair per id; the
 * answer's result is a bit mask of the ids taken (bit i: ids[i]), each with its new
 * id in its header.  A socket is recycled only within the process that made it,
 * never after a FORK or an ADOPT (docs/abi.md "Recycling").
 */
struct toe_cmd {
    uint32_t op;
    uint32_t sock_id;
    int32_t arg0;            /* LISTEN backlog, SHUTDOWN how, SETSOCKOPT level */
    int32_t arg1;            /* SETSOCKOPT optname */
    uint32_t addr_be32;      /* BIND / CONNECT address */
    uint16_t port_be16;      /* BIND / CONNECT port */
    uint16_t optlen;         /* SETSOCKOPT value length (<= TOE_OPT_BYTES) */
    uint32_t pid;            /* HELLO: caller's pid */
    uint32_t shm_bytes;      /* SOCKET / ACCEPT: size of the memfd */
    uint8_t opt[TOE_OPT_BYTES];
    uint64_t cookie;         /* unused since ABI 3 (the daemon reads A's SO_COOKIE itself) */
    uint8_t reserved[8];
};

/*
 * One response, daemon -> shim.  result >= 0 on success, -errno on failure.
 * HELLO fills the adapter fields; SOCKET/ACCEPT give sock_id; ACCEPT gives
 * the peer in addr/port; BIND/CONNECT with flags & TOE_RF_HANDOVER mean
 * "not served by the adapter: hand this socket over to the kernel".
 */
struct toe_rsp {
    int32_t result;
    uint32_t flags;
    uint32_t sock_id;
    uint32_t addr_be32;
    uint16_t port_be16;
    uint16_t prefix_len;     /* HELLO: adapter prefix length */
    uint32_t netmask_be32;   /* HELLO: adapter netmask */
    uint32_t tx_ring_bytes;  /* HELLO: ring sizes the shim must allocate */
    uint32_t rx_ring_bytes;
    uint32_t daemon_pid;
    uint32_t abi_version;
    uint8_t reserved[24];
};

/*
 * Per-socket shared memory: one memfd, created by the shim, mapped by both.
 * Layout: this 4096-byte header, then the TX ring (tx_size bytes), then the
 * RX ring (rx_size bytes).  Each index lives on its own cache line and has
 * exactly one writer, named in the comment.
 */
struct toe_sock_shm {
    /* line 0: identity and state; written by the daemon unless noted */
    uint32_t magic;
    uint32_t abi_version;
    uint32_t sock_id;
    uint32_t state;              /* TOE_SS_* */
    uint32_t flags;              /* TOE_SF_* */
    int32_t so_error;            /* pending error (positive errno); shim clears by exchange */
    uint32_t accept_pending;     /* LISTEN: children ready for accept */
    uint32_t local_addr_be32;
    uint32_t remote_addr_be32;
    uint16_t local_port_be16;
    uint16_t remote_port_be16;
    uint32_t tx_size;            /* written by the shim before SOCKET/ACCEPT */
    uint32_t rx_size;            /* written by the shim before SOCKET/ACCEPT */
    uint32_t mss;                /* effective send MSS, once connected */
    uint32_t pad0[3];

    /* line 1: TX producer (shim) */
    uint32_t tx_tail;
    uint32_t tx_full_wait;       /* shim: "A is stuffed with filler, drain B once writable" */
    uint32_t tx_push;            /* tail at the end of the last write without MSG_MORE: bytes
                                    past it wait for more (published before tx_tail) */
    uint32_t pad1[13];

    /* line 2: TX consumer (daemon) */
    uint32_t tx_head;            /* bytes acknowledged by the peer, freed for reuse */
    uint32_t tx_doorbell_armed;  /* daemon sets when idle; shim rings once and clears */
    uint32_t tx_sent;            /* bytes sent at least once (never moves back); tail - tx_sent
                                    is what TCP_NOTSENT_LOWAT counts */
    uint32_t pad2[13];

    /* line 3: RX producer (daemon) */
    uint32_t rx_tail;
    uint32_t tok_sent;           /* readiness tokens written into B */
    uint32_t rx_wnd_wait;        /* daemon: "ring a doorbell when you free RX space" ... */
    uint32_t rx_wnd_at;          /* ... once rx_head has reached this (written before rx_wnd_wait) */
    uint32_t pad3[12];

    /* line 4: RX consumer (shim) */
    uint32_t rx_head;
    uint32_t tok_taken;          /* readiness tokens read out of A */
    uint32_t pad4[14];

    /* line 5: options (shim-written, daemon reads) */
    uint32_t opt_flags;          /* TOE_OF_* */
    int32_t linger_s;
    uint32_t keepidle_s;
    uint32_t keepintvl_s;
    uint32_t keepcnt;
    uint32_t user_mss;
    uint32_t sndbuf;             /* getsockopt(SO_SNDBUF); also the most bytes queued (unacked
                                    + unsent) when below the TX ring's size */
    uint32_t rcvbuf;             /* value reported by getsockopt(SO_RCVBUF) */
    uint32_t notsent_lowat;      /* TCP_NOTSENT_LOWAT; 0: none */
    uint32_t pad5[7];

    /* line 6: counters (daemon-written) */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t segs_in;
    uint64_t segs_out;
    uint64_t retransmits;
    uint64_t pad6[3];

    uint8_t tail_pad[3648];
};

#ifndef TOE_CDEF
_Static_assert(sizeof(struct toe_cmd) == TOE_CMD_SIZE, "toe_cmd size");
_Static_assert(sizeof(struct toe_rsp) == TOE_RSP_SIZE, "toe_rsp size");
_Static_assert(sizeof(struct toe_sock_shm) == TOE_SHM_HDR_SIZE, "toe_sock_shm size");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, tx_tail) == 64, "tx line");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, tx_head) == 128, "tx consumer line");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, rx_tail) == 192, "rx line");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, rx_head) == 256, "rx consumer line");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, opt_flags) == 320, "opt line");
_Static_assert(__builtin_offsetof(struct toe_sock_shm, bytes_in) == 384, "counter line");
#endif

#endif /* TOE_ABI_H */
