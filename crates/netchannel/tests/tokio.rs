//! The async API (`netchannel::tokio`) and the pollable descriptor under it, on two
//! embedded hosts over loopback: many concurrent verified echoes on both runtime flavours,
//! hyper with a large body, cancelled futures that leave nothing behind, a raw `poll(2)`
//! loop, and readiness after a reset and a half close. Every test is bounded in time.
#![cfg(feature = "tokio")]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check, fill, two_hosts, within, Daemon};
use netchannel::daemon::Client;
use netchannel::tokio::{VListener, VStream};
use netchannel::{Class, Config, Host};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn small_buffers(c: &mut Config) {
    c.send_buffer = 256 << 10;
    c.recv_buffer = 256 << 10;
}

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    let mut b = if multi {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().expect("runtime")
}

/// Where a test's vsockets live: two embedded hosts A and B, or two daemons on loopback
/// with this process as an app of each (the daemon home: everything between the app and its
/// daemon crosses the Unix socket and shared memory as between processes).
#[derive(Clone)]
enum Home {
    Embedded(Host, Host),
    Daemon(Arc<(Daemon, Daemon)>, Client, Client),
}

impl Home {
    fn new(daemon: bool, tweak: impl Fn(&mut Config)) -> Home {
        if !daemon {
            let (a, b) = two_hosts(tweak);
            return Home::Embedded(a, b);
        }
        let (x, y) = common::addr_pair();
        let limits = |c: &mut Config| {
            tweak(c);
            // Many concurrent connects, each on a control connection of its own.
            c.daemon.max_connections_per_process = 4096;
        };
        let (da, db) = (common::daemon(x, &limits), common::daemon(y, &limits));
        let (ca, cb) = (Client::connect(&da.socket).unwrap(), Client::connect(&db.socket).unwrap());
        Home::Daemon(Arc::new((da, db)), ca, cb)
    }

    /// A blocking listener on B, any port.
    fn bind(&self) -> netchannel::VListener {
        match self {
            Home::Embedded(_, b) => b.bind(0).unwrap(),
            Home::Daemon(_, _, b) => b.bind(0).unwrap(),
        }
    }

    /// A blocking connect from A.
    fn connect(&self, addr: SocketAddr, class: Class) -> std::io::Result<netchannel::VStream> {
        match self {
            Home::Embedded(a, _) => a.connect_class(addr, class),
            Home::Daemon(_, a, _) => a.connect_class(addr, class),
        }
    }

    /// An async connect from A.
    async fn connect_async(&self, addr: SocketAddr, class: Class) -> std::io::Result<VStream> {
        match self {
            Home::Embedded(a, _) => VStream::connect_class_with(a, addr, class).await,
            Home::Daemon(_, a, _) => {
                let a = a.clone();
                tokio::task::spawn_blocking(move || a.connect_class(addr, class))
                    .await
                    .unwrap()
                    .and_then(VStream::from_std)
            }
        }
    }

    /// Vsockets left on A and on B (the hosts' stats, or the daemons' status).
    fn vsockets(&self) -> (usize, usize) {
        match self {
            Home::Embedded(a, b) => (a.stats().vsockets, b.stats().vsockets),
            Home::Daemon(d, _, _) => {
                let n = |s: &std::path::Path| {
                    Client::status_of(s).unwrap()["vsockets"].as_array().expect("vsockets").len()
                };
                (n(&d.0.socket), n(&d.1.socket))
            }
        }
    }
}

/// Wait until `f` holds, at most `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn fds_now() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| format!("{:?}->{:?}", e.file_name(), std::fs::read_link(e.path()).ok()))
        .collect();
    v.sort();
    v
}

/// `n` concurrent vsockets of `class`, each echoing messages of random sizes, all verified.
/// Latency-class vsockets have each runtime read their home channel (the lend).
fn many_echoes(daemon: bool, multi: bool, n: usize, class: Class) {
    within(240, move || {
        let home = Home::new(daemon, small_buffers);
        let rt = runtime(multi);
        let h = home.clone();
        rt.block_on(async move {
            let listener = VListener::from_std(h.bind()).unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let mut served = Vec::new();
                for _ in 0..n {
                    let (s, _) = listener.accept().await.expect("accept");
                    served.push(tokio::spawn(async move {
                        let (mut rd, mut wr) = s.into_split();
                        tokio::io::copy(&mut rd, &mut wr).await.expect("echo")
                    }));
                }
                let mut total = 0;
                for t in served {
                    total += t.await.unwrap();
                }
                total
            });
            let mut clients = Vec::new();
            for i in 0..n {
                let h = h.clone();
                clients.push(tokio::spawn(async move {
                    let mut s = h.connect_async(addr, class).await.expect("connect");
                    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut off = 0u64;
                    for _ in 0..4 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let len = 1 + (x % 40_000) as usize;
                        let mut msg = vec![0u8; len];
                        fill(i as u64, off, &mut msg);
                        let (mut rd, mut wr) = s.split();
                        let mut back = vec![0u8; len];
                        let (w, r) = tokio::join!(wr.write_all(&msg), rd.read_exact(&mut back));
                        w.expect("write");
                        r.expect("read the echo");
                        assert_eq!(check(i as u64, off, &back), None, "vsocket {i}: echo differs");
                        off += len as u64;
                    }
                    s.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.unwrap();
                    assert!(rest.is_empty());
                    off
                }));
            }
            let mut sent = 0;
            for c in clients {
                sent += c.await.unwrap();
            }
            assert_eq!(server.await.unwrap(), sent, "the server echoed every byte");
        });
        eventually(20, "every vsocket closed", || home.vsockets() == (0, 0));
    });
}

#[test]
fn a_thousand_concurrent_latency_echoes_current_thread() {
    many_echoes(false, false, 1000, Class::Latency);
}

#[test]
fn a_thousand_concurrent_latency_echoes_multi_thread() {
    many_echoes(false, true, 1000, Class::Latency);
}

/// Latency-class requests of many tasks of one runtime share writes: a read of the lent
/// channel that wakes several tasks has their answers leave together at the end of the
/// runtime's tick, one `writev` per channel instead of one per vsocket write. 16 tasks in
/// lock step, 200 verified round trips each, cost host A's latency channel fewer than one
/// write per 4 requests (one per request before; a handful more for the connects).
#[test]
fn requests_of_many_tasks_leave_in_shared_writes() {
    within(120, || {
        let (a, b) = two_hosts(|_| {});
        let writes = |h: &Host| -> u64 {
            h.stats().channels.iter().filter(|c| c.class == Class::Latency).map(|c| c.writes).sum()
        };
        let (tasks, rounds) = (16u64, 200u64);
        let before = writes(&a);
        runtime(false).block_on(async {
            let listener = VListener::from_std(b.bind(0).unwrap()).unwrap();
            let addr = common::at(&b, listener.local_addr().unwrap().port());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        while s.read_exact(&mut buf).await.is_ok() {
                            s.write_all(&buf).await.expect("echo");
                        }
                    });
                }
            });
            let mut streams = Vec::new();
            for _ in 0..tasks {
                streams.push(VStream::connect_class_with(&a, addr, Class::Latency).await.expect("connect"));
            }
            let mut clients = Vec::new();
            for (i, mut s) in streams.into_iter().enumerate() {
                clients.push(tokio::spawn(async move {
                    let mut msg = [0u8; 64];
                    let mut back = [0u8; 64];
                    for r in 0..rounds {
                        fill(i as u64, r * 64, &mut msg);
                        s.write_all(&msg).await.expect("request");
                        s.read_exact(&mut back).await.expect("answer");
                        assert_eq!(check(i as u64, r * 64, &back), None, "stream {i}, round {r}");
                    }
                }));
            }
            for c in clients {
                c.await.expect("a client task failed");
            }
        });
        let made = writes(&a) - before;
        let requests = tasks * rounds;
        assert!(made * 4 < requests, "{made} writes for {requests} requests");
    });
}

/// A latency-class stream makes its runtime the reader of the home channel (the lend); a
/// runtime that does not run meanwhile (a current-thread runtime outside `block_on`) must
/// not stall the channel's other vsockets: a blocking writer waiting for credit that only
/// that channel brings, and blocking readers, still finish; a runtime dropped gives the
/// channel back, and the next runtime's streams work.
#[test]
fn a_runtime_that_does_not_run_stalls_no_one_else_on_its_channel() {
    within(120, || {
        let (a, b) = two_hosts(small_buffers);
        let lat = b.bind(0).unwrap();
        let addr = common::at(&b, lat.local_addr().unwrap().port());
        let rt = runtime(false);
        // A pending read on a latency stream: the runtime now holds A's latency channel.
        let (held, peer) = rt.block_on(async {
            let c = VStream::connect_class_with(&a, addr, Class::Latency).await.unwrap();
            let (s, _) = lat.accept().unwrap();
            let mut buf = [0u8; 1];
            let mut c = c;
            assert!(tokio::time::timeout(Duration::from_millis(20), c.read(&mut buf)).await.is_err());
            (c, s)
        });
        // The runtime is not running now. A blocking latency stream on the same channel:
        // 4 MiB through a 256 KiB send buffer needs credit, which A's latency channel
        // brings.
        let mut w = a.connect_class(addr, Class::Latency).unwrap();
        let (mut r, _) = lat.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 << 20];
            r.read_exact(&mut got).unwrap();
            assert_eq!(check(7, 0, &got), None, "the blocking stream's bytes");
            r.write_all(b"done").unwrap();
        });
        let mut msg = vec![0u8; 4 << 20];
        fill(7, 0, &mut msg);
        w.write_all(&msg).unwrap();
        let mut done = [0u8; 4];
        w.read_exact(&mut done).unwrap();
        assert_eq!(&done, b"done");
        reader.join().unwrap();
        // The held stream still works once its runtime runs again.
        let mut peer = peer;
        peer.write_all(b"x").unwrap();
        rt.block_on(async {
            let mut held = held;
            let mut buf = [0u8; 1];
            held.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"x");
            drop(held);
        });
        drop(rt);
        // A new runtime: its latency streams echo.
        runtime(true).block_on(async {
            let mut c = VStream::connect_class_with(&a, addr, Class::Latency).await.unwrap();
            let s = lat.accept().unwrap();
            let echo = std::thread::spawn(move || {
                let mut s = s.0;
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            });
            c.write_all(b"again").await.unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"again");
            echo.join().unwrap();
        });
    });
}

#[test]
fn a_thousand_concurrent_echoes_current_thread() {
    many_echoes(false, false, 1000, Class::Throughput);
}

#[test]
fn a_thousand_concurrent_echoes_through_the_daemon_current_thread() {
    many_echoes(true, false, 1000, Class::Throughput);
}

#[test]
fn a_thousand_concurrent_echoes_through_the_daemon_multi_thread() {
    many_echoes(true, true, 1000, Class::Latency);
}

#[test]
fn a_thousand_concurrent_echoes_multi_thread() {
    many_echoes(false, true, 1000, Class::Throughput);
}

#[test]
fn hyper_moves_a_16_mib_body_both_ways() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    within(120, || {
        let (a, b) = two_hosts(|_| {});
        runtime(true).block_on(async {
            let listener = VListener::from_std(b.bind(0).unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let svc =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
                    });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await
                    .unwrap();
            });
            let s = VStream::connect_with(&a, addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            let mut body = vec![0u8; 16 << 20];
            fill(16, 0, &mut body);
            let req = hyper::Request::post("/echo")
                .header("host", addr.to_string())
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let back = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(back.len(), 16 << 20);
            assert_eq!(check(16, 0, &back), None, "the 16 MiB body came back intact");
        });
    });
}

/// A pending accept, read or connect future dropped leaves nothing behind: no vsocket on
/// either side (the hosts' stats, or the daemons' status), no descriptor.
fn dropped_futures_leave_nothing_behind(daemon: bool) {
    within(60, move || {
        let home = Home::new(daemon, |_| {});
        // Channels up, and tokio's process-wide signal pipe made (a first runtime with every
        // driver opens it for the life of the process), so the baseline counts them.
        let l = home.bind();
        let warm = l.local_addr().unwrap();
        drop(home.connect(warm, Class::Throughput).unwrap());
        drop(l);
        drop(runtime(false));
        eventually(10, "the warm-up vsocket closed", || home.vsockets() == (0, 0));
        let fds = open_fds();
        let before = fds_now();
        let h = home.clone();
        runtime(false).block_on(async move {
            let listener = VListener::from_std(h.bind()).unwrap();
            let addr = listener.local_addr().unwrap();

            // A pending accept, dropped: the vsocket that arrives later is still accepted.
            let pending = tokio::time::timeout(Duration::from_millis(20), listener.accept()).await;
            assert!(pending.is_err(), "nothing to accept yet");
            let mut c = h.connect_async(addr, Class::Throughput).await.unwrap();
            let (mut s, _) = listener.accept().await.expect("the vsocket was not lost");

            // A pending read, dropped: no byte is lost.
            let mut buf = [0u8; 5];
            assert!(tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await.is_err());
            c.write_all(b"hello").await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            drop((c, s));

            // Connects dropped before the peer answered: each vsocket closes once it does.
            for _ in 0..20 {
                let r = tokio::time::timeout(Duration::ZERO, h.connect_async(addr, Class::Throughput)).await;
                drop(r);
            }
            drop(listener);
        });
        eventually(10, "no vsocket left on either side", || home.vsockets() == (0, 0));
        if let Home::Daemon(d, _, _) = &home {
            // The daemons' status: no listener either. (Descriptors are not counted here: the
            // app's pool of control connections grows with its concurrent requests, and the
            // daemons, which run in this process, keep a thread per connection.)
            for socket in [&d.0.socket, &d.1.socket] {
                let st = Client::status_of(socket).unwrap();
                assert_eq!(st["listeners"].as_array().map(Vec::len), Some(0), "{st}");
            }
            return;
        }
        let end = Instant::now() + Duration::from_secs(10);
        while open_fds() > fds {
            assert!(Instant::now() < end, "descriptors left: before {before:?} after {:?}", fds_now());
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

#[test]
fn dropped_futures_leave_nothing_behind_embedded() {
    dropped_futures_leave_nothing_behind(false);
}

#[test]
fn dropped_futures_leave_nothing_behind_in_the_daemon() {
    dropped_futures_leave_nothing_behind(true);
}

fn poll1(fd: RawFd, events: i16, ms: i32) -> i16 {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents
}

#[test]
fn a_raw_poll_loop_echoes_through_the_descriptor() {
    within(60, || {
        let (a, b) = two_hosts(small_buffers);
        let l = b.bind(0).unwrap();
        l.set_nonblocking(true).unwrap();
        let lfd = l.poll_fd().unwrap().as_raw_fd();
        assert_eq!(poll1(lfd, libc::POLLIN, 0), 0, "nothing to accept: not readable");
        let c = a.connect(common::at(&b, l.local_addr().unwrap().port())).unwrap();
        assert_eq!(poll1(lfd, libc::POLLIN, 5000), libc::POLLIN, "a vsocket waits: readable");
        let (s, _) = l.accept().unwrap();
        assert_eq!(poll1(lfd, libc::POLLIN, 0), 0, "accepted: not readable again");
        assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);

        // The server echoes with poll(2) and non-blocking calls only.
        s.set_nonblocking(true).unwrap();
        let total = 3usize << 20;
        let server = std::thread::spawn(move || {
            let fd = s.poll_fd().unwrap().as_raw_fd();
            let (mut pending, mut done, mut buf) = (Vec::new(), 0usize, vec![0u8; 100_000]);
            let mut eof = false;
            let mut polls = 0u64;
            while !(eof && pending.is_empty()) {
                let want = if pending.is_empty() { libc::POLLIN } else { libc::POLLOUT };
                let ev = poll1(fd, want, 5000);
                assert!(ev & want != 0, "poll timed out waiting for {want:#x} (got {ev:#x})");
                polls += 1;
                if want == libc::POLLIN {
                    match (&s).read(&mut buf) {
                        Ok(0) => eof = true,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            panic!("readable but the read would block")
                        }
                        Err(e) => panic!("{e}"),
                    }
                } else {
                    match (&s).write(&pending) {
                        Ok(n) => {
                            pending.drain(..n);
                            done += n;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            panic!("writable but the write would block")
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            (done, polls)
        });
        let mut c2 = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut buf = vec![0u8; total];
            fill(3, 0, &mut buf);
            c2.write_all(&buf).unwrap();
            c2.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&c).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        let (done, polls) = server.join().unwrap();
        assert_eq!(done, total);
        assert_eq!(back.len(), total);
        assert_eq!(check(3, 0, &back), None);
        assert!(polls >= 2);
    });
}

/// The descriptor after a half close (readable with end of stream, still writable) and a
/// reset (readable and writable, both failing): never a hang.
fn readiness_after_half_close_and_reset(daemon: bool) {
    within(60, move || {
        let home = Home::new(daemon, |_| {});
        let l = home.bind();
        let addr = l.local_addr().unwrap();

        // Half close: readable with end of stream, still writable; the peer reads both ways.
        let c = home.connect(addr, Class::Throughput).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let fd = s.poll_fd().unwrap().as_raw_fd();
        assert_eq!(poll1(fd, libc::POLLIN | libc::POLLOUT, 0), libc::POLLOUT);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(poll1(fd, libc::POLLIN, 5000), libc::POLLIN, "end of stream makes it readable");
        assert_eq!((&s).read(&mut [0u8; 8]).unwrap(), 0);
        assert_eq!(poll1(fd, libc::POLLIN, 0), libc::POLLIN, "it stays readable at the end");
        (&s).write_all(b"after").unwrap();
        let mut buf = [0u8; 5];
        (&c).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after");

        // Reset: the peer closes with unread data; readable and writable, both fail.
        let c = home.connect(addr, Class::Throughput).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let fd = s.poll_fd().unwrap().as_raw_fd();
        (&s).write_all(b"unread").unwrap();
        let cfd = c.poll_fd().unwrap().as_raw_fd();
        assert_eq!(poll1(cfd, libc::POLLIN, 5000), libc::POLLIN, "the data arrived");
        drop(c);
        // (The daemon's proxy reports a reset as TCP does, with POLLERR|POLLHUP beside it.)
        let r = poll1(fd, libc::POLLIN, 5000);
        assert!(r & libc::POLLIN != 0, "a reset makes it readable: {r:#x}");
        let e = (&s).read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(poll1(fd, libc::POLLOUT, 0) & libc::POLLOUT != 0, "and writable, to fail");
        assert!((&s).write(b"x").is_err());
    });
}

#[test]
fn readiness_after_half_close_and_reset_embedded() {
    readiness_after_half_close_and_reset(false);
}

#[test]
fn readiness_after_half_close_and_reset_in_the_daemon() {
    readiness_after_half_close_and_reset(true);
}

#[test]
fn tokio_errors_match_the_blocking_api() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        runtime(false).block_on(async {
            let refused = VStream::connect_with(&a, common::at(&b, 4999)).await.unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
            let l = VListener::from_std(b.bind(0).unwrap()).unwrap();
            let addr = l.local_addr().unwrap();
            let mut c = VStream::connect_with(&a, addr).await.unwrap();
            let (mut s, peer) = l.accept().await.unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
            assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
            assert_eq!(c.peer_addr().unwrap(), addr);
            c.shutdown().await.unwrap();
            let e = c.write_all(b"late").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
            let mut rest = Vec::new();
            assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);
            // Round trip to and from the blocking type.
            let blocking = s.into_std().unwrap();
            let mut s = VStream::from_std(blocking).unwrap();
            s.write_all(b"back").await.unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"back");
        });
    });
}

/// Wait on an epoll set for at most `ms`; the events of the one registered descriptor.
fn epoll_wait1(ep: RawFd, ms: i32) -> Option<u32> {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: one live epoll_event to fill.
    let n = unsafe { libc::epoll_wait(ep, &mut ev, 1, ms) };
    assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
    (n == 1).then_some(ev.events)
}

#[test]
fn epoll_edge_triggered_gives_one_edge_per_arrival() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(0).unwrap();
        let c = a.connect(common::at(&b, l.local_addr().unwrap().port())).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let fd = s.poll_fd().unwrap().as_raw_fd();
        // SAFETY: plain syscalls on descriptors this test owns.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 1 };
        // SAFETY: as above; `ev` is live.
        assert_eq!(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }, 0);
        assert_eq!(epoll_wait1(ep, 0), None, "nothing arrived: no edge");
        for round in 0..3u8 {
            (&c).write_all(&[round; 100]).unwrap();
            let e = epoll_wait1(ep, 5000).expect("an edge for the arrival");
            assert!(e & libc::EPOLLIN as u32 != 0);
            assert_eq!(epoll_wait1(ep, 0), None, "edge-triggered: reported once");
            let mut buf = [0u8; 100];
            let mut got = 0;
            while got < 100 {
                match (&s).read(&mut buf[got..]) {
                    Ok(n) => got += n,
                    // The rest is on its way: its arrival is a new edge.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        epoll_wait1(ep, 5000).expect("an edge for the rest");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(buf, [round; 100]);
            assert_eq!((&s).read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
        }
        // Level-triggered on the same descriptor: readable while data waits, every time.
        // SAFETY: as above.
        let lt = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 2 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::epoll_ctl(lt, libc::EPOLL_CTL_ADD, fd, &mut ev) }, 0);
        (&c).write_all(b"level").unwrap();
        assert!(epoll_wait1(lt, 5000).is_some());
        assert!(epoll_wait1(lt, 0).is_some(), "level-triggered: still readable");
        // SAFETY: closing the two epoll descriptors this test made.
        unsafe {
            libc::close(ep);
            libc::close(lt);
        }
    });
}
