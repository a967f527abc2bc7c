//! Hostile peers on the channel port, played from raw sockets on loopback: each test is an
//! attack that once worked (issue 15) and must now fail without disturbing honest hosts.
//! Every test is bounded in time (`within`). The daemon's side — its caps, a daemon out of
//! descriptors under a HELLO flood and a slowloris, garbage on its control socket, a wrong
//! key in its log — is in crates/netchannel-cli/tests/hostile.rs.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{addr_pair, read_raw, within};
use netchannel::wire::{self, Frame, Hello, HelloOk};
use netchannel::{Config, Host};

fn key_file(name: &str, key: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("netchannel-hostile-{}-{name}", std::process::id()));
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

fn encode(f: &Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

/// A TCP connection to `to` from `from_ip`, with a read timeout.
fn dial_from(from_ip: IpAddr, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from_ip, 0).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// The reflection attack of issue 15, defect 1. A keyless host X waits for keyed host A to
/// dial it, opens its own connection to A with a HELLO that carries A's own dial nonce,
/// hands A's acceptor proof back to A's dial as HELLO_OK (under a host id of its own), then
/// relays A's dialer proof (AUTH) to A's acceptor and answers AUTH_OK itself. With proofs
/// bound to the role, both host ids, both nonces and the connection, no step verifies: the
/// test fails if A ever holds a channel, on either connection.
#[test]
fn a_reflected_handshake_authenticates_no_channel() {
    within(60, || {
        let (a_addr, x_addr) = addr_pair();
        let key = key_file("reflect", "the key only host A holds, 16+ bytes");
        let cfg = Config {
            listen: a_addr,
            auth_key_file: Some(key),
            connect_timeout: Duration::from_secs(4),
            ..Config::default()
        };
        let a = Host::start(cfg).unwrap();
        // X listens where A dials peers (same channel port, X's own address).
        let x_listener = TcpListener::bind(x_addr).unwrap();
        x_listener.set_nonblocking(true).unwrap();
        let app = {
            let a = a.clone();
            std::thread::spawn(move || a.connect(SocketAddr::new(x_addr.ip(), 7000)))
        };
        let x_id: u64 = 0x5EED_0000_0000_0001;
        let mut attempts = 0;
        let mut acceptor_answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !app.is_finished() && Instant::now() < deadline {
            let mut d = match x_listener.accept() {
                Ok((d, _)) => d,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            d.set_nonblocking(false).unwrap();
            d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            attempts += 1;
            // A's dial: its HELLO, with A's nonce.
            let Ok(raw) = read_raw(&mut d) else { continue };
            let Ok((Frame::Hello(a_hello), _)) = wire::decode(&raw) else { panic!("A did not send HELLO") };
            assert_ne!(a_hello.nonce, [0; 16], "A authenticates");
            // X's own connection to A, from X's address, carrying A's nonce.
            let mut e = dial_from(x_addr.ip(), a_addr);
            let x_hello = Hello { host_id: x_id, listen: x_addr, ..a_hello };
            e.write_all(&encode(&Frame::Hello(x_hello))).unwrap();
            let Ok(raw) = read_raw(&mut e) else { continue };
            let hello_ok = match wire::decode(&raw) {
                Ok((Frame::HelloOk(ok), _)) => ok,
                Ok((other, _)) => {
                    acceptor_answers.push(format!("{other:?}"));
                    continue;
                }
                Err(err) => panic!("A's acceptor sent a bad frame: {err}"),
            };
            assert_ne!(hello_ok.proof, [0; 32]);
            // A's acceptor proof handed back to A's dial, under X's host id (an answer with
            // A's own id would be refused as a dial to itself).
            let forged = HelloOk { host_id: x_id, ..hello_ok };
            if d.write_all(&encode(&Frame::HelloOk(forged))).is_err() {
                continue;
            }
            // A's dialer proof relayed to A's acceptor.
            let Ok(auth) = read_raw(&mut d) else { continue };
            match wire::decode(&auth) {
                Ok((Frame::Auth { .. }, _)) => {}
                _ => continue,
            }
            let _ = e.write_all(&auth);
            if let Ok(raw) = read_raw(&mut e) {
                if let Ok((f, _)) = wire::decode(&raw) {
                    acceptor_answers.push(format!("{:?}", f.kind()));
                }
            }
            let _ = d.write_all(&encode(&Frame::AuthOk));
            std::thread::sleep(Duration::from_millis(100));
            let st = a.stats();
            assert!(st.channels.is_empty(), "a reflected handshake made a channel: {:?}", st.channels);
            // Keep e open until A's verdict is in; A's acceptor must have closed it.
            drop(e);
        }
        let r = app.join().unwrap();
        assert!(attempts >= 1, "A never dialed X");
        let st = a.stats();
        assert!(st.channels.is_empty(), "a reflected handshake made a channel: {:?}", st.channels);
        let e = r.expect_err("A's connect to a host without the key must fail");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(
            !acceptor_answers.iter().any(|k| k.contains("AuthOk")),
            "A's acceptor said AUTH_OK: {acceptor_answers:?}"
        );
    });
}

/// The loopback address `127.x.y.k` next to a test pair's hosts (`.1` and `.2`).
fn nearby_ip(of: SocketAddr, k: u8) -> IpAddr {
    match of.ip() {
        IpAddr::V4(v) => {
            let o = v.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], k))
        }
        other => other,
    }
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// A valid unauthenticated HELLO from `listen` with `host_id`.
fn hello_from(listen: SocketAddr, host_id: u64) -> Vec<u8> {
    encode(&Frame::Hello(Hello {
        version: wire::VERSION,
        class: netchannel::Class::Throughput,
        index: 0,
        host_id,
        listen,
        nonce: [0; 16],
    }))
}

/// Whether the host closed `s` (EOF or reset) within `secs`.
fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// An echo of 1 MiB of patterned bytes over a fresh vsocket from `a` to `b`.
fn verified_echo(a: &Host, b: &Host, port: u16) {
    let l = b.bind(port).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match (&s).read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => (&s).write_all(&buf[..n]).unwrap(),
            }
        }
    });
    let c = a.connect(common::at(b, port)).unwrap();
    let total = 1u64 << 20;
    let writer = {
        let c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut off = 0;
            while off < total {
                common::fill(u64::from(port), off, &mut buf);
                (&c).write_all(&buf).unwrap();
                off += buf.len() as u64;
            }
            c.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    loop {
        let n = (&c).read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(common::check(u64::from(port), off, &buf[..n]), None, "echoed bytes differ");
        off += n as u64;
    }
    assert_eq!(off, total);
    writer.join().unwrap();
    drop(c);
    server.join().unwrap();
}

/// Defect 4: a slowloris (connections that send a HELLO one byte at a time, or nothing) and
/// a HELLO flood (valid HELLOs from hundreds of made-up hosts, held open) cost the host no
/// thread each, are cut at the handshake deadline or the caps, and leave the channel port
/// open: a real peer connects meanwhile and an echo is verified.
#[test]
fn a_slowloris_and_a_hello_flood_cost_no_thread_each_and_leave_the_port_open() {
    within(90, || {
        let (a, b) = common::two_hosts(|c| c.peer_down_timeout = Duration::from_secs(60));
        let b_chan = b.local_addr();
        let before = threads();
        // 40 slow connections from one IP: the first byte of a HELLO, then nothing.
        let slow_ip = nearby_ip(b_chan, 3);
        let mut slow: Vec<TcpStream> = (0..40)
            .map(|_| {
                let mut s = dial_from(slow_ip, b_chan);
                let _ = s.write_all(&hello_from(SocketAddr::new(slow_ip, 1), 7)[..1]);
                s
            })
            .collect();
        // 300 made-up hosts from another IP, each with a valid HELLO, held open.
        let flood_ip = nearby_ip(b_chan, 4);
        let flood: Vec<TcpStream> = (0..300u16)
            .map(|i| {
                let mut s = dial_from(flood_ip, b_chan);
                let _ = s.write_all(&hello_from(SocketAddr::new(flood_ip, 1000 + i), 1000 + u64::from(i)));
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let during = threads();
        assert!(during <= before + 2, "pending handshakes cost threads: {before} before, {during} during");
        let fake = |h: &Host| h.stats().channels.iter().filter(|c| c.peer.ip() == flood_ip).count();
        assert!(fake(&b) <= 16, "fake peers beyond the per-IP cap were admitted: {}", fake(&b));
        // A real peer is served meanwhile.
        verified_echo(&a, &b, 7500);
        // The slow connections are closed at the handshake deadline (3 s after accept).
        for s in &mut slow {
            assert!(closed_within(s, 6), "a slowloris connection outlived the handshake deadline");
        }
        // The fake peers go as soon as their connections do, and take no thread with them.
        drop(flood);
        let t0 = Instant::now();
        while fake(&b) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(fake(&b), 0, "fake peers' channels stayed");
        std::thread::sleep(Duration::from_millis(200));
        let after = threads();
        assert!(after <= before + 2, "fake peers left threads behind: {before} before, {after} after");
        verified_echo(&a, &b, 7501);
    });
}

/// Defect 2: without a key, a HELLO from a live peer's IP with a new host id claims the peer
/// restarted. While the peer's channels are up and answering that is not believed: the
/// peer's vsockets go on, and the impostor's channel is refused.
#[test]
fn a_keyless_hello_with_a_new_host_id_from_a_live_peer_resets_nothing() {
    within(60, || {
        let (a, b) = common::two_hosts(|_| {});
        let l = b.bind(7600).unwrap();
        let c = a.connect(common::at(&b, 7600)).unwrap();
        let (s, _) = l.accept().unwrap();
        (&c).write_all(b"before").unwrap();
        let mut got = [0u8; 6];
        (&s).read_exact(&mut got).unwrap();
        // The impostor: A's IP, A's channel port, another host id.
        let a_chan = a.local_addr();
        let mut imp = dial_from(a_chan.ip(), b.local_addr());
        imp.write_all(&hello_from(a_chan, 0x0BAD_1D00)).unwrap();
        let answer = read_raw(&mut imp);
        assert!(closed_within(&mut imp, 6), "the impostor's channel was kept");
        if let Ok(raw) = answer {
            match wire::decode(&raw) {
                Ok((Frame::HelloOk(_), _)) | Ok((Frame::Reset { .. }, _)) => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(b.stats().peers_lost, 0, "B believed the restart");
        (&c).write_all(b"after!").unwrap();
        (&s).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after!");
        (&s).write_all(b"back").unwrap();
        let mut back = [0u8; 4];
        (&c).read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
        assert!(b.stats().channels.iter().all(|ch| ch.peer == a_chan), "{:?}", b.stats().channels);
    });
}

/// Defect 6: the daemon (`netchannel up --socket PATH`) removes only a stale socket at its
/// socket path; a regular file there is refused with an error naming it, and left whole.
#[test]
fn the_daemon_refuses_a_socket_path_that_holds_a_regular_file() {
    within(60, || {
        let dir = std::env::temp_dir().join(format!("netchannel-hostile-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("precious.txt");
        std::fs::write(&path, b"not a socket").unwrap();
        let (listen, _) = addr_pair();
        let mut cfg = Config { listen, ..Config::default() };
        cfg.daemon.socket = Some(path.clone());
        let e = netchannel::daemon::Server::start(cfg.clone()).err().expect("a regular file is not replaced");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert!(
            e.to_string().contains(&path.display().to_string()) && e.to_string().contains("not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket", "the file was touched");
        // A stale socket (nobody answers on it) is still replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        cfg.daemon.socket = Some(stale.clone());
        let server = netchannel::daemon::Server::start(cfg).expect("a stale socket is replaced");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Defect 2: a channel that claims to belong to a live peer's mesh (its HELLO names the
/// peer's address and host id) from another address is refused, naming both addresses,
/// and the peer's channels are all still its own.
#[test]
fn a_hello_claiming_a_live_peers_address_from_another_ip_is_refused() {
    within(60, || {
        let (a, b) = common::two_hosts(|_| {});
        let l = b.bind(7650).unwrap();
        let c = a.connect(common::at(&b, 7650)).unwrap();
        let (s, _) = l.accept().unwrap();
        let a_chan = a.local_addr();
        let mut imp = dial_from(nearby_ip(a_chan, 5), b.local_addr());
        imp.write_all(&hello_from(a_chan, 0x5EED)).unwrap();
        let raw = read_raw(&mut imp).expect("an answer to the impostor");
        match wire::decode(&raw) {
            Ok((Frame::Reset { message, .. }, _)) => {
                assert!(message.contains("claims") && message.contains(&a_chan.ip().to_string()), "{message}")
            }
            other => panic!("the impostor's HELLO was not refused: {other:?}"),
        }
        assert!(closed_within(&mut imp, 6), "the impostor's connection was kept");
        assert!(b.stats().channels.iter().all(|ch| ch.peer == a_chan), "{:?}", b.stats().channels);
        (&c).write_all(b"still").unwrap();
        let mut got = [0u8; 5];
        (&s).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still");
    });
}
