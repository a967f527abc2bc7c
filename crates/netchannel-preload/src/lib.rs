//! The preload shim (`netchannel run -- PROGRAM`): an unmodified, dynamically linked
//! program's TCP sockets become NetChannel vsockets served by the host's daemon.
//!
//! Deployment layer, app side. The shim interposes only where a socket is born as a
//! connection — `connect`, `listen`, `accept`/`accept4` — and where an address is asked for
//! or an fd goes away (`getsockname`, `getpeername`, `setsockopt` for `SO_PRIORITY`, `close`,
//! `dup`/`dup2`/`dup3`/`fcntl(F_DUPFD)`). Everything else is left to the kernel, because the
//! descriptor the program holds stays a real kernel TCP socket: a loopback connection whose
//! other end the shim relays to the vsocket (see [`relay`]). That is the design's crux:
//! readiness for poll/select/epoll (level and edge triggered, EPOLLIN/OUT/RDHUP/HUP/ERR),
//! non-blocking connect (EINPROGRESS, then SO_ERROR), MSG_PEEK, FIONREAD, SOCK_NONBLOCK,
//! SOCK_CLOEXEC, fork, exec and sendfile are the kernel's own, exactly, at the cost of one
//! loopback hop and two relay threads per vsocket.
//!
//! * `connect(fd, A)` to a selected destination: the daemon opens a vsocket to A first; if it
//!   cannot (no NetChannel host at A, A is this host itself, no daemon) the real connect to A
//!   runs and the socket stays kernel TCP. Otherwise `fd` connects to the process's relay
//!   listener and is paired with the vsocket; `getpeername` says A.
//! * `listen(fd)` on a selected port: the kernel listener stays (kernel TCP clients still
//!   reach it), and the daemon listens on the same vsocket port; each vsocket that arrives is
//!   connected into `fd`'s accept queue over loopback, so `accept` returns it with the
//!   vsocket peer's address.
//! * fork: the child inherits the descriptors, and the relay threads of the parent keep
//!   serving them while the parent lives. The child's own new vsockets use a connection to
//!   the daemon of its own (the inherited one is abandoned, never shut down, in the child).
//!
//! Hooks never panic across the FFI boundary (each body runs under `catch_unwind`, falling
//! back to the real call), never log through a hooked call (stderr lines are single
//! `write(2)`s), and the shim's own threads pass the hooks untouched.

mod direct;
mod relay;
mod sys;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libc::{c_int, c_ulong, sockaddr, socklen_t};
use netchannel::daemon::proxy::{batch_doorbells, flush_doorbells};
use netchannel::daemon::Client;
use netchannel::{Class, Config, PreloadDatapath, VListener, VStream};

use direct::Direct;

use relay::{Arrivals, RelayListener};
use sys::{real, ForkLock};

thread_local! {
    /// Set on the shim's own threads and while a hook runs: socket calls pass untouched.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// How long "no NetChannel host at this IP" is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// How long after a failed attempt the daemon is tried again.
const DAEMON_RETRY: Duration = Duration::from_secs(5);
/// Descriptors below this can be vsockets in the table.
const MAX_FD: usize = 1 << 16;

/// Which descriptors have an entry in the table: checked without a lock by every hook.
static MARK: [AtomicBool; MAX_FD] = [const { AtomicBool::new(false) }; MAX_FD];
/// TCP sockets made by `socket()` and not yet connected or listening: the descriptors whose
/// epoll registrations the shim records, since connect may swap them (see [`EpollRecord`]).
static PENDING: [AtomicBool; MAX_FD] = [const { AtomicBool::new(false) }; MAX_FD];
/// How many epoll registrations are recorded (so `close` of other fds skips the lock).
static RECORDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// This process's id, refreshed in the child after fork.
static PID: AtomicI32 = AtomicI32::new(0);

#[derive(Clone)]
enum Kind {
    Stream(Arc<VStream>),
    Listener(Arc<VListener>),
    /// The shared-memory data path: the fd is the vsocket's readiness proxy.
    Direct(Arc<Direct>),
    ProxyListener(Arc<direct::ListenerSlot>),
}

#[derive(Clone)]
struct Entry {
    /// The process that opened it: only it may talk to the daemon about it.
    pid: i32,
    kind: Kind,
    v6: bool,
    local: SocketAddr,
    remote: SocketAddr,
}

/// An epoll registration of a not-yet-connected TCP socket. `connect` onto the shared-memory
/// data path replaces the socket with the readiness proxy by `dup3`, which silently drops
/// the old file's registrations; they are added again on the new one (nginx registers a
/// socket before it connects it).
#[derive(Clone, Copy)]
struct EpollRecord {
    fd: c_int,
    epfd: c_int,
    events: u32,
    data: u64,
}

#[derive(Default)]
struct Shim {
    epoll: Vec<EpollRecord>,
    table: Option<HashMap<c_int, Entry>>,
    client: Option<Client>,
    retry_at: Option<Instant>,
    warned: bool,
    negative: Option<HashMap<IpAddr, Instant>>,
    relay: Option<Arc<RelayListener>>,
    arrivals: Option<Arrivals>,
    /// Vsocket addresses a confirmed connect reached: a non-blocking connect to one of them
    /// answers EINPROGRESS at once (the first one to an address waits for the answer, so
    /// that a port without a vsocket listener can still fall back to kernel TCP).
    listening: Option<HashSet<SocketAddr>>,
}

static SHIM: ForkLock<Shim> = ForkLock::new(Shim {
    epoll: Vec::new(),
    table: None,
    client: None,
    retry_at: None,
    warned: false,
    negative: None,
    relay: None,
    arrivals: None,
    listening: None,
});

fn shm_datapath() -> bool {
    config().preload.datapath == PreloadDatapath::Shm
}

/// The direct (shared-memory) vsocket behind `fd`, and whether it is IPv6.
fn direct_of(fd: c_int) -> Option<(Arc<Direct>, bool)> {
    if !marked(fd) {
        return None;
    }
    match SHIM.lock().table.as_ref()?.get(&fd) {
        Some(Entry { kind: Kind::Direct(d), v6, .. }) => Some((d.clone(), *v6)),
        _ => None,
    }
}

pub(crate) fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| match std::env::var_os("NETCHANNEL_CONFIG") {
        Some(p) => Config::load(std::path::Path::new(&p)).unwrap_or_else(|e| {
            sys::say(&format!("{e}; using the default configuration"));
            Config::default()
        }),
        None => Config::default(),
    })
}

fn pid() -> i32 {
    PID.load(Ordering::Relaxed)
}

extern "C" fn fork_prepare() {
    end_pass();
    SHIM.acquire();
}

extern "C" fn fork_parent() {
    // SAFETY: taken in fork_prepare by this thread.
    unsafe { SHIM.release() };
}

extern "C" fn fork_child() {
    // SAFETY: getpid has no preconditions.
    PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    // SAFETY: taken in fork_prepare; the child has one thread.
    let s = unsafe { SHIM.get() };
    // The parent's daemon connections and relay threads are the parent's: never use, drop or
    // shut them down here (a shutdown would cut the parent's); the child makes its own.
    std::mem::forget(s.client.take());
    std::mem::forget(s.relay.take());
    std::mem::forget(s.arrivals.take());
    s.retry_at = None;
    // SAFETY: as above.
    unsafe { SHIM.release() };
}

extern "C" fn init() {
    // SAFETY: getpid and pthread_atfork take no memory we do not own.
    unsafe {
        PID.store(libc::getpid(), Ordering::Relaxed);
        libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child));
        // exit() runs no thread-local destructors: what the exiting thread owes rings here.
        libc::atexit(at_exit);
    }
}

extern "C" fn at_exit() {
    end_pass();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

/// Run a hook body with the shim marked busy; a panic falls back to `fallback`.
fn shield<R>(fallback: impl FnOnce() -> R, body: impl FnOnce() -> R) -> R {
    let was = BUSY.try_with(|b| b.replace(true)).unwrap_or(true);
    let r = catch_unwind(AssertUnwindSafe(body));
    let _ = BUSY.try_with(|b| b.set(was));
    match r {
        Ok(r) => r,
        Err(_) => fallback(),
    }
}

fn busy() -> bool {
    BUSY.try_with(|b| b.get()).unwrap_or(true)
}

fn marked(fd: c_int) -> bool {
    fd >= 0 && (fd as usize) < MAX_FD && MARK[fd as usize].load(Ordering::Acquire)
}

fn entry(fd: c_int) -> Option<Entry> {
    if !marked(fd) {
        return None;
    }
    SHIM.lock().table.as_ref()?.get(&fd).cloned()
}

fn insert(fd: c_int, e: Entry) {
    if fd < 0 || fd as usize >= MAX_FD {
        return;
    }
    SHIM.lock().table.get_or_insert_with(HashMap::new).insert(fd, e);
    MARK[fd as usize].store(true, Ordering::Release);
}

/// Forget `fd`'s entry; a listener this process opened stops taking vsockets.
fn remove(fd: c_int) {
    if !marked(fd) {
        return;
    }
    MARK[fd as usize].store(false, Ordering::Release);
    let e = SHIM.lock().table.as_mut().and_then(|t| t.remove(&fd));
    let Some(e) = e else { return };
    if e.pid != pid() {
        // Inherited across fork: the parent still owns it.
        std::mem::forget(e);
        return;
    }
    if let Kind::Listener(l) = &e.kind {
        let still_open =
            SHIM.lock().table.as_ref().is_some_and(|t| {
                t.values().any(|o| matches!(&o.kind, Kind::Listener(x) if Arc::ptr_eq(x, l)))
            });
        if !still_open {
            l.close();
        }
    }
    if let Kind::ProxyListener(l) = &e.kind {
        let still_open = SHIM.lock().table.as_ref().is_some_and(|t| {
            t.values().any(|o| matches!(&o.kind, Kind::ProxyListener(x) if Arc::ptr_eq(x, l)))
        });
        if !still_open {
            l.close();
        }
    }
}

/// The daemon client of this process, connecting (again) if need be.
pub(crate) fn client() -> Option<Client> {
    {
        let mut s = SHIM.lock();
        if let Some(c) = &s.client {
            if !c.is_dead() {
                return Some(c.clone());
            }
            s.client = None;
        }
        if s.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
    }
    match Client::from_config(config()) {
        Ok(c) => {
            let mut s = SHIM.lock();
            s.client = Some(c.clone());
            s.retry_at = None;
            Some(c)
        }
        Err(e) => {
            let mut s = SHIM.lock();
            s.retry_at = Some(Instant::now() + DAEMON_RETRY);
            if !std::mem::replace(&mut s.warned, true) {
                drop(s);
                sys::say(&format!("{e}; TCP sockets of this program stay on kernel TCP"));
            }
            None
        }
    }
}

/// Whether a connection to `ip` should be offered to the daemon.
fn selected(ip: IpAddr) -> bool {
    let hosts = &config().preload.hosts;
    if !hosts.is_empty() {
        return hosts.contains(&ip);
    }
    let s = SHIM.lock();
    match s.negative.as_ref().and_then(|n| n.get(&ip)) {
        Some(until) => Instant::now() >= *until,
        None => true,
    }
}

fn not_netchannel(ip: IpAddr) {
    SHIM.lock().negative.get_or_insert_with(HashMap::new).insert(ip, Instant::now() + NEGATIVE_TTL);
}

fn relay_listener() -> Option<Arc<RelayListener>> {
    let mut s = SHIM.lock();
    if let Some(r) = &s.relay {
        return Some(r.clone());
    }
    let r = RelayListener::start().ok()?;
    s.relay = Some(r.clone());
    Some(r)
}

fn arrivals() -> Arrivals {
    SHIM.lock().arrivals.get_or_insert_with(Default::default).clone()
}

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

fn real_connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let f: ConnectFn = real!(connect: fn(c_int, *const sockaddr, socklen_t) -> c_int);
    // SAFETY: the caller's arguments, passed on.
    unsafe { f(fd, addr, len) }
}

fn connect_sock(fd: c_int, to: SocketAddr, v6: bool) -> c_int {
    match sys::to_raw(to, v6) {
        Some((st, l)) => real_connect(fd, (&st as *const libc::sockaddr_storage).cast(), l),
        None => {
            sys::set_errno(libc::EAFNOSUPPORT);
            -1
        }
    }
}

/// `connect` onto a vsocket: `None` means "not ours, do the real connect".
fn vconnect(fd: c_int, dst: SocketAddr) -> Option<c_int> {
    if marked(fd) {
        // Connecting again (after EINPROGRESS): the kernel socket answers for itself; a
        // vsocket still connecting EALREADY, a failed connect its error, else EISCONN.
        let e = entry(fd)?;
        if let Kind::Direct(d) = &e.kind {
            let errno = match d.ps.error_code() {
                Some(code) => {
                    if code == libc::ECONNREFUSED {
                        note_listener(e.remote, false);
                    }
                    code
                }
                None if d.ps.connecting() => libc::EALREADY,
                None => libc::EISCONN,
            };
            sys::set_errno(errno);
            return Some(-1);
        }
        let target = SHIM.lock().relay.as_ref().map(|r| r.addr)?;
        return Some(connect_sock(fd, target, e.v6));
    }
    let family = sys::tcp_family(fd)?;
    if !selected(dst.ip()) || dst.ip().is_unspecified() {
        return None;
    }
    let c = client()?;
    let class = if sys::priority(fd) > 0 { Class::Latency } else { Class::Throughput };
    if shm_datapath() {
        return vconnect_direct(&c, fd, dst, class, family == libc::AF_INET6);
    }
    let vs = match c.connect_class(dst, class) {
        Ok(vs) => Arc::new(vs),
        Err(e) => {
            // A NetChannel host without a vsocket listener on that port may still have a
            // kernel TCP one: try the kernel, but keep asking the daemon for that host.
            if !(e.kind() == ErrorKind::ConnectionRefused && e.to_string().contains("no vsocket listener")) {
                not_netchannel(dst.ip());
            }
            return None;
        }
    };
    let relay = relay_listener()?;
    let v6 = family == libc::AF_INET6;
    // Bind first (if the program did not) so the relay listener can tell this socket by its
    // port the moment it arrives.
    let mut local = sys::local_addr(fd)?;
    if local.port() == 0 {
        let any: SocketAddr = if v6 { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
        let (st, l) = sys::to_raw(any, v6)?;
        // SAFETY: a live sockaddr of the stated length.
        if unsafe { libc::bind(fd, (&st as *const libc::sockaddr_storage).cast(), l) } != 0 {
            return None;
        }
        local = sys::local_addr(fd)?;
    }
    relay.register(local.port(), vs.clone());
    let rc = connect_sock(fd, relay.addr, v6);
    let err = sys::errno();
    if rc == 0 || err == libc::EINPROGRESS {
        let vlocal = vs.local_addr().unwrap_or(local);
        insert(fd, Entry { pid: pid(), kind: Kind::Stream(vs), v6, local: vlocal, remote: dst });
    }
    sys::set_errno(err);
    Some(rc)
}

/// Whether a confirmed connect reached a vsocket listener at `dst` before.
fn known_listener(dst: SocketAddr) -> bool {
    SHIM.lock().listening.as_ref().is_some_and(|l| l.contains(&dst))
}

/// Remember (or, after a refusal, forget) that `dst` has a vsocket listener.
fn note_listener(dst: SocketAddr, listening: bool) {
    let mut s = SHIM.lock();
    let set = s.listening.get_or_insert_with(HashSet::new);
    if listening {
        set.insert(dst);
    } else {
        set.remove(&dst);
    }
}

/// The connecting socket becomes the vsocket's readiness proxy (no kernel connection). A
/// non-blocking connect to an address known to have a vsocket listener returns EINPROGRESS
/// without waiting for the peer: the descriptor turns writable when the peer accepts, or
/// reports ERR|HUP with `SO_ERROR` ECONNREFUSED / ETIMEDOUT.
fn vconnect_direct(c: &Client, fd: c_int, dst: SocketAddr, class: Class, v6: bool) -> Option<c_int> {
    let (nonblocking, cloexec) = direct::fd_flags(fd);
    let early = nonblocking && known_listener(dst);
    let (ps, a) = match c.connect_proxied(dst, class, early) {
        Ok(x) => x,
        Err(e) => {
            if !(e.kind() == ErrorKind::ConnectionRefused && e.to_string().contains("no vsocket listener")) {
                not_netchannel(dst.ip());
            }
            return None;
        }
    };
    if !early {
        note_listener(dst, true);
    }
    // Not writable until connected: plugged before the program can see the descriptor.
    let in_progress = early && (ps.connecting() || ps.error_code().is_some());
    if ps.connecting() {
        ps.hold_until_connected(std::os::fd::AsRawFd::as_raw_fd(&a));
    }
    let local = ps.local();
    if !direct::swap_in(fd, a, cloexec, nonblocking) {
        return None;
    }
    readd_epoll(fd);
    let d = Arc::new(Direct::new(ps, nonblocking));
    insert(fd, Entry { pid: pid(), kind: Kind::Direct(d), v6, local, remote: dst });
    if in_progress {
        sys::set_errno(libc::EINPROGRESS);
        return Some(-1);
    }
    sys::set_errno(0);
    Some(0)
}

type EpollCtlFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;

fn real_epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int {
    let f: EpollCtlFn = real!(epoll_ctl: fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int);
    // SAFETY: the caller's arguments, passed on.
    unsafe { f(epfd, op, fd, ev) }
}

fn pending(fd: c_int) -> bool {
    fd >= 0 && (fd as usize) < MAX_FD && PENDING[fd as usize].load(Ordering::Relaxed)
}

/// `fd` is no longer a socket that connect may swap: forget its registrations.
fn settled(fd: c_int) {
    if fd < 0 || fd as usize >= MAX_FD || !PENDING[fd as usize].swap(false, Ordering::Relaxed) {
        return;
    }
    forget_epoll(|r| r.fd == fd);
}

fn forget_epoll(which: impl Fn(&EpollRecord) -> bool) {
    if RECORDED.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut s = SHIM.lock();
    s.epoll.retain(|r| !which(r));
    RECORDED.store(s.epoll.len(), Ordering::Relaxed);
}

/// Add `fd`'s recorded registrations again, now that it names the readiness proxy.
fn readd_epoll(fd: c_int) {
    if !pending(fd) {
        return;
    }
    let mine: Vec<EpollRecord> = SHIM.lock().epoll.iter().filter(|r| r.fd == fd).copied().collect();
    for r in mine {
        let mut ev = libc::epoll_event { events: r.events, u64: r.data };
        if real_epoll_ctl(r.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) != 0 {
            sys::say(&format!(
                "fd {fd}: its epoll registration in epoll fd {} did not survive connect: errno {}",
                r.epfd,
                sys::errno()
            ));
        }
    }
}

/// # Safety
/// The C `socket` contract.
#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    let f = real!(socket: fn(c_int, c_int, c_int) -> c_int);
    let fd = f(domain, ty, protocol);
    let tcp = (domain == libc::AF_INET || domain == libc::AF_INET6)
        && ty & 0xf == libc::SOCK_STREAM
        && (protocol == 0 || protocol == libc::IPPROTO_TCP);
    if fd >= 0 && (fd as usize) < MAX_FD {
        PENDING[fd as usize].store(tcp && !busy(), Ordering::Relaxed);
    }
    fd
}

/// Bookkeeping only: registrations of sockets that `connect` may still swap are recorded
/// (see [`EpollRecord`]); the kernel answers every call.
///
/// # Safety
/// The C `epoll_ctl` contract.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int {
    let rc = real_epoll_ctl(epfd, op, fd, ev);
    if rc == 0 && pending(fd) && !busy() {
        let err = sys::errno();
        let (events, data) = if ev.is_null() { (0, 0) } else { ((*ev).events, (*ev).u64) };
        shield(
            || (),
            || {
                let mut s = SHIM.lock();
                s.epoll.retain(|r| !(r.fd == fd && r.epfd == epfd));
                if op != libc::EPOLL_CTL_DEL {
                    s.epoll.push(EpollRecord { fd, epfd, events, data });
                }
                RECORDED.store(s.epoll.len(), Ordering::Relaxed);
            },
        );
        sys::set_errno(err);
    }
    rc
}

/// # Safety
/// The C `connect` contract.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    end_pass();
    if busy() {
        return real_connect(fd, addr, len);
    }
    let rc = connect_hooked(fd, addr, len);
    let err = sys::errno();
    settled(fd);
    sys::set_errno(err);
    rc
}

unsafe fn connect_hooked(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(dst) = sys::read_addr(addr, len) else { return real_connect(fd, addr, len) };
    let r = shield(|| None, || vconnect(fd, dst));
    match r {
        Some(rc) => rc,
        None => real_connect(fd, addr, len),
    }
}

fn vlisten(fd: c_int) {
    if marked(fd) {
        return;
    }
    let Some(family) = sys::tcp_family(fd) else { return };
    let Some(bound) = sys::local_addr(fd) else { return };
    let ports = &config().preload.ports;
    if !ports.is_empty() && !ports.contains(&bound.port()) {
        return;
    }
    let Some(c) = client() else { return };
    if shm_datapath() {
        vlisten_direct(&c, fd, family, bound);
        return;
    }
    // A listener the program just closed on this port may take the daemon a moment to let go.
    let mut tries = 0;
    let vl = loop {
        match c.bind(bound.port()) {
            Err(e) if e.kind() == ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            r => break r,
        }
    };
    let vl = match vl {
        Ok(l) => Arc::new(l),
        Err(e) => {
            sys::say(&format!("port {} stays kernel TCP only: {e}", bound.port()));
            return;
        }
    };
    let local = vl.local_addr().unwrap_or(bound);
    if relay::serve_listener(vl.clone(), relay::listener_target(bound), arrivals()) {
        insert(
            fd,
            Entry {
                pid: pid(),
                kind: Kind::Listener(vl),
                v6: family == libc::AF_INET6,
                local,
                remote: local,
            },
        );
    }
}

fn vlisten_direct(c: &Client, fd: c_int, family: c_int, bound: SocketAddr) {
    let mut tries = 0;
    let l = loop {
        match c.bind_proxied(bound.port()) {
            Err(e) if e.kind() == ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            r => break r,
        }
    };
    let l = match l {
        Ok(l) => Arc::new(direct::ListenerSlot::new(l, bound.port())),
        Err(e) => {
            sys::say(&format!("port {} stays kernel TCP only: {e}", bound.port()));
            return;
        }
    };
    let local = l.local();
    if direct::serve_listener(l.clone(), relay::listener_target(bound)) {
        insert(
            fd,
            Entry {
                pid: pid(),
                kind: Kind::ProxyListener(l),
                v6: family == libc::AF_INET6,
                local,
                remote: local,
            },
        );
    }
}

/// # Safety
/// The C `listen` contract.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let f = real!(listen: fn(c_int, c_int) -> c_int);
    let rc = f(fd, backlog);
    if rc == 0 {
        settled(fd);
    }
    if rc == 0 && !busy() {
        let err = sys::errno();
        shield(|| (), || vlisten(fd));
        sys::set_errno(err);
    }
    rc
}

/// After the kernel's accept of `nfd` on `fd`: a vsocket arrival gets its table entry and
/// the vsocket peer's address.
fn vaccept(fd: c_int, nfd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) {
    let Some(l) = entry(fd) else { return };
    let Some(from) = sys::peer_addr(nfd) else { return };
    if matches!(l.kind, Kind::ProxyListener(_)) {
        // The arrival is parked in the daemon: claim it, whichever process this is.
        let Some((ps, a)) = direct::claim(nfd, from) else { return };
        let nonblocking = flags & libc::SOCK_NONBLOCK != 0;
        if !direct::swap_in(nfd, a, flags & libc::SOCK_CLOEXEC != 0, nonblocking) {
            return;
        }
        let (local, remote) = (ps.local(), ps.remote());
        // SAFETY: the caller's addr/len, as accept(2) fills them.
        unsafe { sys::write_addr(remote, l.v6, addr, len) };
        let d = Arc::new(Direct::new(ps, nonblocking));
        insert(nfd, Entry { pid: pid(), kind: Kind::Direct(d), v6: l.v6, local, remote });
        return;
    }
    let Some(arr) = SHIM.lock().arrivals.clone() else { return };
    let Some(a) = arr.lock().unwrap().remove(&from) else { return };
    let local = a.vs.local_addr().unwrap_or(l.local);
    // SAFETY: the caller's addr/len, as accept(2) fills them.
    unsafe { sys::write_addr(a.remote, l.v6, addr, len) };
    insert(nfd, Entry { pid: pid(), kind: Kind::Stream(a.vs), v6: l.v6, local, remote: a.remote });
}

/// # Safety
/// The C `accept4` contract.
#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    end_pass();
    let f = real!(accept4: fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int);
    let nfd = f(fd, addr, len, flags);
    if nfd >= 0 && marked(fd) && !busy() {
        shield(|| (), || vaccept(fd, nfd, addr, len, flags));
    }
    nfd
}

/// # Safety
/// The C `accept` contract.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    end_pass();
    let f = real!(accept: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
    let nfd = f(fd, addr, len);
    if nfd >= 0 && marked(fd) && !busy() {
        shield(|| (), || vaccept(fd, nfd, addr, len, 0));
    }
    nfd
}

/// # Safety
/// The C `getpeername` contract.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(Entry { kind: Kind::Stream(_) | Kind::Direct(_), remote, v6, .. }) =
        shield(|| None, || entry(fd))
    {
        sys::write_addr(remote, v6, addr, len);
        return 0;
    }
    let f = real!(getpeername: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
    f(fd, addr, len)
}

/// # Safety
/// The C `getsockname` contract.
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(Entry { kind: Kind::Stream(_) | Kind::Direct(_), local, v6, .. }) =
        shield(|| None, || entry(fd))
    {
        sys::write_addr(local, v6, addr, len);
        return 0;
    }
    let f = real!(getsockname: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
    f(fd, addr, len)
}

/// # Safety
/// The C `setsockopt` contract.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const libc::c_void,
    len: socklen_t,
) -> c_int {
    if !busy() {
        if let Some((d, _)) = shield(|| None, || direct_of(fd)) {
            let prio = (level == libc::SOL_SOCKET
                && name == libc::SO_PRIORITY
                && !val.is_null()
                && len as usize >= std::mem::size_of::<c_int>())
            .then(|| std::ptr::read_unaligned(val.cast::<c_int>()));
            if let Some(p) = prio {
                let owner = entry(fd).is_some_and(|e| e.pid == pid());
                if owner {
                    shield(
                        || (),
                        || {
                            let _ = d.ps.set_class(if p > 0 { Class::Latency } else { Class::Throughput });
                        },
                    );
                }
            }
            return shield(|| -1, || direct::setsockopt(&d, fd, level, name, val, len));
        }
    }
    let f = real!(setsockopt: fn(c_int, c_int, c_int, *const libc::c_void, socklen_t) -> c_int);
    let rc = f(fd, level, name, val, len);
    if rc == 0
        && level == libc::SOL_SOCKET
        && name == libc::SO_PRIORITY
        && marked(fd)
        && !val.is_null()
        && len as usize >= std::mem::size_of::<c_int>()
    {
        let prio = std::ptr::read_unaligned(val.cast::<c_int>());
        let err = sys::errno();
        shield(
            || (),
            || {
                if let Some(Entry { kind: Kind::Stream(vs), pid: p, .. }) = entry(fd) {
                    if p == pid() {
                        vs.set_class(if prio > 0 { Class::Latency } else { Class::Throughput });
                    }
                }
            },
        );
        sys::set_errno(err);
    }
    rc
}

/// # Safety
/// The C `close` contract.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    end_pass();
    if RECORDED.load(Ordering::Relaxed) != 0 {
        let err = sys::errno();
        // A closed socket's registrations are gone, and so are those in a closed epoll fd.
        shield(
            || (),
            || {
                if fd >= 0 && (fd as usize) < MAX_FD {
                    PENDING[fd as usize].store(false, Ordering::Relaxed);
                }
                forget_epoll(|r| r.fd == fd || r.epfd == fd);
            },
        );
        sys::set_errno(err);
    } else if pending(fd) {
        PENDING[fd as usize].store(false, Ordering::Relaxed);
    }
    if marked(fd) {
        let err = sys::errno();
        shield(|| (), || remove(fd));
        sys::set_errno(err);
    }
    let f = real!(close: fn(c_int) -> c_int);
    f(fd)
}

/// `newfd` now names what `oldfd` names.
fn copied(oldfd: c_int, newfd: c_int) {
    if newfd < 0 || newfd == oldfd {
        return;
    }
    let err = sys::errno();
    shield(
        || (),
        || {
            remove(newfd);
            if let Some(e) = entry(oldfd) {
                insert(newfd, e);
            }
        },
    );
    sys::set_errno(err);
}

/// # Safety
/// The C `dup` contract.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let f = real!(dup: fn(c_int) -> c_int);
    let n = f(fd);
    if marked(fd) {
        copied(fd, n);
    }
    n
}

/// # Safety
/// The C `dup2` contract.
#[no_mangle]
pub unsafe extern "C" fn dup2(fd: c_int, newfd: c_int) -> c_int {
    let f = real!(dup2: fn(c_int, c_int) -> c_int);
    let n = f(fd, newfd);
    if n >= 0 && n != fd {
        let err = sys::errno();
        settled(n);
        sys::set_errno(err);
    }
    if n >= 0 && (marked(fd) || marked(newfd)) {
        copied(fd, n);
    }
    n
}

/// # Safety
/// The C `dup3` contract.
#[no_mangle]
pub unsafe extern "C" fn dup3(fd: c_int, newfd: c_int, flags: c_int) -> c_int {
    let f = real!(dup3: fn(c_int, c_int, c_int) -> c_int);
    let n = f(fd, newfd, flags);
    if n >= 0 && n != fd {
        let err = sys::errno();
        settled(n);
        sys::set_errno(err);
    }
    if n >= 0 && (marked(fd) || marked(newfd)) {
        copied(fd, n);
    }
    n
}

fn after_fcntl(fd: c_int, cmd: c_int, rc: c_int) {
    if rc >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) && marked(fd) {
        copied(fd, rc);
    }
    if rc >= 0 && cmd == libc::F_SETFL && marked(fd) && !busy() {
        let err = sys::errno();
        shield(
            || (),
            || {
                if let Some((d, _)) = direct_of(fd) {
                    d.nonblocking.store(direct::fd_flags(fd).0, Ordering::Relaxed);
                }
            },
        );
        sys::set_errno(err);
    }
}

/// `fcntl` is variadic in C; its one optional argument is an int or a pointer, passed in
/// the same register as a fixed third argument on the Linux ABIs this builds for.
///
/// # Safety
/// The C `fcntl` contract.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let f = real!(fcntl: fn(c_int, c_int, c_ulong) -> c_int);
    let rc = f(fd, cmd, arg);
    after_fcntl(fd, cmd, rc);
    rc
}

/// # Safety
/// The C `fcntl64` contract (see [`fcntl`]).
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let f = real!(fcntl64: fn(c_int, c_int, c_ulong) -> c_int);
    let rc = f(fd, cmd, arg);
    after_fcntl(fd, cmd, rc);
    rc
}

// ---- The data calls of the shared-memory data path (see `direct`). Each passes straight to
// libc unless `fd` is a direct vsocket of this shim.

fn direct_call(fd: c_int) -> Option<(Arc<Direct>, bool)> {
    if busy() || !marked(fd) {
        return None;
    }
    shield(|| None, || direct_of(fd))
}

/// # Safety
/// The C `read` contract.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut libc::c_void, n: libc::size_t) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf, iov_len: n };
        return shield(|| -1, || direct::read_iov(&d, fd, &iov, 1, 0));
    }
    end_pass();
    let f = real!(read: fn(c_int, *mut libc::c_void, libc::size_t) -> libc::ssize_t);
    f(fd, buf, n)
}

/// # Safety
/// The C `recv` contract.
#[no_mangle]
pub unsafe extern "C" fn recv(
    fd: c_int,
    buf: *mut libc::c_void,
    n: libc::size_t,
    flags: c_int,
) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf, iov_len: n };
        return shield(|| -1, || direct::read_iov(&d, fd, &iov, 1, flags));
    }
    end_pass();
    let f = real!(recv: fn(c_int, *mut libc::c_void, libc::size_t, c_int) -> libc::ssize_t);
    f(fd, buf, n, flags)
}

/// # Safety
/// The C `recvfrom` contract.
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut libc::c_void,
    n: libc::size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> libc::ssize_t {
    if let Some((d, v6)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf, iov_len: n };
        let r = shield(|| -1, || direct::read_iov(&d, fd, &iov, 1, flags));
        if r >= 0 {
            sys::write_addr(d.ps.remote(), v6, addr, len);
        }
        return r;
    }
    end_pass();
    let f = real!(recvfrom: fn(c_int, *mut libc::c_void, libc::size_t, c_int, *mut sockaddr, *mut socklen_t) -> libc::ssize_t);
    f(fd, buf, n, flags, addr, len)
}

/// # Safety
/// The C `readv` contract.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, n: c_int) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        return shield(|| -1, || direct::read_iov(&d, fd, iov, n.max(0) as usize, 0));
    }
    end_pass();
    let f = real!(readv: fn(c_int, *const libc::iovec, c_int) -> libc::ssize_t);
    f(fd, iov, n)
}

/// # Safety
/// The C `recvmsg` contract.
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> libc::ssize_t {
    if !msg.is_null() {
        if let Some((d, v6)) = direct_call(fd) {
            return direct_recvmsg(&d, v6, fd, &mut *msg, flags);
        }
    }
    end_pass();
    let f = real!(recvmsg: fn(c_int, *mut libc::msghdr, c_int) -> libc::ssize_t);
    f(fd, msg, flags)
}

/// `recvmsg` on a direct vsocket: the bytes, the peer's address, no control data.
///
/// # Safety
/// `m` is a valid `msghdr` whose buffers the caller owns.
unsafe fn direct_recvmsg(
    d: &Direct,
    v6: bool,
    fd: c_int,
    m: &mut libc::msghdr,
    flags: c_int,
) -> libc::ssize_t {
    let r = shield(|| -1, || direct::read_iov(d, fd, m.msg_iov, m.msg_iovlen, flags));
    if r >= 0 {
        if !m.msg_name.is_null() {
            sys::write_addr(d.ps.remote(), v6, m.msg_name.cast(), &mut m.msg_namelen);
        }
        m.msg_controllen = 0;
        m.msg_flags = 0;
    }
    r
}

/// `recvmmsg` on a stream socket, as the kernel does it: one `recvmsg` per entry until
/// `vlen` are filled, end of stream, an error after the first (the count is returned), or
/// `timeout` has passed after an entry; with `MSG_WAITFORONE`, entries after the first do
/// not wait.
///
/// # Safety
/// The C `recvmmsg` contract.
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    msgvec: *mut libc::mmsghdr,
    vlen: libc::c_uint,
    flags: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    if !msgvec.is_null() {
        if let Some((d, v6)) = direct_call(fd) {
            let limit = timeout.as_ref().map(|t| {
                Instant::now() + Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
            });
            let mut got: c_int = 0;
            for i in 0..vlen as usize {
                let mut fl = flags & !libc::MSG_WAITFORONE;
                if i > 0 && flags & libc::MSG_WAITFORONE != 0 {
                    fl |= libc::MSG_DONTWAIT;
                }
                let mm = &mut *msgvec.add(i);
                let r = direct_recvmsg(&d, v6, fd, &mut mm.msg_hdr, fl);
                if r < 0 {
                    return if got > 0 { got } else { -1 };
                }
                mm.msg_len = r as libc::c_uint;
                got += 1;
                if r == 0 || limit.is_some_and(|l| Instant::now() >= l) {
                    break;
                }
            }
            return got;
        }
    }
    let f = real!(recvmmsg: fn(c_int, *mut libc::mmsghdr, libc::c_uint, c_int, *mut libc::timespec) -> c_int);
    f(fd, msgvec, vlen, flags, timeout)
}

/// `sendmmsg` on a stream socket: one `sendmsg` per entry, in order, stopping at an error
/// after the first (the count is returned) or after a short write (its `msg_len` says how
/// much went).
///
/// # Safety
/// The C `sendmmsg` contract.
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    msgvec: *mut libc::mmsghdr,
    vlen: libc::c_uint,
    flags: c_int,
) -> c_int {
    if !msgvec.is_null() {
        if let Some((d, _)) = direct_call(fd) {
            let mut sent: c_int = 0;
            for i in 0..vlen as usize {
                let mm = &mut *msgvec.add(i);
                let m = &mm.msg_hdr;
                let r = shield(|| -1, || direct::write_iov(&d, fd, m.msg_iov, m.msg_iovlen, flags));
                if r < 0 {
                    return if sent > 0 { sent } else { -1 };
                }
                mm.msg_len = r as libc::c_uint;
                sent += 1;
                let want: usize = (0..m.msg_iovlen).map(|k| (*m.msg_iov.add(k)).iov_len).sum();
                if (r as usize) < want {
                    break;
                }
            }
            return sent;
        }
    }
    let f = real!(sendmmsg: fn(c_int, *mut libc::mmsghdr, libc::c_uint, c_int) -> c_int);
    f(fd, msgvec, vlen, flags)
}

/// # Safety
/// The C `write` contract.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const libc::c_void, n: libc::size_t) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf as *mut _, iov_len: n };
        return shield(|| -1, || direct::write_iov(&d, fd, &iov, 1, 0));
    }
    let f = real!(write: fn(c_int, *const libc::c_void, libc::size_t) -> libc::ssize_t);
    f(fd, buf, n)
}

/// # Safety
/// The C `send` contract.
#[no_mangle]
pub unsafe extern "C" fn send(
    fd: c_int,
    buf: *const libc::c_void,
    n: libc::size_t,
    flags: c_int,
) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf as *mut _, iov_len: n };
        return shield(|| -1, || direct::write_iov(&d, fd, &iov, 1, flags));
    }
    let f = real!(send: fn(c_int, *const libc::c_void, libc::size_t, c_int) -> libc::ssize_t);
    f(fd, buf, n, flags)
}

/// # Safety
/// The C `sendto` contract.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const libc::c_void,
    n: libc::size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        let iov = libc::iovec { iov_base: buf as *mut _, iov_len: n };
        return shield(|| -1, || direct::write_iov(&d, fd, &iov, 1, flags));
    }
    let f = real!(sendto: fn(c_int, *const libc::c_void, libc::size_t, c_int, *const sockaddr, socklen_t) -> libc::ssize_t);
    f(fd, buf, n, flags, addr, len)
}

/// # Safety
/// The C `writev` contract.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, n: c_int) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(fd) {
        return shield(|| -1, || direct::write_iov(&d, fd, iov, n.max(0) as usize, 0));
    }
    let f = real!(writev: fn(c_int, *const libc::iovec, c_int) -> libc::ssize_t);
    f(fd, iov, n)
}

/// # Safety
/// The C `sendmsg` contract.
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> libc::ssize_t {
    if !msg.is_null() {
        if let Some((d, _)) = direct_call(fd) {
            let m = &*msg;
            return shield(|| -1, || direct::write_iov(&d, fd, m.msg_iov, m.msg_iovlen, flags));
        }
    }
    let f = real!(sendmsg: fn(c_int, *const libc::msghdr, c_int) -> libc::ssize_t);
    f(fd, msg, flags)
}

/// # Safety
/// The C `sendfile` contract.
#[no_mangle]
pub unsafe extern "C" fn sendfile(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut libc::off_t,
    count: libc::size_t,
) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(out_fd) {
        return shield(|| -1, || direct::sendfile(&d, out_fd, in_fd, offset, count));
    }
    let f = real!(sendfile: fn(c_int, c_int, *mut libc::off_t, libc::size_t) -> libc::ssize_t);
    f(out_fd, in_fd, offset, count)
}

/// # Safety
/// The C `sendfile64` contract (`off_t` is 64-bit on the ABIs this builds for).
#[no_mangle]
pub unsafe extern "C" fn sendfile64(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut libc::off_t,
    count: libc::size_t,
) -> libc::ssize_t {
    if let Some((d, _)) = direct_call(out_fd) {
        return shield(|| -1, || direct::sendfile(&d, out_fd, in_fd, offset, count));
    }
    let f = real!(sendfile64: fn(c_int, c_int, *mut libc::off_t, libc::size_t) -> libc::ssize_t);
    f(out_fd, in_fd, offset, count)
}

/// # Safety
/// The C `shutdown` contract.
#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    end_pass();
    if let Some((d, _)) = direct_call(fd) {
        return shield(|| -1, || direct::shutdown(&d, how));
    }
    let f = real!(shutdown: fn(c_int, c_int) -> c_int);
    f(fd, how)
}

/// # Safety
/// The C `getsockopt` contract.
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut libc::c_void,
    len: *mut socklen_t,
) -> c_int {
    if let Some((d, v6)) = direct_call(fd) {
        if (level, name) == (libc::SOL_SOCKET, libc::SO_ERROR)
            && d.ps.error_code() == Some(libc::ECONNREFUSED)
        {
            // The listener went away: the next connect there asks before it answers.
            note_listener(d.ps.remote(), false);
        }
        return shield(|| -1, || direct::getsockopt(&d, fd, v6, level, name, val, len));
    }
    let f = real!(getsockopt: fn(c_int, c_int, c_int, *mut libc::c_void, *mut socklen_t) -> c_int);
    f(fd, level, name, val, len)
}

/// `ioctl` is variadic in C; its one optional argument is passed like a fixed third one on
/// the Linux ABIs this builds for (see [`fcntl`]).
///
/// # Safety
/// The C `ioctl` contract.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut libc::c_void) -> c_int {
    if let Some((d, _)) = direct_call(fd) {
        if let Some(r) = shield(|| None, || direct::ioctl(&d, req, arg)) {
            return r;
        }
    }
    let f = real!(ioctl: fn(c_int, c_ulong, *mut libc::c_void) -> c_int);
    f(fd, req, arg)
}

/// The program (not the shim itself, whose own `recv`/`poll` calls land in these hooks too)
/// is about to do something that may wait: ring the doorbells its thread owes.
#[inline]
fn end_pass() {
    if !busy() {
        flush_doorbells();
    }
}

/// After a wait call returned `n`: an event-loop pass begins, whose doorbell kicks ring
/// together at its end (`netchannel::daemon::proxy::batch_doorbells`), unless
/// `[preload] eager_doorbells`.
fn pass_begins(n: c_int) {
    static EAGER: AtomicU8 = AtomicU8::new(0);
    if n < 2 || busy() {
        return;
    }
    let mut eager = EAGER.load(Ordering::Relaxed);
    if eager == 0 {
        eager = shield(|| 2, || if config().preload.eager_doorbells { 2 } else { 1 });
        EAGER.store(eager, Ordering::Relaxed);
    }
    if eager == 1 {
        batch_doorbells(n as usize);
    }
}

/// # Safety
/// The C `epoll_wait` contract.
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    end_pass();
    let f = real!(epoll_wait: fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int);
    let n = f(epfd, ev, max, timeout);
    pass_begins(n);
    n
}

/// # Safety
/// The C `epoll_pwait` contract.
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    end_pass();
    let f =
        real!(epoll_pwait: fn(c_int, *mut libc::epoll_event, c_int, c_int, *const libc::sigset_t) -> c_int);
    let n = f(epfd, ev, max, timeout, sigmask);
    pass_begins(n);
    n
}

/// # Safety
/// The C `poll` contract.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    end_pass();
    let f = real!(poll: fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int);
    let n = f(fds, nfds, timeout);
    pass_begins(n);
    n
}

/// # Safety
/// The C `ppoll` contract.
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    end_pass();
    let f = real!(ppoll: fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const libc::sigset_t) -> c_int);
    let n = f(fds, nfds, timeout, sigmask);
    pass_begins(n);
    n
}

/// # Safety
/// The C `select` contract.
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    end_pass();
    let f = real!(select: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int);
    let n = f(nfds, r, w, e, timeout);
    pass_begins(n);
    n
}

/// # Safety
/// The C `pselect` contract.
#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    end_pass();
    let f = real!(pselect: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const libc::timespec, *const libc::sigset_t) -> c_int);
    let n = f(nfds, r, w, e, timeout, sigmask);
    pass_begins(n);
    n
}

/// # Safety
/// The C `nanosleep` contract.
#[no_mangle]
pub unsafe extern "C" fn nanosleep(req: *const libc::timespec, rem: *mut libc::timespec) -> c_int {
    end_pass();
    let f = real!(nanosleep: fn(*const libc::timespec, *mut libc::timespec) -> c_int);
    f(req, rem)
}

/// # Safety
/// The C `clock_nanosleep` contract.
#[no_mangle]
pub unsafe extern "C" fn clock_nanosleep(
    clock: libc::clockid_t,
    flags: c_int,
    req: *const libc::timespec,
    rem: *mut libc::timespec,
) -> c_int {
    end_pass();
    let f = real!(clock_nanosleep: fn(libc::clockid_t, c_int, *const libc::timespec, *mut libc::timespec) -> c_int);
    f(clock, flags, req, rem)
}

/// # Safety
/// The C `usleep` contract.
#[no_mangle]
pub unsafe extern "C" fn usleep(us: libc::c_uint) -> c_int {
    end_pass();
    let f = real!(usleep: fn(libc::c_uint) -> c_int);
    f(us)
}

/// # Safety
/// The C `sleep` contract.
#[no_mangle]
pub unsafe extern "C" fn sleep(secs: libc::c_uint) -> libc::c_uint {
    end_pass();
    let f = real!(sleep: fn(libc::c_uint) -> libc::c_uint);
    f(secs)
}
