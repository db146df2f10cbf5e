/*
 * sockopt_kernel.c - the kernel's rules that socket options follow and the
 * shim reads from the running system: sysctl defaults and ceilings, the
 * buffer-size doubling, capabilities, SO_PASSCRED on TCP, TCP_DEFER_ACCEPT's
 * rounding.  sockopt.c's table refers to them.
 *
 * Values read from /proc are read once and cached (relaxed atomics: every
 * thread computes the same value).  errno may change: the option calls
 * restore it when they succeed.
 */
#include "sock_int.h"

/* Field `field` (0-based) of a numeric sysctl, read once into *cache. */
uint32_t sysctl_field(const char *path, int field, uint32_t *cache, uint32_t dflt)
{
    uint32_t v = __atomic_load_n(cache, __ATOMIC_RELAXED);
    if (v)
        return v;
    v = dflt;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buf[64];
        ssize_t n = toe_real_read(fd, buf, sizeof(buf) - 1);
        if (n > 0) {
            unsigned long x[3] = {0, 0, 0};
            buf[n] = 0;
            if (sscanf(buf, "%lu %lu %lu", &x[0], &x[1], &x[2]) > field && x[field] > 0 &&
                x[field] <= INT_MAX)
                v = (uint32_t)x[field];
        }
        toe_real_close(fd);
    }
    __atomic_store_n(cache, v, __ATOMIC_RELAXED);
    return v;
}

/* net.core.wmem_max / rmem_max ... read once (the kernel's SO_*BUF ceiling). */
uint32_t sysctl_u32(const char *path, uint32_t *cache, uint32_t dflt)
{
    return sysctl_field(path, 0, cache, dflt);
}

uint32_t buf_size(int v, int force, const char *sysctl, uint32_t *cache, uint32_t floor)
{
    uint32_t max = sysctl_u32(sysctl, cache, 212992);
    uint32_t u = v < 0 ? 0 : (uint32_t)v;
    if (!force && u > max)
        u = max;
    if (u > INT_MAX / 2)
        u = INT_MAX / 2;
    u *= 2;
    return u < floor ? floor : u;
}

/* Linux 6.16 restricted SO_PASSCRED to AF_UNIX/AF_NETLINK (EOPNOTSUPP on TCP). */
int passcred_refused(void)
{
    static int cached; /* 0 unknown, 1 refused, 2 accepted */
    int c = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (!c) {
        struct utsname u;
        int major = 0, minor = 0;
        c = 2;
        if (uname(&u) == 0 && sscanf(u.release, "%d.%d", &major, &minor) == 2 &&
            (major > 6 || (major == 6 && minor >= 16)))
            c = 1;
        __atomic_store_n(&cached, c, __ATOMIC_RELAXED);
    }
    return c == 1;
}

/* CAP_NET_ADMIN or CAP_NET_RAW in the effective set (the kernel's test for
 * SO_PRIORITY > 6, SO_MARK, IP_TRANSPARENT). */
int net_capable(void)
{
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct d[2];
    int saved = errno;
    memset(d, 0, sizeof(d));
    long r = syscall(SYS_capget, &h, d);
    errno = saved;
    if (r < 0)
        return geteuid() == 0;
    return (d[0].effective & ((1u << CAP_NET_ADMIN) | (1u << CAP_NET_RAW))) != 0;
}

/* TCP_DEFER_ACCEPT is kept as SYN-ACK retransmissions: seconds -> count -> seconds. */
int defer_accept_round_trip(int seconds)
{
    int timeout = 1, rto_max = 120, res = 0, period;
    if (seconds > 0) {
        period = timeout;
        res = 1;
        while (seconds > period && res < 255) {
            res++;
            timeout <<= 1;
            if (timeout > rto_max)
                timeout = rto_max;
            period += timeout;
        }
    }
    timeout = 1;
    period = 0;
    if (res > 0) {
        period = timeout;
        while (--res) {
            timeout <<= 1;
            if (timeout > rto_max)
                timeout = rto_max;
            period += timeout;
        }
    }
    return period;
}
