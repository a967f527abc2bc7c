//! Hostile peers on the channel port, played from raw sockets on loopback: each test is an
//! attack that once worked (issue 15) and must now fail without disturbing honest hosts.
//! Every test is bounded in time (`within`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{addr_pair, within};
use netchannel::wire::{self, Frame, Hello, HelloOk, HEADER_LEN};
use netchannel::{Config, Host};

fn key_file(name: &str, key: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("netchannel-hostile-{}-{name}", std::process::id()));
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

/// One frame read from a raw socket: the raw bytes (header and payload).
fn read_raw(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER_LEN];
    s.read_exact(&mut buf)?;
    let h =
        wire::Header::decode(&buf).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
    buf.resize(HEADER_LEN + h.len as usize, 0);
    s.read_exact(&mut buf[HEADER_LEN..])?;
    Ok(buf)
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
