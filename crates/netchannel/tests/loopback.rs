//! Two NetChannel hosts in one process on loopback: data integrity, striping, half close,
//! refusal, unreachable hosts and peers that go away. Behaviour only, never speed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::{at, check, fill, two_hosts, within};
use netchannel::{Class, Config, Host, Policy};
use rand::{Rng, SeedableRng};

fn send_pattern(mut s: impl Write, seed: u64, total: u64, rng_seed: u64, max_write: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    let mut buf = vec![0u8; max_write];
    let mut off = 0u64;
    while off < total {
        let n = rng.gen_range(1..=max_write).min((total - off) as usize);
        fill(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        off += n as u64;
    }
}

fn recv_pattern(mut s: impl Read, seed: u64, rng_seed: u64, max_read: usize) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    let mut buf = vec![0u8; max_read];
    let mut off = 0u64;
    loop {
        let n = rng.gen_range(1..=max_read);
        let got = s.read(&mut buf[..n]).expect("read");
        if got == 0 {
            return off;
        }
        if let Some(bad) = check(seed, off, &buf[..got]) {
            panic!("stream {seed}: byte at offset {bad} differs from the pattern");
        }
        off += got as u64;
    }
}

#[test]
fn large_transfer_striped_over_four_channels_is_exact() {
    within(240, || {
        let (a, b) = two_hosts(|c| {
            c.throughput_channels = 4;
            c.channel_workers = 2;
            c.copy_workers = 1;
        });
        let l = b.bind(5001).unwrap();
        let total: u64 = 256 << 20;
        let dst = at(&b, 5001);
        let sender = std::thread::spawn({
            let a = a.clone();
            move || {
                let s = a.connect(dst).unwrap();
                send_pattern(&s, 7, total, 1, 3 << 20);
                s.shutdown(Shutdown::Write).unwrap();
                // Wait for the peer's EOF so every byte is acknowledged before dropping.
                let mut end = [0u8; 1];
                assert_eq!((&s).read(&mut end).unwrap(), 0);
            }
        });
        let (s, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), a.local_addr().ip());
        let got = recv_pattern(&s, 7, 2, 3 << 20);
        assert_eq!(got, total);
        drop(s);
        sender.join().unwrap();
        // Striping: every throughput channel from A carried a share of the stream.
        let st = a.stats();
        let thpt: Vec<_> = st.channels.iter().filter(|c| c.class == Class::Throughput).collect();
        assert_eq!(thpt.len(), 4, "{:?}", st.channels);
        for c in &thpt {
            assert!(c.bytes_sent > total / 16, "channel {} carried only {} bytes", c.index, c.bytes_sent);
        }
        let sum: u64 = thpt.iter().map(|c| c.bytes_sent).sum();
        assert!(sum >= total);
    });
}

#[test]
fn two_hundred_concurrent_vsockets_each_verified() {
    within(240, || {
        let (a, b) = two_hosts(|c| {
            c.send_buffer = 256 << 10;
            c.recv_buffer = 256 << 10;
        });
        let l = b.bind(6000).unwrap();
        let n = 200u64;
        let per = 300_000u64;
        let server = std::thread::spawn(move || {
            // Accept all, then serve them in the order they were connected (their ports are
            // handed out in order), eight at a time: echo the byte count back after
            // verifying. (Connects that do not wait for the answer, to an announced port,
            // may arrive in another order over the channels; the clients below write them
            // in connect order and block beyond the window.)
            let mut arrived: Vec<_> = (0..n).map(|_| l.accept().unwrap()).collect();
            arrived.sort_by_key(|(_, from)| from.port());
            let mut handles = Vec::new();
            for (s, _) in arrived {
                handles.push(std::thread::spawn(move || {
                    let mut seed_buf = [0u8; 8];
                    (&s).read_exact(&mut seed_buf).unwrap();
                    let seed = u64::from_be_bytes(seed_buf);
                    let got = recv_pattern(&s, seed, seed, 50_000);
                    (&s).write_all(&got.to_be_bytes()).unwrap();
                    got
                }));
                if handles.len() >= 8 {
                    // Keep the thread count modest on small machines.
                    for h in handles.drain(..) {
                        assert_eq!(h.join().unwrap(), per);
                    }
                }
            }
            for h in handles {
                assert_eq!(h.join().unwrap(), per);
            }
        });
        let dst = at(&b, 6000);
        // Open all 200 first, then drive them from a few client threads.
        let streams: Vec<_> = (0..n).map(|_| a.connect(dst).unwrap()).collect();
        let mut ports: Vec<_> = streams.iter().map(|s| s.local_addr().unwrap().port()).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), n as usize, "every vsocket has its own port");
        let mut groups: Vec<Vec<(u64, netchannel::VStream)>> = (0..4).map(|_| Vec::new()).collect();
        for (i, s) in streams.into_iter().enumerate() {
            groups[i % 4].push((i as u64 + 1000, s));
        }
        let clients: Vec<_> = groups
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    for (seed, s) in g {
                        (&s).write_all(&seed.to_be_bytes()).unwrap();
                        send_pattern(&s, seed, per, seed, 40_000);
                        s.shutdown(Shutdown::Write).unwrap();
                        let mut echo = [0u8; 8];
                        (&s).read_exact(&mut echo).unwrap();
                        assert_eq!(u64::from_be_bytes(echo), per);
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        server.join().unwrap();
        assert!(b.stats().vsockets_opened >= n);
    });
}

#[test]
fn half_close_delivers_everything_then_eof_and_the_other_way_still_works() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(7000).unwrap();
        let mut c = a.connect(at(&b, 7000)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let msg = vec![0xabu8; 1 << 20];
        c.write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(c.write(b"x").unwrap_err().kind(), ErrorKind::BrokenPipe);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, msg);
        assert_eq!(s.read(&mut [0u8; 10]).unwrap(), 0, "EOF stays EOF");
        // The reverse direction is still open.
        s.write_all(b"reply after half close").unwrap();
        drop(s);
        let mut back = String::new();
        c.read_to_string(&mut back).unwrap();
        assert_eq!(back, "reply after half close");
    });
}

#[test]
fn connecting_to_a_port_without_listener_is_refused() {
    within(30, || {
        let (a, b) = two_hosts(|_| {});
        let _l = b.bind(8000).unwrap();
        let t = Instant::now();
        let e = a.connect(at(&b, 8001)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("8001"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // The refusal did not disturb the channels: a good port still works.
        let mut s = a.connect(at(&b, 8000)).unwrap();
        s.write_all(b"ok").unwrap();
    });
}

#[test]
fn connecting_where_no_host_listens_names_the_address() {
    within(30, || {
        let (a, _b) = two_hosts(|c| c.connect_timeout = Duration::from_millis(800));
        // Nothing listens on this loopback address at all: TCP refuses at once.
        let nowhere: SocketAddr = "127.254.254.254:5000".parse().unwrap();
        let e = a.connect(nowhere).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("127.254.254.254"), "{e}");
    });
}

#[test]
fn connecting_to_a_silent_host_times_out_within_the_connect_timeout() {
    within(30, || {
        // A TCP listener that accepts channels but never answers HELLO.
        let (_, b_addr) = common::addr_pair();
        let mute = TcpListener::bind(b_addr).unwrap();
        let keep = std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in mute.incoming().take(8) {
                held.push(s);
            }
        });
        let cfg = Config {
            listen: SocketAddr::new("127.0.0.1".parse().unwrap(), 0),
            peer_port: Some(b_addr.port()),
            connect_timeout: Duration::from_millis(700),
            ..Config::default()
        };
        let a = Host::start(cfg).unwrap();
        let t = Instant::now();
        let e = a.connect(SocketAddr::new(b_addr.ip(), 80)).unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains(&b_addr.ip().to_string()), "{e}");
        assert!(took >= Duration::from_millis(600) && took < Duration::from_secs(3), "took {took:?}");
        drop(keep);
    });
}

#[test]
fn a_peer_dropping_its_stream_mid_transfer_gives_an_error_not_a_hang() {
    within(60, || {
        let (a, b) = two_hosts(|c| {
            c.send_buffer = 1 << 20;
            c.recv_buffer = 1 << 20;
        });
        let l = b.bind(9100).unwrap();
        let mut c = a.connect(at(&b, 9100)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let chunk = vec![1u8; 256 << 10];
        c.write_all(&chunk).unwrap();
        let mut some = vec![0u8; 1000];
        s.read_exact(&mut some).unwrap();
        // The receiver goes away with unread data in its buffer.
        drop(s);
        let mut failed = None;
        for _ in 0..10_000 {
            if let Err(e) = c.write_all(&chunk) {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("writer never noticed the peer was gone");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
            "{e}"
        );
    });
}

#[test]
fn a_writer_dropping_mid_transfer_gives_the_reader_eof_after_its_bytes() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(9200).unwrap();
        let c = a.connect(at(&b, 9200)).unwrap();
        let (s, _) = l.accept().unwrap();
        send_pattern(&c, 3, 5 << 20, 3, 100_000);
        drop(c);
        assert_eq!(recv_pattern(&s, 3, 4, 70_000), 5 << 20);
    });
}

#[test]
fn a_host_that_dies_fails_the_peers_vsockets() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(9300).unwrap();
        let c = a.connect(at(&b, 9300)).unwrap();
        let (_s, _) = l.accept().unwrap();
        drop(l);
        b.shutdown();
        let mut buf = [0u8; 16];
        let e = (&c).read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains(&b.local_addr().ip().to_string()), "{e}");
    });
}

#[test]
fn hash_policy_pins_a_vsocket_to_one_channel() {
    within(60, || {
        let (a, b) = two_hosts(|c| c.policy = Policy::Hash);
        let l = b.bind(9400).unwrap();
        let c = a.connect(at(&b, 9400)).unwrap();
        let (s, _) = l.accept().unwrap();
        let sender = std::thread::spawn(move || {
            send_pattern(&c, 9, 16 << 20, 9, 1 << 20);
            c.shutdown(Shutdown::Write).unwrap();
            c
        });
        assert_eq!(recv_pattern(&s, 9, 9, 1 << 20), 16 << 20);
        drop(sender.join().unwrap());
        let busy: Vec<_> = a
            .stats()
            .channels
            .into_iter()
            .filter(|ch| ch.class == Class::Throughput && ch.bytes_sent > 1 << 20)
            .collect();
        assert_eq!(busy.len(), 1, "{busy:?}");
    });
}

#[test]
fn nonblocking_reads_and_writes_would_block() {
    within(30, || {
        let (a, b) = two_hosts(|c| {
            c.send_buffer = 64 << 10;
            c.recv_buffer = 64 << 10;
            c.segment_size = 16 << 10;
        });
        let l = b.bind(9500).unwrap();
        let mut c = a.connect(at(&b, 9500)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        assert_eq!(s.read(&mut [0u8; 8]).unwrap_err().kind(), ErrorKind::WouldBlock);
        c.set_nonblocking(true).unwrap();
        let mut sent = 0;
        let chunk = vec![5u8; 8192];
        loop {
            match c.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 10 << 20, "the peer never stopped granting credit");
        }
        // Both buffers are full: at most send + receive buffer bytes are in flight.
        assert!(sent <= (128 << 10) + 8192, "sent {sent}");
        let mut got = 0;
        let mut buf = vec![0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < sent && Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, sent);
    });
}

#[test]
fn killing_one_channel_mid_transfer_loses_no_byte() {
    within(120, || {
        let (a, b) = two_hosts(|c| c.throughput_channels = 3);
        let l = b.bind(9600).unwrap();
        let c = a.connect(at(&b, 9600)).unwrap();
        let (s, _) = l.accept().unwrap();
        let total: u64 = 64 << 20;
        let peer_key = SocketAddr::new(b.local_addr().ip(), b.local_addr().port());
        let killer = {
            let a = a.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                a.kill_channel(peer_key, Class::Throughput, 1)
            })
        };
        let sender = std::thread::spawn(move || {
            send_pattern(&c, 11, total, 11, 1 << 20);
            c.shutdown(Shutdown::Write).unwrap();
            let mut end = [0u8; 1];
            let _ = (&c).read(&mut end);
        });
        assert_eq!(recv_pattern(&s, 11, 12, 1 << 20), total);
        drop(s);
        assert!(killer.join().unwrap(), "the channel to kill existed");
        sender.join().unwrap();
    });
}

#[test]
fn latency_and_bulk_vsockets_coexist_with_verified_data() {
    within(120, || {
        let (a, b) = two_hosts(|c| c.latency_channels = 1);
        let bulk_l = b.bind(9700).unwrap();
        let lat_l = b.bind(9701).unwrap();
        let bulk = a.connect(at(&b, 9700)).unwrap();
        let lat = a.connect_class(at(&b, 9701), Class::Latency).unwrap();
        assert_eq!(lat.class(), Class::Latency);
        let (bulk_s, _) = bulk_l.accept().unwrap();
        let (lat_s, _) = lat_l.accept().unwrap();
        assert_eq!(lat_s.class(), Class::Latency, "the acceptor's end takes the opener's class");
        let total: u64 = 32 << 20;
        let sender = std::thread::spawn(move || {
            send_pattern(&bulk, 21, total, 21, 1 << 20);
            bulk.shutdown(Shutdown::Write).unwrap();
            bulk
        });
        let receiver = std::thread::spawn(move || recv_pattern(&bulk_s, 21, 22, 1 << 20));
        // Ping-pong on the latency vsocket while the bulk transfer runs.
        for i in 0..200u64 {
            let mut msg = vec![0u8; 4096];
            fill(100 + i, 0, &mut msg);
            (&lat).write_all(&msg).unwrap();
            let mut got = vec![0u8; 4096];
            (&lat_s).read_exact(&mut got).unwrap();
            assert_eq!(check(100 + i, 0, &got), None);
            (&lat_s).write_all(&got).unwrap();
            let mut back = vec![0u8; 4096];
            (&lat).read_exact(&mut back).unwrap();
            assert_eq!(back, msg);
        }
        assert_eq!(receiver.join().unwrap(), total);
        drop(sender.join().unwrap());
        // The latency vsocket's bytes went over the latency channel, the bulk over the others.
        let st = a.stats();
        let lat_ch: Vec<_> = st.channels.iter().filter(|c| c.class == Class::Latency).collect();
        assert_eq!(lat_ch.len(), 1);
        assert!(lat_ch[0].bytes_sent >= 200 * 4096, "{:?}", lat_ch[0]);
        assert!(lat_ch[0].bytes_sent < total / 4, "bulk leaked onto the latency channel: {:?}", lat_ch[0]);
    });
}

#[test]
fn latency_ports_and_set_class_choose_the_class() {
    within(60, || {
        let (a, b) = two_hosts(|c| c.latency_ports = vec![9800]);
        let l = b.bind(9800).unwrap();
        let c = a.connect(at(&b, 9800)).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(c.class(), Class::Latency, "a configured latency port makes the connector latency class");
        assert_eq!(s.class(), Class::Latency, "and the acceptor");
        let l2 = b.bind(9801).unwrap();
        let c2 = a.connect(at(&b, 9801)).unwrap();
        let (s2, _) = l2.accept().unwrap();
        assert_eq!(c2.class(), Class::Throughput);
        c2.set_class(Class::Latency);
        assert_eq!(c2.class(), Class::Latency);
        let before = a.stats().channels.iter().find(|c| c.class == Class::Latency).unwrap().bytes_sent;
        (&c2).write_all(&[7u8; 8000]).unwrap();
        let mut got = [0u8; 8000];
        (&s2).read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 7));
        let after = a.stats().channels.iter().find(|c| c.class == Class::Latency).unwrap().bytes_sent;
        assert!(after - before >= 8000, "the moved vsocket's bytes used the latency channel");
        drop((c, s));
    });
}

/// Every channel, dialed or accepted, runs the configured congestion control; an empty name
/// leaves the system default; a name the kernel does not have fails `Host::start`, naming
/// the key.
#[test]
fn channels_run_the_configured_congestion_control() {
    within(60, || {
        let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
        // reno is built into every kernel, and allowed without privilege.
        for (name, expect) in [("reno", "reno"), ("", system.trim())] {
            let (a, b) = two_hosts(|c| {
                c.throughput_channels = 2;
                c.channel_congestion = name.to_string();
            });
            let l = b.bind(5001).unwrap();
            let mut s = a.connect(at(&b, 5001)).unwrap();
            let (mut r, _) = l.accept().unwrap();
            s.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            r.read_exact(&mut one).unwrap();
            for h in [&a, &b] {
                // A byte flows once one channel of its class is up; the others may still be
                // finishing their handshakes.
                let deadline = Instant::now() + Duration::from_secs(10);
                let channels = loop {
                    let channels = h.stats().channels;
                    if channels.len() == 3 || Instant::now() > deadline {
                        break channels;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                assert_eq!(channels.len(), 3, "{channels:?}");
                for c in channels {
                    assert_eq!(
                        c.congestion,
                        expect,
                        "channel {:?} {} of {}",
                        c.class,
                        c.index,
                        h.local_addr()
                    );
                }
            }
        }
        let c = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            peer_port: Some(9),
            channel_congestion: "nosuchcc".into(),
            ..Config::default()
        };
        let e = Host::start(c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("channel_congestion") && e.to_string().contains("nosuchcc"), "{e}");
    });
}

/// The CPU lists pin the engine's threads (read back from /proc), and a CPU this process may
/// not use fails `Host::start`, naming the key.
#[test]
fn worker_cpu_lists_pin_the_workers() {
    within(60, || {
        let allowed_in = |status_file: &str| -> String {
            let status = std::fs::read_to_string(status_file).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let allowed_list = |tid: &str| allowed_in(&format!("/proc/self/task/{tid}/status"));
        // (nextest runs each test in a process of its own: these are this host's threads.)
        let threads_named = |prefix: &str| -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|e| {
                    let tid = e.ok()?.file_name().into_string().ok()?;
                    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
                    comm.starts_with(prefix).then_some(tid)
                })
                .collect()
        };
        let first = allowed_in("/proc/thread-self/status")
            .split([',', '-'])
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap();
        let mut c = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            peer_port: Some(9),
            channel_worker_cpus: vec![first],
            copy_worker_cpus: vec![first],
            latency_worker_cpus: vec![first],
            ..Config::default()
        };
        let h = Host::start(c.clone()).unwrap();
        for prefix in ["nc-chan-", "nc-lat-", "nc-copy-"] {
            // A thread names and pins itself first thing; give it a moment to start.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut tids = threads_named(prefix);
            while tids.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                tids = threads_named(prefix);
            }
            assert!(!tids.is_empty(), "no {prefix} thread");
            for tid in tids {
                while allowed_list(&tid) != first.to_string() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert_eq!(allowed_list(&tid), first.to_string(), "{prefix} thread {tid}");
            }
        }
        h.shutdown();
        c.copy_worker_cpus = vec![1023];
        let e = Host::start(c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("copy_worker_cpus") && e.to_string().contains("1023"), "{e}");
    });
}

/// A short-lived vsocket (connect, a small request and response, close) keeps every frame
/// of it (OPEN, OPEN_OK, DATA, CREDIT, FIN) on one channel on each host, the same channel
/// index on both, instead of spreading them over the mesh.
#[test]
fn a_small_vsocket_stays_on_one_channel() {
    within(60, || {
        let (a, b) = two_hosts(|c| {
            c.throughput_channels = 4;
            c.latency_channels = 0;
        });
        let l = b.bind(5001).unwrap();
        let dst = at(&b, 5001);
        let sent = |h: &Host| -> Vec<(u16, u64)> {
            h.stats().channels.iter().map(|c| (c.index, c.frames_sent)).collect()
        };
        let idle = |h: &Host| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while h.stats().vsockets > 0 {
                assert!(Instant::now() < deadline, "vsockets left on {}", h.local_addr());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        const ROUNDS: usize = 4;
        let server = std::thread::spawn(move || {
            for _ in 0..ROUNDS {
                let (mut s, _) = l.accept().unwrap();
                let mut req = [0u8; 4096];
                s.read_exact(&mut req).unwrap();
                s.write_all(&req).unwrap();
                let mut end = [0u8; 1];
                assert_eq!(s.read(&mut end).unwrap(), 0);
            }
            // Closed after the last round is counted: its UNLISTEN is a frame of its own.
            l
        });
        // The first connect sets the mesh up; measure the ones after.
        for round in 0..ROUNDS {
            let (before_a, before_b) = (sent(&a), sent(&b));
            let mut s = a.connect(dst).unwrap();
            s.write_all(&[round as u8; 4096]).unwrap();
            let mut resp = [0u8; 4096];
            s.read_exact(&mut resp).unwrap();
            assert_eq!(resp, [round as u8; 4096]);
            drop(s);
            idle(&a);
            idle(&b);
            if round == 0 {
                continue;
            }
            let moved = |before: &[(u16, u64)], after: &[(u16, u64)]| -> Vec<u16> {
                after
                    .iter()
                    .filter(|(i, n)| before.iter().any(|(j, m)| i == j && n > m))
                    .map(|(i, _)| *i)
                    .collect()
            };
            let (ma, mb) = (moved(&before_a, &sent(&a)), moved(&before_b, &sent(&b)));
            assert_eq!(ma.len(), 1, "round {round}: host A sent on channels {ma:?}");
            assert_eq!(ma, mb, "round {round}: the hosts used different channels");
        }
        server.join().unwrap();
    });
}

#[test]
fn optimistic_open_carries_the_request_and_verifies_both_ways() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(5101).unwrap();
        let dst = at(&b, 5101);
        // Sizes below, at and above the open credit (16 KiB by default), and a reader-first one.
        let sizes = [1usize, 4096, 16 << 10, (16 << 10) + 1, 1 << 20];
        let server = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let (mut s, _) = l.accept().unwrap();
                let mut req = vec![0u8; n];
                s.read_exact(&mut req).unwrap();
                assert_eq!(check(i as u64, 0, &req), None, "request {i} of {n} bytes");
                s.write_all(&req).unwrap();
                let mut end = [0u8; 1];
                assert_eq!(s.read(&mut end).unwrap(), 0);
            }
            // The server speaks first on this one: the client reads before it writes.
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello").unwrap();
        });
        for (i, &n) in sizes.iter().enumerate() {
            let mut s = a.connect_optimistic(dst).unwrap();
            let mut req = vec![0u8; n];
            fill(i as u64, 0, &mut req);
            s.write_all(&req).unwrap();
            let mut resp = vec![0u8; n];
            s.read_exact(&mut resp).unwrap();
            assert_eq!(check(i as u64, 0, &resp), None, "response {i} of {n} bytes");
        }
        let mut s = a.connect_optimistic(dst).unwrap();
        let mut hello = Vec::new();
        s.read_to_end(&mut hello).unwrap();
        assert_eq!(hello, b"hello");
        drop(s);
        server.join().unwrap();
        both_tables_empty(&a, &b);
    });
}

#[test]
fn an_optimistic_open_whose_server_never_writes_still_ends_cleanly() {
    // The accepting end holds its OPEN_OK back for its first frame; a server that only reads
    // (an upload past the open credit: the opener needs the answer's credit) or that closes
    // without a word must still answer, so both ends finish and leave their tables.
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(5104).unwrap();
        let dst = at(&b, 5104);
        let sizes = [100usize, 1 << 20];
        let server = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let (mut s, _) = l.accept().unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                assert_eq!(got.len(), n);
                assert_eq!(check(i as u64, 0, &got), None, "upload {i} of {n} bytes");
            }
        });
        for (i, &n) in sizes.iter().enumerate() {
            let mut s = a.connect_optimistic(dst).unwrap();
            let mut up = vec![0u8; n];
            fill(i as u64, 0, &mut up);
            s.write_all(&up).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
        server.join().unwrap();
        both_tables_empty(&a, &b);
    });
}

#[test]
fn an_optimistic_open_to_a_closed_port_fails_the_first_read_as_refused() {
    within(30, || {
        let (a, b) = two_hosts(|_| {});
        let _l = b.bind(5102).unwrap();
        let t = Instant::now();
        // connect returns at once; the write is taken with the OPEN; the read sees the refusal.
        let mut s = a.connect_optimistic(at(&b, 5103)).unwrap();
        s.write_all(b"request").unwrap();
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("5103"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(s.write(b"more").unwrap_err().kind(), ErrorKind::ConnectionRefused);
        // The refusal harmed nothing: an optimistic open to the good port works.
        let mut s = a.connect_optimistic(at(&b, 5102)).unwrap();
        s.write_all(b"ok").unwrap();
    });
}

#[test]
fn an_open_carrying_more_than_the_listener_grants_is_refused() {
    within(30, || {
        // The opener believes in 64 KiB of open credit; the listener grants 1 KiB and does
        // not announce it (with announcements the opener sends what the listener grants:
        // tests/announce.rs).
        let (a, b) = common::two_hosts_with(
            |c| c.open_credit = 64 << 10,
            |c| {
                c.open_credit = 1 << 10;
                c.announce_listeners = false;
            },
        );
        let l = b.bind(5104).unwrap();
        let mut s = a.connect_optimistic(at(&b, 5104)).unwrap();
        s.write_all(&[7u8; 4096]).unwrap();
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("protocol"), "{e}");
        // Nothing was queued for the listener; within the grant it works.
        l.set_nonblocking(true).unwrap();
        assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
        l.set_nonblocking(false).unwrap();
        let mut s = a.connect_optimistic(at(&b, 5104)).unwrap();
        s.write_all(&[7u8; 512]).unwrap();
        let (mut got, _) = l.accept().unwrap();
        let mut req = [0u8; 512];
        got.read_exact(&mut req).unwrap();
        assert_eq!(req, [7u8; 512]);
    });
}

/// Wait (at most 10 s) until neither host has a vsocket left in its table.
/// An inline read leaves its channel parked (the worker does not poll it until the thread
/// comes back, or for a grace period). Neither what arrives meanwhile for another vsocket
/// of that channel, read without blocking, nor the credit a blocked writer of the same
/// vsocket waits for may be left unread.
#[test]
fn a_channel_parked_by_an_inline_read_still_delivers_to_others_and_to_writers() {
    within(60, || {
        let (a, b) = two_hosts(|c| {
            c.latency_channels = 1;
            c.send_buffer = 64 << 10;
            c.recv_buffer = 64 << 10;
            c.segment_size = 16 << 10;
        });
        let l = b.bind(9720).unwrap();
        let p = a.connect_class(at(&b, 9720), Class::Latency).unwrap();
        let (p_s, _) = l.accept().unwrap();
        let q = a.connect_class(at(&b, 9720), Class::Latency).unwrap();
        let (q_s, _) = l.accept().unwrap();
        q_s.set_nonblocking(true).unwrap();
        for round in 0..20u64 {
            // A blocking read on p: b's only latency channel is read inline, then parked.
            let mut msg = vec![0u8; 512];
            fill(round, 0, &mut msg);
            (&p).write_all(&msg).unwrap();
            let mut got = vec![0u8; 512];
            (&p_s).read_exact(&mut got).unwrap();
            assert_eq!(check(round, 0, &got), None);
            // Bytes for q, whose reader never blocks, arrive on the parked channel.
            let mut m = vec![0u8; 4096];
            fill(1000 + round, 0, &mut m);
            (&q).write_all(&m).unwrap();
            assert_eq!(read_without_blocking(&q_s, m.len()), m, "round {round}");
        }
        // A blocking read parks the channel, then the same thread writes far more than the
        // send window: the credit that frees it comes in on the parked channel.
        let mut one = [0u8; 1];
        (&p).write_all(b"x").unwrap();
        (&p_s).read_exact(&mut one).unwrap();
        let total: u64 = 4 << 20;
        let reader = std::thread::spawn(move || recv_pattern(&p, 77, 78, 64 << 10));
        send_pattern(&p_s, 77, total, 79, 1 << 20);
        p_s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), total);
    });
}

/// A blocking accept reads the host's parked channels itself while it waits (the OPEN then
/// wakes it alone). What those channels carry for other vsockets meanwhile — bytes for a
/// thread blocked in read, bytes for a non-blocking reader — is delivered, vsockets whose
/// OPEN comes on a channel nobody parked (read by its worker) are accepted as well, and
/// closing the listener ends the wait.
#[test]
fn an_accept_reading_parked_channels_still_delivers_to_others_and_accepts_from_workers() {
    within(60, || {
        let (a, b) = two_hosts(|c| c.throughput_channels = 4);
        let l = std::sync::Arc::new(b.bind(9730).unwrap());
        let dst = at(&b, 9730);
        // Server ends that read blocking: their home channels on b are left parked.
        let mut pairs = Vec::new();
        for i in 0..6u8 {
            let c = a.connect(dst).unwrap();
            let (s, _) = l.accept().unwrap();
            (&c).write_all(&[i; 100]).unwrap();
            let mut got = [0u8; 100];
            (&s).read_exact(&mut got).unwrap();
            assert_eq!(got, [i; 100]);
            pairs.push((c, s));
        }
        let (c0, s0) = pairs.remove(0);
        let (c1, s1) = pairs.remove(0);
        let acceptor = std::thread::spawn({
            let l = l.clone();
            move || {
                let mut served = 0;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            let mut req = [0u8; 5];
                            (&s).read_exact(&mut req).unwrap();
                            (&s).write_all(&req).unwrap();
                            served += 1;
                        }
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
                            return served;
                        }
                    }
                }
            }
        });
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4096];
            (&s0).read_exact(&mut got).unwrap();
            check(40, 0, &got)
        });
        // Let the accept and the read block before anything arrives.
        std::thread::sleep(Duration::from_millis(50));
        let mut m = vec![0u8; 4096];
        fill(40, 0, &mut m);
        (&c0).write_all(&m).unwrap();
        assert_eq!(reader.join().unwrap(), None, "the blocked reader got other bytes");
        s1.set_nonblocking(true).unwrap();
        fill(41, 0, &mut m);
        (&c1).write_all(&m).unwrap();
        assert_eq!(read_without_blocking(&s1, m.len()), m);
        // New vsockets while the accept waits: their OPENs come on parked channels and on
        // channels their workers read.
        for i in 0..8u8 {
            let c = a.connect(dst).unwrap();
            (&c).write_all(&[i; 5]).unwrap();
            let mut echo = [0u8; 5];
            (&c).read_exact(&mut echo).unwrap();
            assert_eq!(echo, [i; 5]);
        }
        std::thread::sleep(Duration::from_millis(20));
        l.close();
        assert_eq!(acceptor.join().unwrap(), 8);
    });
}

/// The acknowledgement of a FIN that arrives after this end closed waits for the next write
/// on its channel; when none comes, the channel's worker sends it, so the peer's vsocket
/// still leaves its table (it waits for nothing else).
#[test]
fn a_fin_acknowledgement_waiting_for_a_write_that_never_comes_still_leaves() {
    within(30, || {
        let (a, b) = two_hosts(|_| {});
        let l = b.bind(9731).unwrap();
        for round in 0..3u8 {
            let c = a.connect(at(&b, 9731)).unwrap();
            let (s, _) = l.accept().unwrap();
            // Blocking reads on both ends: their channels are read inline and left parked,
            // so the workers tick.
            (&c).write_all(&[round; 64]).unwrap();
            let mut got = [0u8; 64];
            (&s).read_exact(&mut got).unwrap();
            (&s).write_all(&got).unwrap();
            (&c).read_exact(&mut got).unwrap();
            assert_eq!(got, [round; 64]);
            // The client closes first; the server's FIN arrives after, and nothing is
            // written on any channel afterwards.
            drop(c);
            let mut end = [0u8; 1];
            assert_eq!((&s).read(&mut end).unwrap(), 0);
            drop(s);
            both_tables_empty(&a, &b);
        }
    });
}

/// Read `n` bytes from the non-blocking `s`, napping while it would block.
fn read_without_blocking(s: &netchannel::VStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < n {
        match { s }.read(&mut buf) {
            Ok(0) => panic!("the vsocket ended after {} of {n} bytes", got.len()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => panic!("{e}"),
        }
    }
    got
}

fn both_tables_empty(a: &Host, b: &Host) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.stats().vsockets + b.stats().vsockets > 0 {
        assert!(
            Instant::now() < deadline,
            "vsockets left behind: {:?} {:?}",
            a.vsock_infos(),
            b.vsock_infos()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
