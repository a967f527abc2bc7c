//! Linux MPTCP sockets, the multipath baseline of experiment 6a: one MPTCP connection whose
//! bytes the kernel spreads over several TCP subflows, next to NetChannel's one stream over
//! several channels. A socket is `socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)` (libc; no
//! other crate), wrapped in a std [`TcpStream`]/[`TcpListener`] because it reads, writes,
//! accepts and shuts down exactly like one.
//!
//! Subflows beyond the first come from the kernel's path manager, which needs per-namespace
//! limits and `subflow` endpoints: [`Topology::configure_mptcp`](super::netns::Topology)
//! sets them inside the run's own namespaces, so the machine's settings are never changed.
//! [`subflows`] asks a connection how many subflows it has and how many bytes each carried
//! (`getsockopt(SOL_MPTCP, MPTCP_TCPINFO)`).
//!
//! When the kernel refuses MPTCP, errors say so up front: "MPTCP is not available: …".

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{describe, Error, Result};

/// `IPPROTO_MPTCP` from `<linux/in.h>`.
pub const IPPROTO_MPTCP: libc::c_int = 262;
/// `SOL_MPTCP` from `<linux/socket.h>`.
const SOL_MPTCP: libc::c_int = 284;
/// `MPTCP_TCPINFO` from `<linux/mptcp.h>`: a `struct tcp_info` per subflow.
const MPTCP_TCPINFO: libc::c_int = 2;

/// A connected MPTCP socket.
#[derive(Debug)]
pub struct MptcpStream(pub TcpStream);

impl Read for MptcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for MptcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// "MPTCP is not available: …" when `e` (from creating an MPTCP socket) means the kernel
/// has no MPTCP, or has it turned off; `None` for other errors.
pub fn unavailable(e: &io::Error) -> Option<String> {
    let why = match e.raw_os_error()? {
        libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT => format!(
            "the kernel refuses IPPROTO_MPTCP ({}); it needs Linux 5.6 or later built with CONFIG_MPTCP",
            describe(e)
        ),
        libc::ENOPROTOOPT => {
            let value = std::fs::read_to_string("/proc/sys/net/mptcp/enabled")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "0".into());
            format!(
                "it is turned off in this network namespace (sysctl net.mptcp.enabled = {value}; \
                 `sysctl -w net.mptcp.enabled=1` turns it on)"
            )
        }
        _ => return None,
    };
    Some(format!("MPTCP is not available: {why}"))
}

/// Create (and close) an MPTCP socket of `ip`'s family in the calling thread's namespace, so
/// that a missing MPTCP is reported before a run starts.
pub fn probe(ip: IpAddr) -> Result<()> {
    socket(ip).map(drop).map_err(|e| match unavailable(&e) {
        Some(msg) => Error::from(msg),
        None => {
            Error::from(format!("MPTCP is not available: cannot create an MPTCP socket: {}", describe(&e)))
        }
    })
}

fn socket(ip: IpAddr) -> io::Result<OwnedFd> {
    let domain = if ip.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked before it is used as an fd.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, IPPROTO_MPTCP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Call `f` with `addr` as a `sockaddr` pointer and its length.
fn with_sockaddr<T>(addr: SocketAddr, f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> T) -> T {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            f((&sin as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            f((&sin6 as *const libc::sockaddr_in6).cast(), size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An MPTCP listener on `addr` (`SO_REUSEADDR`, backlog 128), created in the calling thread's
/// network namespace.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = socket(addr.ip())?;
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a valid socket; the option value points to a c_int of the given size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    // SAFETY: `fd` is a valid socket; the address pointer and length come from with_sockaddr.
    check(with_sockaddr(addr, |sa, len| unsafe { libc::bind(fd.as_raw_fd(), sa, len) }))?;
    // SAFETY: `fd` is a valid, bound socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(TcpListener::from(fd))
}

/// An MPTCP connection to `addr`, from the calling thread's network namespace; the path
/// manager adds subflows once it is established.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let fd = socket(addr.ip())?;
    // SAFETY: `fd` is a valid socket; the address pointer and length come from with_sockaddr.
    check(with_sockaddr(addr, |sa, len| unsafe { libc::connect(fd.as_raw_fd(), sa, len) }))?;
    Ok(TcpStream::from(fd))
}

/// The subflows of one MPTCP connection at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subflows {
    /// Subflows now, the initial one included (1 after a fallback to plain TCP).
    pub count: usize,
    /// The connection fell back to plain TCP (the peer or a middlebox refused MPTCP).
    pub fallback: bool,
    /// Per subflow, in the kernel's order: bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub bytes_acked: Vec<u64>,
    /// Per subflow, in the kernel's order: bytes received (`tcpi_bytes_received`).
    pub bytes_received: Vec<u64>,
}

/// Ask the kernel for the subflows of the MPTCP connection `fd`
/// (`getsockopt(SOL_MPTCP, MPTCP_TCPINFO)`, up to 16 subflows' counters).
pub fn subflows(fd: &impl AsRawFd) -> io::Result<Subflows> {
    subflows_of(fd.as_raw_fd())
}

fn subflows_of(fd: RawFd) -> io::Result<Subflows> {
    // struct mptcp_subflow_data { u32 size_subflow_data, num_subflows, size_kernel, size_user }
    const HEADER: usize = 16;
    const SLOT: usize = 256; // >= sizeof(struct tcp_info); the kernel uses min(SLOT, its size)
    const SLOTS: usize = 16;
    // Offsets in struct tcp_info (<linux/tcp.h>).
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    let mut buf = vec![0u8; HEADER + SLOT * SLOTS];
    buf[0..4].copy_from_slice(&(HEADER as u32).to_ne_bytes());
    buf[12..16].copy_from_slice(&(SLOT as u32).to_ne_bytes());
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and `len` is a valid socklen_t.
    let rc = unsafe { libc::getsockopt(fd, SOL_MPTCP, MPTCP_TCPINFO, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // A connection that fell back to TCP passes SOL_MPTCP to TCP, which refuses it.
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOPROTOOPT) => {
                Ok(Subflows { count: 1, fallback: true, ..Default::default() })
            }
            _ => Err(e),
        };
    }
    let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes")) as usize;
    let u64_at = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    let count = u32_at(4);
    let stride = u32_at(12);
    let mut out = Subflows { count, ..Default::default() };
    if stride >= BYTES_RECEIVED + 8 {
        let filled = (len as usize).saturating_sub(HEADER) / stride;
        for i in 0..count.min(SLOTS).min(filled) {
            let base = HEADER + i * stride;
            out.bytes_acked.push(u64_at(base + BYTES_ACKED));
            out.bytes_received.push(u64_at(base + BYTES_RECEIVED));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_the_reason() {
        let e = io::Error::from_raw_os_error(libc::EPROTONOSUPPORT);
        let msg = unavailable(&e).unwrap();
        assert!(msg.starts_with("MPTCP is not available: the kernel refuses IPPROTO_MPTCP"), "{msg}");
        let msg = unavailable(&io::Error::from_raw_os_error(libc::ENOPROTOOPT)).unwrap();
        assert!(msg.contains("net.mptcp.enabled"), "{msg}");
        assert_eq!(unavailable(&io::Error::from_raw_os_error(libc::ECONNREFUSED)), None);
    }

    /// Needs an MPTCP-capable kernel; skipped (passes) where the socket is refused, since the
    /// end-to-end tests report that case with a clear failure.
    #[test]
    fn loopback_connection_reports_its_subflows() {
        let listener = match listen("127.0.0.1:0".parse().unwrap()) {
            Ok(l) => l,
            Err(e) if unavailable(&e).is_some() => return,
            Err(e) => panic!("listen: {e}"),
        };
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            let info = subflows(&s).unwrap();
            (buf, info)
        });
        let mut c = connect(addr).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        let info = subflows(&c).unwrap();
        assert!(info.count >= 1, "{info:?}");
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let (got, server_info) = server.join().unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(server_info.count >= 1, "{server_info:?}");
        if !server_info.fallback {
            assert!(server_info.bytes_received.iter().sum::<u64>() >= 100_000, "{server_info:?}");
        }
    }
}
