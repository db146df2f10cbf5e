/*
 * probe.c - a small unmodified-style TCP client for the shim's tests.
 * Built with -O2 -D_FORTIFY_SOURCE=2 so that read()/recv()/recvfrom() into
 * fixed-size buffers reach the shim as __read_chk/__recv_chk/__recvfrom_chk.
 *
 *   probe echo ADDR PORT IN OUT   blocking echo of file IN, received bytes to OUT
 *   probe connect ADDR PORT       blocking connect; prints "connect=0" or "connect=ERRNO"
 *   probe nbconnect ADDR PORT     nonblocking connect, poll POLLOUT, SO_ERROR
 *   probe eintr ADDR PORT         blocking recv interrupted (no SA_RESTART) -> EINTR
 *   probe restart ADDR PORT       blocking recv with SA_RESTART survives a signal
 *   probe sigpipe ADDR PORT       write after SHUT_WR: killed by SIGPIPE
 *   probe nosignal ADDR PORT      send(MSG_NOSIGNAL) after SHUT_WR: EPIPE
 *   probe fork ADDR PORT          a socket used by parent and child; the child opens its own
 *   probe dup ADDR PORT           dup/dup2/dup3/F_DUPFD keep the socket; dup2 over it drops it
 *   probe misc ADDR PORT          MSG_PEEK/MSG_WAITALL/readv/recvmsg/FIONREAD/errors
 *   probe sendfile ADDR PORT FILE offsets, file position, EOF, errors, pass-through
 *   probe sendfile_nb ADDR PORT FILE  nonblocking sendfile into a held ring: partial, EAGAIN
 *   probe sendfile_epipe ADDR PORT FILE  after SHUT_WR: EPIPE and a pending SIGPIPE
 *   probe splice ADDR PORT FILE   pipe/file -> socket, socket -> pipe, errors
 *   probe mmsg ADDR PORT          sendmmsg/recvmmsg, MSG_WAITFORONE, EAGAIN, timeout
 *   probe closerange ADDR PORT    close_range/closefrom drop offloaded fds, CLOEXEC keeps them
 *   probe exec ADDR PORT          echo, exec itself keeping the socket, echo 1 MB again
 *   probe connecting ADDR PORT    a slow nonblocking connect: EAGAIN from send and recv
 *   probe refused ADDR PORT       after connect() reported a refusal: ENOTCONN, EPIPE
 *   probe forkstress ADDR PORT    fork while other threads are inside the shim's locks
 *   probe spawn ADDR PORT         vfork: dup2 the socket to stdin/stdout, close_range, exec sh
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: check failed: %s (errno %d %s)\n", \
    __FILE__, __LINE__, #c, errno, strerror(errno)); exit(2); } } while (0)

static struct sockaddr_in dst;

static int tcp(int flags)
{
    int fd = socket(AF_INET, SOCK_STREAM | flags, 0);
    CHECK(fd >= 0);
    return fd;
}

static int connected(void)
{
    int fd = tcp(0);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0);
    return fd;
}

static void send_all(int fd, const void *p, size_t n)
{
    while (n) {
        ssize_t r = write(fd, p, n);
        CHECK(r > 0);
        p = (const char *)p + r;
        n -= (size_t)r;
    }
}

static void recv_exact(int fd, void *p, size_t n)
{
    ssize_t r = recv(fd, p, n, MSG_WAITALL);
    CHECK(r == (ssize_t)n);
}

/* ---- echo ---- */
static char *in_data;
static size_t in_len;
static int echo_fd;

static void *writer(void *arg)
{
    (void)arg;
    size_t off = 0, step = 1;
    unsigned k = 0;
    while (off < in_len) {
        size_t n = (step * 7919) % 100000 + 1;
        step++;
        if (n > in_len - off)
            n = in_len - off;
        ssize_t r;
        switch (k++ % 3) {
        case 0:
            r = write(echo_fd, in_data + off, n);
            break;
        case 1:
            r = send(echo_fd, in_data + off, n, 0);
            break;
        default: {
            size_t h = n / 2;
            struct iovec iov[3] = {{in_data + off, h}, {in_data + off, 0}, {in_data + off + h, n - h}};
            r = writev(echo_fd, iov, 3);
        }
        }
        CHECK(r > 0);
        off += (size_t)r;
    }
    CHECK(shutdown(echo_fd, SHUT_WR) == 0);
    return NULL;
}

static int cmd_echo(const char *in, const char *out)
{
    FILE *f = fopen(in, "rb");
    CHECK(f);
    struct stat st;
    CHECK(fstat(fileno(f), &st) == 0);
    in_len = (size_t)st.st_size;
    in_data = malloc(in_len + 1);
    CHECK(fread(in_data, 1, in_len, f) == in_len);
    fclose(f);
    echo_fd = connected();
    int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(o >= 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, writer, NULL) == 0);
    char buf[65536];
    static volatile size_t cap = sizeof(buf); /* unknown to the compiler: fortified calls */
    size_t total = 0;
    unsigned k = 0;
    for (;;) {
        ssize_t r;
        size_t want = (k * 4099) % cap + 1;
        switch (k++ % 4) {
        case 0:
            r = read(echo_fd, buf, want);
            break;
        case 1:
            r = recv(echo_fd, buf, want, 0);
            break;
        case 2:
            r = recvfrom(echo_fd, buf, want, 0, NULL, NULL);
            break;
        default: {
            size_t h = want / 3;
            struct iovec iov[2] = {{buf, h}, {buf + h, want - h}};
            r = readv(echo_fd, iov, 2);
        }
        }
        CHECK(r >= 0);
        if (r == 0)
            break;
        CHECK(write(o, buf, (size_t)r) == r);
        total += (size_t)r;
    }
    pthread_join(t, NULL);
    close(o);
    close(echo_fd);
    printf("echoed=%zu\n", total);
    return 0;
}

/* ---- connect ---- */
static int cmd_connect(void)
{
    int fd = tcp(0);
    int r = connect(fd, (struct sockaddr *)&dst, sizeof(dst));
    printf("connect=%d\n", r == 0 ? 0 : errno);
    if (r == 0) {
        r = connect(fd, (struct sockaddr *)&dst, sizeof(dst));
        printf("again=%d\n", r == 0 ? 0 : errno);
    }
    return 0;
}

static int cmd_nbconnect(void)
{
    int fd = tcp(SOCK_NONBLOCK);
    int r = connect(fd, (struct sockaddr *)&dst, sizeof(dst));
    printf("connect=%d\n", r == 0 ? 0 : errno);
    r = connect(fd, (struct sockaddr *)&dst, sizeof(dst));
    printf("second=%d\n", r == 0 ? 0 : errno);
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    CHECK(poll(&p, 1, 5000) == 1);
    printf("revents_out=%d\n", !!(p.revents & POLLOUT));
    int err = -1;
    socklen_t len = sizeof(err);
    CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && len == sizeof(err));
    printf("so_error=%d\n", err);
    CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0);
    printf("so_error2=%d\n", err);
    return 0;
}

/* ---- signals ---- */
static void on_alarm(int sig)
{
    (void)sig;
}

static void arm(int restart, int ms)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_alarm;
    sa.sa_flags = restart ? SA_RESTART : 0;
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    struct itimerval it = {.it_value = {.tv_sec = 0, .tv_usec = ms * 1000}};
    CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0);
}

static int delayed_fd;
static void *delayed_send(void *arg)
{
    (void)arg;
    usleep(300 * 1000);
    send_all(delayed_fd, "late", 4);
    return NULL;
}

static int cmd_eintr(int restart)
{
    int fd = connected();
    char c[16];
    arm(restart, 50);
    pthread_t t;
    if (restart) {
        delayed_fd = fd;
        CHECK(pthread_create(&t, NULL, delayed_send, NULL) == 0);
    }
    ssize_t r = recv(fd, c, sizeof(c), 0);
    printf("recv=%zd errno=%d\n", r, r < 0 ? errno : 0);
    if (restart)
        pthread_join(t, NULL);
    return 0;
}

static int cmd_sigpipe(int nosignal)
{
    int fd = connected();
    CHECK(shutdown(fd, SHUT_WR) == 0);
    errno = 0;
    ssize_t r = nosignal ? send(fd, "x", 1, MSG_NOSIGNAL) : write(fd, "x", 1);
    printf("send=%zd errno=%d\n", r, errno);
    return 0;
}

/* ---- fork ---- */
static int cmd_fork(void)
{
    int fd = connected();
    char buf[64];
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        send_all(fd, "child", 5);
        recv_exact(fd, buf, 5);
        CHECK(memcmp(buf, "child", 5) == 0);
        int own = connected();
        send_all(own, "own", 3);
        recv_exact(own, buf, 3);
        CHECK(memcmp(buf, "own", 3) == 0);
        close(own);
        close(fd);
        _exit(0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    send_all(fd, "parent", 6);
    recv_exact(fd, buf, 6);
    CHECK(memcmp(buf, "parent", 6) == 0);
    printf("fork=ok\n");
    return 0;
}

/* ---- dup ---- */
static void ping(int fd, const char *msg)
{
    char buf[64];
    size_t n = strlen(msg);
    send_all(fd, msg, n);
    recv_exact(fd, buf, n);
    CHECK(memcmp(buf, msg, n) == 0);
}

static int cmd_dup(void)
{
    int fd = connected();
    int d = dup(fd);
    CHECK(d >= 0);
    CHECK(close(fd) == 0);
    ping(d, "dup");
    CHECK(dup2(d, 100) == 100);
    CHECK(close(d) == 0);
    ping(100, "dup2");
    CHECK(dup3(100, 101, O_CLOEXEC) == 101);
    CHECK(fcntl(101, F_GETFD) == FD_CLOEXEC);
    int f = fcntl(101, F_DUPFD_CLOEXEC, 200);
    CHECK(f >= 200);
    CHECK(close(101) == 0);
    CHECK(close(100) == 0);
    ping(f, "fdup");
    int st = -1;
    socklen_t len = sizeof(st);
    CHECK(getsockopt(f, SOL_SOCKET, SO_TYPE, &st, &len) == 0 && st == SOCK_STREAM);
    /* dup2 a pipe over the offloaded fd: that fd is a pipe again */
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(dup2(p[0], f) == f);
    CHECK(write(p[1], "pipe", 4) == 4);
    char buf[8];
    CHECK(read(f, buf, sizeof(buf)) == 4 && memcmp(buf, "pipe", 4) == 0);
    errno = 0;
    CHECK(getsockopt(f, SOL_SOCKET, SO_TYPE, &st, &len) == -1 && errno == ENOTSOCK);
    printf("dup=ok\n");
    return 0;
}

/* ---- misc ---- */
static int cmd_misc(void)
{
    char buf[256];
    int fd = tcp(0);
    /* not connected */
    errno = 0;
    CHECK(recv(fd, buf, 1, MSG_DONTWAIT) == -1 && errno == ENOTCONN);
    CHECK(recv(fd, buf, 0, 0) == 0);
    signal(SIGPIPE, SIG_IGN);
    CHECK(send(fd, "x", 1, 0) == -1 && errno == EPIPE);
    CHECK(shutdown(fd, SHUT_RDWR) == -1 && errno == ENOTCONN);
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    CHECK(getpeername(fd, (struct sockaddr *)&sin, &len) == -1 && errno == ENOTCONN);
    int v = -1;
    CHECK(ioctl(fd, FIONREAD, &v) == 0 && v == 0);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EISCONN);

    /* MSG_PEEK, FIONREAD, MSG_WAITALL, recvmsg, readv, sendmsg */
    send_all(fd, "abcdefgh", 8);
    CHECK(recv(fd, buf, 4, MSG_PEEK | MSG_WAITALL) == 4 && memcmp(buf, "abcd", 4) == 0);
    for (int i = 0; i < 100; i++) {
        CHECK(ioctl(fd, FIONREAD, &v) == 0);
        if (v == 8)
            break;
        usleep(10000);
    }
    CHECK(v == 8);
    CHECK(recv(fd, buf, 3, MSG_PEEK) == 3 && memcmp(buf, "abc", 3) == 0);
    CHECK(recv(fd, buf, 3, 0) == 3 && memcmp(buf, "abc", 3) == 0);
    struct iovec iov[2] = {{buf, 2}, {buf + 10, 3}};
    struct msghdr mh;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = iov;
    mh.msg_iovlen = 2;
    mh.msg_name = &sin;
    mh.msg_namelen = sizeof(sin);
    char ctl[64];
    mh.msg_control = ctl;
    mh.msg_controllen = sizeof(ctl);
    CHECK(recvmsg(fd, &mh, 0) == 5);
    CHECK(memcmp(buf, "de", 2) == 0 && memcmp(buf + 10, "fgh", 3) == 0);
    CHECK(mh.msg_namelen == 0 && mh.msg_controllen == 0 && mh.msg_flags == 0);
    CHECK(recv(fd, buf, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN);
    mh.msg_name = &dst;  /* ignored on a connected socket */
    mh.msg_namelen = sizeof(dst);
    mh.msg_control = NULL;
    mh.msg_controllen = 0;
    iov[0].iov_base = "12";
    iov[1].iov_base = "345";
    CHECK(sendmsg(fd, &mh, 0) == 5);
    CHECK(sendto(fd, "67", 2, 0, (struct sockaddr *)&dst, sizeof(dst)) == 2);
    CHECK(recv(fd, buf, 7, MSG_WAITALL) == 7 && memcmp(buf, "1234567", 7) == 0);
    /* odd option lengths */
    v = 1;
    CHECK(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, 2) == -1 && errno == EINVAL);
    CHECK(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof(v)) == 0);
    unsigned char one = 0xff;
    len = 1;
    CHECK(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, &len) == 0 && len == 1 && one == 1);
    len = 0;
    CHECK(getsockopt(fd, SOL_SOCKET, SO_TYPE, NULL, &len) == 0 && len == 0);
    CHECK(getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, NULL) == -1 && errno == EFAULT);
    struct tcp_info ti;
    len = sizeof(ti);
    CHECK(getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && len == sizeof(ti));
    CHECK(ti.tcpi_state == TCP_ESTABLISHED && ti.tcpi_snd_mss == 1460);
    CHECK(setsockopt(fd, SOL_SOCKET, 12345, &v, sizeof(v)) == 0);  /* unknown: accepted */
    len = 2;
    CHECK(getsockname(fd, (struct sockaddr *)&sin, &len) == 0 && len == sizeof(sin));
    close(fd);
    printf("misc=ok\n");
    return 0;
}

/* ---- sendfile ---- */
static char *file_data(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    CHECK(f);
    struct stat st;
    CHECK(fstat(fileno(f), &st) == 0);
    *len = (size_t)st.st_size;
    char *d = malloc(*len + 1);
    CHECK(fread(d, 1, *len, f) == *len);
    fclose(f);
    return d;
}

struct collector {
    int fd;
    size_t want, got;
    char *buf;
};

static void *collect(void *arg)
{
    struct collector *c = arg;
    while (c->got < c->want) {
        ssize_t r = recv(c->fd, c->buf + c->got, c->want - c->got, 0);
        CHECK(r > 0);
        c->got += (size_t)r;
    }
    return NULL;
}

static int cmd_sendfile(const char *path)
{
    size_t n;
    char *data = file_data(path, &n);
    CHECK(n > 1000);
    int fd = connected();
    int in = open(path, O_RDONLY);
    CHECK(in >= 0);
    /* the echo comes back while we send: collect it in a thread */
    struct collector c = {.fd = fd, .want = (n - 100) + n + 10, .buf = malloc(2 * n + 10)};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, collect, &c) == 0);
    /* with an offset: pread semantics, the offset advances, the file position does not */
    off_t off = 100;
    CHECK(sendfile(fd, in, &off, n) == (ssize_t)(n - 100));
    CHECK(off == (off_t)n);
    CHECK(lseek(in, 0, SEEK_CUR) == 0);
    /* without: the file position advances */
    errno = 1234;
    CHECK(sendfile64(fd, in, NULL, n + 1000) == (ssize_t)n);
    CHECK(errno == 1234);                 /* errno kept on success */
    CHECK(lseek(in, 0, SEEK_CUR) == (off_t)n);
    CHECK(sendfile(fd, in, NULL, 100) == 0); /* end of file */
    off = (off_t)n;
    CHECK(sendfile(fd, in, &off, 100) == 0 && off == (off_t)n);
    CHECK(sendfile(fd, in, NULL, 0) == 0);
    /* a last short piece with an offset into the middle */
    off = 5;
    CHECK(sendfile(fd, in, &off, 10) == 10 && off == 15);
    pthread_join(t, NULL);
    CHECK(memcmp(c.buf, data + 100, n - 100) == 0);
    CHECK(memcmp(c.buf + n - 100, data, n) == 0);
    CHECK(memcmp(c.buf + 2 * n - 100, data + 5, 10) == 0);
    /* errors */
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(write(p[1], "abc", 3) == 3);
    errno = 0;
    CHECK(sendfile(fd, p[0], NULL, 3) == -1 && errno == EINVAL);  /* like the kernel: no pipes */
    off = 0;
    CHECK(sendfile(fd, p[0], &off, 3) == -1 && errno == ESPIPE);
    int wo = open(path, O_WRONLY);
    CHECK(wo >= 0);
    CHECK(sendfile(fd, wo, NULL, 3) == -1 && errno == EBADF);
    CHECK(sendfile(fd, 9999, NULL, 3) == -1 && errno == EBADF);
    off = -1;
    CHECK(sendfile(fd, in, &off, 3) == -1 && errno == EINVAL);
    CHECK(sendfile(p[1], fd, NULL, 3) == -1 && errno == EINVAL); /* from an offloaded socket */
    /* not offloaded: the kernel's sendfile (file -> pipe) */
    off = 0;
    CHECK(sendfile(p[1], in, &off, 7) == 7);
    char b[16];
    CHECK(read(p[0], b, sizeof(b)) == 10 && memcmp(b, "abc", 3) == 0);
    CHECK(memcmp(b + 3, data, 7) == 0);
    close(fd);
    printf("sendfile=ok\n");
    return 0;
}

static int cmd_sendfile_nb(const char *path)
{
    int fd = tcp(SOCK_NONBLOCK);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EINPROGRESS);
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    CHECK(poll(&p, 1, 5000) == 1);
    int in = open(path, O_RDONLY);
    CHECK(in >= 0);
    off_t off = 0;
    ssize_t r = sendfile(fd, in, &off, 1 << 30);
    printf("first=%zd off=%lld\n", r, (long long)off);
    errno = 0;
    r = sendfile(fd, in, &off, 1 << 30);
    printf("second=%zd errno=%d off=%lld\n", r, errno, (long long)off);
    p.revents = 0;
    printf("writable=%d\n", poll(&p, 1, 0));
    return 0;
}

static int cmd_sendfile_epipe(const char *path)
{
    int fd = connected();
    int in = open(path, O_RDONLY);
    CHECK(in >= 0);
    CHECK(shutdown(fd, SHUT_WR) == 0);
    sigset_t ss, pend;
    sigemptyset(&ss);
    sigaddset(&ss, SIGPIPE);
    CHECK(sigprocmask(SIG_BLOCK, &ss, NULL) == 0);
    off_t off = 0;
    errno = 0;
    ssize_t r = sendfile(fd, in, &off, 10);
    CHECK(sigpending(&pend) == 0);
    printf("sendfile=%zd errno=%d off=%lld sigpipe=%d\n", r, errno, (long long)off,
           sigismember(&pend, SIGPIPE));
    return 0;
}

/* ---- splice ---- */
static int cmd_splice(const char *path)
{
    size_t n;
    char *data = file_data(path, &n);
    int fd = connected();
    int p[2], q[2];
    char buf[256];
    CHECK(pipe(p) == 0 && pipe(q) == 0);
    /* pipe -> socket, then the echo socket -> pipe */
    CHECK(write(p[1], "hello", 5) == 5);
    CHECK(splice(p[0], NULL, fd, NULL, 100, 0) == 5);
    ssize_t got = 0;
    while (got < 5) {
        ssize_t r = splice(fd, NULL, q[1], NULL, 100, 0);
        CHECK(r > 0);
        got += r;
    }
    CHECK(read(q[0], buf, sizeof(buf)) == 5 && memcmp(buf, "hello", 5) == 0);
    /* file -> socket (the kernel wants a pipe; the shim reads the file), with an offset */
    int in = open(path, O_RDONLY);
    CHECK(in >= 0);
    loff_t off = 3;
    CHECK(splice(in, &off, fd, NULL, 50, SPLICE_F_MORE) == 50 && off == 53);
    CHECK(lseek(in, 0, SEEK_CUR) == 0);
    CHECK(recv(fd, buf, 50, MSG_WAITALL) == 50 && memcmp(buf, data + 3, 50) == 0);
    /* errors, like the kernel's */
    off = 0;
    CHECK(splice(p[0], &off, fd, NULL, 5, 0) == -1 && errno == ESPIPE);
    CHECK(splice(p[0], NULL, fd, &off, 5, 0) == -1 && errno == EINVAL);
    CHECK(splice(fd, &off, q[1], NULL, 5, 0) == -1 && errno == EINVAL);
    CHECK(splice(fd, NULL, in, NULL, 5, 0) == -1 && errno == EBADF);   /* read-only */
    int wfile = open(path, O_WRONLY);
    CHECK(wfile >= 0);
    CHECK(splice(fd, NULL, wfile, NULL, 5, 0) == -1 && errno == EINVAL); /* not a pipe */
    CHECK(splice(p[0], NULL, fd, NULL, 5, 0x100) == -1 && errno == EINVAL); /* flags */
    CHECK(splice(p[0], NULL, fd, NULL, 5, SPLICE_F_NONBLOCK) == -1 && errno == EAGAIN); /* empty */
    CHECK(fcntl(fd, F_SETFL, O_NONBLOCK) == 0);
    CHECK(splice(fd, NULL, q[1], NULL, 5, 0) == -1 && errno == EAGAIN); /* no data */
    CHECK(fcntl(fd, F_SETFL, 0) == 0);
    /* a bigger transfer: pipe -> socket -> pipe, byte exact */
    size_t sent = 0, back = 0, m = n < 200000 ? n : 200000;
    char *out = malloc(m);
    while (back < m) {
        if (sent < m) {
            ssize_t w = write(p[1], data + sent, m - sent < 4096 ? m - sent : 4096);
            CHECK(w > 0);
            ssize_t r = splice(p[0], NULL, fd, NULL, (size_t)w, 0);
            CHECK(r == w);
            sent += (size_t)r;
        }
        ssize_t r = splice(fd, NULL, q[1], NULL, 65536, SPLICE_F_NONBLOCK);
        if (r < 0) {
            CHECK(errno == EAGAIN);
            continue;
        }
        CHECK(r > 0);
        while (r > 0) {
            ssize_t k = read(q[0], out + back, (size_t)r);
            CHECK(k > 0);
            back += (size_t)k;
            r -= k;
        }
    }
    CHECK(memcmp(out, data, m) == 0);
    /* end of file: the echo peer closes after our SHUT_WR */
    CHECK(shutdown(fd, SHUT_WR) == 0);
    CHECK(splice(fd, NULL, q[1], NULL, 100, 0) == 0);
    printf("splice=ok\n");
    return 0;
}

/* ---- recvmmsg / sendmmsg ---- */
static int cmd_mmsg(void)
{
    int fd = connected();
    char a[] = "one", b[] = "three", c[] = "five5";
    struct iovec siov[3] = {{a, 3}, {b, 5}, {c, 5}};
    struct mmsghdr sv[3];
    memset(sv, 0, sizeof(sv));
    for (int i = 0; i < 3; i++) {
        sv[i].msg_hdr.msg_iov = &siov[i];
        sv[i].msg_hdr.msg_iovlen = 1;
    }
    errno = 77;
    CHECK(sendmmsg(fd, sv, 3, 0) == 3 && errno == 77);
    CHECK(sv[0].msg_len == 3 && sv[1].msg_len == 5 && sv[2].msg_len == 5);
    char r0[4], r1[4], r2[64];
    struct iovec riov[3] = {{r0, 4}, {r1, 4}, {r2, 64}};
    struct mmsghdr rv[3];
    memset(rv, 0, sizeof(rv));
    for (int i = 0; i < 3; i++) {
        rv[i].msg_hdr.msg_iov = &riov[i];
        rv[i].msg_hdr.msg_iovlen = 1;
    }
    /* 13 bytes echoed: wait for them all, then one blocking call fills 4 + 4 + 5 */
    CHECK(recv(fd, r2, 13, MSG_PEEK | MSG_WAITALL) == 13);
    int k = recvmmsg(fd, rv, 3, 0, NULL);
    CHECK(k == 3 && rv[0].msg_len == 4 && rv[1].msg_len == 4 && rv[2].msg_len == 5);
    CHECK(memcmp(r0, "onet", 4) == 0 && memcmp(r1, "hree", 4) == 0 && memcmp(r2, "five5", 5) == 0);
    /* nothing there: EAGAIN with MSG_DONTWAIT */
    CHECK(recvmmsg(fd, rv, 3, MSG_DONTWAIT, NULL) == -1 && errno == EAGAIN);
    /* MSG_WAITFORONE: the first waits, the rest do not */
    CHECK(send(fd, "xy", 2, 0) == 2);
    k = recvmmsg(fd, rv, 3, MSG_WAITFORONE, NULL);
    CHECK(k == 1 && rv[0].msg_len == 2 && memcmp(r0, "xy", 2) == 0);
    /* a timeout is checked after each entry and the rest written back */
    CHECK(send(fd, "zz", 2, 0) == 2);
    struct timespec to = {.tv_sec = 5, .tv_nsec = 0};
    k = recvmmsg(fd, rv, 3, MSG_WAITFORONE, &to);
    CHECK(k == 1 && to.tv_sec <= 5 && (to.tv_sec > 0 || to.tv_nsec > 0));
    to.tv_nsec = -1;
    CHECK(recvmmsg(fd, rv, 3, 0, &to) == -1 && errno == EINVAL);
    /* at end of file every entry gets 0, like the kernel's loop */
    CHECK(shutdown(fd, SHUT_WR) == 0);
    k = recvmmsg(fd, rv, 3, 0, NULL);
    CHECK(k == 3 && rv[0].msg_len == 0 && rv[2].msg_len == 0);
    signal(SIGPIPE, SIG_IGN);
    CHECK(sendmmsg(fd, sv, 3, 0) == -1 && errno == EPIPE);
    printf("mmsg=ok\n");
    return 0;
}

/* ---- close_range / closefrom ---- */
static int is_offloaded_echo(int fd)
{
    char b[8];
    if (send(fd, "pp", 2, MSG_NOSIGNAL) != 2)
        return 0;
    return recv(fd, b, 2, MSG_WAITALL) == 2 && memcmp(b, "pp", 2) == 0;
}

static int cmd_closerange(void)
{
    int a = connected(), b = connected(), c = connected();
    CHECK(dup2(c, 60) == 60 && dup2(c, 61) == 61);
    CHECK(is_offloaded_echo(60));
    /* CLOEXEC: nothing is closed, the sockets keep working */
    CHECK(close_range(60, 61, CLOSE_RANGE_CLOEXEC) == 0);
    CHECK(fcntl(60, F_GETFD) == FD_CLOEXEC && is_offloaded_echo(61));
    CHECK(close_range(61, 60, 0) == -1 && errno == EINVAL);
    CHECK(close_range(60, 61, 0x40) == -1 && errno == EINVAL && is_offloaded_echo(60));
    CHECK(close_range(60, 61, 0) == 0);
    CHECK(fcntl(60, F_GETFD) == -1 && errno == EBADF);
    /* the numbers come back as pipes: nothing of the socket is left in the table */
    int p[2];
    CHECK(pipe(p) == 0);
    /* F_DUPFD on a pipe does not touch the table: a stale entry would show */
    CHECK(fcntl(p[0], F_DUPFD, 60) == 60 && fcntl(p[1], F_DUPFD, 61) == 61);
    CHECK(write(61, "pipe", 4) == 4);
    char buf[8];
    CHECK(read(60, buf, 8) == 4 && memcmp(buf, "pipe", 4) == 0);
    CHECK(is_offloaded_echo(c));
    close(60);
    close(61);
    /* closefrom: everything from the lowest socket up, but not the control channel */
    int lo = a < b ? a : b;
    lo = lo < c ? lo : c;
    CHECK(dup2(a, 300) == 300);
    closefrom(lo);
    CHECK(fcntl(a, F_GETFD) == -1 && fcntl(300, F_GETFD) == -1 && fcntl(c, F_GETFD) == -1);
    CHECK(pipe(p) == 0);
    CHECK(write(p[1], "x", 1) == 1 && read(p[0], buf, 1) == 1);
    /* a new socket still talks to the adapter over the same channel */
    int d = connected();
    CHECK(is_offloaded_echo(d));
    printf("closerange=ok\n");
    return 0;
}

/* ---- exec ---- */
static int cmd_exec(char **argv, int argc)
{
    if (argc >= 6 && !strcmp(argv[4], "after")) {
        int fd = atoi(argv[5]);
        struct sockaddr_in peer;
        socklen_t len = sizeof(peer);
        CHECK(getpeername(fd, (struct sockaddr *)&peer, &len) == 0);
        CHECK(peer.sin_addr.s_addr == dst.sin_addr.s_addr && peer.sin_port == dst.sin_port);
        int v = 0;
        len = sizeof(v);
        CHECK(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &len) == 0 && v == 1); /* from shm */
        char pend[8];
        recv_exact(fd, pend, 7); /* echoed across the exec */
        CHECK(memcmp(pend, "pending", 7) == 0);
        size_t n = 1 << 20;
        char *out = malloc(n), *in = malloc(n);
        for (size_t i = 0; i < n; i++)
            out[i] = (char)(i * 131 + (i >> 9));
        struct collector c = {.fd = fd, .want = n, .buf = in};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, collect, &c) == 0);
        send_all(fd, out, n);
        pthread_join(t, NULL);
        CHECK(memcmp(in, out, n) == 0);
        printf("after=ok\nexec=ok\n");
        return 0;
    }
    int fd = connected();
    int one = 1;
    CHECK(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0);
    ping(fd, "before");
    send_all(fd, "pending", 7); /* echoed while we exec: read after it */
    char fds[16];
    snprintf(fds, sizeof(fds), "%d", fd);
    char *args[] = {argv[0], argv[1], argv[2], argv[3], "after", fds, NULL};
    printf("before=ok\n");
    /* the kernel keeps A (no FD_CLOEXEC); the fd table is the new image's to rebuild */
    CHECK(fcntl(fd, F_GETFD) == 0);
    execv("/proc/self/exe", args);
    CHECK(0);
    return 1;
}

/* ---- connect outcomes ---- */
static int cmd_connecting(void)
{
    int fd = tcp(SOCK_NONBLOCK);
    char c;
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EINPROGRESS);
    CHECK(send(fd, "x", 1, MSG_NOSIGNAL) == -1 && errno == EAGAIN);
    CHECK(recv(fd, &c, 1, 0) == -1 && errno == EAGAIN);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EALREADY);
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    CHECK(poll(&p, 1, 5000) == 1);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EISCONN);
    CHECK(send(fd, "x", 1, 0) == 1);
    printf("connecting=ok\n");
    return 0;
}

static int cmd_refused(void)
{
    char c;
    signal(SIGPIPE, SIG_IGN);
    /* blocking: connect() reports the refusal; the socket is unconnected again */
    int fd = tcp(0);
    CHECK(connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == ECONNREFUSED);
    CHECK(recv(fd, &c, 1, MSG_DONTWAIT) == -1 && errno == ENOTCONN);
    CHECK(send(fd, "x", 1, 0) == -1 && errno == EPIPE);
    /* nonblocking, error read by recv(): reported once, then end of file (as the kernel) */
    int nb = tcp(SOCK_NONBLOCK);
    CHECK(connect(nb, (struct sockaddr *)&dst, sizeof(dst)) == -1 && errno == EINPROGRESS);
    struct pollfd p = {.fd = nb, .events = POLLOUT};
    CHECK(poll(&p, 1, 5000) == 1);
    CHECK(recv(nb, &c, 1, 0) == -1 && errno == ECONNREFUSED);
    CHECK(recv(nb, &c, 1, 0) == 0);
    printf("refused=ok\n");
    return 0;
}

/* ---- fork while other threads hold the shim's table and channel locks ---- */
static volatile int stress_stop;

static void *stress(void *arg)
{
    (void)arg;
    int one = 1;
    while (!stress_stop) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);      /* table + channel */
        CHECK(fd >= 0);
        CHECK(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0); /* channel */
        int d = dup(fd);                                /* table */
        CHECK(d >= 0);
        close(d);
        close(fd);
    }
    return NULL;
}

static int cmd_forkstress(void)
{
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&t[i], NULL, stress, NULL) == 0);
    for (int i = 0; i < 100; i++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            /* the child uses the shim at once: a lock left held would hang it here */
            alarm(10); /* ... and a hung child must not outlive the test */
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            if (fd < 0 || connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0 ||
                send(fd, "k", 1, 0) != 1)
                _exit(3);
            char c;
            _exit(recv(fd, &c, 1, MSG_WAITALL) == 1 && c == 'k' ? 0 : 4);
        }
        int status;
        CHECK(waitpid(pid, &status, 0) == pid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    stress_stop = 1;
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    printf("forkstress=ok\n");
    return 0;
}

/* ---- vfork + exec with the socket as stdin/stdout (inetd, CGI) ---- */
static int cmd_spawn(void)
{
    int fd = connected();
    ping(fd, "spawn");
    CHECK(fd > 2 && fd < 50);
    /* the vfork child shares our memory: its dup2/close/close_range must leave
     * our table alone, and sh adopts the socket as fds 0 and 1 */
    pid_t pid = vfork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (dup2(fd, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 70) < 0 || close(fd) < 0 ||
            close_range(3, ~0U, 0) < 0)
            _exit(5);
        execl("/bin/sh", "sh", "-c", "read line; echo \"got $line\"", (char *)NULL);
        _exit(6);
    }
    CHECK(send(fd, "hello\n", 6, 0) == 6);
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char buf[32];
    CHECK(recv(fd, buf, 10, MSG_WAITALL) == 10 && memcmp(buf, "got hello\n", 10) == 0);
    /* still ours, and the child's fd 70 never entered our table */
    ping(fd, "after");
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(fcntl(p[0], F_DUPFD, 70) == 70);
    CHECK(write(p[1], "x", 1) == 1 && read(70, buf, 1) == 1 && buf[0] == 'x');
    printf("spawn=ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 4) {
        fprintf(stderr, "usage: probe CMD ADDR PORT ...\n");
        return 2;
    }
    memset(&dst, 0, sizeof(dst));
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)atoi(argv[3]));
    CHECK(inet_pton(AF_INET, argv[2], &dst.sin_addr) == 1);
    const char *c = argv[1];
    if (!strcmp(c, "echo") && argc == 6)
        return cmd_echo(argv[4], argv[5]);
    if (!strcmp(c, "connect"))
        return cmd_connect();
    if (!strcmp(c, "nbconnect"))
        return cmd_nbconnect();
    if (!strcmp(c, "eintr"))
        return cmd_eintr(0);
    if (!strcmp(c, "restart"))
        return cmd_eintr(1);
    if (!strcmp(c, "sigpipe"))
        return cmd_sigpipe(0);
    if (!strcmp(c, "nosignal"))
        return cmd_sigpipe(1);
    if (!strcmp(c, "fork"))
        return cmd_fork();
    if (!strcmp(c, "dup"))
        return cmd_dup();
    if (!strcmp(c, "misc"))
        return cmd_misc();
    if (!strcmp(c, "sendfile") && argc == 5)
        return cmd_sendfile(argv[4]);
    if (!strcmp(c, "sendfile_nb") && argc == 5)
        return cmd_sendfile_nb(argv[4]);
    if (!strcmp(c, "sendfile_epipe") && argc == 5)
        return cmd_sendfile_epipe(argv[4]);
    if (!strcmp(c, "splice") && argc == 5)
        return cmd_splice(argv[4]);
    if (!strcmp(c, "mmsg"))
        return cmd_mmsg();
    if (!strcmp(c, "closerange"))
        return cmd_closerange();
    if (!strcmp(c, "exec"))
        return cmd_exec(argv, argc);
    if (!strcmp(c, "connecting"))
        return cmd_connecting();
    if (!strcmp(c, "refused"))
        return cmd_refused();
    if (!strcmp(c, "forkstress"))
        return cmd_forkstress();
    if (!strcmp(c, "spawn"))
        return cmd_spawn();
    fprintf(stderr, "unknown command %s\n", c);
    return 2;
}
