//! The two stacks a benchmark compares, behind one interface: a [`Net`] sets up the hosts (or
//! nothing, for TCP) for a [`Role`], hands out the server's [`Listener`] and the client's
//! [`Connector`], and both yield a boxed [`Conn`] (a `VStream` or a `TcpStream`).
//!
//! Topology of `--role both`: two embedded hosts in this process, host A on
//! `127.0.0.1:P` (the client) and host B on `127.0.0.2:P` (the server). Both use the same
//! channel port `P` because the engine dials a peer at `peer_ip:config.peer_port()`. Over TCP,
//! the server listens on `127.0.0.2` (ephemeral port) and the client connects from loopback.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};

use netchannel::{Class, Config, Host, VListener, VStream};

use super::{CommonOpts, Role, Stack};
use crate::error::{describe, Context, Error, Result};

/// The client host's address in `--role both`.
pub const LOOPBACK_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// The server host's address in `--role both`.
pub const LOOPBACK_SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// One end of a byte stream, whichever stack carries it.
pub trait Conn: Read + Write + Send {
    /// Half-close: no more writes; the peer reads EOF after the bytes already written.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Conn for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for VStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// The server's listening end.
pub enum Listener {
    /// A kernel TCP listener.
    Tcp(TcpListener),
    /// A vsocket listener on an embedded host.
    Vsock(VListener, SocketAddr),
}

impl Listener {
    /// Wait for the next stream; TCP streams get `TCP_NODELAY`.
    pub fn accept(&self) -> Result<(Box<dyn Conn>, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().context(|| format!("cannot accept on {}", self.describe()))?;
                s.set_nodelay(true)
                    .context(|| format!("cannot set TCP_NODELAY on the stream from {peer}"))?;
                Ok((Box::new(s), peer))
            }
            Listener::Vsock(l, _) => {
                let (s, peer) = l.accept().context(|| format!("cannot accept on {}", self.describe()))?;
                Ok((Box::new(s), peer))
            }
        }
    }

    /// "TCP 127.0.0.2:40211" or "vsocket port 5001 of host 10.0.0.2:9000".
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("TCP {a}"),
                Err(_) => "TCP".to_string(),
            },
            Listener::Vsock(l, host) => match l.local_addr() {
                Ok(a) => format!("vsocket port {} of host {host}", a.port()),
                Err(_) => format!("a vsocket port of host {host}"),
            },
        }
    }
}

/// What the client needs to open its stream; cheap to clone and `Send`.
#[derive(Clone)]
pub struct Connector {
    host: Option<Host>,
    target: SocketAddr,
}

impl Connector {
    /// Where the client connects: the server host's IP and the vsocket (or TCP) port.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Open the stream; TCP streams get `TCP_NODELAY`.
    pub fn connect(&self) -> Result<Box<dyn Conn>> {
        let what = || format!("cannot connect to {}", self.target);
        match &self.host {
            Some(host) => Ok(Box::new(host.connect(self.target).context(what)?)),
            None => {
                let s = TcpStream::connect(self.target).context(what)?;
                s.set_nodelay(true)
                    .context(|| format!("cannot set TCP_NODELAY on the stream to {}", self.target))?;
                Ok(Box::new(s))
            }
        }
    }

    /// Open a stream of traffic class `class`: a vsocket of that class for NetChannel; TCP has
    /// no classes, so there this is [`Connector::connect`].
    pub fn connect_class(&self, class: Class) -> Result<Box<dyn Conn>> {
        match &self.host {
            Some(host) => Ok(Box::new(
                host.connect_class(self.target, class)
                    .context(|| format!("cannot connect to {}", self.target))?,
            )),
            None => self.connect(),
        }
    }
}

/// The hosts (for NetChannel) and addresses of one run.
pub struct Net {
    stack: Stack,
    role: Role,
    port: u16,
    /// Server side: the host that accepts (NetChannel) and the IP a TCP listener binds.
    server_host: Option<Host>,
    server_ip: IpAddr,
    /// Client side: the host that connects (NetChannel) and where it connects.
    client_host: Option<Host>,
    target: Option<SocketAddr>,
}

impl Net {
    /// Start what `stack` needs for `opts.role`: NetChannel hosts are started here (with the
    /// role's listen address put into `config`); TCP needs nothing until [`Net::listen`].
    pub fn open(stack: Stack, opts: &CommonOpts, config: &Config) -> Result<Net> {
        let mut net = Net {
            stack,
            role: opts.role,
            port: opts.port,
            server_host: None,
            server_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            client_host: None,
            target: None,
        };
        if opts.role != Role::Client && opts.connect.is_some() {
            return Err("--connect is for --role client".into());
        }
        if opts.role != Role::Server && opts.listen.is_some() {
            return Err(
                "--listen is for --role server (--role both always uses 127.0.0.1 and 127.0.0.2)".into()
            );
        }
        if opts.local.is_some() && !(opts.role == Role::Client && stack == Stack::Netchannel) {
            return Err("--local is for --role client with --backend netchannel".into());
        }
        match (opts.role, stack) {
            (Role::Both, Stack::Tcp) => net.server_ip = IpAddr::V4(LOOPBACK_SERVER),
            (Role::Both, Stack::Netchannel) => {
                let (a, b) = loopback_pair(config)?;
                net.server_ip = IpAddr::V4(LOOPBACK_SERVER);
                net.target = Some(SocketAddr::new(net.server_ip, opts.port));
                net.client_host = Some(a);
                net.server_host = Some(b);
            }
            (Role::Server, _) => {
                let (ip, channel_port) = match &opts.listen {
                    Some(s) => parse_host_addr("--listen", s)?,
                    None => (config.listen.ip(), None),
                };
                net.server_ip = ip;
                if stack == Stack::Netchannel {
                    let mut c = config.clone();
                    c.listen = SocketAddr::new(ip, channel_port.unwrap_or(config.listen.port()));
                    net.server_host = Some(start_host(c)?);
                }
            }
            (Role::Client, _) => {
                let s = opts
                    .connect
                    .as_deref()
                    .ok_or("--role client needs --connect ADDR (the server's --listen)")?;
                let (ip, channel_port) = parse_host_addr("--connect", s)?;
                net.target = Some(SocketAddr::new(ip, opts.port));
                if stack == Stack::Netchannel {
                    let mut c = config.clone();
                    let peer_port = channel_port.unwrap_or(config.peer_port());
                    c.peer_port = Some(peer_port);
                    c.listen = opts.local.unwrap_or(SocketAddr::new(unspecified_like(ip), peer_port));
                    net.client_host = Some(start_host(c)?);
                }
            }
        }
        Ok(net)
    }

    /// The server's listener: a vsocket port on the server host, or a TCP listener.
    pub fn listen(&mut self) -> Result<Listener> {
        if !self.role.has_server() {
            return Err("internal: listen() on a client-only run".into());
        }
        match &self.server_host {
            Some(host) => {
                let l = host.bind(self.port).context(|| {
                    format!("cannot listen on vsocket port {} of host {}", self.port, host.local_addr())
                })?;
                Ok(Listener::Vsock(l, host.local_addr()))
            }
            None => {
                // --role both: an ephemeral port, so parallel runs never collide.
                let port = if self.role == Role::Both { 0 } else { self.port };
                let addr = SocketAddr::new(self.server_ip, port);
                let l = TcpListener::bind(addr).context(|| format!("cannot listen on TCP {addr}"))?;
                if self.role == Role::Both {
                    self.target =
                        Some(l.local_addr().context(|| format!("cannot read the address of TCP {addr}"))?);
                }
                Ok(Listener::Tcp(l))
            }
        }
    }

    /// The client's connector. With `--role both` over TCP, call [`Net::listen`] first.
    pub fn connector(&self) -> Result<Connector> {
        let target = self.target.ok_or("internal: connector() before the target is known")?;
        Ok(Connector { host: self.client_host.clone(), target })
    }

    /// Bytes of the client → server direction per throughput channel, in index order: counted
    /// as sent by the client host when it is in this process, else as received by the server
    /// host from `peer_ip` (the client). Empty for TCP. Only channels to/from that peer are
    /// counted; if the engine names peers differently and none match, every throughput channel is.
    pub fn client_to_server_channel_bytes(&self, peer_ip: Option<IpAddr>) -> Vec<u64> {
        if self.stack == Stack::Tcp {
            return Vec::new();
        }
        if let Some(host) = &self.client_host {
            throughput_counts(host, self.target.map(|t| t.ip()), true)
        } else if let Some(host) = &self.server_host {
            throughput_counts(host, peer_ip, false)
        } else {
            Vec::new()
        }
    }

    /// Stop the hosts.
    pub fn shutdown(self) {
        for host in [self.client_host, self.server_host].into_iter().flatten() {
            host.shutdown();
        }
    }
}

fn throughput_counts(host: &Host, peer_ip: Option<IpAddr>, sent: bool) -> Vec<u64> {
    let stats = host.stats();
    let mut chans: Vec<_> = stats.channels.iter().filter(|c| c.class == Class::Throughput).collect();
    if let Some(ip) = peer_ip {
        if chans.iter().any(|c| c.peer.ip() == ip) {
            chans.retain(|c| c.peer.ip() == ip);
        }
    }
    chans.sort_by_key(|c| c.index);
    chans.iter().map(|c| if sent { c.bytes_sent } else { c.bytes_received }).collect()
}

fn start_host(config: Config) -> Result<Host> {
    let listen = config.listen;
    Host::start(config).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AddrInUse {
            " (another process holds that port: pick another with --listen/--local or `listen` in --config)"
        } else {
            ""
        };
        Error::from(format!("cannot start a netchannel host on {listen}: {}{hint}", describe(&e)))
    })
}

/// Start hosts A (127.0.0.1:P) and B (127.0.0.2:P) on a port P free on both addresses.
fn loopback_pair(config: &Config) -> Result<(Host, Host)> {
    let mut last = String::new();
    for _ in 0..8 {
        let port = free_port_pair().context(|| "cannot find a free loopback port".to_string())?;
        let cfg = |ip: Ipv4Addr| Config {
            listen: SocketAddr::new(IpAddr::V4(ip), port),
            peer_port: Some(port),
            ..config.clone()
        };
        match Host::start(cfg(LOOPBACK_CLIENT)) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = describe(&e),
            Err(e) => {
                return Err(format!(
                    "cannot start a netchannel host on {LOOPBACK_CLIENT}:{port}: {}",
                    describe(&e)
                )
                .into())
            }
            Ok(a) => match Host::start(cfg(LOOPBACK_SERVER)) {
                Ok(b) => return Ok((a, b)),
                Err(e) => {
                    a.shutdown();
                    if e.kind() != io::ErrorKind::AddrInUse {
                        return Err(format!(
                            "cannot start a netchannel host on {LOOPBACK_SERVER}:{port}: {}",
                            describe(&e)
                        )
                        .into());
                    }
                    last = describe(&e);
                }
            },
        }
    }
    Err(format!("cannot start two loopback netchannel hosts on a common port: {last}").into())
}

/// A TCP port free on both 127.0.0.1 and 127.0.0.2 (a moment ago).
fn free_port_pair() -> io::Result<u16> {
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no port free on both 127.0.0.1 and 127.0.0.2");
    for _ in 0..16 {
        let a = TcpListener::bind((LOOPBACK_CLIENT, 0))?;
        let port = a.local_addr()?.port();
        match TcpListener::bind((LOOPBACK_SERVER, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The unspecified address of `ip`'s family.
fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
fn parse_host_addr(flag: &str, s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip(), Some(a.port())));
    }
    if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok((ip, None));
    }
    Err(format!("{flag}: {s:?} is not an IP address or IP:PORT").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses() {
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(parse_host_addr("--x", "10.0.0.2").unwrap(), (v4, None));
        assert_eq!(parse_host_addr("--x", "10.0.0.2:9000").unwrap(), (v4, Some(9000)));
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(parse_host_addr("--x", "[::1]:9").unwrap(), (v6, Some(9)));
        assert_eq!(parse_host_addr("--x", "::1").unwrap(), (v6, None));
        let e = parse_host_addr("--connect", "server.example").unwrap_err().to_string();
        assert!(e.starts_with("--connect: "), "{e}");
    }

    #[test]
    fn a_port_free_on_both_loopback_addresses() {
        let p = free_port_pair().unwrap();
        TcpListener::bind((LOOPBACK_SERVER, p)).unwrap();
    }
}
