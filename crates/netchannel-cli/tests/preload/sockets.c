/* A plain C program for the preload shim tests (tests/preload.rs): it uses the socket
 * surface the way unmodified programs do, and checks what the kernel would answer.
 *
 *   sockets server IP PORT   accept with an edge-triggered epoll on the listener; fork one
 *                            child per connection, which echoes until EOF, then writes
 *                            "bye" and closes (half close seen from the other side).
 *   sockets client IP PORT   non-blocking connect (EINPROGRESS, then SO_ERROR), flags kept,
 *                            edge- and level-triggered epoll, poll, select, FIONREAD,
 *                            MSG_PEEK, half close with EPOLLRDHUP, fork with an inherited
 *                            socket, an epoll registration made before connect, sendmmsg and
 *                            recvmmsg. Prints "ok" and exits 0, or names the failed check.
 *   sockets prefork IP PORT N
 *                            the shape of event-loop servers: the master listens, forks N
 *                            workers and only waits; each worker accepts (epoll on the
 *                            inherited listener), answers "ping" with "pong" and closes.
 *   sockets churn IP PORT N  N connect / "ping" / "pong" / close cycles, one at a time.
 *                            Prints "ok".
 *   sockets many IP PORT N   N non-blocking connects at once from one epoll loop (an event
 *                            loop's burst), each then "ping" / "pong" / close. Prints
 *                            "ok N inprogress K": K of the connects answered EINPROGRESS.
 *   sockets hold IP PORT N   one connection, then N more held open at once: prints "ok fds K",
 *                            K the descriptors the N took (a TCP connection takes one).
 *   sockets gone IP PORT [timeout]
 *                            one "ping" / "pong" with a prefork server (the address now has a
 *                            vsocket listener), prints "connected" and waits for a line on
 *                            stdin (the server is stopped meanwhile), then as "refused" (with
 *                            "timeout": the peer is frozen, SO_ERROR ETIMEDOUT).
 *   sockets refused IP PORT  a non-blocking connect to a port nobody listens on: reported
 *                            as ERR|HUP to an events = 0 epoll registration, then SO_ERROR
 *                            ECONNREFUSED. Prints "ok".
 *   sockets pass IP PORT     an event loop that pauses inside a pass: it accepts two
 *                            connections, waits until epoll reports both readable in one
 *                            call, answers the first, sleeps 3 s (nanosleep), then answers
 *                            the second. Repeats for the next two.
 *   sockets pass_client IP PORT
 *                            two connections each send "ping" at once; prints "ok MS", MS
 *                            the milliseconds until the first "pong" arrived (an answer
 *                            waiting for the server's sleep would take 3000).
 */
#include "check.h"
#include <netinet/tcp.h>
#include <dirent.h>
#include <signal.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <time.h>

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

/* A non-blocking, close-on-exec TCP listener on ip:port. */
static int listen_on(const char *ip, int port, int backlog) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(l >= 0, "socket");
    int one = 1;
    CHECK(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0, "SO_REUSEADDR");
    struct sockaddr_in a = addr_of(ip, port);
    CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0, "bind");
    CHECK(listen(l, backlog) == 0, "listen");
    return l;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pf = {fd, POLLOUT, 0};
            poll(&pf, 1, 1000);
            continue;
        }
        CHECK(w > 0, "send");
        p += w;
        n -= (size_t)w;
    }
}

/* Read exactly n bytes (blocking on poll between non-blocking reads). */
static void read_exact(int fd, char *p, size_t n) {
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pf = {fd, POLLIN, 0};
            CHECK(poll(&pf, 1, 10000) == 1, "poll for data within 10 s");
            continue;
        }
        CHECK(r > 0, "recv of expected bytes");
        p += r;
        n -= (size_t)r;
    }
}

static void echo(int fd) {
    char buf[65536];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r == 0)
            break;
        if (r < 0 && errno == EINTR)
            continue;
        CHECK(r > 0, "server read");
        write_all(fd, buf, (size_t)r);
    }
    write_all(fd, "bye", 3);
    close(fd);
}

static int server(const char *ip, int port) {
    signal(SIGCHLD, SIG_IGN);
    int l = listen_on(ip, port, 64);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.fd = l};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev) == 0, "epoll_ctl listener");
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        struct epoll_event got;
        int n = epoll_wait(ep, &got, 1, -1);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n == 1, "epoll_wait on the listener");
        for (;;) { /* edge triggered: drain the queue */
            struct sockaddr_in peer;
            socklen_t pl = sizeof peer;
            int c = accept4(l, (struct sockaddr *)&peer, &pl, SOCK_CLOEXEC);
            if (c < 0 && errno == EAGAIN)
                break;
            CHECK(c >= 0, "accept4");
            CHECK(pl == sizeof peer && peer.sin_family == AF_INET, "accept4 peer address");
            int fdfl = fcntl(c, F_GETFD);
            CHECK(fdfl & FD_CLOEXEC, "SOCK_CLOEXEC of accept4 kept");
            CHECK(!(fcntl(c, F_GETFL) & O_NONBLOCK), "accepted socket blocking");
            pid_t p = fork();
            CHECK(p >= 0, "fork");
            if (p == 0) {
                close(l);
                echo(c);
                _exit(0);
            }
            close(c);
        }
    }
}

static int connect_nb(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(s >= 0, "socket");
    int one = 1;
    CHECK(setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0, "TCP_NODELAY");
    struct sockaddr_in a = addr_of(ip, port);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    CHECK(r == 0 || errno == EINPROGRESS, "non-blocking connect: 0 or EINPROGRESS");
    struct pollfd pf = {s, POLLOUT, 0};
    CHECK(poll(&pf, 1, 10000) == 1 && (pf.revents & POLLOUT), "writable after connect");
    int err = -1;
    socklen_t el = sizeof err;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0, "SO_ERROR 0");
    CHECK(fcntl(s, F_GETFL) & O_NONBLOCK, "SOCK_NONBLOCK kept");
    CHECK(fcntl(s, F_GETFD) & FD_CLOEXEC, "SOCK_CLOEXEC kept");
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    CHECK(getpeername(s, (struct sockaddr *)&peer, &pl) == 0, "getpeername");
    CHECK(peer.sin_port == a.sin_port && peer.sin_addr.s_addr == a.sin_addr.s_addr,
          "getpeername is the address connected to");
    return s;
}

static int client(const char *ip, int port) {
    int s = connect_nb(ip, port);

    /* Edge triggered: one event per arrival, none again until more arrives. */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = s};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl ET");
    struct epoll_event got;
    CHECK(epoll_wait(ep, &got, 1, 5000) == 1 && (got.events & EPOLLOUT) && !(got.events & EPOLLIN),
          "ET: writable, nothing to read yet");
    CHECK(epoll_wait(ep, &got, 1, 100) == 0, "ET: no second event without a change");
    write_all(s, "ping", 4);
    CHECK(epoll_wait(ep, &got, 1, 10000) == 1 && (got.events & EPOLLIN), "ET: EPOLLIN on arrival");
    usleep(50000);
    int n = epoll_wait(ep, &got, 1, 100);
    CHECK(n == 0 || !(got.events & EPOLLIN), "ET: EPOLLIN not repeated while unread");

    /* Level triggered, poll, select, FIONREAD and MSG_PEEK all see the unread 4 bytes. */
    int lt = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = s};
    CHECK(epoll_ctl(lt, EPOLL_CTL_ADD, s, &lev) == 0, "epoll_ctl LT");
    CHECK(epoll_wait(lt, &got, 1, 1000) == 1 && (got.events & EPOLLIN), "LT: EPOLLIN");
    CHECK(epoll_wait(lt, &got, 1, 1000) == 1 && (got.events & EPOLLIN), "LT: EPOLLIN again");
    struct pollfd pf = {s, POLLIN, 0};
    CHECK(poll(&pf, 1, 1000) == 1 && (pf.revents & POLLIN), "poll POLLIN");
    fd_set rd;
    FD_ZERO(&rd);
    FD_SET(s, &rd);
    struct timeval tv = {1, 0};
    CHECK(select(s + 1, &rd, NULL, NULL, &tv) == 1 && FD_ISSET(s, &rd), "select readable");
    int avail = 0;
    CHECK(ioctl(s, FIONREAD, &avail) == 0 && avail == 4, "FIONREAD 4");
    char buf[64];
    CHECK(recv(s, buf, sizeof buf, MSG_PEEK) == 4 && memcmp(buf, "ping", 4) == 0, "MSG_PEEK");
    CHECK(recv(s, buf, sizeof buf, MSG_DONTWAIT) == 4 && memcmp(buf, "ping", 4) == 0, "recv");
    CHECK(recv(s, buf, sizeof buf, MSG_DONTWAIT) < 0 && errno == EAGAIN, "EAGAIN when drained");
    CHECK(epoll_wait(lt, &got, 1, 100) == 0, "LT: quiet when drained");

    /* fork: the child uses the inherited vsocket, then the parent goes on with it. */
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        write_all(s, "child", 5);
        char b[5];
        read_exact(s, b, 5);
        _exit(memcmp(b, "child", 5) == 0 ? 0 : 3);
    }
    int st = 0;
    CHECK(waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child's echo");
    /* A second vsocket opened in a child of its own. */
    p = fork();
    CHECK(p >= 0, "fork 2");
    if (p == 0) {
        int c = connect_nb(ip, port);
        write_all(c, "new", 3);
        char b[3];
        read_exact(c, b, 3);
        _exit(memcmp(b, "new", 3) == 0 ? 0 : 4);
    }
    CHECK(waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child's own vsocket");

    /* An epoll registration made before connect (nginx makes them) survives the connect. */
    {
        int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        CHECK(c >= 0, "socket");
        int pe = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event pev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u64 = 77};
        CHECK(epoll_ctl(pe, EPOLL_CTL_ADD, c, &pev) == 0, "epoll_ctl before connect");
        struct sockaddr_in a = addr_of(ip, port);
        int r = connect(c, (struct sockaddr *)&a, sizeof a);
        CHECK(r == 0 || errno == EINPROGRESS, "connect after epoll_ctl");
        CHECK(epoll_wait(pe, &got, 1, 10000) == 1 && got.data.u64 == 77 && (got.events & EPOLLOUT),
              "EPOLLOUT through the registration made before connect");
        write_all(c, "pre", 3);
        int in = 0;
        for (int i = 0; i < 10 && !in; i++) {
            CHECK(epoll_wait(pe, &got, 1, 10000) == 1 && got.data.u64 == 77,
                  "an event through the registration made before connect");
            in = (got.events & EPOLLIN) != 0;
        }
        CHECK(in, "EPOLLIN through the registration made before connect");
        read_exact(c, buf, 3);
        CHECK(memcmp(buf, "pre", 3) == 0, "echo on the socket registered before connect");
        close(c);
        close(pe);
    }

    /* sendmmsg / recvmmsg: three messages out, their bytes back in order. */
    {
        struct iovec out[3] = {{(void *)"ab", 2}, {(void *)"cd", 2}, {(void *)"ef", 2}};
        struct mmsghdr om[3];
        memset(om, 0, sizeof om);
        for (int i = 0; i < 3; i++) {
            om[i].msg_hdr.msg_iov = &out[i];
            om[i].msg_hdr.msg_iovlen = 1;
        }
        CHECK(sendmmsg(s, om, 3, MSG_NOSIGNAL) == 3 && om[0].msg_len == 2 && om[2].msg_len == 2, "sendmmsg of 3");
        char in[4][6], got[6];
        size_t have = 0;
        while (have < 6) {
            struct iovec iv[4];
            struct mmsghdr im[4];
            memset(im, 0, sizeof im);
            for (int i = 0; i < 4; i++) {
                iv[i].iov_base = in[i];
                iv[i].iov_len = 6 - have;
                im[i].msg_hdr.msg_iov = &iv[i];
                im[i].msg_hdr.msg_iovlen = 1;
            }
            struct pollfd pf = {s, POLLIN, 0};
            CHECK(poll(&pf, 1, 10000) == 1, "the echo of the mmsg bytes within 10 s");
            int n = recvmmsg(s, im, 4, MSG_WAITFORONE, NULL);
            CHECK(n >= 1, "recvmmsg with MSG_WAITFORONE");
            for (int i = 0; i < n; i++) {
                CHECK(have + im[i].msg_len <= 6, "no more bytes than were sent");
                memcpy(got + have, in[i], im[i].msg_len);
                have += im[i].msg_len;
            }
        }
        CHECK(memcmp(got, "abcdef", 6) == 0, "sendmmsg/recvmmsg bytes in order");
    }

    /* A larger exchange through writev/readv-sized buffers. */
    static char big[1 << 20], back[1 << 20];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (char)(i * 7 + 3);
    pid_t w = fork();
    if (w == 0) {
        write_all(s, big, sizeof big);
        _exit(0);
    }
    read_exact(s, back, sizeof back);
    CHECK(waitpid(w, &st, 0) == w && WIFEXITED(st) && WEXITSTATUS(st) == 0, "writer child");
    CHECK(memcmp(big, back, sizeof big) == 0, "1 MiB echoed intact");

    /* Half close: our FIN reaches the server, whose "bye" and FIN come back. */
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown(SHUT_WR)");
    read_exact(s, buf, 3);
    CHECK(memcmp(buf, "bye", 3) == 0, "bye after half close");
    struct epoll_event rh = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = s};
    int ep2 = epoll_create1(EPOLL_CLOEXEC);
    CHECK(epoll_ctl(ep2, EPOLL_CTL_ADD, s, &rh) == 0, "epoll_ctl RDHUP");
    /* On the shared-memory path the IN token for the FIN can precede shutdown(B) by a few
     * microseconds: wait (at most 10 s in all) until RDHUP shows, every event being IN. */
    int rdhup = 0;
    for (int i = 0; i < 100 && !rdhup; i++) {
        CHECK(epoll_wait(ep2, &got, 1, 10000) == 1 && (got.events & EPOLLIN), "EPOLLIN on peer FIN");
        rdhup = (got.events & EPOLLRDHUP) != 0;
        if (!rdhup)
            usleep(100000);
    }
    CHECK(rdhup, "EPOLLRDHUP on peer FIN");
    CHECK(recv(s, buf, sizeof buf, 0) == 0, "EOF after the peer's FIN");
    close(s);
    printf("ok\n");
    return 0;
}

static void prefork_worker(int l) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = l};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev) == 0, "epoll_ctl listener in a worker");
    for (;;) {
        struct epoll_event got;
        int n = epoll_wait(ep, &got, 1, -1);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n == 1, "epoll_wait in a worker");
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0 && errno == EAGAIN)
            continue; /* another worker took it */
        CHECK(c >= 0, "accept4 in a worker");
        char buf[4];
        size_t have = 0;
        while (have < 4) { /* a probe that connects and closes sends nothing: skip it */
            ssize_t r = recv(c, buf + have, 4 - have, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            have += (size_t)r;
        }
        if (have == 4 && memcmp(buf, "ping", 4) == 0)
            write_all(c, "pong", 4);
        close(c);
    }
}

static int prefork(const char *ip, int port, int workers) {
    int l = listen_on(ip, port, 512);
    for (int i = 0; i < workers; i++) {
        pid_t p = fork();
        CHECK(p >= 0, "fork a worker");
        if (p == 0) {
            prefork_worker(l);
            _exit(0);
        }
    }
    /* The master keeps the listener open and never accepts, as nginx's does. */
    for (;;)
        pause();
}

/* "ping" to a prefork worker, its "pong" back. */
static void ping_pong(int s) {
    write_all(s, "ping", 4);
    char buf[4];
    read_exact(s, buf, 4);
    CHECK(memcmp(buf, "pong", 4) == 0, "pong from a worker");
}

static int churn(const char *ip, int port, int n) {
    struct sockaddr_in a = addr_of(ip, port);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(s >= 0, "socket");
        CHECK(connect(s, (struct sockaddr *)&a, sizeof a) == 0, "connect");
        ping_pong(s);
        close(s);
    }
    printf("ok\n");
    return 0;
}

/* One pass of many()'s event loop: what epoll reports within timeout_ms. A connection
 * reported writable must take its "ping" at once (writable means connected). */
static int many_pass(int ep, int *fds, int timeout_ms) {
    struct epoll_event got[64];
    int k = epoll_wait(ep, got, 64, timeout_ms);
    if (k < 0 && errno == EINTR)
        return 0;
    CHECK(k >= 0, "epoll_wait");
    int done = 0;
    for (int j = 0; j < k; j++) {
        int i = (int)got[j].data.u32, s = fds[i];
        CHECK(!(got[j].events & (EPOLLERR | EPOLLHUP)), "no connection failed");
        if (got[j].events & EPOLLOUT) {
            int err = -1;
            socklen_t el = sizeof err;
            CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0, "SO_ERROR 0 once writable");
            CHECK(send(s, "ping", 4, MSG_NOSIGNAL) == 4, "a socket reported writable takes its ping");
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0, "epoll_ctl MOD to EPOLLIN");
        } else if (got[j].events & EPOLLIN) {
            char buf[4];
            ssize_t r = recv(s, buf, sizeof buf, MSG_WAITALL);
            CHECK(r == 4 && memcmp(buf, "pong", 4) == 0, "pong");
            CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL) == 0, "epoll_ctl DEL");
            close(s);
            done++;
        }
    }
    return done;
}

static int many(const char *ip, int port, int n) {
    struct sockaddr_in a = addr_of(ip, port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int *fds = calloc((size_t)n, sizeof *fds);
    int inprogress = 0, done = 0;
    /* Each connection: writable (connected) -> "ping" -> readable -> "pong" -> close, with
     * the events of earlier connections handled between the connects, as event loops do. */
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        CHECK(s >= 0, "socket");
        int r = connect(s, (struct sockaddr *)&a, sizeof a);
        CHECK(r == 0 || errno == EINPROGRESS, "non-blocking connect: 0 or EINPROGRESS");
        inprogress += r < 0;
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLET, .data.u32 = (uint32_t)i};
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl of a connecting socket");
        fds[i] = s;
        done += many_pass(ep, fds, 0);
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (done < n) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        CHECK(t.tv_sec - t0.tv_sec < 30, "every connection answered within 30 s");
        done += many_pass(ep, fds, 1000);
    }
    printf("ok %d inprogress %d\n", n, inprogress);
    return 0;
}

/* A failed non-blocking connect: EINPROGRESS (or the error at once), then ERR|HUP to an
 * events = 0 registration and SO_ERROR `want`. */
static int failed_connect(const char *ip, int port, int want) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(s >= 0, "socket");
    struct sockaddr_in a = addr_of(ip, port);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno == want) {
        printf("ok\n");
        return 0;
    }
    CHECK(r < 0 && errno == EINPROGRESS, "failing non-blocking connect: EINPROGRESS or its error");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = 0, .data.fd = s};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl events = 0");
    struct epoll_event got;
    CHECK(epoll_wait(ep, &got, 1, 10000) == 1, "the failure reported within 10 s");
    CHECK((got.events & EPOLLERR) && (got.events & EPOLLHUP), "ERR|HUP to an events = 0 registration");
    int err = 0;
    socklen_t el = sizeof err;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) == 0, "getsockopt SO_ERROR");
    if (err != want)
        fprintf(stderr, "SO_ERROR %d (%s), expected %d (%s)\n", err, strerror(err), want, strerror(want));
    CHECK(err == want, "SO_ERROR says why");
    close(s);
    printf("ok\n");
    return 0;
}

static int open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL, "opendir /proc/self/fd");
    int n = 0;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n;
}

static int hold(const char *ip, int port, int n) {
    struct sockaddr_in a = addr_of(ip, port);
    /* The first connection makes what a process makes once (its daemon connection...). */
    int first = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(first >= 0 && connect(first, (struct sockaddr *)&a, sizeof a) == 0, "first connect");
    int before = open_fds();
    int *fds = calloc((size_t)n, sizeof *fds);
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(fds[i] >= 0 && connect(fds[i], (struct sockaddr *)&a, sizeof a) == 0, "connect");
    }
    int after = open_fds();
    for (int i = 0; i < n; i++)
        close(fds[i]);
    close(first);
    printf("ok fds %d\n", after - before);
    return 0;
}

static int refused(const char *ip, int port) { return failed_connect(ip, port, ECONNREFUSED); }

static int gone(const char *ip, int port, int want) {
    struct sockaddr_in a = addr_of(ip, port);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0, "connect while listening");
    ping_pong(s);
    close(s);
    printf("connected\n");
    fflush(stdout);
    char line[16];
    CHECK(fgets(line, sizeof line, stdin) != NULL, "a line on stdin once the server is gone");
    return failed_connect(ip, port, want);
}

static long ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static int pass(const char *ip, int port) {
    int l = listen_on(ip, port, 16);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (;;) {
        int c[2];
        for (int i = 0; i < 2;) {
            struct pollfd pf = {l, POLLIN, 0};
            CHECK(poll(&pf, 1, -1) == 1, "poll the listener");
            c[i] = accept4(l, NULL, NULL, SOCK_NONBLOCK);
            CHECK(c[i] >= 0, "accept4");
            /* A connection that closes without a ping (the test's probe) is not a client. */
            struct pollfd cf = {c[i], POLLIN, 0};
            char b;
            if (poll(&cf, 1, 5000) != 1 || recv(c[i], &b, 1, MSG_PEEK) != 1) {
                close(c[i]);
                continue;
            }
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c[i], &ev) == 0, "epoll_ctl");
            i++;
        }
        /* Both requests in: one epoll_wait reports the two. */
        struct epoll_event got[2];
        int k = 0;
        for (int tries = 0; tries < 100 && k < 2; tries++) {
            struct pollfd pf[2] = {{c[0], POLLIN, 0}, {c[1], POLLIN, 0}};
            poll(pf, 2, 100);
            if ((pf[0].revents & POLLIN) && (pf[1].revents & POLLIN))
                k = epoll_wait(ep, got, 2, 1000);
        }
        CHECK(k == 2, "one epoll_wait reports both connections");
        for (int j = 0; j < 2; j++) {
            int s = c[got[j].data.u32];
            char buf[4];
            CHECK(recv(s, buf, 4, MSG_WAITALL) == 4 && memcmp(buf, "ping", 4) == 0, "ping");
            CHECK(send(s, "pong", 4, MSG_NOSIGNAL) == 4, "send pong");
            if (j == 0) {
                struct timespec pause = {3, 0};
                nanosleep(&pause, NULL);
            }
        }
        for (int i = 0; i < 2; i++) {
            epoll_ctl(ep, EPOLL_CTL_DEL, c[i], NULL);
            close(c[i]);
        }
    }
}

static int pass_client(const char *ip, int port) {
    struct sockaddr_in a = addr_of(ip, port);
    int s[2];
    for (int i = 0; i < 2; i++) {
        s[i] = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(s[i] >= 0, "socket");
        CHECK(connect(s[i], (struct sockaddr *)&a, sizeof a) == 0, "connect");
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 2; i++)
        write_all(s[i], "ping", 4);
    struct pollfd pf[2] = {{s[0], POLLIN, 0}, {s[1], POLLIN, 0}};
    CHECK(poll(pf, 2, 10000) >= 1, "a pong within 10 s");
    long first = ms_since(&t0);
    for (int i = 0; i < 2; i++) {
        char buf[4];
        read_exact(s[i], buf, 4);
        CHECK(memcmp(buf, "pong", 4) == 0, "pong");
        close(s[i]);
    }
    printf("ok %ld\n", first);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: sockets server|client|refused|gone IP PORT | prefork|churn|many|hold IP PORT N\n");
        return 2;
    }
    int port = atoi(argv[3]);
    if (strcmp(argv[1], "server") == 0)
        return server(argv[2], port);
    if (strcmp(argv[1], "prefork") == 0 && argc == 5)
        return prefork(argv[2], port, atoi(argv[4]));
    if (strcmp(argv[1], "churn") == 0 && argc == 5)
        return churn(argv[2], port, atoi(argv[4]));
    if (strcmp(argv[1], "many") == 0 && argc == 5)
        return many(argv[2], port, atoi(argv[4]));
    if (strcmp(argv[1], "hold") == 0 && argc == 5)
        return hold(argv[2], port, atoi(argv[4]));
    if (strcmp(argv[1], "gone") == 0)
        return gone(argv[2], port, argc == 5 && strcmp(argv[4], "timeout") == 0 ? ETIMEDOUT : ECONNREFUSED);
    if (strcmp(argv[1], "refused") == 0)
        return refused(argv[2], port);
    if (strcmp(argv[1], "pass") == 0)
        return pass(argv[2], port);
    if (strcmp(argv[1], "pass_client") == 0)
        return pass_client(argv[2], port);
    return client(argv[2], port);
}
