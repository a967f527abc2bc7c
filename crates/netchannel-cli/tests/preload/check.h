/* What the C programs of the preload shim tests share: the headers they use and CHECK, which
 * names the failed check, its line and errno, and exits 1. */
#ifndef NETCHANNEL_PRELOAD_TEST_CHECK_H
#define NETCHANNEL_PRELOAD_TEST_CHECK_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(c, what)                                                          \
    do {                                                                        \
        if (!(c)) {                                                             \
            fprintf(stderr, "FAILED: %s (line %d, errno %d %s)\n", what,        \
                    __LINE__, errno, strerror(errno));                          \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

#endif
