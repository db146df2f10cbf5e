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
    fprintf(stderr, "unknown command %s\n", c);
    return 2;
}
