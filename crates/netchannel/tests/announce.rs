//! Listener announcements (`engine::announce`): a confirmed connect to a port the peer
//! announced needs no round trip; one to a port not announced asks the peer; the set follows
//! binds, closes and rebinds, is sent again to a peer that reconnects and on a channel that
//! replaces a dead one. The race where a listener closed while its UNLISTEN was in flight
//! is played by a fake peer host on a raw socket, which announces a port and then refuses
//! the OPEN. Every test is bounded in time (`within`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{addr_pair, at, check, fill, read_raw, two_hosts, two_hosts_with, within};
use netchannel::wire::{self, Class, Frame, HelloOk, Reason};
use netchannel::{Config, Host, VStream};

/// Wait (at most 10 s) until `a` holds `port` as announced by `b` (`present`) or not.
fn wait_announced(a: &Host, b: &Host, port: u16, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.announced_ports(b.local_addr()).contains(&port) != present {
        assert!(
            Instant::now() < deadline,
            "port {port} {} announced: {:?}",
            if present { "never" } else { "still" },
            a.announced_ports(b.local_addr())
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One request/response of `n` bytes on `s`, verified both ways (the server echoes).
fn echo(s: &mut VStream, seed: u64, n: usize) {
    let mut req = vec![0u8; n];
    fill(seed, 0, &mut req);
    s.write_all(&req).unwrap();
    let mut resp = vec![0u8; n];
    s.read_exact(&mut resp).unwrap();
    assert_eq!(check(seed, 0, &resp), None, "response {seed} of {n} bytes");
}

/// Accept `count` vsockets on `l` and echo one `n`-byte request on each.
fn echo_server(l: netchannel::VListener, count: usize, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..count {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; n];
            s.read_exact(&mut req).unwrap();
            s.write_all(&req).unwrap();
        }
    })
}

#[test]
fn a_connect_to_an_announced_port_returns_without_waiting_and_carries_the_request() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        // Announced in the set the channels carry when the mesh comes up.
        let early = b.bind(6001).unwrap();
        let server = echo_server(early, 2, 3000);
        let mut s = a.connect(at(&b, 6001)).unwrap();
        echo(&mut s, 1, 3000);
        drop(s);
        wait_announced(&a, &b, 6001, true);
        let before = a.stats().connects_announced;
        let mut s = a.connect(at(&b, 6001)).unwrap();
        assert_eq!(a.stats().connects_announced, before + 1, "the connect did not use the announcement");
        echo(&mut s, 2, 3000);
        drop(s);
        server.join().unwrap();
        // Bound while the mesh is up: announced on its own (LISTEN).
        let late = b.bind(6002).unwrap();
        wait_announced(&a, &b, 6002, true);
        let server = echo_server(late, 1, 100_000);
        let mut s = a.connect(at(&b, 6002)).unwrap();
        assert_eq!(a.stats().connects_announced, before + 2);
        // Past the open credit: the rest waits for OPEN_OK and its credit.
        echo(&mut s, 3, 100_000);
        drop(s);
        server.join().unwrap();
        // A port that never listened is refused by connect itself, as before.
        let e = a.connect(at(&b, 6003)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    });
}

#[test]
fn without_announcements_every_confirmed_connect_waits_for_the_answer() {
    within(60, || {
        let (a, b) = two_hosts_with(|_| {}, |c| c.announce_listeners = false);
        let l = b.bind(6011).unwrap();
        let server = echo_server(l, 3, 500);
        for i in 0..3 {
            let mut s = a.connect(at(&b, 6011)).unwrap();
            echo(&mut s, i, 500);
        }
        server.join().unwrap();
        assert!(a.announced_ports(b.local_addr()).is_empty());
        assert_eq!(a.stats().connects_announced, 0);
    });
}

#[test]
fn closing_and_rebinding_a_port_is_followed_in_order() {
    within(60, || {
        let (a, b) = two_hosts(|_| {});
        let keep = b.bind(6021).unwrap();
        let server = echo_server(keep, 1, 10);
        let mut s = a.connect(at(&b, 6021)).unwrap();
        echo(&mut s, 0, 10);
        server.join().unwrap();
        for round in 0..5u64 {
            let l = b.bind(6022).unwrap();
            wait_announced(&a, &b, 6022, true);
            let server = echo_server(l, 1, 64);
            let mut s = a.connect(at(&b, 6022)).unwrap();
            echo(&mut s, round, 64);
            server.join().unwrap(); // drops the listener: the port is withdrawn
            wait_announced(&a, &b, 6022, false);
            // Not announced any more: the connect asks, and is refused itself.
            let e = a.connect(at(&b, 6022)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "round {round}: {e}");
        }
        // close() withdraws the port too, while the listener object lives, and frees it.
        let l = b.bind(6023).unwrap();
        wait_announced(&a, &b, 6023, true);
        l.close();
        wait_announced(&a, &b, 6023, false);
        let again = b.bind(6023).unwrap();
        wait_announced(&a, &b, 6023, true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let (mut s, _) = again.accept().unwrap();
                let mut req = [0u8; 64];
                s.read_exact(&mut req).unwrap();
                s.write_all(&req).unwrap();
            });
            let mut s = a.connect(at(&b, 6023)).unwrap();
            echo(&mut s, 9, 64);
        });
        // Dropping the closed listener does not withdraw its successor: an announcement
        // made after the drop arrives, and 6023 is still there.
        drop(l);
        let _marker = b.bind(6024).unwrap();
        wait_announced(&a, &b, 6024, true);
        assert!(a.announced_ports(b.local_addr()).contains(&6023), "{:?}", a.announced_ports(b.local_addr()));
        drop(again);
        wait_announced(&a, &b, 6023, false);
    });
}

#[test]
fn a_close_while_the_channel_is_down_is_replaced_by_the_set_on_its_successor() {
    within(60, || {
        // One channel: while it is down, nothing can carry an announcement.
        let one = |c: &mut Config| {
            c.throughput_channels = 1;
            c.latency_channels = 0;
            c.reconnect_backoff = Duration::from_millis(200);
        };
        let (a, b) = two_hosts(one);
        let first = b.bind(6031).unwrap();
        let server = echo_server(b.bind(6032).unwrap(), 1, 10);
        let mut s = a.connect(at(&b, 6032)).unwrap();
        echo(&mut s, 0, 10);
        drop(s);
        server.join().unwrap();
        wait_announced(&a, &b, 6031, true);
        // b kills its channel; a, which dialed the mesh, dials it again. The close and
        // the bind while it is down are sent on no channel.
        assert!(b.kill_channel(a.local_addr(), Class::Throughput, 0));
        drop(first);
        let second = b.bind(6033).unwrap();
        wait_announced(&a, &b, 6031, false);
        wait_announced(&a, &b, 6033, true);
        let server = echo_server(second, 1, 64);
        let mut s = a.connect(at(&b, 6033)).unwrap();
        echo(&mut s, 1, 64);
        server.join().unwrap();
    });
}

#[test]
fn a_peer_that_comes_back_sends_its_set_again() {
    within(60, || {
        let (a_addr, b_addr) = addr_pair();
        let a = Host::start(Config { listen: a_addr, ..Config::default() }).unwrap();
        let b = Host::start(Config { listen: b_addr, ..Config::default() }).unwrap();
        let l = b.bind(6041).unwrap();
        let server = echo_server(l, 1, 10);
        let mut s = a.connect(at(&b, 6041)).unwrap();
        echo(&mut s, 0, 10);
        drop(s);
        server.join().unwrap();
        let _l2 = b.bind(6042).unwrap();
        wait_announced(&a, &b, 6042, true);
        // b goes away (its channels say so) and a new host comes up at its address with
        // other listeners: a must not keep the old set, and must learn the new one.
        b.shutdown();
        drop(_l2);
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.stats().peers_lost == 0 {
            assert!(Instant::now() < deadline, "a never saw b go");
            std::thread::sleep(Duration::from_millis(2));
        }
        let b2 = loop {
            match Host::start(Config { listen: b_addr, ..Config::default() }) {
                Ok(h) => break h,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("restart b: {e}"),
            }
        };
        let l3 = b2.bind(6043).unwrap();
        let server = echo_server(l3, 2, 10);
        let mut s = a.connect(at(&b2, 6043)).unwrap();
        echo(&mut s, 1, 10);
        drop(s);
        wait_announced(&a, &b2, 6043, true);
        assert!(!a.announced_ports(b2.local_addr()).contains(&6042), "{:?}", a.announced_ports(b_addr));
        let mut s = a.connect(at(&b2, 6043)).unwrap();
        echo(&mut s, 2, 10);
        drop(s);
        server.join().unwrap();
        let e = a.connect(at(&b2, 6042)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    });
}

#[test]
fn an_optimistic_open_to_an_announced_port_carries_what_the_listener_grants() {
    within(60, || {
        // The opener would put 64 KiB in an OPEN; the listener grants 1 KiB and says so.
        let (a, b) = two_hosts_with(|c| c.open_credit = 64 << 10, |c| c.open_credit = 1 << 10);
        let l = b.bind(6051).unwrap();
        let server = echo_server(l, 3, 4096);
        let mut s = a.connect(at(&b, 6051)).unwrap();
        echo(&mut s, 0, 4096);
        drop(s);
        wait_announced(&a, &b, 6051, true);
        let mut s = a.connect_optimistic(at(&b, 6051)).unwrap();
        echo(&mut s, 1, 4096);
        drop(s);
        let mut s = a.connect(at(&b, 6051)).unwrap();
        echo(&mut s, 2, 4096);
        drop(s);
        server.join().unwrap();
        assert_eq!(b.stats().bad_frames, 0);
    });
}

// ---- A fake peer host on a raw socket ----

fn send(s: &mut TcpStream, f: &Frame<'_>) {
    let mut v = Vec::new();
    f.encode(&mut v);
    s.write_all(&v).unwrap();
}

/// The next OPEN on `s` (other frames skipped): its source vsocket, port and payload.
fn next_open(s: &mut TcpStream) -> (u32, u16, Vec<u8>) {
    loop {
        let raw = read_raw(s).expect("the host closed the channel before sending OPEN");
        if let Ok((Frame::Open { src_vsock, dst_port, payload, .. }, _)) = wire::decode(&raw) {
            return (src_vsock, dst_port, payload.to_vec());
        }
    }
}

#[test]
fn a_listener_closed_while_its_withdrawal_is_in_flight_fails_the_first_read_as_refused() {
    within(60, || {
        let (a_addr, x_addr) = addr_pair();
        let cfg = Config { listen: a_addr, throughput_channels: 1, latency_channels: 0, ..Config::default() };
        let a = Host::start(cfg).unwrap();
        // X, a host of one channel, announces port 7000 and then refuses every OPEN: its
        // listener closed and the UNLISTEN has not reached A yet.
        let x = TcpListener::bind(x_addr).unwrap();
        let dial = {
            let a = a.clone();
            std::thread::spawn(move || a.connect(SocketAddr::new(x_addr.ip(), 7001)))
        };
        let (mut ch, _) = x.accept().unwrap();
        ch.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let raw = read_raw(&mut ch).unwrap();
        let Ok((Frame::Hello(hello), _)) = wire::decode(&raw) else { panic!("A did not send HELLO") };
        assert_eq!(hello.version, wire::VERSION);
        let ok = HelloOk {
            version: wire::VERSION,
            host_id: 0x5EED_0000_0000_0002,
            proof: [0; 32],
            nonce: [0; 16],
        };
        send(&mut ch, &Frame::HelloOk(ok));
        send(&mut ch, &Frame::ListenSet { seq: 1 });
        send(&mut ch, &Frame::Listen { port: 7000, seq: 1, credit: 4096 });
        // Port 7001 was not announced: A's connect asks, and X's refusal fails it.
        let (id, port, payload) = next_open(&mut ch);
        assert_eq!((port, payload.len()), (7001, 0));
        send(&mut ch, &Frame::Refused { vsock: id, reason: Reason::NoListener });
        let e = dial.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.announced_ports(x_addr).contains(&7000) {
            assert!(Instant::now() < deadline, "7000 never announced");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Announced: connect returns with X silent, and the request leaves with the OPEN.
        let mut s = a.connect(SocketAddr::new(x_addr.ip(), 7000)).unwrap();
        s.write_all(b"GET /index").unwrap();
        let (id, port, payload) = next_open(&mut ch);
        assert_eq!((port, &payload[..]), (7000, &b"GET /index"[..]));
        send(&mut ch, &Frame::Refused { vsock: id, reason: Reason::NoListener });
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("7000"), "{e}");
        assert_eq!(s.write(b"more").unwrap_err().kind(), ErrorKind::ConnectionRefused);
        drop(s);
        // Withdrawn now: A asks again, and a refusal fails the connect itself.
        send(&mut ch, &Frame::Unlisten { port: 7000, seq: 2 });
        while a.announced_ports(x_addr).contains(&7000) {
            assert!(Instant::now() < deadline, "7000 never withdrawn");
            std::thread::sleep(Duration::from_millis(2));
        }
        // A late copy of the first LISTEN (it came over another channel) changes nothing.
        send(&mut ch, &Frame::Listen { port: 7000, seq: 1, credit: 4096 });
        let dial = {
            let a = a.clone();
            std::thread::spawn(move || a.connect(SocketAddr::new(x_addr.ip(), 7000)))
        };
        let (id, port, payload) = next_open(&mut ch);
        assert_eq!((port, payload.len()), (7000, 0));
        send(&mut ch, &Frame::Refused { vsock: id, reason: Reason::NoListener });
        let e = dial.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        while a.stats().vsockets > 0 {
            assert!(Instant::now() < deadline, "vsockets left: {:?}", a.vsock_infos());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}
