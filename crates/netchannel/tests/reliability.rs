//! Reliability and bad input: channels that die and come back, peers that vanish or restart,
//! garbage on the channel port, and memory that stays bounded when a receiver never reads.
//! Behaviour only, never speed.
//!
//! Some tests need a host in another process (to kill it, or to measure its memory alone):
//! they run this test binary again with `--exact child_host` and `NC_CHILD_ROLE` set, and
//! the `child_host` test plays that host.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{addr_pair, at, check, fill, two_hosts, within};
use netchannel::wire::{Frame, Hello, HEADER_LEN};
use netchannel::{Class, Config, Host, VStream};

/// Write `total` bytes of pattern `seed` in writes of up to `chunk` bytes.
fn send_pattern(s: &VStream, seed: u64, total: u64, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < total {
        let n = chunk.min((total - off) as usize);
        fill(seed, off, &mut buf[..n]);
        (&*s).write_all(&buf[..n]).expect("write");
        off += n as u64;
    }
}

/// Read to EOF, checking every byte against pattern `seed`; returns the byte count.
fn recv_pattern(s: &VStream, seed: u64) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0u64;
    loop {
        let got = (&*s).read(&mut buf).expect("read");
        if got == 0 {
            return off;
        }
        if let Some(bad) = check(seed, off, &buf[..got]) {
            panic!("stream {seed}: byte at offset {bad} differs from the pattern");
        }
        off += got as u64;
    }
}

/// Wait (bounded by the caller's `within`) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(60), "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fast_reconnect(c: &mut Config) {
    c.throughput_channels = 3;
    c.latency_channels = 1;
    c.channel_workers = 1;
    c.copy_workers = 0;
    c.reconnect_backoff = Duration::from_millis(10);
    c.reconnect_backoff_max = Duration::from_millis(100);
}

/// Send `total` verified bytes from `a` to `b` on `port` while `faults` runs; returns the
/// connected pair's byte count as received.
fn transfer_with(a: &Host, b: &Host, port: u16, total: u64, faults: impl FnOnce() + Send + 'static) -> u64 {
    let l = b.bind(port).unwrap();
    let c = a.connect(at(b, port)).unwrap();
    let (s, _) = l.accept().unwrap();
    let sender = std::thread::spawn(move || {
        send_pattern(&c, port as u64, total, 1 << 20);
        c.shutdown(Shutdown::Write).unwrap();
        // Hold the vsocket until the receiver is done, so every byte is acknowledged.
        let _ = (&c).read(&mut [0u8; 1]);
    });
    let faults = std::thread::spawn(faults);
    let got = recv_pattern(&s, port as u64);
    drop(s);
    faults.join().unwrap();
    sender.join().unwrap();
    got
}

#[test]
fn killed_channels_are_dialed_again_and_no_byte_is_lost() {
    within(180, || {
        let (a, b) = two_hosts(fast_reconnect);
        let b_key = b.local_addr();
        let a_key = a.local_addr();
        let (a2, b2) = (a.clone(), b.clone());
        let total = 48u64 << 20;
        let got = transfer_with(&a, &b, 9100, total, move || {
            // On the dialing host, on the accepting host, and the latency channel.
            std::thread::sleep(Duration::from_millis(30));
            assert!(a2.kill_channel(b_key, Class::Throughput, 1), "A's channel 1 existed");
            std::thread::sleep(Duration::from_millis(100));
            eventually("B sees three throughput channels", || {
                b2.stats().channels.iter().filter(|c| c.class == Class::Throughput).count() == 3
            });
            assert!(b2.kill_channel(a_key, Class::Throughput, 2), "B's channel 2 existed");
            std::thread::sleep(Duration::from_millis(100));
            assert!(a2.kill_channel(b_key, Class::Latency, 0), "A's latency channel existed");
        });
        assert_eq!(got, total);
        // The mesh comes back whole on both hosts: every killed channel dialed again.
        eventually("A dialed the 3 killed channels again and has 4", || {
            let st = a.stats();
            st.channels_redialed >= 3 && st.channels.len() == 4
        });
        eventually("B has 4 channels again", || b.stats().channels.len() == 4);
        assert_eq!(a.stats().peers_lost, 0);
        // And it carries new vsockets.
        let got = transfer_with(&a, &b, 9101, 4 << 20, || {});
        assert_eq!(got, 4 << 20);
    });
}

#[test]
fn spliced_payloads_arrive_whole_across_killed_channels() {
    // `splice_send`: bulk payloads go from the send ring to the socket by vmsplice + splice,
    // so the socket references the ring's pages until the peer read them. A channel killed
    // with payloads in its pipe and its socket, and the ring rewritten after the peer's
    // acknowledgement, must change no byte the receiver sees.
    within(180, || {
        let (a, b) = two_hosts(|c| {
            fast_reconnect(c);
            c.splice_send = true;
        });
        let b_key = b.local_addr();
        let a_key = a.local_addr();
        let (a2, b2) = (a.clone(), b.clone());
        let total = 64u64 << 20;
        let got = transfer_with(&a, &b, 9102, total, move || {
            for i in 0..3u16 {
                std::thread::sleep(Duration::from_millis(40));
                let (h, key) = if i % 2 == 0 { (&a2, b_key) } else { (&b2, a_key) };
                h.kill_channel(key, Class::Throughput, i % 3);
            }
        });
        assert_eq!(got, total);
        let got = transfer_with(&a, &b, 9103, 8 << 20, || {});
        assert_eq!(got, 8 << 20, "and the mesh carries new vsockets");
        assert_eq!(a.stats().peers_lost, 0);
    });
}

#[test]
fn every_channel_killed_at_once_loses_nothing_and_connects_wait_for_them() {
    within(180, || {
        let (a, b) = two_hosts(fast_reconnect);
        let b_key = b.local_addr();
        let a2 = a.clone();
        let kill_all = move || {
            for (class, index) in [(Class::Throughput, 0), (Class::Throughput, 1), (Class::Throughput, 2)]
                .into_iter()
                .chain([(Class::Latency, 0)])
            {
                a2.kill_channel(b_key, class, index);
            }
        };
        let k = kill_all.clone();
        let got = transfer_with(&a, &b, 9200, 32 << 20, move || {
            std::thread::sleep(Duration::from_millis(50));
            k();
        });
        assert_eq!(got, 32 << 20);
        // A connect issued while no channel is up goes out once they are back.
        let l = b.bind(9201).unwrap();
        kill_all();
        let mut c = a.connect(at(&b, 9201)).expect("connect while the channels are dialed again");
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"after the storm").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"after the storm");
        eventually("A has 4 channels again", || a.stats().channels.len() == 4);
        assert_eq!(a.stats().peers_lost + b.stats().peers_lost, 0);
    });
}

#[test]
fn garbage_on_the_channel_port_is_rejected_counted_and_disturbs_nothing() {
    within(180, || {
        let (a, b) = two_hosts(|c| {
            c.throughput_channels = 2;
            c.channel_workers = 1;
        });
        let b_chan = b.local_addr();
        // The attacker comes from another loopback address than host A.
        let attacker_ip = match b_chan.ip() {
            std::net::IpAddr::V4(v) => {
                let o = v.octets();
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], 3))
            }
            other => other,
        };
        let dial = move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(attacker_ip, 0).into()).unwrap();
            s.connect(&b_chan.into()).unwrap();
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        };
        // The host must close each of these connections: reading sees EOF or an error.
        let closed = |mut s: TcpStream| {
            let mut sink = vec![0u8; 4096];
            loop {
                match s.read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                        panic!("the host kept a garbage connection open")
                    }
                    Err(_) => return,
                }
            }
        };
        let hello = move |host_id: u64| {
            let mut buf = Vec::new();
            Frame::Hello(Hello {
                version: netchannel::wire::VERSION,
                class: Class::Throughput,
                index: 0,
                host_id,
                listen: SocketAddr::new(attacker_ip, 1),
                nonce: [0; 16],
            })
            .encode(&mut buf);
            buf
        };
        let garbage = std::thread::spawn(move || {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for round in 0..6u64 {
                // Random bytes instead of a HELLO.
                let mut s = dial();
                let junk: Vec<u8> = (0..rng.gen_range(HEADER_LEN..4096)).map(|_| rng.gen()).collect();
                let _ = s.write_all(&junk);
                closed(s);
                // A valid HELLO, then a malformed frame (unknown kind, bad reserved bits).
                let mut s = dial();
                s.write_all(&hello(1000 + round)).unwrap();
                let mut ok = vec![0u8; HEADER_LEN + netchannel::wire::HelloOk::LEN];
                s.read_exact(&mut ok).unwrap();
                let mut bad = vec![0u8; HEADER_LEN];
                bad[0] = 0xEE;
                bad[2] = 0x55;
                let _ = s.write_all(&bad);
                closed(s);
                // A valid HELLO, then a handshake frame on the open channel.
                let mut s = dial();
                s.write_all(&hello(2000 + round)).unwrap();
                s.read_exact(&mut ok).unwrap();
                let _ = s.write_all(&hello(2000 + round));
                closed(s);
            }
        });
        let got = transfer_with(&a, &b, 9300, 64 << 20, move || garbage.join().unwrap());
        assert_eq!(got, 64 << 20, "the live transfer was disturbed");
        let st = b.stats();
        assert!(st.channels_refused >= 6, "random bytes are refused at the handshake: {st:?}");
        assert!(st.bad_frames >= 12, "malformed frames close open channels: {st:?}");
        assert_eq!(a.stats().peers_lost, 0, "host A's peer was never given up");
    });
}

// ---- Tests with a host in a child process --------------------------------------------------

/// A child process running this test binary's `child_host` test in `role`; killed on drop.
struct ChildHost {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildHost {
    fn start(role: &str, listen: SocketAddr, peer: SocketAddr) -> ChildHost {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_host", "--nocapture", "--test-threads=1"])
            .env("NC_CHILD_ROLE", role)
            .env("NC_CHILD_LISTEN", listen.to_string())
            .env("NC_CHILD_PEER", peer.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the test binary as a child host");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                // libtest may print `test child_host ... ` on the same line first.
                if let Some(i) = l.find("NC: ") {
                    let _ = tx.send(l[i + 4..].to_string());
                }
            }
        });
        ChildHost { child, lines }
    }

    /// The child's next `NC:` line.
    fn expect(&self, prefix: &str) -> String {
        let l = self.lines.recv_timeout(Duration::from_secs(60)).expect("the child host said nothing");
        assert!(l.starts_with(prefix), "child said {l:?}, expected {prefix:?}");
        l[prefix.len()..].trim().to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildHost {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of process `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Plays a host in a child process (see the module docs); does nothing in a normal run.
#[test]
fn child_host() {
    let Ok(role) = std::env::var("NC_CHILD_ROLE") else { return };
    let listen: SocketAddr = std::env::var("NC_CHILD_LISTEN").unwrap().parse().unwrap();
    let peer: SocketAddr = std::env::var("NC_CHILD_PEER").unwrap().parse().unwrap();
    let say = |m: String| {
        println!("NC: {m}");
        std::io::stdout().flush().unwrap();
    };
    // Never outlive a parent that forgot us.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        std::process::exit(3);
    });
    match role.as_str() {
        "echo" => {
            let h = Host::start(Config { listen, ..Config::default() }).unwrap();
            let l = h.bind(7000).unwrap();
            say("ready".into());
            for s in l.incoming() {
                let Ok(s) = s else { break };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match (&s).read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if (&s).write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        }
        "unread" => {
            // Both hosts here; a fast sender to a receiver that never reads.
            let buffers = |c: &mut Config| {
                c.send_buffer = 16 << 20;
                c.recv_buffer = 16 << 20;
                c.channel_workers = 1;
                c.copy_workers = 0;
            };
            let mut ca = Config { listen, ..Config::default() };
            buffers(&mut ca);
            let mut cb = Config { listen: peer, ..Config::default() };
            buffers(&mut cb);
            let (a, b) = (Host::start(ca).unwrap(), Host::start(cb).unwrap());
            let l = b.bind(7001).unwrap();
            let c = a.connect(at(&b, 7001)).unwrap();
            let (_never_read, _) = l.accept().unwrap();
            say("ready".into());
            let chunk = vec![0x5au8; 1 << 20];
            c.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let start = Instant::now();
            let mut written = 0u64;
            while start.elapsed() < Duration::from_secs(3) {
                match (&c).write(&chunk) {
                    Ok(n) => written += n as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            say(format!("written {written}"));
            std::thread::sleep(Duration::from_secs(300));
        }
        other => panic!("unknown NC_CHILD_ROLE {other}"),
    }
}

#[test]
fn unread_receiver_keeps_both_hosts_memory_bounded() {
    within(120, || {
        let (a, b) = addr_pair();
        let child = ChildHost::start("unread", a, b);
        child.expect("ready");
        let pid = child.child.id();
        let base = rss_kib(pid);
        let mut peak = base;
        let written = loop {
            peak = peak.max(rss_kib(pid));
            match child.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(l) => break l.strip_prefix("written ").expect("written N").parse::<u64>().unwrap(),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => panic!("child host: {e}"),
            }
        };
        for _ in 0..10 {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        let buffers_kib = (16 + 16) << 10;
        // Fixed overhead: channel read buffers (up to a segment each), frame queues, stacks.
        let overhead_kib = 48 << 10;
        assert!(written <= (32 << 20) + (2 << 20), "the sender got past both buffers: {written} bytes");
        assert!(
            peak <= base + buffers_kib + overhead_kib,
            "resident memory grew from {base} KiB to {peak} KiB (bound {} KiB)",
            base + buffers_kib + overhead_kib
        );
    });
}

/// Host A in this process with `tweak`, and an echo host B in a child process.
fn host_and_child(tweak: impl Fn(&mut Config)) -> (Host, ChildHost, SocketAddr, SocketAddr) {
    let (a_addr, b_addr) = addr_pair();
    let child = ChildHost::start("echo", b_addr, a_addr);
    child.expect("ready");
    let mut c = Config { listen: a_addr, ..Config::default() };
    c.reconnect_backoff = Duration::from_millis(20);
    c.reconnect_backoff_max = Duration::from_millis(200);
    tweak(&mut c);
    (Host::start(c).unwrap(), child, a_addr, b_addr)
}

fn echo_once(s: &VStream, msg: &[u8]) {
    (&*s).write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    (&*s).read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn a_peer_gone_longer_than_the_timeout_fails_its_vsockets_naming_it() {
    within(120, || {
        let (a, mut child, _, b_addr) = host_and_child(|c| c.peer_down_timeout = Duration::from_millis(800));
        let dst = SocketAddr::new(b_addr.ip(), 7000);
        let c = a.connect(dst).unwrap();
        echo_once(&c, b"are you there");
        child.kill();
        // A blocked read and a write both fail once the timeout passed; nothing hangs.
        let e = (&c).read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains(&b_addr.ip().to_string()), "the error names the peer: {e}");
        assert!(e.to_string().contains("peer_down_timeout_ms"), "{e}");
        assert!((&c).write(b"x").is_err());
        assert_eq!(a.stats().peers_lost, 1);
        let e = a.connect(dst).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    });
}

#[test]
fn a_restarted_peer_fails_old_vsockets_at_once_and_serves_new_ones() {
    within(120, || {
        // The timeout is long: only recognising the restart can fail the old vsocket soon.
        let (a, mut child, a_addr, b_addr) =
            host_and_child(|c| c.peer_down_timeout = Duration::from_secs(600));
        let dst = SocketAddr::new(b_addr.ip(), 7000);
        let old = a.connect(dst).unwrap();
        echo_once(&old, b"before the restart");
        child.kill();
        let child2 = ChildHost::start("echo", b_addr, a_addr);
        child2.expect("ready");
        let e = (&old).read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains("restarted"), "{e}");
        let new = a.connect(dst).expect("connect to the restarted host");
        echo_once(&new, b"after the restart");
    });
}
