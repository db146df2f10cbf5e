/*
 * fdcalls.c - descriptor calls: fcntl, ioctl, dup, close.
 *
 * sock_int.h says what the rooms of the offloaded socket share.
 */
#include "sock_int.h"

/* ---------------- fcntl / ioctl / dup / close ---------------- */

int toe_sock_fcntl(struct toe_sock *s, int fd, int cmd, void *arg, int is64)
{
    /* status and descriptor flags live on A: everything goes to A */
    int r = is64 ? toe_real_fcntl64(fd, cmd, arg) : toe_real_fcntl(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && toe_fd_install(r, s) < 0) {
        toe_real_close(r);
        return fail(EMFILE);
    }
    return r;
}

int toe_sock_ioctl(struct toe_sock *s, int fd, unsigned long req, void *arg)
{
    struct toe_sock_shm *m = s->shm;
    int v;

    switch (req) {
    case FIONREAD:    /* SIOCINQ */
    case TIOCOUTQ:    /* SIOCOUTQ */
    case SIOCOUTQNSD:
        if (state_of(s) == TOE_SS_LISTEN)
            return fail(EINVAL);
        if (req == FIONREAD)
            v = (int)toe_rx_avail(m);
        else
            v = (int)(s->shm->tx_tail - LOAD(&m->tx_head));
        break;
    case SIOCATMARK:
        v = 0;
        break;
    default:
        /* FIONBIO, FIOASYNC, FIOCLEX ...: A's business */
        return toe_real_ioctl(fd, req, arg);
    }
    if (!arg)
        return fail(EFAULT);
    memcpy(arg, &v, sizeof(v));
    return 0;
}

int toe_sock_dup(struct toe_sock *s, int fd)
{
    int r = toe_real_dup(fd);
    if (r >= 0 && toe_fd_install(r, s) < 0) {
        toe_real_close(r);
        return fail(EMFILE);
    }
    return r;
}

int toe_sock_close(int fd)
{
    /* lifetime is A's: no command, the daemon sees B's EOF after the last close */
    toe_fd_remove(fd);
    return toe_real_close(fd);
}

