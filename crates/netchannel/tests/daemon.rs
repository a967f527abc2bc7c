//! The daemon's data path in one process: two daemons (`Server`) on loopback, apps as
//! `Client`s of them. Everything between an app and its daemon goes through the Unix socket
//! and shared memory exactly as across processes; the multi-process cases (kills, other
//! users) are in the CLI's tests.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::{addr_pair, check, daemon, fill, within, Daemon};
use netchannel::daemon::Client;
use netchannel::{Class, Config};

fn pair(tweak: &dyn Fn(&mut Config)) -> (Daemon, Daemon) {
    let (a, b) = addr_pair();
    (daemon(a, tweak), daemon(b, tweak))
}

fn at(d: &Daemon, port: u16) -> SocketAddr {
    SocketAddr::new(d.addr.ip(), port)
}

/// Write `len` pattern bytes of stream `seed` in writes of `chunk`, then half close.
fn send_pattern(s: &mut netchannel::VStream, seed: u64, len: u64, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Read to EOF, checking the pattern; the byte count.
fn recv_pattern(s: &mut netchannel::VStream, seed: u64) -> u64 {
    let mut buf = vec![0u8; 100_000];
    let mut off = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return off;
        }
        assert_eq!(check(seed, off, &buf[..n]), None, "stream {seed}: corrupt byte");
        off += n as u64;
    }
}

#[test]
fn verified_streams_through_two_daemons() {
    within(60, || {
        let (da, db) = pair(&|_| {});
        let (ca, cb) = (Client::connect(&da.socket).unwrap(), Client::connect(&db.socket).unwrap());
        let l = cb.bind(7000).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), 7000);
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..3 {
                let (mut s, _) = l.accept().unwrap();
                assert!(s.is_daemon());
                let mut seed = [0u8; 8];
                s.read_exact(&mut seed).unwrap();
                let seed = u64::from_be_bytes(seed);
                let n = recv_pattern(&mut s, seed);
                s.write_all(&n.to_be_bytes()).unwrap();
                got.push(n);
            }
            got
        });
        let mut clients = Vec::new();
        for seed in 1..=3u64 {
            let ca = ca.clone();
            let target = at(&db, 7000);
            clients.push(std::thread::spawn(move || {
                let mut s = ca.connect_stream(target).unwrap();
                s.write_all(&seed.to_be_bytes()).unwrap();
                let len = seed * 7 * 1_000_003;
                send_pattern(&mut s, seed, len, 65_537 * seed as usize);
                let mut n = [0u8; 8];
                s.read_exact(&mut n).unwrap();
                assert_eq!(u64::from_be_bytes(n), len);
                let mut rest = Vec::new();
                assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "EOF after the count");
                len
            }));
        }
        let sent: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
        let got: u64 = server.join().unwrap().into_iter().sum();
        assert_eq!(sent, got);
        let st = ca.status().unwrap();
        assert!(st["totals"]["bytes_sent"].as_u64().unwrap() >= sent, "{st}");
        assert!(st["totals"]["vsockets_opened"].as_u64().unwrap() >= 3, "{st}");
        assert!(!st["peers"].as_array().unwrap().is_empty(), "{st}");
        let stb = cb.status().unwrap();
        assert!(stb["totals"]["bytes_received"].as_u64().unwrap() >= sent, "{stb}");
    });
}

#[test]
fn errors_are_typed_through_the_daemon() {
    within(30, || {
        let (da, db) = pair(&|_| {});
        let ca = Client::connect(&da.socket).unwrap();
        let e = ca.connect_stream(at(&db, 7001)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("7001"), "{e}");
        let cb = Client::connect(&db.socket).unwrap();
        let _l = cb.bind(7002).unwrap();
        let e = cb.bind(7002).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
        let l = cb.bind(7003).unwrap();
        l.set_nonblocking(true).unwrap();
        assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    });
}

#[test]
fn reset_and_timeouts_and_nonblocking() {
    within(30, || {
        let (da, db) = pair(&|_| {});
        let (ca, cb) = (Client::connect(&da.socket).unwrap(), Client::connect(&db.socket).unwrap());
        let l = cb.bind(7010).unwrap();
        let s = ca.connect_class(at(&db, 7010), Class::Latency).unwrap();
        assert_eq!(s.class(), Class::Latency);
        let (peer, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!((&s).read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert_eq!((&s).read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
        // Closing with unread data resets the connection, as TCP does.
        (&peer).write_all(b"left unread").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
        let mut b = [0u8; 8];
        let mut errs = 0;
        for _ in 0..50 {
            match (&peer).write_all(&[0u8; 4096]) {
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
                        "{e}"
                    );
                    errs += 1;
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        assert_eq!(errs, 1, "the peer sees the reset");
        let _ = (&peer).read(&mut b);
    });
}

/// Descriptors and memory mappings of this process (the daemons and apps of these tests).
fn fds_and_maps() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
    (fds, maps)
}

/// Wait until daemon `c` serves no vsocket (the engine and the app let go of every region).
fn until_idle(c: &Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = c.status().unwrap();
        let served = st["clients"].as_array().unwrap().iter().any(|c| c["vsockets"] != 0);
        if st["vsockets"].as_array().unwrap().is_empty() && !served {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the daemon kept vsockets: {st}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn regions(c: &Client) -> (u64, u64) {
    let st = c.status().unwrap();
    (st["totals"]["regions_created"].as_u64().unwrap(), st["totals"]["regions_reused"].as_u64().unwrap())
}

#[test]
fn recycled_regions_never_show_a_previous_vsockets_bytes_and_hold_nothing_more() {
    within(120, || {
        let (da, db) = pair(&|_| {});
        let (ca, cb) = (Client::connect(&da.socket).unwrap(), Client::connect(&db.socket).unwrap());
        let l = cb.bind(7020).unwrap();
        const N: u64 = 1500;
        const WARM: u64 = 100;
        let len = |i: u64| 1 + (i * 7919) % 20_000;
        let server = std::thread::spawn(move || {
            for i in 0..N {
                let (mut s, _) = l.accept().unwrap();
                assert_eq!(recv_pattern(&mut s, i), len(i), "connection {i}: request length");
                send_pattern(&mut s, 1_000_000 + i, len(i), 4096);
            }
        });
        let target = at(&db, 7020);
        let mut before = (0, 0);
        for i in 0..N {
            if i == WARM {
                before = fds_and_maps();
            }
            let mut s = ca.connect_stream(target).unwrap();
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(
                s.read(&mut b).unwrap_err().kind(),
                ErrorKind::WouldBlock,
                "connection {i}: stale bytes"
            );
            s.set_nonblocking(false).unwrap();
            send_pattern(&mut s, i, len(i), 3000);
            assert_eq!(recv_pattern(&mut s, 1_000_000 + i), len(i), "connection {i}: response length");
        }
        server.join().unwrap();
        let after = fds_and_maps();
        // Each side's pool holds at most POOL_MAX free regions (32): a memfd, an eventfd and
        // the app's doorbell each, and two mappings (daemon, app). A leak per connection would
        // be over a thousand.
        assert!(after.0 <= before.0 + 3 * 2 * 32, "descriptors grew from {} to {}", before.0, after.0);
        assert!(after.1 <= before.1 + 2 * 2 * 32, "mappings grew from {} to {}", before.1, after.1);
        for (name, c) in [("connecting", &ca), ("accepting", &cb)] {
            let (created, reused) = regions(c);
            assert!(reused >= N / 2, "the {name} daemon reused {reused} regions of {N} (created {created})");
            assert!(created <= 64, "the {name} daemon created {created} regions for {N} connections");
        }
    });
}

#[test]
fn a_region_mapped_when_the_process_forked_is_not_reused() {
    within(60, || {
        let (da, db) = pair(&|_| {});
        let (ca, cb) = (Client::connect(&da.socket).unwrap(), Client::connect(&db.socket).unwrap());
        let l = cb.bind(7030).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..5 {
                let (mut s, _) = l.accept().unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
            }
        });
        let target = at(&db, 7030);
        let cycle = |fork: bool| {
            let s = ca.connect_stream(target).unwrap();
            if fork {
                // SAFETY: the child only exits; the parent reaps it.
                unsafe {
                    let pid = libc::fork();
                    if pid == 0 {
                        libc::_exit(0);
                    }
                    assert!(pid > 0, "fork failed");
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            drop(s);
            until_idle(&ca);
        };
        cycle(false);
        let (c0, r0) = regions(&ca);
        cycle(false);
        assert_eq!(regions(&ca), (c0, r0 + 1), "a finished vsocket's region is reused");
        // The region of this vsocket is mapped in the child too: not reused.
        cycle(true);
        assert_eq!(regions(&ca), (c0, r0 + 2), "the forked-across region still served this one");
        cycle(false);
        assert_eq!(regions(&ca), (c0 + 1, r0 + 2), "a region mapped when the process forked was reused");
        // A region mapped after the fork is the parent's alone again.
        cycle(false);
        assert_eq!(regions(&ca), (c0 + 1, r0 + 3));
        server.join().unwrap();
    });
}
