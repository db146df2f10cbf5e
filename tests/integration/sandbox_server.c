/*
 * sandbox_server.c - a privilege-separated server in miniature (tests/integration/test_sandbox.py).
 *
 * usage: sandbox_server ADDR PORT NBYTES EMPTYDIR UID GID [kill|errno]
 *
 * The parent (root) listens on ADDR:PORT, prints "listening" (flushed), accepts ONE
 * connection and fork()s.  It prints "forked <child pid>", closes its copy of the
 * accepted socket, waits for the child, prints "child exit <code>" or "child signal <n>"
 * and exits 0 only if the child exited 0 (else 1; 2 for a usage or set-up error).
 *
 * The child drops everything before it touches the inherited socket, as sshd, vsftpd,
 * postfix or dovecot do: chroot(EMPTYDIR) + chdir("/"), setgroups(0), setgid(GID),
 * setuid(UID) (checked: real/effective ids are the new ones and setuid(0) fails), then
 * PR_SET_NO_NEW_PRIVS and a seccomp filter (raw BPF, no libseccomp) that allows only the
 * system calls in allowed[] below.  Any other call kills the process (SIGSYS; mode
 * "kill", the default) or fails with EPERM (mode "errno").  The filter also kills any
 * call made with another architecture's numbering (and, on x86-64, the x32 ABI).  The
 * listening socket is inherited too and never touched by the child.
 *
 * Only then does the child make its first calls on the accepted socket:
 *   1. read() until '\n': the request must be exactly "GET <NBYTES>\n";
 *   2. NBYTES of the pattern, in chunks of varying sizes, alternately with write() and
 *      send(MSG_NOSIGNAL) (short writes are continued);
 *   3. shutdown(SHUT_WR), then read() until EOF (the client closes once it has it all),
 *      close(), exit(0).
 * Nothing is printed after the filter is installed: the outcome is the bytes on the
 * socket and the exit code (CHILD_* below; diagnostics before the filter go to stderr).
 *
 * The pattern: the stream is a sequence of little-endian 64-bit words, word k (bytes
 * 8k .. 8k+7) = k * 0x9E3779B97F4A7C15 mod 2^64.  The multiplier is odd, so every word
 * of the stream differs from every other: a lost, repeated, reordered or shifted piece
 * shows up at its offset.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif

#if defined(__x86_64__)
#define SANDBOX_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SANDBOX_ARCH AUDIT_ARCH_AARCH64
#else
#error "sandbox_server: only x86-64 and aarch64 are supported"
#endif

#define PATTERN_MUL 0x9E3779B97F4A7C15ULL

/* The child's exit codes (anything but 0 is a failure, named by the step that failed). */
enum {
    CHILD_OK = 0,
    CHILD_SETUP = 20,       /* chroot/setuid/seccomp failed (said on stderr) */
    CHILD_READ_REQ = 21,    /* read() of the request failed */
    CHILD_EOF_REQ = 22,     /* EOF before the request's '\n' */
    CHILD_BAD_REQ = 23,     /* the request was not "GET <NBYTES>\n" */
    CHILD_WRITE = 24,       /* write() failed or wrote nothing */
    CHILD_SEND = 25,        /* send() failed or sent nothing */
    CHILD_SHUTDOWN = 26,    /* shutdown(SHUT_WR) failed */
    CHILD_READ_EOF = 27,    /* read() while waiting for the client's EOF failed */
    CHILD_EXTRA = 28,       /* the client sent more after its request */
    CHILD_CLOSE = 29,       /* close() failed */
};

/* The system calls the sandbox allows; everything else is killed or fails with EPERM. */
static const int allowed[] = {
    __NR_read, __NR_write, __NR_readv, __NR_writev, __NR_recvfrom, __NR_sendto,
#ifdef __NR_poll
    __NR_poll,
#endif
    __NR_ppoll,
#ifdef __NR_select
    __NR_select,
#endif
    __NR_pselect6,
#ifdef __NR_epoll_wait
    __NR_epoll_wait,
#endif
    __NR_epoll_pwait, __NR_epoll_ctl,
    __NR_close, __NR_shutdown,
    __NR_futex, __NR_munmap, __NR_brk, __NR_madvise,
    __NR_rt_sigreturn, __NR_rt_sigprocmask, __NR_rt_sigaction,
    __NR_clock_gettime, __NR_clock_nanosleep, __NR_nanosleep,
    __NR_gettid, __NR_getpid, __NR_getuid,
    __NR_exit, __NR_exit_group,
    __NR_fstat,
#ifdef __NR_newfstatat
    __NR_newfstatat,
#endif
};
#define NALLOWED (sizeof(allowed) / sizeof(allowed[0]))

static void die(const char *what)
{
    fprintf(stderr, "sandbox_server: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Child diagnostics before the filter: one write(2), no stdio. */
static void child_fail(const char *what)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), "sandbox_server child: %s: %s\n", what, strerror(errno));
    if (n > 0) {
        ssize_t r = write(2, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
        (void)r;
    }
    _exit(CHILD_SETUP);
}

static void fill_pattern(unsigned char *buf, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        uint64_t pos = off + i;
        uint64_t word = (pos >> 3) * PATTERN_MUL;
        buf[i] = (unsigned char)(word >> (8 * (pos & 7)));
    }
}

static void install_sandbox(int errno_mode)
{
    struct sock_filter f[8 + 2 * NALLOWED];
    unsigned n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SANDBOX_ARCH, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
#if defined(__x86_64__)
    /* x32 calls carry bit 30 and would otherwise match the x86-64 numbers */
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000U, 0, 1);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
#endif
    for (size_t i = 0; i < NALLOWED; i++) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)allowed[i], 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[n++] = (struct sock_filter)BPF_STMT(
        BPF_RET | BPF_K, errno_mode ? SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA) : SECCOMP_RET_KILL_PROCESS);

    struct sock_fprog prog = {.len = (unsigned short)n, .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_fail("prctl(PR_SET_NO_NEW_PRIVS)");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
        child_fail("prctl(PR_SET_SECCOMP)");
}

static void drop_privileges(const char *dir, uid_t uid, gid_t gid)
{
    if (chroot(dir) < 0)
        child_fail("chroot");
    if (chdir("/") < 0)
        child_fail("chdir(/)");
    if (setgroups(0, NULL) < 0)
        child_fail("setgroups(0)");
    if (setgid(gid) < 0)
        child_fail("setgid");
    if (setuid(uid) < 0)
        child_fail("setuid");
    if (getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid) {
        errno = EPERM;
        child_fail("the ids did not change");
    }
    if (uid != 0 && setuid(0) == 0) {
        errno = EPERM;
        child_fail("setuid(0) succeeded after the drop");
    }
}

/* The child's work, all on the inherited socket, inside the sandbox. */
static int serve(int fd, uint64_t nbytes)
{
    char want[64], req[64];
    size_t got = 0;
    int wn = snprintf(want, sizeof(want), "GET %llu\n", (unsigned long long)nbytes);

    for (;;) {
        if (got == sizeof(req))
            return CHILD_BAD_REQ;
        ssize_t r = read(fd, req + got, 1);     /* one byte at a time: nothing beyond the '\n' */
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return CHILD_READ_REQ;
        if (r == 0)
            return CHILD_EOF_REQ;
        got++;
        if (req[got - 1] == '\n')
            break;
    }
    if ((int)got != wn || memcmp(req, want, got) != 0)
        return CHILD_BAD_REQ;

    static unsigned char buf[256 * 1024];
    static const size_t sizes[] = {1, 1460, 65536, 7, 12289, 256 * 1024, 4096, 100000, 3};
    uint64_t off = 0;
    unsigned turn = 0;
    while (off < nbytes) {
        size_t len = sizes[turn % (sizeof(sizes) / sizeof(sizes[0]))];
        if (len > nbytes - off)
            len = (size_t)(nbytes - off);
        fill_pattern(buf, off, len);
        int use_send = turn & 1;
        turn++;
        size_t done = 0;
        while (done < len) {
            ssize_t r = use_send ? send(fd, buf + done, len - done, MSG_NOSIGNAL)
                                 : write(fd, buf + done, len - done);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return use_send ? CHILD_SEND : CHILD_WRITE;
            done += (size_t)r;
        }
        off += len;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return CHILD_SHUTDOWN;
    for (;;) {
        char c[256];
        ssize_t r = read(fd, c, sizeof(c));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return CHILD_READ_EOF;
        if (r == 0)
            break;
        return CHILD_EXTRA;
    }
    if (close(fd) < 0)
        return CHILD_CLOSE;
    return CHILD_OK;
}

static unsigned long long number(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) {
        fprintf(stderr, "sandbox_server: bad %s %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 7 || argc > 8) {
        fprintf(stderr, "usage: sandbox_server ADDR PORT NBYTES EMPTYDIR UID GID [kill|errno]\n");
        return 2;
    }
    const char *mode = argc > 7 ? argv[7] : "kill";
    if (strcmp(mode, "kill") != 0 && strcmp(mode, "errno") != 0) {
        fprintf(stderr, "sandbox_server: MODE must be kill or errno, not %s\n", mode);
        return 2;
    }
    unsigned long long port = number(argv[2], "PORT");
    uint64_t nbytes = number(argv[3], "NBYTES");
    uid_t uid = (uid_t)number(argv[5], "UID");
    gid_t gid = (gid_t)number(argv[6], "GID");
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    if (port == 0 || port > 65535 || inet_pton(AF_INET, argv[1], &sin.sin_addr) != 1) {
        fprintf(stderr, "sandbox_server: bad ADDR:PORT %s:%s\n", argv[1], argv[2]);
        return 2;
    }

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        die("socket");
    int one = 1;
    if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
        die("setsockopt(SO_REUSEADDR)");
    if (bind(ls, (struct sockaddr *)&sin, sizeof(sin)) < 0)
        die("bind");
    if (listen(ls, 16) < 0)
        die("listen");
    printf("listening\n");
    fflush(stdout);

    int fd;
    do
        fd = accept(ls, NULL, NULL);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        die("accept");

    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        drop_privileges(argv[4], uid, gid);
        install_sandbox(strcmp(mode, "errno") == 0);
        exit(serve(fd, nbytes));
    }

    printf("forked %d\n", (int)pid);
    fflush(stdout);
    if (close(fd) < 0)
        die("close (parent's copy of the accepted socket)");
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid");
    if (WIFEXITED(status))
        printf("child exit %d\n", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        printf("child signal %d\n", WTERMSIG(status));
    else
        printf("child status %#x\n", (unsigned)status);
    fflush(stdout);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
