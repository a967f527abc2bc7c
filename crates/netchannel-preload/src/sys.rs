//! The shim's edge to libc: the real functions behind the hooks (resolved once with
//! `dlsym(RTLD_NEXT)`), socket addresses to and from `sockaddr`, errno, a fork-safe lock and
//! a stderr line that goes through no hooked call.

use std::cell::UnsafeCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// The next definition of a libc function after this library's own, looked up once.
macro_rules! real {
    ($name:ident : fn($($a:ty),*) -> $r:ty) => {{
        static P: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut p = P.load(std::sync::atomic::Ordering::Relaxed);
        if p == 0 {
            // SAFETY: a NUL-terminated symbol name; RTLD_NEXT is a valid pseudo-handle.
            p = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!(stringify!($name), "\0").as_ptr().cast()) }
                as usize;
            assert!(p != 0, concat!("netchannel-preload: libc has no ", stringify!($name)));
            P.store(p, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: p is the address of libc's function of this name, whose C signature this is.
        unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($a),*) -> $r>(p) }
    }};
}
pub(crate) use real;

pub fn errno() -> i32 {
    // SAFETY: the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
}

/// One line on stderr, written with a single `write(2)` (no std I/O, no hooked call).
pub fn say(msg: &str) {
    let line = format!("netchannel-preload: {msg}\n");
    // SAFETY: writes a live buffer to fd 2; a failure is ignored.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// The address in `addr`/`len`, if it is IPv4 or IPv6. A v4-mapped IPv6 address comes out
/// as IPv4, the address the peer host really has.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
pub unsafe fn read_addr(addr: *const libc::sockaddr, len: libc::socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    match (*addr).sa_family as i32 {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            let a = &*(addr as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let a = &*(addr as *const libc::sockaddr_in6);
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

/// `sa` as a `sockaddr` of family `AF_INET6` (v4-mapped if need be) when `v6`, else
/// `AF_INET` (an IPv6 `sa` cannot be, and gives `None`).
pub fn to_raw(sa: SocketAddr, v6: bool) -> Option<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = if v6 {
        let ip = match sa.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
        let a = unsafe { &mut *(&mut st as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
        a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a.sin6_port = sa.port().to_be();
        a.sin6_addr.s6_addr = ip.octets();
        std::mem::size_of::<libc::sockaddr_in6>()
    } else {
        let IpAddr::V4(ip) = sa.ip() else { return None };
        // SAFETY: as above.
        let a = unsafe { &mut *(&mut st as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_port = sa.port().to_be();
        a.sin_addr.s_addr = u32::from(ip).to_be();
        std::mem::size_of::<libc::sockaddr_in>()
    };
    Some((st, len as libc::socklen_t))
}

/// Store `sa` into a caller's `addr`/`len` pair as the kernel would (truncated to the
/// caller's buffer, `*len` set to the full size). Nothing happens if either is null.
///
/// # Safety
/// `addr` must point at `*len` writable bytes.
pub unsafe fn write_addr(sa: SocketAddr, v6: bool, addr: *mut libc::sockaddr, len: *mut libc::socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let Some((st, n)) = to_raw(sa, v6) else { return };
    let copy = (*len).min(n) as usize;
    std::ptr::copy_nonoverlapping(
        (&st as *const libc::sockaddr_storage).cast::<u8>(),
        addr.cast::<u8>(),
        copy,
    );
    *len = n;
}

fn sockopt_int(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and l are live and sized for an int option.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut l) };
    (r == 0).then_some(v)
}

/// The family of `fd` if it is a kernel TCP socket (IPv4 or IPv6 stream, protocol TCP).
pub fn tcp_family(fd: i32) -> Option<i32> {
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return None;
    }
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return None;
    }
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP {
        return None;
    }
    Some(domain)
}

/// `SO_PRIORITY` of a socket (0 if unreadable).
pub fn priority(fd: i32) -> i32 {
    sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap_or(0)
}

/// The kernel's local address of `fd`.
pub fn local_addr(fd: i32) -> Option<SocketAddr> {
    sock_name(fd, real!(getsockname: fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32))
}

/// The kernel's peer address of `fd`.
pub fn peer_addr(fd: i32) -> Option<SocketAddr> {
    sock_name(fd, real!(getpeername: fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32))
}

/// An address of `fd` read by `f` (the real getsockname or getpeername).
fn sock_name(
    fd: i32,
    f: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32,
) -> Option<SocketAddr> {
    // SAFETY: st is a live sockaddr_storage of the stated length.
    unsafe {
        let mut st: libc::sockaddr_storage = std::mem::zeroed();
        let mut l = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if f(fd, (&mut st as *mut libc::sockaddr_storage).cast(), &mut l) != 0 {
            return None;
        }
        read_addr((&st as *const libc::sockaddr_storage).cast(), l)
    }
}

/// A lock that can be taken in `pthread_atfork`'s prepare handler and released in both the
/// parent and the child, so a fork never leaves the child with a lock another thread held.
/// Waiters back off with short sleeps, never a bare spin.
pub struct ForkLock<T> {
    held: AtomicBool,
    v: UnsafeCell<T>,
}

// SAFETY: access to v is serialized by `held`.
unsafe impl<T: Send> Sync for ForkLock<T> {}

pub struct Guard<'a, T>(&'a ForkLock<T>);

impl<T> ForkLock<T> {
    pub const fn new(v: T) -> Self {
        ForkLock { held: AtomicBool::new(false), v: UnsafeCell::new(v) }
    }

    pub fn lock(&self) -> Guard<'_, T> {
        self.acquire();
        Guard(self)
    }

    pub fn acquire(&self) {
        let mut tries = 0u32;
        while self.held.swap(true, Ordering::Acquire) {
            tries += 1;
            if tries < 16 {
                std::hint::spin_loop();
            } else {
                let ts = libc::timespec { tv_sec: 0, tv_nsec: 20_000 };
                // SAFETY: a live timespec; no remainder wanted.
                unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            }
        }
    }

    /// Release without a guard (the fork handlers).
    ///
    /// # Safety
    /// The caller took the lock with [`ForkLock::acquire`] (or is the only thread left).
    pub unsafe fn release(&self) {
        self.held.store(false, Ordering::Release);
    }

    /// The value, with the lock held by the caller through `acquire`.
    ///
    /// # Safety
    /// The caller holds the lock.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        &mut *self.v.get()
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.v.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.v.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::Release);
    }
}
