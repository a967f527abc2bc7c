//! Shared helpers for the two-host loopback tests.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use netchannel::daemon::Server;
use netchannel::{Config, Host};

/// A distinct pair of loopback addresses and a port for each pair of hosts, so tests can
/// run in parallel (threads and processes) without colliding.
pub fn addr_pair() -> (SocketAddr, SocketAddr) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let b = (pid % 200) as u8 + 20;
    let c = (n % 250) as u8 + 1;
    let port = 20000 + (pid % 20000) as u16;
    let a = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 1)), port);
    let z = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 2)), port);
    (a, z)
}

/// Two hosts A and B on loopback with `tweak` applied to both configs.
pub fn two_hosts(tweak: impl Fn(&mut Config)) -> (Host, Host) {
    two_hosts_with(&tweak, &tweak)
}

/// Two hosts A and B on loopback, each config with its own tweak.
pub fn two_hosts_with(tweak_a: impl Fn(&mut Config), tweak_b: impl Fn(&mut Config)) -> (Host, Host) {
    let (a, b) = addr_pair();
    let mut ca = Config { listen: a, ..Config::default() };
    tweak_a(&mut ca);
    let mut cb = Config { listen: b, ..Config::default() };
    tweak_b(&mut cb);
    (Host::start(ca).expect("start host A"), Host::start(cb).expect("start host B"))
}

/// The vsocket address of `port` on host `h`.
pub fn at(h: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(h.local_addr().ip(), port)
}

/// Run `f` on a thread and fail the test if it does not finish within `secs`.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().expect("test body panicked"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(_) => panic!("test did not finish within {secs} s (hang)"),
    }
}

/// The byte at stream offset `o` of stream number `seed`.
pub fn pattern(seed: u64, o: u64) -> u8 {
    let x = (o ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8 ^ (o as u8)
}

pub fn fill(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(seed, off + i as u64);
    }
}

/// Index of the first byte of `buf` (at stream offset `off`) that differs from the pattern.
pub fn check(seed: u64, off: u64, buf: &[u8]) -> Option<u64> {
    buf.iter().enumerate().find(|(i, &b)| b != pattern(seed, off + *i as u64)).map(|(i, _)| off + i as u64)
}

/// A daemon (`Server`) running on a thread of the test process; dropping it stops it.
pub struct Daemon {
    pub socket: PathBuf,
    pub addr: SocketAddr,
    stop: netchannel::daemon::Stopper,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fresh directory under the system's temporary directory.
pub fn tmp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "nc-daemon-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Start a daemon listening on `listen`, its socket in a fresh directory.
pub fn daemon(listen: SocketAddr, tweak: &dyn Fn(&mut Config)) -> Daemon {
    let socket = tmp_dir().join("nc.sock");
    let mut cfg = Config { listen, ..Config::default() };
    cfg.daemon.socket = Some(socket.clone());
    tweak(&mut cfg);
    let server = Server::start(cfg).expect("start daemon");
    let stop = server.stopper();
    let thread = std::thread::spawn(move || server.run().unwrap());
    Daemon { socket, addr: listen, stop, thread: Some(thread) }
}

/// One frame read from a raw socket (a test's fake peer host): the raw bytes, header and
/// payload.
pub fn read_raw(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use netchannel::wire::{self, HEADER_LEN};
    use std::io::Read;
    let mut buf = vec![0u8; HEADER_LEN];
    s.read_exact(&mut buf)?;
    let h = wire::Header::decode(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    buf.resize(HEADER_LEN + h.len as usize, 0);
    s.read_exact(&mut buf[HEADER_LEN..])?;
    Ok(buf)
}
