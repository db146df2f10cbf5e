/*
 * early.c - a preloaded library whose constructor uses an offloaded socket.
 * Listed after the shim in LD_PRELOAD, its constructor runs before the shim's:
 * the shim must work before its own constructor ran.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* EARLY_FD: an inherited offloaded socket, used before the shim's constructor
 * ran (the shim must adopt it on this first use) */
static void early_inherited(int fd)
{
    char buf[8] = {0};
    if (write(fd, "inherit", 7) != 7 || recv(fd, buf, 7, MSG_WAITALL) != 7 ||
        memcmp(buf, "inherit", 7) != 0) {
        perror("early inherited");
        _exit(3);
    }
    fputs("early_fd=ok\n", stdout);
    fflush(stdout);
}

__attribute__((constructor)) static void early(void)
{
    if (getenv("EARLY_FD")) {
        early_inherited(atoi(getenv("EARLY_FD")));
        return;
    }
    const char *port = getenv("EARLY_PORT");
    if (!port || !getenv("EARLY_ADDR"))
        return;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    inet_pton(AF_INET, getenv("EARLY_ADDR"), &sin.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    char buf[8] = {0};
    if (fd < 0 || connect(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 || write(fd, "early", 5) != 5 ||
        recv(fd, buf, 5, MSG_WAITALL) != 5 || memcmp(buf, "early", 5) != 0) {
        perror("early");
        _exit(3);
    }
    close(fd);
    fputs("early=ok\n", stdout);
    fflush(stdout);
}
