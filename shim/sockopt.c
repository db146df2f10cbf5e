/*
 * sockopt.c - socket options: setsockopt/getsockopt.
 *
 * One table (opt_rows[], "the option table" below) says for every option the
 * shim knows how its value is read and checked, where it is kept, how
 * getsockopt answers and whether the adapter is told; the code under it only
 * follows the rows.  The answers are the kernel's, byte for byte (errors,
 * normalised values, lengths): tests/shim/sockopts.py compares them with
 * kernel sockets.  An option without a row is accepted and recorded: never
 * break the program.
 *
 * Thread safety: the header's fields are written atomically, the recorded
 * list under opt_lock; no lock is held across a call to the adapter.
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

/* ---------------- helpers ---------------- */

/* Copy an option value out like the kernel: truncated to *len, *len set to
 * what was copied. */
static int opt_out(void *val, socklen_t *len, const void *v, size_t vlen)
{
    if (!len)
        return fail(EFAULT);
    int l = (int)*len;
    if (l < 0)
        return fail(EINVAL);
    size_t n = (size_t)l < vlen ? (size_t)l : vlen;
    if (n && !val)
        return fail(EFAULT);
    memcpy(val, v, n);
    *len = (socklen_t)n;
    return 0;
}

static int opt_int(void *val, socklen_t *len, int v)
{
    return opt_out(val, len, &v, sizeof(v));
}

static void record_opt(struct toe_sock *s, int level, int name, const void *val, socklen_t len)
{
    if (len > TOE_OPT_VAL_MAX || (len && !val)) {
        TOE_DBG("setsockopt %d/%d: %u bytes, not recorded for handover", level, name, len);
        return;
    }
    pthread_mutex_lock(&s->opt_lock);
    unsigned i;
    for (i = 0; i < s->nopts; i++)
        if (s->opts[i].level == level && s->opts[i].name == name)
            break;
    if (i == s->nopts) {
        if (s->nopts == TOE_MAX_OPTS) {
            pthread_mutex_unlock(&s->opt_lock);
            TOE_DBG("setsockopt %d/%d: replay list full", level, name);
            return;
        }
        s->nopts++;
    }
    s->opts[i].level = level;
    s->opts[i].name = name;
    s->opts[i].len = len;
    if (len)
        memcpy(s->opts[i].val, val, len);
    pthread_mutex_unlock(&s->opt_lock);
}

/* The option is in the header already; the daemon hears of it only if it has a connection
 * to act on now.  Before connect (and on a listener) it reads the header when it needs
 * the option (keepalive armed at establishment, NODELAY at each send, linger at close),
 * so a setsockopt there costs no round trip: a connection's set-up pays one, CONNECT. */
static void notify_opt(struct toe_sock *s, int level, int name, const void *val, socklen_t len)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    uint32_t st = state_of(s);
    if (st == TOE_SS_NEW || st == TOE_SS_BOUND || st == TOE_SS_LISTEN)
        return;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_SETSOCKOPT;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = level;
    cmd.arg1 = name;
    cmd.optlen = (uint16_t)(len < TOE_OPT_BYTES ? len : TOE_OPT_BYTES);
    memcpy(cmd.opt, val, cmd.optlen);
    toe_ctl_call(&cmd, NULL, 0, &rsp); /* the option is recorded either way */
}

/* SO_SNDBUF or TCP_NOTSENT_LOWAT changed: A's writability follows at once.
 * Unwritable now: stuff A; writable: the daemon drains a stuffed A (told). */
static void tx_limits_changed(struct toe_sock *s, int fd, int level, int name, const void *val,
                              socklen_t len)
{
    if (state_of(s) != TOE_SS_CONNECTED)
        return; /* not writable before connect; the connect's completion drains A */
    pthread_mutex_lock(&s->tx_lock);
    tx_settle(s, fd);
    pthread_mutex_unlock(&s->tx_lock);
    notify_opt(s, level, name, val, len);
}

static void set_flag(struct toe_sock *s, uint32_t bit, int on)
{
    if (on)
        __atomic_or_fetch(&s->shm->opt_flags, bit, __ATOMIC_SEQ_CST);
    else
        __atomic_and_fetch(&s->shm->opt_flags, ~bit, __ATOMIC_SEQ_CST);
}

static int has_flag(struct toe_sock *s, uint32_t bit)
{
    return (LOAD(&s->shm->opt_flags) & bit) != 0;
}

/* The int an option value carries, read like the kernel: IPPROTO_IP takes an
 * int, a single byte, or nothing (0); the other levels need an int. */
static int opt_parse_int(int level, const void *val, socklen_t len, int *v)
{
    if (len >= sizeof(int)) {
        memcpy(v, val, sizeof(int));
        return 0;
    }
    if (level == IPPROTO_IP) {
        *v = len >= 1 ? *(const unsigned char *)val : 0;
        return 0;
    }
    return fail(EINVAL);
}

/* The recorded value of (level, name), or 0 when the application set none. */
static int find_opt(struct toe_sock *s, int level, int name, struct toe_opt *o)
{
    int found = 0;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        if (s->opts[i].level == level && s->opts[i].name == name) {
            *o = s->opts[i];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&s->opt_lock);
    return found;
}

/* An int option value out with the level's length rule: IPPROTO_IP answers a
 * single byte to a short buffer when the value fits; the others truncate. */
static int opt_int_level(int level, void *val, socklen_t *len, int v)
{
    if (level == IPPROTO_IP && *len > 0 && *len < sizeof(int) && v >= 0 && v <= 255) {
        unsigned char c = (unsigned char)v;
        return opt_out(val, len, &c, 1);
    }
    return opt_int(val, len, v);
}

#define TOE_CA_NAME_MAX 16

/* TCP_CONGESTION: a name the kernel knows (tcp_available_congestion_control). */
static int set_congestion(struct toe_sock *s, const void *val, socklen_t len)
{
    char name[TOE_CA_NAME_MAX], avail[512];
    if (len < 1)
        return fail(EINVAL);
    size_t n = len < TOE_CA_NAME_MAX - 1 ? len : TOE_CA_NAME_MAX - 1;
    memcpy(name, val, n);
    name[n] = 0;
    n = strlen(name);
    int fd = open("/proc/sys/net/ipv4/tcp_available_congestion_control", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t r = toe_real_read(fd, avail, sizeof(avail) - 1);
        toe_real_close(fd);
        int ok = 0;
        if (r > 0) {
            avail[r] = 0;
            char *save, *w = strtok_r(avail, " \t\n", &save);
            for (; w; w = strtok_r(NULL, " \t\n", &save))
                if (strcmp(w, name) == 0)
                    ok = 1;
        }
        if (!ok && r > 0)
            return fail(ENOENT);
    }
    record_opt(s, IPPROTO_TCP, TCP_CONGESTION, name, (socklen_t)n);
    return 0;
}

/* The kernel's TCP state numbers (tcpi_state). */
static uint8_t tcpi_state_of(struct toe_sock *s)
{
    uint32_t fl = flags_of(s);
    switch (state_of(s)) {
    case TOE_SS_LISTEN:
        return TCP_LISTEN;
    case TOE_SS_CONNECTING:
        return TCP_SYN_SENT;
    case TOE_SS_CONNECTED:
        if ((fl & TOE_SF_TX_SHUT) && (fl & TOE_SF_RX_EOF))
            return TCP_LAST_ACK;
        if (fl & TOE_SF_TX_SHUT)
            return TCP_FIN_WAIT1;
        if (fl & TOE_SF_RX_EOF)
            return TCP_CLOSE_WAIT;
        return TCP_ESTABLISHED;
    default:
        return TCP_CLOSE;
    }
}

/* ---------------- the option table ---------------- */

/*
 * One row per (level, name) the shim knows.  A row says
 *   set    how setsockopt reads the value          SET_*
 *   check  the kernel's set-time test of that int  CK_* (lo..hi)
 *   store  where the value lives                   ST_* (bit, field)
 *   get    how getsockopt answers                  GT_* (norm, dflt, sysctl)
 *   flags  OPT_* (tell the adapter, length rules ...)
 * Every value setsockopt accepts is also recorded (record_opt) and replayed
 * on a kernel socket at handover; an option without a row is accepted,
 * recorded and answered from the record (else ENOPROTOOPT / EOPNOTSUPP).
 */
enum opt_set {
    SET_RAW,    /* anything: recorded as given */
    SET_INT,    /* an int; IPPROTO_IP also a byte or nothing (opt_parse_int) */
    SET_LINGER, /* a struct linger */
    SET_ON_A,   /* set on A too: the kernel applies it to our waits (SO_*TIMEO) */
    SET_CA,     /* a congestion control name the kernel knows */
    SET_RDONLY, /* ENOPROTOOPT */
};

enum opt_check {
    CK_NONE,
    CK_RANGE,       /* lo <= v <= hi, else EINVAL */
    CK_RANGE_OR_0,  /* 0 or lo..hi */
    CK_RANGE_OR_M1, /* -1 or lo..hi */
    CK_CAP,         /* CAP_NET_ADMIN / CAP_NET_RAW, else EPERM */
    CK_CAP_OUTSIDE, /* outside lo..hi needs the capability */
    CK_CAP_NONZERO, /* a nonzero value needs the capability */
    CK_NEVER,       /* not changeable on Linux: ENOPROTOOPT */
    CK_FASTOPEN,    /* v >= 0, socket closed or listening */
    CK_FO_CONNECT,  /* 0..1, socket closed */
    CK_WCLAMP,      /* 0 only on a closed socket */
};

enum opt_store {
    ST_REC,    /* only in the recorded-options list */
    ST_FLAG,   /* opt_flags bit `bit` (v != 0) */
    ST_U32,    /* the header's uint32_t at `field` */
    ST_BUF,    /* the header's uint32_t at `field`: doubled, within sysctl, at least lo */
    ST_LINGER, /* linger_s and TOE_OF_LINGER */
};

enum opt_get {
    GT_REC,       /* the recorded value; else dflt (OPT_DFLT), empty (OPT_EMPTY), ENOPROTOOPT */
    GT_KNOWN,     /* the recorded int normalised (norm); else the default (dflt / sysctl) */
    GT_A,         /* A's own (SO_*TIMEO, SO_COOKIE) */
    GT_CONST,     /* dflt */
    GT_FLAG,      /* opt_flags bit `bit` */
    GT_U32,       /* the header's uint32_t at `field`; 0 reads as dflt */
    GT_ERROR,     /* SO_ERROR, taken */
    GT_ACCEPTCONN,
    GT_PEERCRED,
    GT_LINGER,
    GT_MAXSEG,
    GT_INFO,
    GT_CA,
};

/* GT_KNOWN: the recorded value as the kernel keeps it */
enum opt_norm {
    NV_INT,
    NV_BOOL,     /* v != 0 */
    NV_RCVLOWAT, /* tcp_set_rcvlowat()'s caps */
    NV_LINGER2,  /* -1, the sysctl for 0, at most TCP_FIN_TIMEOUT_MAX */
    NV_DEFER,    /* seconds -> SYN-ACK retransmissions -> seconds */
    NV_WCLAMP,   /* at least SOCK_MIN_RCVBUF / 2 */
    NV_FASTOPEN, /* at most somaxconn */
    NV_TOS,      /* without the ECN bits */
    NV_TTL,      /* -1: the sysctl */
};

#define OPT_NOTIFY 1    /* tell the adapter (SETSOCKOPT): it has timers to arm (keepalive) */
#define OPT_TX_LIMIT 2  /* A's writability follows: tx_limits_changed (tells the adapter) */
#define OPT_REC_INT 4   /* record at most an int of the value */
#define OPT_LEN1 8      /* at least one byte, else EINVAL (after the check) */
#define OPT_FORCE 16    /* ST_BUF: past the sysctl's ceiling (SO_*BUFFORCE) */
#define OPT_PASSCRED 32 /* EOPNOTSUPP where Linux refuses SO_PASSCRED on TCP (6.16) */
#define OPT_DFLT 64     /* GT_REC: dflt when nothing is recorded */
#define OPT_EMPTY 128   /* GT_REC: an empty value when nothing is recorded */
#define OPT_KICK 256    /* a connected socket's next send reads it: a doorbell (kick) is enough */

struct opt_row {
    int level, name;
    uint8_t set, check, store, get, norm;
    uint16_t flags;
    int lo, hi;          /* CK_*; ST_BUF: lo is the floor */
    uint32_t bit;        /* ST_FLAG, GT_FLAG: TOE_OF_* */
    uint16_t field;      /* ST_U32, ST_BUF, GT_U32: offsetof(struct toe_sock_shm, ...) */
    int dflt;            /* getsockopt's answer when nothing is set */
    const char *sysctl;  /* GT_KNOWN: the default's sysctl; ST_BUF: the ceiling's */
    uint32_t *cache;     /* the sysctl's value, read once */
};

static uint32_t c_wmem_max, c_rmem_max, c_syn_retries, c_fin_timeout, c_ttl;

#define SYS_WMEM_MAX "/proc/sys/net/core/wmem_max"
#define SYS_RMEM_MAX "/proc/sys/net/core/rmem_max"
#define SYS_SYN_RETRIES "/proc/sys/net/ipv4/tcp_syn_retries"
#define SYS_FIN_TIMEOUT "/proc/sys/net/ipv4/tcp_fin_timeout"
#define SYS_TTL "/proc/sys/net/ipv4/ip_default_ttl"
#define FIELD(f) .field = offsetof(struct toe_sock_shm, f)

/* Rows of the kinds most options are. */
#define KNOWN(l, n, nv, ck, lo_, hi_, fl, d)                                                    \
    {.level = l, .name = n, .set = SET_INT, .check = ck, .store = ST_REC, .get = GT_KNOWN,    \
     .norm = nv, .flags = OPT_REC_INT | (fl), .lo = lo_, .hi = hi_, .dflt = d}
#define KINT(l, n) KNOWN(l, n, NV_INT, CK_NONE, 0, 0, 0, 0)
#define KBOOL(l, n) KNOWN(l, n, NV_BOOL, CK_NONE, 0, 0, 0, 0)
#define KSYSCTL(l, n, nv, ck, lo_, hi_, fl, d, path, c)                                         \
    {.level = l, .name = n, .set = SET_INT, .check = ck, .store = ST_REC, .get = GT_KNOWN,    \
     .norm = nv, .flags = OPT_REC_INT | (fl), .lo = lo_, .hi = hi_, .dflt = d,                \
     .sysctl = path, .cache = c}
#define OFLAG(l, n, b, fl)                                                                      \
    {.level = l, .name = n, .set = SET_INT, .store = ST_FLAG, .get = GT_FLAG, .bit = b,       \
     .flags = fl}
#define OU32(l, n, f, ck, lo_, hi_, fl, d)                                                      \
    {.level = l, .name = n, .set = SET_INT, .check = ck, .store = ST_U32, .get = GT_U32,      \
     FIELD(f), .lo = lo_, .hi = hi_, .flags = fl, .dflt = d}
#define OBUF(n, f, fl, floor, get_, path, c)                                                    \
    {.level = SOL_SOCKET, .name = n, .set = SET_INT, .store = ST_BUF, .get = get_, FIELD(f),  \
     .flags = fl, .lo = floor, .sysctl = path, .cache = c}
#define OGET(l, n, g, d) {.level = l, .name = n, .set = SET_RDONLY, .get = g, .dflt = d}
#define OREC(l, n, fl, d)                                                                       \
    {.level = l, .name = n, .set = SET_RAW, .get = GT_REC, .flags = fl, .dflt = d}
#define OSPECIAL(l, n, s_, st, g, fl)                                                           \
    {.level = l, .name = n, .set = s_, .store = st, .get = g, .flags = fl}

static const struct opt_row opt_rows[] = {
    /* SOL_SOCKET: on A */
    OSPECIAL(SOL_SOCKET, SO_RCVTIMEO, SET_ON_A, ST_REC, GT_A, 0),
    OSPECIAL(SOL_SOCKET, SO_SNDTIMEO, SET_ON_A, ST_REC, GT_A, 0),
#ifdef SO_RCVTIMEO_NEW
    OSPECIAL(SOL_SOCKET, SO_RCVTIMEO_NEW, SET_ON_A, ST_REC, GT_A, 0),
    OSPECIAL(SOL_SOCKET, SO_SNDTIMEO_NEW, SET_ON_A, ST_REC, GT_A, 0),
#endif
    OSPECIAL(SOL_SOCKET, SO_COOKIE, SET_RAW, ST_REC, GT_A, 0), /* unique for the socket's life */
    /* SOL_SOCKET: read only */
    OGET(SOL_SOCKET, SO_ERROR, GT_ERROR, 0),
    OGET(SOL_SOCKET, SO_TYPE, GT_CONST, SOCK_STREAM),
    OGET(SOL_SOCKET, SO_DOMAIN, GT_CONST, AF_INET),
    OGET(SOL_SOCKET, SO_PROTOCOL, GT_CONST, IPPROTO_TCP),
    OGET(SOL_SOCKET, SO_ACCEPTCONN, GT_ACCEPTCONN, 0),
    OSPECIAL(SOL_SOCKET, SO_PEERCRED, SET_RAW, ST_REC, GT_PEERCRED, 0), /* none: pid 0, ids -1 */
    /* SOL_SOCKET: modelled (the header, the adapter) */
    OBUF(SO_SNDBUF, sndbuf, OPT_TX_LIMIT, TOE_MIN_SNDBUF, GT_U32, SYS_WMEM_MAX, &c_wmem_max),
    OBUF(SO_SNDBUFFORCE, sndbuf, OPT_TX_LIMIT | OPT_FORCE, TOE_MIN_SNDBUF, GT_REC, SYS_WMEM_MAX,
         &c_wmem_max),
    OBUF(SO_RCVBUF, rcvbuf, 0, TOE_MIN_RCVBUF, GT_U32, SYS_RMEM_MAX, &c_rmem_max),
    OBUF(SO_RCVBUFFORCE, rcvbuf, OPT_FORCE, TOE_MIN_RCVBUF, GT_REC, SYS_RMEM_MAX, &c_rmem_max),
    OFLAG(SOL_SOCKET, SO_KEEPALIVE, TOE_OF_KEEPALIVE, OPT_NOTIFY),
    OFLAG(SOL_SOCKET, SO_REUSEADDR, TOE_OF_REUSEADDR, 0),
    OFLAG(SOL_SOCKET, SO_REUSEPORT, TOE_OF_REUSEPORT, 0),
    OSPECIAL(SOL_SOCKET, SO_LINGER, SET_LINGER, ST_LINGER, GT_LINGER, 0),   /* read at close */
    /* SOL_SOCKET: recorded, answered like the kernel */
    KBOOL(SOL_SOCKET, SO_DEBUG),
    KBOOL(SOL_SOCKET, SO_DONTROUTE),
    KBOOL(SOL_SOCKET, SO_BROADCAST),
    KBOOL(SOL_SOCKET, SO_OOBINLINE),
    KBOOL(SOL_SOCKET, SO_NO_CHECK),
    KBOOL(SOL_SOCKET, SO_TIMESTAMP),
    KBOOL(SOL_SOCKET, SO_TIMESTAMPNS),
    KBOOL(SOL_SOCKET, SO_RXQ_OVFL),
    KBOOL(SOL_SOCKET, SO_SELECT_ERR_QUEUE),
    KNOWN(SOL_SOCKET, SO_ZEROCOPY, NV_BOOL, CK_RANGE, 0, 1, 0, 0),
    KNOWN(SOL_SOCKET, SO_PRIORITY, NV_INT, CK_CAP_OUTSIDE, 0, 6, 0, 0),
    KNOWN(SOL_SOCKET, SO_MARK, NV_INT, CK_CAP, 0, 0, 0, 0),
    KNOWN(SOL_SOCKET, SO_RCVLOWAT, NV_RCVLOWAT, CK_NONE, 0, 0, 0, 1),
    KNOWN(SOL_SOCKET, SO_SNDLOWAT, NV_INT, CK_NEVER, 0, 0, 0, 1),
    KNOWN(SOL_SOCKET, SO_BUSY_POLL, NV_INT, CK_RANGE, 0, INT_MAX, 0, 0),
    KNOWN(SOL_SOCKET, SO_INCOMING_CPU, NV_INT, CK_NONE, 0, 0, 0, -1),
    /* SOL_SOCKET: recorded, with a default of their own */
    OREC(SOL_SOCKET, SO_PEEK_OFF, OPT_DFLT, -1),
    OREC(SOL_SOCKET, SO_PASSCRED, OPT_PASSCRED | OPT_DFLT, 0), /* 0: before Linux 6.16 */
    OREC(SOL_SOCKET, SO_BINDTODEVICE, OPT_EMPTY, 0),           /* no device: an empty name */
    /* IPPROTO_TCP: modelled */
    OFLAG(IPPROTO_TCP, TCP_NODELAY, TOE_OF_NODELAY, OPT_KICK),
    OFLAG(IPPROTO_TCP, TCP_CORK, TOE_OF_CORK, OPT_KICK),
    OU32(IPPROTO_TCP, TCP_KEEPIDLE, keepidle_s, CK_RANGE, 1, 32767, OPT_NOTIFY, 7200),
    OU32(IPPROTO_TCP, TCP_KEEPINTVL, keepintvl_s, CK_RANGE, 1, 32767, OPT_NOTIFY, 75),
    OU32(IPPROTO_TCP, TCP_KEEPCNT, keepcnt, CK_RANGE, 1, 127, OPT_NOTIFY, 9),
    {.level = IPPROTO_TCP, .name = TCP_MAXSEG, .set = SET_INT, .check = CK_RANGE_OR_0,
     .store = ST_U32, .get = GT_MAXSEG, FIELD(user_mss), .lo = TOE_MIN_MSS, .hi = 65535},
    OSPECIAL(IPPROTO_TCP, TCP_INFO, SET_RAW, ST_REC, GT_INFO, 0),
    OSPECIAL(IPPROTO_TCP, TCP_CONGESTION, SET_CA, ST_REC, GT_CA, 0),
    /* IPPROTO_TCP: recorded, answered like the kernel */
    KNOWN(IPPROTO_TCP, TCP_QUICKACK, NV_BOOL, CK_NONE, 0, 0, 0, 1),
    KNOWN(IPPROTO_TCP, TCP_USER_TIMEOUT, NV_INT, CK_RANGE, 0, INT_MAX, 0, 0),
    KSYSCTL(IPPROTO_TCP, TCP_SYNCNT, NV_INT, CK_RANGE, 1, 127, 0, 6, SYS_SYN_RETRIES,
            &c_syn_retries),
    KSYSCTL(IPPROTO_TCP, TCP_LINGER2, NV_LINGER2, CK_NONE, 0, 0, 0, 60, SYS_FIN_TIMEOUT,
            &c_fin_timeout),
    KNOWN(IPPROTO_TCP, TCP_DEFER_ACCEPT, NV_DEFER, CK_NONE, 0, 0, 0, 0),
    KNOWN(IPPROTO_TCP, TCP_WINDOW_CLAMP, NV_WCLAMP, CK_WCLAMP, 0, 0, 0, 0),
    /* tcp(7): unsent bytes above it make the socket unwritable; 0 (the default): no limit */
    {.level = IPPROTO_TCP, .name = TCP_NOTSENT_LOWAT, .set = SET_INT, .store = ST_U32,
     .get = GT_KNOWN, FIELD(notsent_lowat), .flags = OPT_REC_INT | OPT_TX_LIMIT},
    KNOWN(IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, NV_INT, CK_RANGE, 0, 1, 0, 0),
    KNOWN(IPPROTO_TCP, TCP_FASTOPEN, NV_FASTOPEN, CK_FASTOPEN, 0, 0, 0, 0),
    KNOWN(IPPROTO_TCP, TCP_FASTOPEN_CONNECT, NV_INT, CK_FO_CONNECT, 0, 1, 0, 0),
    KNOWN(IPPROTO_TCP, TCP_INQ, NV_INT, CK_RANGE, 0, 1, 0, 0),
    KINT(IPPROTO_TCP, TCP_TX_DELAY),
    /* IPPROTO_IP: recorded, answered like the kernel */
    KNOWN(IPPROTO_IP, IP_TOS, NV_TOS, CK_NONE, 0, 0, 0, 0),
    KSYSCTL(IPPROTO_IP, IP_TTL, NV_TTL, CK_RANGE_OR_M1, 1, 255, OPT_LEN1, 64, SYS_TTL, &c_ttl),
    KNOWN(IPPROTO_IP, IP_MINTTL, NV_INT, CK_RANGE, 0, 255, OPT_LEN1, 0),
    KNOWN(IPPROTO_IP, IP_MTU_DISCOVER, NV_INT, CK_RANGE, IP_PMTUDISC_DONT, IP_PMTUDISC_OMIT, 0,
          IP_PMTUDISC_WANT),
    KBOOL(IPPROTO_IP, IP_RECVERR),
    KBOOL(IPPROTO_IP, IP_RECVTOS),
    KBOOL(IPPROTO_IP, IP_RECVTTL),
    KBOOL(IPPROTO_IP, IP_PKTINFO),
    KBOOL(IPPROTO_IP, IP_RECVOPTS),
    KBOOL(IPPROTO_IP, IP_RETOPTS),
    KBOOL(IPPROTO_IP, IP_FREEBIND),
    KNOWN(IPPROTO_IP, IP_TRANSPARENT, NV_BOOL, CK_CAP_NONZERO, 0, 0, OPT_LEN1, 0),
    KBOOL(IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT),
    KBOOL(IPPROTO_IP, IP_PASSSEC),
    KBOOL(IPPROTO_IP, IP_RECVORIGDSTADDR),
    KNOWN(IPPROTO_IP, IP_MULTICAST_LOOP, NV_BOOL, CK_NONE, 0, 0, OPT_LEN1, 1),
    KNOWN(IPPROTO_IP, IP_MULTICAST_ALL, NV_BOOL, CK_RANGE, 0, 1, OPT_LEN1, 1),
    KNOWN(IPPROTO_IP, IP_RECVERR_RFC4884, NV_BOOL, CK_RANGE, 0, 1, 0, 0),
};

/* What the shim knows of an option without a row: accepted, recorded, answered from the record. */
static const struct opt_row opt_unknown = {.set = SET_RAW, .store = ST_REC, .get = GT_REC};

static const struct opt_row *opt_row_of(int level, int name)
{
    for (size_t i = 0; i < sizeof(opt_rows) / sizeof(opt_rows[0]); i++)
        if (opt_rows[i].level == level && opt_rows[i].name == name)
            return &opt_rows[i];
    return &opt_unknown;
}

static uint32_t *opt_field(struct toe_sock *s, const struct opt_row *r)
{
    return (uint32_t *)((char *)s->shm + r->field);
}

/* The row's default: its sysctl (read once), else dflt. */
static int opt_default(const struct opt_row *r)
{
    return r->sysctl ? (int)sysctl_u32(r->sysctl, r->cache, (uint32_t)r->dflt) : r->dflt;
}

/* ---------------- setsockopt ---------------- */

/* The kernel's set-time checks of an int value.  0, or -1 with errno. */
static int opt_check(struct toe_sock *s, const struct opt_row *r, int v, socklen_t len)
{
    uint32_t st = state_of(s);
    int closed = st == TOE_SS_NEW || st == TOE_SS_BOUND || st == TOE_SS_CLOSED; /* TCP_CLOSE */
    int in = v >= r->lo && v <= r->hi, e = 0;
    switch (r->check) {
    case CK_RANGE:
        e = in ? 0 : EINVAL;
        break;
    case CK_RANGE_OR_0:
        e = (v == 0 || in) ? 0 : EINVAL;
        break;
    case CK_RANGE_OR_M1:
        e = (v == -1 || in) ? 0 : EINVAL;
        break;
    case CK_CAP:
        e = net_capable() ? 0 : EPERM;
        break;
    case CK_CAP_OUTSIDE:
        e = (in || net_capable()) ? 0 : EPERM;
        break;
    case CK_CAP_NONZERO:
        e = (v && !net_capable()) ? EPERM : 0;
        break;
    case CK_NEVER:
        e = ENOPROTOOPT;
        break;
    case CK_FASTOPEN:
        e = (v >= 0 && (closed || st == TOE_SS_LISTEN)) ? 0 : EINVAL;
        break;
    case CK_FO_CONNECT:
        e = (in && closed) ? 0 : EINVAL;
        break;
    case CK_WCLAMP:
        e = (v == 0 && !closed) ? EINVAL : 0;
        break;
    default:
        break;
    }
    if (!e && (r->flags & OPT_LEN1) && len < 1)
        e = EINVAL;
    return e ? fail(e) : 0;
}

/* Read (and check) the value as the row says; *v gets an int value.  For
 * SET_ON_A the value is set on A here.  0, or -1 with errno. */
static int opt_read(struct toe_sock *s, int fd, const struct opt_row *r, int level, int name,
                    const void *val, socklen_t len, int *v)
{
    if ((r->flags & OPT_PASSCRED) && passcred_refused())
        return fail(EOPNOTSUPP);
    switch (r->set) {
    case SET_RDONLY:
        return fail(ENOPROTOOPT);
    case SET_ON_A:
        return toe_real_setsockopt(fd, level, name, val, len);
    case SET_LINGER:
        return len < sizeof(struct linger) ? fail(EINVAL) : 0;
    case SET_INT:
        if (opt_parse_int(level, val, len, v) < 0)
            return -1;
        return opt_check(s, r, *v, len);
    default:
        return 0;
    }
}

/* Keep the value where the row says (the recorded list is record_opt's). */
static void opt_store(struct toe_sock *s, const struct opt_row *r, const void *val, int v)
{
    switch (r->store) {
    case ST_FLAG:
        set_flag(s, r->bit, v != 0);
        break;
    case ST_U32:
        __atomic_store_n(opt_field(s, r), (uint32_t)v, __ATOMIC_RELEASE);
        break;
    case ST_BUF:
        /* SO_SNDBUF: the doubled value getsockopt reports bounds the bytes queued
         * (toe_tx_room); A's own buffer stays minimal */
        __atomic_store_n(opt_field(s, r),
                         buf_size(v, (r->flags & OPT_FORCE) != 0, r->sysctl, r->cache,
                                  (uint32_t)r->lo),
                         __ATOMIC_RELEASE);
        break;
    case ST_LINGER: {
        struct linger l;
        memcpy(&l, val, sizeof(l));
        __atomic_store_n(&s->shm->linger_s, l.l_linger, __ATOMIC_RELEASE);
        set_flag(s, TOE_OF_LINGER, l.l_onoff != 0);
        break;
    }
    default:
        break;
    }
}

int toe_sock_setsockopt(struct toe_sock *s, int fd, int level, int name, const void *val,
                        socklen_t len)
{
    int saved = errno, v = 0;

    if (len && !val)
        return fail(EFAULT);
    if ((int)len < 0)
        return fail(EINVAL);
    const struct opt_row *r = opt_row_of(level, name);
    if (r->set == SET_CA) {
        if (set_congestion(s, val, len) < 0)
            return -1;
        errno = saved;
        return 0;
    }
    if (opt_read(s, fd, r, level, name, val, len, &v) < 0)
        return -1;
    opt_store(s, r, val, v);
    /* everything accepted is recorded, for getsockopt and the handover: never break the program */
    record_opt(s, level, name, val,
               (r->flags & OPT_REC_INT) && len > sizeof(int) ? sizeof(int) : len);
    if (r->flags & OPT_TX_LIMIT)
        tx_limits_changed(s, fd, level, name, val, len);
    else if (r->flags & OPT_NOTIFY)
        notify_opt(s, level, name, val, len);
    else if ((r->flags & OPT_KICK) && state_of(s) == TOE_SS_CONNECTED)
        kick(s, fd); /* what Nagle or the cork held goes now: no round trip */
    errno = saved;
    return 0;
}

/* ---------------- getsockopt ---------------- */

/* tcp_set_rcvlowat(): negative is INT_MAX, capped at half the receive buffer the
 * application set, else at half of tcp_rmem's maximum; 0 is 1 */
static int rcvlowat_value(struct toe_sock *s, int v)
{
    static uint32_t rmem_max3;
    struct toe_opt o;
    int user = find_opt(s, SOL_SOCKET, SO_RCVBUF, &o) ||
               find_opt(s, SOL_SOCKET, SO_RCVBUFFORCE, &o);
    int cap = user ? (int)(LOAD(&s->shm->rcvbuf) >> 1)
                   : (int)(sysctl_field("/proc/sys/net/ipv4/tcp_rmem", 2, &rmem_max3,
                                        6291456) >> 1);
    if (v < 0)
        v = INT_MAX;
    if (cap > 0 && v > cap)
        v = cap;
    return v ? v : 1;
}

/* GT_KNOWN: the recorded value v as the kernel stores it. */
static int known_value(struct toe_sock *s, const struct opt_row *r, int v)
{
    static uint32_t somaxconn;
    switch (r->norm) {
    case NV_BOOL:
        return v != 0;
    case NV_RCVLOWAT:
        return rcvlowat_value(s, v);
    case NV_LINGER2:
        if (v < 0)
            return -1;
        if (v == 0)
            return opt_default(r);
        return v > 120 ? 120 : v; /* TCP_FIN_TIMEOUT_MAX */
    case NV_DEFER:
        return defer_accept_round_trip(v);
    case NV_WCLAMP:
        return v == 0 ? 0 : v < TOE_MIN_RCVBUF / 2 ? TOE_MIN_RCVBUF / 2 : v;
    case NV_FASTOPEN: {
        int max = (int)sysctl_u32("/proc/sys/net/core/somaxconn", &somaxconn, 4096);
        return v > max ? max : v;
    }
    case NV_TOS:
        return (uint8_t)(v & ~3); /* a stream socket keeps the ECN bits for itself */
    case NV_TTL:
        return v < 0 ? opt_default(r) : v;
    default:
        return v;
    }
}

/* The answers kept in the header or the recorded list. */
static int opt_get_kept(struct toe_sock *s, const struct opt_row *r, int level, int name, void *val,
                        socklen_t *len)
{
    struct toe_opt o;
    int v = 0, have = (r->get == GT_KNOWN || r->get == GT_REC) && find_opt(s, level, name, &o);
    switch (r->get) {
    case GT_KNOWN:
        if (have && opt_parse_int(level, o.val, o.len, &v) < 0)
            have = 0;
        return opt_int_level(level, val, len, have ? known_value(s, r, v) : opt_default(r));
    case GT_CONST:
        return opt_int(val, len, r->dflt);
    case GT_FLAG:
        return opt_int(val, len, has_flag(s, r->bit));
    case GT_U32: {
        uint32_t x = LOAD(opt_field(s, r));
        return opt_int(val, len, x ? (int)x : r->dflt);
    }
    default: /* GT_REC: what the application set, else the kernel's default */
        if (have)
            return opt_out(val, len, o.val, o.len);
        if (r->flags & OPT_DFLT)
            return opt_int(val, len, r->dflt);
        if (r->flags & OPT_EMPTY) {
            *len = 0;
            return 0;
        }
        if (level == SOL_SOCKET || level == IPPROTO_TCP || level == IPPROTO_IP)
            return fail(ENOPROTOOPT);
        return fail(EOPNOTSUPP);
    }
}

/* The answers made up from the socket's state. */
static int opt_get_state(struct toe_sock *s, const struct opt_row *r, void *val, socklen_t *len)
{
    struct toe_sock_shm *m = s->shm;
    switch (r->get) {
    case GT_ERROR:
        return opt_int(val, len, take_so_error(s));
    case GT_ACCEPTCONN:
        return opt_int(val, len, state_of(s) == TOE_SS_LISTEN);
    case GT_PEERCRED: {
        /* a TCP socket has no peer credentials: pid 0, uid/gid -1 */
        struct ucred uc = {.pid = 0, .uid = (uid_t)-1, .gid = (gid_t)-1};
        return opt_out(val, len, &uc, sizeof(uc));
    }
    case GT_LINGER: {
        struct linger l = {.l_onoff = has_flag(s, TOE_OF_LINGER), .l_linger = LOAD(&m->linger_s)};
        return opt_out(val, len, &l, sizeof(l));
    }
    case GT_MAXSEG: {
        uint32_t mss = state_of(s) == TOE_SS_CONNECTED ? LOAD(&m->mss) : 0;
        if (!mss)
            mss = LOAD(&m->user_mss);
        return opt_int(val, len, mss ? (int)mss : TOE_DEFAULT_MSS);
    }
    case GT_INFO: {
        struct tcp_info ti;
        uint32_t mss = LOAD(&m->mss);
        memset(&ti, 0, sizeof(ti));
        ti.tcpi_state = tcpi_state_of(s);
        ti.tcpi_snd_mss = mss ? mss : TOE_DEFAULT_MSS;
        ti.tcpi_rcv_mss = ti.tcpi_snd_mss;
        ti.tcpi_total_retrans = (uint32_t)LOAD(&m->retransmits);
        return opt_out(val, len, &ti, sizeof(ti));
    }
    default: { /* GT_CA: the kernel copies its 16-byte name field, NUL padded */
        char name16[TOE_CA_NAME_MAX] = "reno";
        struct toe_opt o;
        if (find_opt(s, IPPROTO_TCP, TCP_CONGESTION, &o)) {
            memset(name16, 0, sizeof(name16));
            memcpy(name16, o.val, o.len < TOE_CA_NAME_MAX - 1 ? o.len : TOE_CA_NAME_MAX - 1);
        }
        return opt_out(val, len, name16, sizeof(name16));
    }
    }
}

int toe_sock_getsockopt(struct toe_sock *s, int fd, int level, int name, void *val,
                        socklen_t *len)
{
    int saved = errno, rc;

    if (!len)
        return fail(EFAULT);
    if ((int)*len < 0)
        return fail(EINVAL);
    const struct opt_row *r = opt_row_of(level, name);
    if (r->get == GT_A)
        return toe_real_getsockopt(fd, level, name, val, len);
    if ((r->flags & OPT_PASSCRED) && passcred_refused())
        return fail(EOPNOTSUPP);
    if (r->get == GT_REC || r->get == GT_KNOWN || r->get == GT_CONST || r->get == GT_FLAG ||
        r->get == GT_U32)
        rc = opt_get_kept(s, r, level, name, val, len);
    else
        rc = opt_get_state(s, r, val, len);
    if (rc == 0)
        errno = saved;
    return rc;
}
