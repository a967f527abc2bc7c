//! The relays: what joins an app's kernel TCP socket to its vsocket.
//!
//! Every vsocket the shim makes is handed to the program as a real, connected kernel TCP
//! socket over loopback, so every call on it — read/write/send/recv and their vector forms,
//! MSG_PEEK/MSG_DONTWAIT, FIONREAD, poll/select/epoll in both trigger modes, dup, fork,
//! exec, sendfile — is the kernel's own, with the kernel's exact readiness. The other end of
//! that loopback connection belongs to the shim: two relay threads per vsocket copy bytes
//! between it and the vsocket's shared rings (`VStream`, served by the daemon):
//!
//! * app → peer: a read of the loopback end, then a write into the vsocket; the app's FIN
//!   (shutdown or close) becomes the vsocket's `shutdown(Write)`.
//! * peer → app: a vsocket read, then a write into the loopback end; the vsocket's end of
//!   stream becomes a FIN, and a vsocket error becomes a TCP reset (SO_LINGER 0), so the app
//!   sees ECONNRESET, EPOLLERR and EPOLLHUP as with kernel TCP.
//!
//! For `connect`, the app's own socket connects to the process's relay listener
//! (127.0.0.1, an ephemeral port), whose accepting thread pairs each arrival with the
//! vsocket registered under the app socket's port. For a listening socket, a thread takes the
//! listener's vsockets from the daemon and connects a loopback socket to the app's listening
//! socket for each, so the app's `accept` (and its readiness) finds it in the kernel's queue
//! beside ordinary TCP clients.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use netchannel::{VListener, VStream};

/// Bytes one relay thread moves per call.
const RELAY_BUF: usize = 256 << 10;
/// How long the relay listener waits for the vsocket of an arrival it does not know yet.
const PAIR_WAIT: Duration = Duration::from_secs(2);

/// Mark the calling thread as the shim's own: its socket calls pass the hooks untouched.
pub fn own_thread() {
    crate::BUSY.with(|b| b.set(true));
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 << 10)
        .spawn(move || {
            own_thread();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        })
        .is_ok()
}

/// Abort the loopback connection: its close sends a reset, and a relay thread blocked
/// reading it wakes up.
fn abort(tcp: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a live linger struct of the stated size on our own socket.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = tcp.shutdown(Shutdown::Read);
}

/// Join `tcp` (the shim's end of an app socket) and `vs` with two relay threads.
pub fn start(vs: Arc<VStream>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let tcp = Arc::new(tcp);
    let (vs2, tcp2) = (vs.clone(), tcp.clone());
    let ok = spawn("nc-relay-rx", move || {
        let mut buf = vec![0u8; RELAY_BUF];
        loop {
            match (&*vs2).read(&mut buf) {
                Ok(0) => {
                    let _ = tcp2.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    if (&*tcp2).write_all(&buf[..n]).is_err() {
                        // The app is gone: its end reset; the other thread sees it too.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    abort(&tcp2);
                    break;
                }
            }
        }
    });
    if !ok {
        abort(&tcp);
        return;
    }
    spawn("nc-relay-tx", move || {
        let mut buf = vec![0u8; RELAY_BUF];
        loop {
            match (&*tcp).read(&mut buf) {
                Ok(0) => {
                    let _ = vs.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    if (&*vs).write_all(&buf[..n]).is_err() {
                        abort(&tcp);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The app reset its socket: stop the other direction too.
                    let _ = vs.shutdown(Shutdown::Read);
                    break;
                }
            }
        }
    });
}

/// The process's relay listener: app sockets connected to a vsocket connect here.
pub struct RelayListener {
    pub addr: SocketAddr,
    pending: Mutex<HashMap<u16, Arc<VStream>>>,
    cv: Condvar,
}

impl RelayListener {
    pub fn start() -> std::io::Result<Arc<RelayListener>> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let r = Arc::new(RelayListener {
            addr: l.local_addr()?,
            pending: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
        });
        let me = r.clone();
        if !spawn("nc-relay-accept", move || me.serve(l)) {
            return Err(std::io::Error::other("cannot start the relay listener thread"));
        }
        Ok(r)
    }

    /// The app socket bound to local `port` is connecting here for `vs`.
    pub fn register(&self, port: u16, vs: Arc<VStream>) {
        self.pending.lock().unwrap().insert(port, vs);
        self.cv.notify_all();
    }

    fn serve(&self, l: TcpListener) {
        loop {
            let (tcp, from) = match l.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let mut p = self.pending.lock().unwrap();
            let mut vs = p.remove(&from.port());
            if vs.is_none() {
                p = self.cv.wait_timeout_while(p, PAIR_WAIT, |p| !p.contains_key(&from.port())).unwrap().0;
                vs = p.remove(&from.port());
            }
            drop(p);
            match vs {
                Some(vs) => start(vs, tcp),
                None => abort(&tcp),
            }
        }
    }
}

/// A vsocket arrival handed to the app's listening socket, keyed by the loopback address it
/// connects from.
pub struct Arrival {
    pub vs: Arc<VStream>,
    pub remote: SocketAddr,
}

/// Vsockets connected into app listening sockets, not yet accepted.
pub type Arrivals = Arc<Mutex<HashMap<SocketAddr, Arrival>>>;

/// Where to reach an app's listening socket bound to `bound`.
pub fn listener_target(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

/// Take the vsockets of `vl` and connect each into the app's listening socket at `target`.
pub fn serve_listener(vl: Arc<VListener>, target: SocketAddr, arrivals: Arrivals) -> bool {
    spawn("nc-listener", move || loop {
        let (vs, remote) = match vl.accept() {
            Ok(a) => a,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // Closed by the app, or the daemon went away: the kernel listener goes on alone.
            Err(_) => return,
        };
        let vs = Arc::new(vs);
        let Ok(sock) =
            socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)
        else {
            continue;
        };
        if sock.bind(&SocketAddr::new(target.ip(), 0).into()).is_err() {
            continue;
        }
        let Some(from) = sock.local_addr().ok().and_then(|a| a.as_socket()) else { continue };
        arrivals.lock().unwrap().insert(from, Arrival { vs: vs.clone(), remote });
        if sock.connect(&target.into()).is_err() {
            arrivals.lock().unwrap().remove(&from);
            continue;
        }
        start(vs, sock.into());
    })
}
