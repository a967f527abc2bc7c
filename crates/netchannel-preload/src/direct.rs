//! The shared-memory data path (`[preload] datapath = "shm"`): the program's descriptor of a
//! vsocket is end A of its readiness proxy (`netchannel::daemon::proxy`), and the hooked data
//! calls — `read`, `readv`, `recv`, `recvfrom`, `recvmsg`, `recvmmsg`, `write`, `writev`,
//! `send`, `sendto`, `sendmsg`, `sendmmsg`, `sendfile`, `shutdown`, `getsockopt`/`setsockopt`, `ioctl`
//! FIONREAD/SIOCOUTQ/FIONBIO — move bytes straight between the program's buffers and the
//! vsocket's shared rings: no kernel TCP socket, no relay thread, no loopback hop. `poll`,
//! `select` and `epoll` are not hooked: the kernel answers them on A, whose readiness the
//! daemon drives.
//!
//! `connect` replaces the program's TCP socket by A with `dup3` (close-on-exec and
//! `O_NONBLOCK` carried over); a non-blocking one to an address already reached returns
//! EINPROGRESS with A's OUT gate plugged until the peer answers. A listening socket stays a kernel TCP listener; a thread takes
//! the vsocket arrivals from the daemon and, for each, connects a loopback socket into the
//! listener's queue (so `accept` and its readiness are the kernel's) and closes it at once;
//! the `accept` hook then swaps the accepted socket for the arrival's A before the program
//! sees it. No data ever crosses that loopback connection.
//!
//! Socket options a TCP socket has and A has not are answered from the vsocket (type,
//! domain, protocol, buffer sizes, `SO_ERROR`, `TCP_INFO`, `TCP_MAXSEG`, `TCP_CONGESTION`) or
//! remembered as set (`TCP_NODELAY`, keepalive, `SO_LINGER`, ...); `SO_RCVTIMEO` and
//! `SO_SNDTIMEO` are set on A itself, where the blocking waits happen.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use libc::{c_int, c_void, size_t, socklen_t, ssize_t};
use netchannel::daemon::proxy::{ProxyListener, ProxyStream, ReadFlags};

use crate::sys::{self, real};

/// One vsocket on the shared-memory data path, shared by its descriptors (dup).
pub struct Direct {
    pub ps: ProxyStream,
    /// `O_NONBLOCK` of A's open file description, kept in step by the fcntl/ioctl hooks.
    pub nonblocking: AtomicBool,
    /// Socket options set by the program that A does not have: (level, name) → value.
    opts: Mutex<HashMap<(c_int, c_int), Vec<u8>>>,
}

impl Direct {
    pub fn new(ps: ProxyStream, nonblocking: bool) -> Direct {
        Direct { ps, nonblocking: AtomicBool::new(nonblocking), opts: Mutex::new(HashMap::new()) }
    }
}

/// Put `a` (end A) in place of the program's descriptor `fd`, with `fd`'s close-on-exec and
/// the given `O_NONBLOCK`.
pub fn swap_in(fd: c_int, a: OwnedFd, cloexec: bool, nonblocking: bool) -> bool {
    let dup3 = real!(dup3: fn(c_int, c_int, c_int) -> c_int);
    // SAFETY: both descriptors are live; dup3 atomically replaces fd.
    let r = unsafe { dup3(a.as_raw_fd(), fd, if cloexec { libc::O_CLOEXEC } else { 0 }) };
    if r < 0 {
        return false;
    }
    drop(a);
    // SAFETY: fcntl on the program's descriptor, now A.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fl = if nonblocking { fl | libc::O_NONBLOCK } else { fl & !libc::O_NONBLOCK };
        libc::fcntl(fd, libc::F_SETFL, fl);
    }
    true
}

/// Whether `fd` has O_NONBLOCK / FD_CLOEXEC now.
pub fn fd_flags(fd: c_int) -> (bool, bool) {
    // SAFETY: fcntl reads flags only.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fdf = libc::fcntl(fd, libc::F_GETFD);
        (fl >= 0 && fl & libc::O_NONBLOCK != 0, fdf >= 0 && fdf & libc::FD_CLOEXEC != 0)
    }
}

/// The vsocket listener behind a program's listening socket. When the daemon restarts, the
/// listener thread registers the port again with the new daemon and says so in one line; the
/// program's kernel listener never noticed anything.
pub struct ListenerSlot {
    current: Mutex<Arc<ProxyListener>>,
    closed: AtomicBool,
    port: u16,
}

impl ListenerSlot {
    pub fn new(l: ProxyListener, port: u16) -> ListenerSlot {
        ListenerSlot { current: Mutex::new(Arc::new(l)), closed: AtomicBool::new(false), port }
    }

    /// The vsocket address it listens on.
    pub fn local(&self) -> SocketAddr {
        self.current().local()
    }

    fn current(&self) -> Arc<ProxyListener> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The program closed its listening socket: stop taking vsockets for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.current().close();
    }

    /// After the daemon went away: wait until one answers again and listen there. False if
    /// the program closed the socket meanwhile.
    fn relisten(&self) -> bool {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            let Ok(c) = netchannel::daemon::Client::from_config(crate::config()) else { continue };
            let Ok(l) = c.bind_proxied(self.port) else { continue };
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(l);
            if self.closed.load(Ordering::SeqCst) {
                self.current().close();
                return false;
            }
            sys::say(&format!(
                "the NetChannel daemon is back: the listening socket on port {} takes vsockets again",
                self.port
            ));
            return true;
        }
    }
}

/// Take the arrivals of `slot` and queue a placeholder connection for each on the program's
/// listening socket at `target`. The arrival itself stays parked in the daemon, keyed by the
/// placeholder's address, until the process that accepts the placeholder — this one or a
/// forked worker sharing the listening socket — claims it ([`claim`]): this process holds
/// nothing per arrival, so nothing of it leaks here when another process accepts.
pub fn serve_listener(slot: Arc<ListenerSlot>, target: SocketAddr) -> bool {
    std::thread::Builder::new()
        .name("nc-listener".into())
        .stack_size(128 << 10)
        .spawn(move || {
            crate::relay::own_thread();
            loop {
                let Ok(sock) =
                    socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)
                else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                if sock.bind(&SocketAddr::new(target.ip(), 0).into()).is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                let Some(from) = sock.local_addr().ok().and_then(|a| a.as_socket()) else { continue };
                let l = slot.current();
                match l.park(from) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) if slot.closed.load(Ordering::SeqCst) => return,
                    Err(_) if l.daemon_gone() => {
                        if !slot.relisten() {
                            return;
                        }
                        continue;
                    }
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                }
                if sock.connect(&target.into()).is_err() {
                    // Nobody can accept it: take it back; dropping its end A closes it.
                    if let Some(c) = crate::client() {
                        drop(c.claim_proxied(from));
                    }
                }
                // The placeholder only carries the arrival into the accept queue.
                drop(sock);
            }
        })
        .is_ok()
}

/// The arrival behind the accepted connection `nfd` (peer `from`), if it is a placeholder:
/// a placeholder connects from the very address it connects to, so a kernel TCP client from
/// elsewhere costs no daemon round trip.
pub fn claim(nfd: c_int, from: SocketAddr) -> Option<(ProxyStream, OwnedFd)> {
    if sys::local_addr(nfd)?.ip() != from.ip() {
        return None;
    }
    crate::client()?.claim_proxied(from).ok()
}

/// One line: the program read its vsocket `fd` with a call the shim cannot see.
fn say_bypassed(fd: c_int) {
    let program = std::fs::read_to_string("/proc/self/comm")
        .map_or("this program".to_string(), |s| s.trim().to_string());
    sys::say(&format!(
        "{program} (pid {}) read vsocket fd {fd} with a call the preload shim cannot see (an io_uring data \
         operation or a raw system call): the vsocket is reset; run it with [preload] datapath = \"relay\"",
        crate::pid()
    ));
}

fn fail(code: c_int) -> ssize_t {
    sys::set_errno(code);
    -1
}

fn io_fail(e: std::io::Error) -> ssize_t {
    fail(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Read into the iovecs.
///
/// # Safety
/// `iov` points at `n` valid iovecs of writable memory.
pub unsafe fn read_iov(d: &Direct, fd: c_int, iov: *const libc::iovec, n: usize, flags: c_int) -> ssize_t {
    let mut f = ReadFlags {
        peek: flags & libc::MSG_PEEK != 0,
        wait_all: flags & libc::MSG_WAITALL != 0,
        nonblocking: flags & libc::MSG_DONTWAIT != 0 || d.nonblocking.load(Ordering::Relaxed),
    };
    let iovs = if n == 0 || iov.is_null() { &[][..] } else { std::slice::from_raw_parts(iov, n) };
    let mut total = 0usize;
    for v in iovs {
        if v.iov_len == 0 {
            continue;
        }
        let buf = std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len);
        if total > 0 {
            f.nonblocking = true;
            if f.peek {
                break;
            }
        }
        let r = d.ps.read(fd, buf, f);
        if d.ps.bypass_found() {
            say_bypassed(fd);
        }
        match r {
            Ok(got) => {
                total += got;
                if got < buf.len() {
                    break;
                }
            }
            Err(_) if total > 0 => break,
            Err(e) => return io_fail(e),
        }
    }
    total as ssize_t
}

/// Write the iovecs.
///
/// # Safety
/// `iov` points at `n` valid iovecs of readable memory.
pub unsafe fn write_iov(d: &Direct, fd: c_int, iov: *const libc::iovec, n: usize, flags: c_int) -> ssize_t {
    let nonblocking = flags & libc::MSG_DONTWAIT != 0 || d.nonblocking.load(Ordering::Relaxed);
    let iovs = if n == 0 || iov.is_null() { &[][..] } else { std::slice::from_raw_parts(iov, n) };
    let mut total = 0usize;
    for v in iovs {
        if v.iov_len == 0 {
            continue;
        }
        let buf = std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len);
        match d.ps.write(fd, buf, nonblocking || total > 0) {
            Ok(w) => {
                total += w;
                if w < buf.len() {
                    break;
                }
            }
            Err(_) if total > 0 => break,
            Err(e) => {
                let code = e.raw_os_error().unwrap_or(libc::EIO);
                if code == libc::EPIPE && flags & libc::MSG_NOSIGNAL == 0 {
                    libc::raise(libc::SIGPIPE);
                }
                return fail(code);
            }
        }
    }
    total as ssize_t
}

/// `sendfile` from `in_fd` into the vsocket: the file's bytes go straight into the send ring
/// through a bounce buffer.
///
/// # Safety
/// `offset` is null or points at a writable off_t.
pub unsafe fn sendfile(
    d: &Direct,
    fd: c_int,
    in_fd: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    let mut buf = vec![0u8; count.min(256 << 10)];
    let got = if offset.is_null() {
        libc::read(in_fd, buf.as_mut_ptr().cast(), buf.len())
    } else {
        libc::pread(in_fd, buf.as_mut_ptr().cast(), buf.len(), *offset)
    };
    if got <= 0 {
        return got;
    }
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: got as usize };
    let sent = write_iov(d, fd, &iov, 1, 0);
    let back = if sent < 0 { got } else { got - sent };
    if offset.is_null() {
        if back > 0 {
            libc::lseek(in_fd, -(back as libc::off_t), libc::SEEK_CUR);
        }
    } else if sent > 0 {
        *offset += sent as libc::off_t;
    }
    sent
}

/// `shutdown` on a vsocket.
pub fn shutdown(d: &Direct, how: c_int) -> c_int {
    let how = match how {
        libc::SHUT_RD => Shutdown::Read,
        libc::SHUT_WR => Shutdown::Write,
        libc::SHUT_RDWR => Shutdown::Both,
        _ => return fail(libc::EINVAL) as c_int,
    };
    match d.ps.shutdown(how) {
        Ok(()) => 0,
        Err(e) => io_fail(e) as c_int,
    }
}

/// Store an int answer as getsockopt does.
///
/// # Safety
/// `val`/`len` as getsockopt's.
unsafe fn put_bytes(bytes: &[u8], val: *mut c_void, len: *mut socklen_t) -> c_int {
    if val.is_null() || len.is_null() {
        return fail(libc::EFAULT) as c_int;
    }
    let n = (*len as usize).min(bytes.len());
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), val.cast::<u8>(), n);
    *len = n as socklen_t;
    0
}

unsafe fn put_int(v: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int {
    put_bytes(&v.to_ne_bytes(), val, len)
}

/// `getsockopt` on a vsocket: what a TCP socket would answer.
///
/// # Safety
/// getsockopt's contract.
pub unsafe fn getsockopt(
    d: &Direct,
    fd: c_int,
    v6: bool,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let (snd, rcv) = d.ps.buffer_sizes();
    let remembered = d.opts.lock().unwrap().get(&(level, name)).cloned();
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_TYPE) => put_int(libc::SOCK_STREAM, val, len),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => {
            put_int(if v6 { libc::AF_INET6 } else { libc::AF_INET }, val, len)
        }
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => put_int(libc::IPPROTO_TCP, val, len),
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => put_int(0, val, len),
        (libc::SOL_SOCKET, libc::SO_ERROR) => put_int(d.ps.error_code().unwrap_or(0), val, len),
        (libc::SOL_SOCKET, libc::SO_RCVTIMEO) | (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => {
            let f = real!(getsockopt: fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int);
            f(fd, level, name, val, len)
        }
        (libc::SOL_SOCKET, libc::SO_SNDBUF) | (libc::SOL_SOCKET, libc::SO_RCVBUF) => match remembered {
            // Linux doubles what was asked for.
            Some(b) if b.len() >= 4 => {
                put_int(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]).saturating_mul(2), val, len)
            }
            _ => put_int(
                if name == libc::SO_SNDBUF { snd } else { rcv }.min(i32::MAX as usize) as c_int,
                val,
                len,
            ),
        },
        (libc::IPPROTO_TCP, libc::TCP_INFO) => {
            // SAFETY: tcp_info is plain data; all-zero is valid.
            let mut ti: libc::tcp_info = std::mem::zeroed();
            ti.tcpi_state = 1; // TCP_ESTABLISHED
            ti.tcpi_snd_mss = 1448;
            ti.tcpi_rcv_mss = 1448;
            ti.tcpi_snd_cwnd = 10;
            let bytes = std::slice::from_raw_parts(
                (&ti as *const libc::tcp_info).cast::<u8>(),
                std::mem::size_of::<libc::tcp_info>(),
            );
            put_bytes(bytes, val, len)
        }
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => put_int(1448, val, len),
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => match remembered {
            Some(b) => put_bytes(&b, val, len),
            None => put_bytes(b"cubic\0", val, len),
        },
        (libc::SOL_SOCKET, _) | (libc::IPPROTO_TCP, _) | (libc::IPPROTO_IP, _) | (libc::IPPROTO_IPV6, _) => {
            match remembered {
                Some(b) => put_bytes(&b, val, len),
                None if name == libc::SO_LINGER && level == libc::SOL_SOCKET => {
                    put_bytes(&[0u8; std::mem::size_of::<libc::linger>()], val, len)
                }
                None => put_int(0, val, len),
            }
        }
        _ => fail(libc::ENOPROTOOPT) as c_int,
    }
}

/// `setsockopt` on a vsocket: timeouts go to A, the rest is remembered.
///
/// # Safety
/// setsockopt's contract.
pub unsafe fn setsockopt(
    d: &Direct,
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    if level == libc::SOL_SOCKET && (name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO) {
        let f = real!(setsockopt: fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int);
        return f(fd, level, name, val, len);
    }
    if val.is_null() && len > 0 {
        return fail(libc::EFAULT) as c_int;
    }
    let bytes = if len == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(val.cast::<u8>(), len as usize).to_vec()
    };
    d.opts.lock().unwrap().insert((level, name), bytes);
    0
}

/// `ioctl` requests answered for a vsocket; `None`: pass to the kernel.
///
/// # Safety
/// `arg` is the request's pointer argument.
pub unsafe fn ioctl(d: &Direct, req: libc::c_ulong, arg: *mut c_void) -> Option<c_int> {
    let put = |v: usize| -> c_int {
        if arg.is_null() {
            return fail(libc::EFAULT) as c_int;
        }
        *arg.cast::<c_int>() = v.min(i32::MAX as usize) as c_int;
        0
    };
    match req {
        libc::FIONREAD => Some(put(d.ps.readable())),
        libc::TIOCOUTQ => Some(put(d.ps.unsent())),
        libc::FIONBIO => {
            if !arg.is_null() {
                d.nonblocking.store(*arg.cast::<c_int>() != 0, Ordering::Relaxed);
            }
            None
        }
        _ => None,
    }
}
