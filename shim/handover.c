/*
 * handover.c - handover: an offloaded socket replaced by a kernel socket (or, with TOE_STRICT,
 * refused).
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

/* ---------------- handover to the kernel ---------------- */

/* HANDOVER: statistics only (the daemon counts it for this process, with the
 * reason; `refused`: strict mode said no), so errors do not matter. */
static void report_handover(struct toe_sock *s, int reason, int refused)
{
    struct toe_cmd cmd;
    struct toe_rsp rsp;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = TOE_OP_HANDOVER;
    cmd.sock_id = s->sock_id;
    cmd.arg0 = reason;
    cmd.arg1 = refused;
    toe_ctl_call(&cmd, NULL, 0, &rsp);
}

/*
 * Replace the offloaded socket behind fd (and every other fd of this process
 * that points at it) with a fresh kernel socket carrying what the application
 * set so far: O_NONBLOCK, FD_CLOEXEC, recorded options, its bind.  The caller
 * then performs the real operation on fd.  0, or -1 with errno (nothing
 * changed).
 */
static int handover(struct toe_sock *s, int fd, int reason)
{
    int saved = errno, e;
    int fl = toe_real_fcntl(fd, F_GETFL, NULL);
    if (fl < 0)
        return -1;
    int k = toe_real_socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | ((fl & O_NONBLOCK) ? SOCK_NONBLOCK : 0),
                            IPPROTO_TCP);
    if (k < 0)
        return -1;
    pthread_mutex_lock(&s->opt_lock);
    for (unsigned i = 0; i < s->nopts; i++) {
        struct toe_opt *o = &s->opts[i];
        if (toe_real_setsockopt(k, o->level, o->name, o->val, o->len) < 0)
            TOE_DBG("handover: replaying option %d/%d: %s", o->level, o->name, strerror(errno));
    }
    struct sockaddr_in b = s->bound;
    pthread_mutex_unlock(&s->opt_lock);
    if ((lstate_of(s) & TOE_LS_BOUND) && toe_real_bind(k, (struct sockaddr *)&b, sizeof(b)) < 0)
        goto fail;
    if (toe_fd_replace_all(s, fd, k) < 0)
        goto fail;
    toe_real_close(k);

    report_handover(s, reason, 0);
    TOE_DBG("handover fd %d (sock %u) to the kernel, reason %d", fd, s->sock_id, reason);
    errno = saved;
    return 0;

fail:
    e = errno;
    toe_real_close(k);
    TOE_DBG("handover fd %d failed: %s", fd, strerror(e));
    return fail(e);
}

static const char *handover_words(int reason)
{
    switch (reason) {
    case TOE_HO_LOOPBACK:
        return "loopback";
    case TOE_HO_OFF_SUBNET:
        return "outside the adapter's subnet";
    case TOE_HO_BIND_ADDR:
        return "not the adapter's address";
    case TOE_HO_DAEMON:
        return "the daemon does not serve it";
    case TOE_HO_NO_DAEMON:
        return "no adapter daemon";
    case TOE_HO_KERNEL_PATH:
        return "arrived through the kernel";
    default:
        return "unknown reason";
    }
}

/*
 * A socket operation would give the socket to the kernel.  Normally: do it
 * (0; the caller then runs the real operation on fd).  With TOE_STRICT: say
 * so on stderr, tell the daemon (HANDOVER, arg1 = 1 "refused": the socket
 * stays offloaded and usable) and fail with strict_errno.
 */
int handover_or_refuse(struct toe_sock *s, int fd, int reason, const char *what,
                              uint32_t a_be32, uint16_t p_be16, int strict_errno)
{
    if (!toe_strict)
        return handover(s, fd, reason);
    char a[INET_ADDRSTRLEN];
    struct in_addr ia = {.s_addr = a_be32};
    inet_ntop(AF_INET, &ia, a, sizeof(a));
    toe_say("toe: strict: %s %s:%u would use the kernel (%s)", what, a, (unsigned)ntohs(p_be16),
            handover_words(reason));
    report_handover(s, reason, 1);
    return fail(strict_errno);
}

