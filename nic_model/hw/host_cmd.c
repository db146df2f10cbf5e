/*
 * nic_model/hw/host_cmd.c - the command unit: connect() answered by the adapter.
 *
 * Seed 003's host interface reads the host's commands itself; software sees
 * only what the hardware leaves to it.  Here: when a process's control channel
 * is readable, the unit looks at the command waiting (MSG_PEEK, no descriptors
 * taken).  A CONNECT of a fresh socket (one of the shim's pool that software
 * registered and has not used since) to a host of the subnet whose MAC the
 * neighbour copy knows is done here, as software's connect() would do it with
 * a LazyCcb: a port (RFC 6056 algorithm 3 on the counter software's port
 * choice uses, among ports nobody uses), the ISN (RFC 6528, the same function
 * software calls), the CCB from software's SYN-SENT template (FastPath.push_new),
 * the SYN, the socket's addresses and state in its header, and the answer
 * (-EINPROGRESS) on the channel.  Software learns of it from an FP_EV_CONNECT
 * record (TcpStack.units_connected), in order with everything else.  Anything
 * else (another op, descriptors, a socket software has touched, another
 * channel's socket, an unknown or stale neighbour, no free port, a full table)
 * stays where it is, and the channel's readiness goes to software, which reads
 * the command as before.
 *
 * What software tells the unit (and takes back before it acts itself):
 *   channels   fd -> a generation number, once the channel's peer is known
 *              and allowed (0: not the unit's; a new channel on the same fd
 *              has another number, so a socket registered by a channel that
 *              went cannot be named through its successor);
 *   sockets    by B descriptor: id, registering channel (fd, generation),
 *              the mapping and ring sizes, the owner; removed (fp_hc_unsock)
 *              before software handles any command of the socket or closes B;
 *   ports      a use count per local port: bound sockets and connections
 *              (software's table; TIME-WAIT records count themselves).  The
 *              unit takes only ports whose count is 0, so no 4-tuple check is
 *              needed; it counts its own socket's bind and connection (+2);
 *   neighbours ip -> MAC and the time until which software's ARP cache
 *              holds it (software calls fp_hc_neighbour at every learn).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "fp.h"

#define HC_NEIGH 256           /* neighbour copy (open addressing, a power of two) */
#define HC_ID_BUCKETS 16384    /* socket id hash */
#define HC_PROBES 64           /* ports tried before the CONNECT goes to software */
#define HC_MAX_FD (1u << 22)   /* descriptors past this are left to software */
#define ISN_TICKS_PER_S 250000.0

struct hc_sock {               /* a fresh socket, at index = its B descriptor */
    uint32_t sock_id;          /* 0: none */
    int32_t chan_fd;
    uint32_t chan_gen;
    uint32_t tx_size;
    uint32_t rx_size;
    uint32_t uid;
    int32_t hnext;             /* id hash chain (B descriptors) */
    uint32_t pad;
    uint64_t shm_addr;
};

struct hc_neigh {
    uint32_t ip;               /* 0: empty */
    uint8_t mac[8];
    double until;
};

struct fp_hc {
    uint32_t net, mask, bcast, our_mss, eph_lo, eph_hi;
    struct fp_ids *ids;        /* software's (TcpStack.ids) */
    struct fp_ccb tmpl;
    uint32_t *ports;           /* software's (TcpStack.port_users): a use count per local port */
    uint32_t *chans;
    uint32_t chans_len;
    uint32_t socks_len;
    struct hc_sock *socks;
    int32_t id_hash[HC_ID_BUCKETS];
    struct hc_neigh neigh[HC_NEIGH];
    struct fp_hc_conn *conns;
    uint32_t nconns;
    uint32_t nowed;            /* records whose answer waits for the pass's end (fp_hc_settle) */
    struct fp_hc_counters counters;
};

/* ---- SipHash-2-4 (the ISN's F and the port offset, as Linux's secure_seq.c) ---- */

static uint64_t isn_key[2];

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                   \
    do {                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                  \
    } while (0)

/* SipHash-2-4 of the 16 bytes m0, m1 (little-endian words) */
static uint64_t siphash16(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ull, v1 = k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ull, v3 = k1 ^ 0x7465646279746573ull;
    uint64_t m[3] = {m0, m1, (uint64_t)16 << 56};
    for (int i = 0; i < 3; i++) {
        v3 ^= m[i];
        SIPROUND;
        SIPROUND;
        v0 ^= m[i];
    }
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

void fp_isn_key(const uint8_t *key)
{
    memcpy(isn_key, key, sizeof(isn_key));
}

/* RFC 6528: M (a 4 us clock) + F(4-tuple, secret) */
uint32_t fp_isn(uint32_t local_ip, uint32_t local_port, uint32_t remote_ip, uint32_t remote_port, double now)
{
    uint64_t f = siphash16(isn_key[0], isn_key[1], (uint64_t)local_ip << 32 | remote_ip,
                           (uint64_t)(local_port & 0xffff) << 16 | (remote_port & 0xffff));
    return (uint32_t)(uint64_t)(now * ISN_TICKS_PER_S) + (uint32_t)f;
}

/* RFC 6056 algorithm 3: where the search for a port to remote_ip:remote_port starts */
uint32_t fp_eph_start(const struct fp_ids *ids, uint32_t remote_ip, uint32_t remote_port)
{
    uint64_t f = siphash16(ids->eph_secret, ids->eph_secret ^ 0x9e3779b97f4a7c15ull, remote_ip, remote_port);
    return (uint32_t)f + ids->eph_next;
}

/* ---- what software tells the unit ---- */

int fp_hc_setup(struct fp_state *st, uint32_t prefix_len, uint32_t our_mss, uint32_t eph_lo, uint32_t eph_hi,
                struct fp_ids *ids, uint32_t *ports, const struct fp_ccb *tmpl)
{
    if (st->hc || prefix_len > 32 || !eph_lo || eph_hi < eph_lo || eph_hi > 65535 || !our_mss || !ids || !ports)
        return -EINVAL;
    struct fp_hc *hc = calloc(1, sizeof(*hc));
    if (!hc)
        return -ENOMEM;
    hc->conns = calloc(FP_MAX_EVENTS, sizeof(struct fp_hc_conn));
    if (!hc->conns) {
        free(hc);
        return -ENOMEM;
    }
    hc->mask = prefix_len ? 0xffffffffu << (32 - prefix_len) : 0;
    hc->net = st->my_ip & hc->mask;
    hc->bcast = hc->net | ~hc->mask;
    hc->our_mss = our_mss;
    hc->eph_lo = eph_lo;
    hc->eph_hi = eph_hi;
    hc->ids = ids;
    hc->ports = ports;
    hc->tmpl = *tmpl;
    memset(hc->id_hash, 0xff, sizeof(hc->id_hash));
    st->hc = hc;
    return 0;
}

void fp_hc_free(struct fp_state *st)
{
    struct fp_hc *hc = st->hc;
    if (!hc)
        return;
    free(hc->chans);
    free(hc->socks);
    free(hc->conns);
    free(hc);
    st->hc = NULL;
}

struct fp_hc_conn *fp_hc_conns(struct fp_state *st)
{
    return st->hc ? ((struct fp_hc *)st->hc)->conns : NULL;
}

void fp_hc_counters(struct fp_state *st, struct fp_hc_counters *out)
{
    if (st->hc)
        *out = ((struct fp_hc *)st->hc)->counters;
    else
        memset(out, 0, sizeof(*out));
}

void fp_hc_begin(struct fp_state *st)
{
    if (st->hc) {
        fp_hc_settle(st);                      /* (none is left over: the pass settled them) */
        ((struct fp_hc *)st->hc)->nconns = 0;
    }
}

static int answer(int fd, int32_t result)
{
    struct toe_rsp rsp;
    memset(&rsp, 0, sizeof(rsp));
    rsp.result = result;
    return send(fd, &rsp, sizeof(rsp), MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)sizeof(rsp) ? 0 : -1;
}

int fp_hc_owed(const struct fp_state *st)
{
    return st->hc ? (int)((const struct fp_hc *)st->hc)->nowed : 0;
}

/*
 * The pass's end: the answers of blocking connects.  0 when the handshake ended meanwhile
 * (the SYN|ACK of a peer on the TAP usually comes back while the SYN is written: the
 * connect then costs the application one wake-up, the answer, instead of two), else
 * -EINPROGRESS as for any connect (the shim then waits for A to become writable).
 */
void fp_hc_settle(struct fp_state *st)
{
    struct fp_hc *hc = st->hc;
    if (!hc || !hc->nowed)
        return;
    for (uint32_t i = 0; i < hc->nconns; i++) {
        struct fp_hc_conn *r = &hc->conns[i];
        if (r->owed < 0)
            continue;
        const struct fp_ccb *c = &st->ccbs[r->slot];
        int done = c->in_use && c->state == FP_ST_ESTABLISHED && c->local_port == r->local_port &&
                   c->remote_ip == r->remote_ip && c->remote_port == r->remote_port;
        if (answer(r->owed, done ? 0 : -EINPROGRESS) < 0) {
            r->lost = 1;                       /* a channel that does not take its answers goes */
            hc->counters.lost_answers++;
        } else if (done) {
            hc->counters.completed++;
        }
        r->owed = -1;
    }
    hc->nowed = 0;
}

void fp_hc_port(struct fp_state *st, uint32_t port, int delta)
{
    struct fp_hc *hc = st->hc;
    if (!hc || port > 65535)
        return;
    if (delta > 0)
        hc->ports[port] += (uint32_t)delta;
    else
        hc->ports[port] = hc->ports[port] >= (uint32_t)-delta ? hc->ports[port] + (uint32_t)delta : 0;
}

/* grow an array indexed by descriptor to hold index i (new entries zero) */
static int grow(void **arr, uint32_t *len, uint32_t i, size_t elem)
{
    if (i < *len)
        return 0;
    if (i >= HC_MAX_FD)
        return -EINVAL;
    uint32_t n = *len ? *len : 64;
    while (n <= i)
        n *= 2;
    uint8_t *a = realloc(*arr, n * elem);
    if (!a)
        return -ENOMEM;
    memset(a + (size_t)*len * elem, 0, (size_t)(n - *len) * elem);
    *arr = a;
    *len = n;
    return 0;
}

int fp_hc_channel(struct fp_state *st, int fd, uint32_t gen)
{
    struct fp_hc *hc = st->hc;
    if (!hc || fd < 0)
        return -EINVAL;
    if (!gen && (uint32_t)fd >= hc->chans_len)
        return 0;
    int r = grow((void **)&hc->chans, &hc->chans_len, (uint32_t)fd, sizeof(uint32_t));
    if (r == 0)
        hc->chans[fd] = gen;
    return r;
}

static uint32_t id_bucket(uint32_t id)
{
    return (id * 0x9e3779b1u) >> 18;          /* HC_ID_BUCKETS = 2^14 */
}

int fp_hc_sock(struct fp_state *st, uint32_t sock_id, int b_fd, int chan_fd, uint64_t shm_addr,
               uint32_t tx_size, uint32_t rx_size, uint32_t uid)
{
    struct fp_hc *hc = st->hc;
    if (!hc || !sock_id || b_fd < 0 || chan_fd < 0 || (uint32_t)chan_fd >= hc->chans_len ||
        !hc->chans[chan_fd] || !shm_addr || !tx_size || (tx_size & (tx_size - 1)) || !rx_size)
        return -EINVAL;
    int r = grow((void **)&hc->socks, &hc->socks_len, (uint32_t)b_fd, sizeof(struct hc_sock));
    if (r)
        return r;
    fp_hc_unsock(st, b_fd);
    struct hc_sock *s = &hc->socks[b_fd];
    s->sock_id = sock_id;
    s->chan_fd = chan_fd;
    s->chan_gen = hc->chans[chan_fd];
    s->shm_addr = shm_addr;
    s->tx_size = tx_size;
    s->rx_size = rx_size;
    s->uid = uid;
    int32_t *h = &hc->id_hash[id_bucket(sock_id)];
    s->hnext = *h;
    *h = b_fd;
    return 0;
}

void fp_hc_unsock(struct fp_state *st, int b_fd)
{
    struct fp_hc *hc = st->hc;
    if (!hc || b_fd < 0 || (uint32_t)b_fd >= hc->socks_len || !hc->socks[b_fd].sock_id)
        return;
    struct hc_sock *s = &hc->socks[b_fd];
    int32_t *p = &hc->id_hash[id_bucket(s->sock_id)];
    while (*p >= 0 && *p != b_fd)
        p = &hc->socks[*p].hnext;
    if (*p == b_fd)
        *p = s->hnext;
    s->sock_id = 0;
}

static int find_sock(struct fp_hc *hc, uint32_t sock_id)
{
    if (!sock_id)
        return -1;
    for (int32_t i = hc->id_hash[id_bucket(sock_id)]; i >= 0; i = hc->socks[i].hnext)
        if (hc->socks[i].sock_id == sock_id)
            return i;
    return -1;
}

static uint32_t neigh_at(uint32_t ip)
{
    return (ip * 0x9e3779b1u) >> 24;          /* HC_NEIGH = 2^8 */
}

int fp_hc_neighbour(struct fp_state *st, uint32_t ip, const uint8_t *mac, double until)
{
    struct fp_hc *hc = st->hc;
    if (!hc || !ip)
        return -EINVAL;
    uint32_t at = neigh_at(ip), oldest = at;
    for (uint32_t k = 0; k < HC_NEIGH; k++) {
        uint32_t i = (at + k) & (HC_NEIGH - 1);
        struct hc_neigh *n = &hc->neigh[i];
        if (n->ip == ip || n->ip == 0) {
            oldest = i;
            break;
        }
        if (n->until < hc->neigh[oldest].until)
            oldest = i;
    }
    struct hc_neigh *n = &hc->neigh[oldest];   /* full: the one that goes stale first gives way */
    n->ip = ip;
    memcpy(n->mac, mac, 6);
    n->until = until;
    return 0;
}

static const struct hc_neigh *neighbour(struct fp_hc *hc, uint32_t ip, double now)
{
    uint32_t at = neigh_at(ip);
    for (uint32_t k = 0; k < HC_NEIGH; k++) {
        const struct hc_neigh *n = &hc->neigh[(at + k) & (HC_NEIGH - 1)];
        if (n->ip == ip)
            return n->until >= now ? n : NULL;  /* software's ArpTable.lookup */
        if (n->ip == 0)
            return NULL;
    }
    return NULL;
}

/* a port nobody uses, by algorithm 3 from fp_eph_start; 0: none within HC_PROBES */
static uint32_t free_port(struct fp_hc *hc, uint32_t rip, uint32_t rport, uint32_t *tried)
{
    uint32_t n = hc->eph_hi - hc->eph_lo + 1, start = fp_eph_start(hc->ids, rip, rport);
    for (uint32_t i = 0; i < HC_PROBES && i < n; i++) {
        uint32_t p = hc->eph_lo + (uint32_t)(((uint64_t)start + i) % n);
        if (hc->ports[p] == 0) {
            *tried = i + 1;
            return p;
        }
    }
    return 0;
}

/* ---- the command ---- */

/* The CCB software's push_new makes for this connect(), pushed: its slot, or -errno */
static int push_syn_sent(struct fp_state *st, struct fp_hc *hc, const struct hc_sock *s, const uint8_t *mac,
                         uint32_t lport, uint32_t rip, uint32_t rport, uint32_t iss, uint32_t mss)
{
    struct fp_ccb f;
    memcpy(&f, &hc->tmpl, sizeof(f));
    f.conn_id = hc->ids->conn_id + 1;
    f.uid = s->uid;
    f.local_ip = st->my_ip;
    f.remote_ip = rip;
    f.local_port = lport;
    f.remote_port = rport;
    memcpy(f.peer_mac, mac, 6);
    f.b_fd = (int32_t)(s - hc->socks);
    f.tx_size = s->tx_size;
    f.rx_size = s->rx_size;
    f.shm_addr = s->shm_addr;
    f.mss = f.adv_mss = mss;
    f.max_seg = st->offloads && st->max_payload >= mss ? st->max_payload / mss * mss : mss;
    f.snd_una = f.snd_sml = iss;
    f.snd_nxt = f.snd_max = f.rtt_seq = iss + 1;
    f.rtt_time = f.last_rx = st->now;          /* the SYN's RTT sample (Karn: first send), its RTO */
    return fp_push(st, &f);
}

/*
 * An epoll event no CCB took: 1 when it is the command unit's (nothing for software),
 * 0 when it is software's.  A fresh socket's B: readable is the shim stuffing A (an
 * unconnected socket is not writable; software would do nothing), a hang-up makes the
 * socket software's.  A channel: the command waiting there, answered here if it is a
 * CONNECT the unit can make (else it stays for software to read).
 */
int fp_hc_event(struct fp_state *st, int fd, uint32_t ev, double now)
{
    struct fp_hc *hc = st->hc;
    if (!hc || fd < 0)
        return 0;
    if ((uint32_t)fd < hc->socks_len && hc->socks[fd].sock_id) {
        if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
            fp_hc_unsock(st, fd);              /* the application closed it (or died) */
            return 0;
        }
        hc->counters.fresh_stuffed++;
        return 1;
    }
    if ((uint32_t)fd >= hc->chans_len || !hc->chans[fd] || st->proc ||
        (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) || !(ev & EPOLLIN))
        return 0;
    struct toe_cmd cmd;
    struct iovec iov = {.iov_base = &cmd, .iov_len = sizeof(cmd)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    /* without a control buffer a peek installs no descriptor (MSG_CTRUNC says there were) */
    ssize_t n = recvmsg(fd, &mh, MSG_PEEK | MSG_DONTWAIT);
    hc->counters.looked++;
    if (n != (ssize_t)sizeof(cmd) || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || cmd.op != TOE_OP_CONNECT) {
        hc->counters.passed++;
        return 0;
    }
    int b = find_sock(hc, cmd.sock_id);
    if (b < 0 || hc->socks[b].chan_fd != fd || hc->socks[b].chan_gen != hc->chans[fd]) {
        hc->counters.not_fresh++;
        return 0;
    }
    const struct hc_sock *s = &hc->socks[b];
    uint32_t rip = ntohl(cmd.addr_be32), rport = ntohs(cmd.port_be16);
    const struct hc_neigh *nb = NULL;
    if (rport && rip != st->my_ip && (rip & hc->mask) == hc->net && rip != hc->net && rip != hc->bcast)
        nb = neighbour(hc, rip, now);
    if (!nb) {
        hc->counters.no_neighbour++;
        return 0;
    }
    if (st->nfree == 0 || st->nevents + 8 >= FP_MAX_EVENTS || hc->nconns >= FP_MAX_EVENTS) {
        hc->counters.no_room++;
        return 0;
    }
    uint32_t tried = 0, lport = free_port(hc, rip, rport, &tried);
    if (!lport) {
        hc->counters.no_port++;
        return 0;
    }
    struct toe_sock_shm *shm = (struct toe_sock_shm *)(uintptr_t)s->shm_addr;
    uint32_t user = __atomic_load_n(&shm->user_mss, __ATOMIC_RELAXED);   /* TCP_MAXSEG (_adv_mss) */
    uint32_t mss = user ? (user < 88 ? 88 : user) : hc->our_mss;
    if (mss > hc->our_mss)
        mss = hc->our_mss;
    uint32_t iss = fp_isn(st->my_ip, lport, rip, rport, now);
    st->now = now;                             /* (the wait's clock: fp_poll's caller passes it on) */
    int slot = push_syn_sent(st, hc, s, nb->mac, lport, rip, rport, iss, mss);
    if (slot < 0) {
        hc->counters.no_room++;
        return 0;                              /* software's connect() meets the same */
    }
    hc->ids->conn_id++;
    hc->ids->eph_next += tried;
    hc->ports[lport] += 2;                     /* the socket's bind and the connection */
    shm->local_addr_be32 = htonl(st->my_ip);
    shm->local_port_be16 = htons((uint16_t)lport);
    shm->remote_addr_be32 = cmd.addr_be32;
    shm->remote_port_be16 = cmd.port_be16;
    __atomic_store_n(&shm->state, TOE_SS_CONNECTING, __ATOMIC_RELEASE);

    struct fp_hc_conn *r = &hc->conns[hc->nconns];
    memset(r, 0, sizeof(*r));
    r->b_fd = b;
    r->slot = slot;
    r->sock_id = cmd.sock_id;
    r->conn_id = hc->ids->conn_id;
    r->remote_ip = rip;
    r->local_port = lport;
    r->remote_port = rport;
    r->iss = iss;
    r->adv_mss = mss;
    memcpy(r->peer_mac, nb->mac, 6);
    r->now = now;
    r->owed = -1;
    fp_hc_unsock(st, b);                       /* used: software's from its record on */

    int wait = (cmd.arg1 & TOE_CONNECT_WAIT) != 0;
    if (recv(fd, &cmd, sizeof(cmd), MSG_DONTWAIT) != (ssize_t)sizeof(cmd) ||
        (!wait && answer(fd, -EINPROGRESS) < 0)) {
        r->lost = 1;                           /* a channel that does not take its answers goes */
        hc->counters.lost_answers++;
    } else if (wait) {
        r->owed = fd;                          /* answered at the pass's end (fp_hc_settle) */
        hc->nowed++;
    }
    struct fp_event *e = fp_event_new(st, FP_EV_CONNECT);
    e->fd = b;
    e->slot = slot;
    e->buf = hc->nconns++;
    hc->counters.connects++;
    return 1;
}
