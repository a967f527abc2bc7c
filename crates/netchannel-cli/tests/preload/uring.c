/* io_uring beside the preload shim (tests/preload.rs), with raw io_uring system calls (no
 * liburing needed to build it), the way event-loop runtimes use it.
 *
 *   uring files IP PORT FILE  reads FILE through io_uring (IORING_OP_READ), then sends it to
 *                             an echo server over a socket driven by epoll and plain
 *                             read/write, and checks the echo. Prints "ok". Under the shim
 *                             the socket must be a vsocket: io_uring for files is no reason
 *                             to give up on sockets.
 *   uring recv IP PORT        receives on a connected socket with IORING_OP_RECV, a data
 *                             operation the shim cannot see. Under the shim the vsocket
 *                             must then be reset (never corrupted silently or hung): the
 *                             program sends more, reads with plain read() until an error
 *                             and prints "reset" if it got ECONNRESET, else what it got.
 */
#include "check.h"
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static void ring_init(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->fd = (int)syscall(__NR_io_uring_setup, 8, &p);
    CHECK(r->fd >= 0, "io_uring_setup");
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    CHECK(sq != MAP_FAILED, "mmap sq ring");
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_CQ_RING);
    CHECK(cq != MAP_FAILED, "mmap cq ring");
    r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    CHECK(r->sqes != MAP_FAILED, "mmap sqes");
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

/* Submit one operation on fd into buf and wait (at most 10 s) for its result. */
static int ring_op(struct ring *r, int op, int fd, void *buf, unsigned len, unsigned long long off) {
    unsigned tail = *r->sq_tail;
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = (unsigned char)op;
    sqe->fd = fd;
    sqe->addr = (unsigned long long)(unsigned long)buf;
    sqe->len = len;
    sqe->off = off;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    CHECK(syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0) == 1, "io_uring_enter submit");
    for (int i = 0; i < 1000; i++) {
        unsigned head = *r->cq_head;
        if (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            int res = r->cqes[head & *r->cq_mask].res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            return res;
        }
        usleep(10000);
    }
    fprintf(stderr, "FAILED: io_uring operation %d on fd %d did not complete in 10 s\n", op, fd);
    exit(1);
}

static int connect_to(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(s >= 0, "socket");
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    CHECK(connect(s, (struct sockaddr *)&a, sizeof a) == 0, "connect");
    return s;
}

static int files(const char *ip, int port, const char *path) {
    struct ring r;
    ring_init(&r);
    int f = open(path, O_RDONLY);
    CHECK(f >= 0, "open the file");
    static char data[65536], back[65536];
    int n = ring_op(&r, IORING_OP_READ, f, data, sizeof data, 0);
    CHECK(n > 0, "IORING_OP_READ of the file");
    int s = connect_to(ip, port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl");
    CHECK(write(s, data, (size_t)n) == n, "write the file's bytes");
    int got = 0;
    while (got < n) {
        struct epoll_event e;
        CHECK(epoll_wait(ep, &e, 1, 10000) == 1, "epoll_wait for the echo");
        ssize_t k = read(s, back + got, (size_t)(n - got));
        CHECK(k > 0, "read the echo");
        got += (int)k;
    }
    CHECK(memcmp(data, back, (size_t)n) == 0, "the echo is the file");
    close(s);
    printf("ok\n");
    return 0;
}

static int recv_op(const char *ip, int port) {
    struct ring r;
    ring_init(&r);
    int s = connect_to(ip, port);
    CHECK(write(s, "ping", 4) == 4, "write ping");
    /* Wait until the echo is there (the kernel's poll on the socket). */
    struct pollfd pf = {s, POLLIN, 0};
    CHECK(poll(&pf, 1, 10000) == 1, "poll for the echo");
    char buf[64];
    int n = ring_op(&r, IORING_OP_RECV, s, buf, sizeof buf, 0);
    (void)n; /* plain TCP: "ping"; a vsocket: whatever the proxy held */
    CHECK(write(s, "more", 4) == 4 || errno == ECONNRESET || errno == EPIPE, "write more");
    /* Read with plain read() until EOF or an error (2 s per read, at most 10 reads). */
    struct timeval tv = {2, 0};
    CHECK(setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0, "SO_RCVTIMEO");
    for (int i = 0; i < 10; i++) {
        ssize_t k = read(s, buf, sizeof buf);
        if (k < 0 && errno == ECONNRESET) {
            printf("reset\n");
            return 0;
        }
        if (k < 0 && errno != EINTR && errno != EAGAIN) {
            printf("error %d\n", errno);
            return 0;
        }
        if (k == 0) {
            printf("eof\n");
            return 0;
        }
    }
    printf("hung\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "files") == 0)
        return files(argv[2], atoi(argv[3]), argv[4]);
    if (argc >= 4 && strcmp(argv[1], "recv") == 0)
        return recv_op(argv[2], atoi(argv[3]));
    fprintf(stderr, "usage: uring files IP PORT FILE | uring recv IP PORT\n");
    return 2;
}
