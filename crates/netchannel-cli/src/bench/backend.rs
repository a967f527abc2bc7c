//! The stacks a benchmark compares, behind one interface: a [`Net`] sets up the hosts (or
//! nothing, for TCP and MPTCP) for a [`Role`], hands out the server's [`Listener`] and the
//! client's [`Connector`], and both yield a boxed [`Conn`] (a `VStream`, a `TcpStream` or an
//! [`MptcpStream`]).
//!
//! Topology of `--role both`: two embedded hosts in this process, host A on
//! `127.0.0.1:P` (the client) and host B on `127.0.0.2:P` (the server). Both use the same
//! channel port `P` because the engine dials a peer at `peer_ip:config.peer_port()`. Over TCP,
//! the server listens on `127.0.0.2` (ephemeral port) and the client connects from loopback.
//! MPTCP does the same, but (as root) inside a private namespace with only `lo`, where the path
//! manager gets `--subflows - 1` extra `subflow` endpoints 127.0.0.3….
//!
//! With `--netns` the same happens between two namespaces joined by a veth pair
//! ([`Topology::veth_pair`]): the client (host A) on `10.X.Y.1`, the server (host B) on
//! `10.X.Y.2`. Whatever creates a socket runs in the right namespace: hosts are started and
//! listeners bound on a thread inside it ([`Ns::run`]), and [`Connector::connect`] moves the
//! calling thread into the client's namespace first (the engine dials its channels from the
//! thread that connects). The namespaces are removed when the [`Net`] goes away.
//!
//! TCP and MPTCP baselines run the congestion control of the channels (`channel_congestion`,
//! `--congestion`): the listener gets it (accepted connections inherit it) and so does every
//! connecting socket, so that a comparison is never BBR against cubic.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};

use std::sync::Arc;

use netchannel::daemon::Client;
use netchannel::{Class, Config, Host, VListener, VStream};

use super::daemons::Daemon;
use super::mptcp::{self, MptcpStream, Subflows};
use super::netns::{self, Ns, Topology};
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

    /// MPTCP only: the connection's subflows right now; `None` for the other stacks.
    fn subflows(&self) -> Option<io::Result<Subflows>> {
        None
    }
}

impl Conn for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for MptcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Write)
    }

    fn subflows(&self) -> Option<io::Result<Subflows>> {
        Some(mptcp::subflows(&self.0))
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
    /// A kernel MPTCP listener.
    Mptcp(TcpListener),
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
            Listener::Mptcp(l) => {
                let (s, peer) = l.accept().context(|| format!("cannot accept on {}", self.describe()))?;
                s.set_nodelay(true)
                    .context(|| format!("cannot set TCP_NODELAY on the MPTCP stream from {peer}"))?;
                Ok((Box::new(MptcpStream(s)), peer))
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
            Listener::Mptcp(l) => match l.local_addr() {
                Ok(a) => format!("MPTCP {a}"),
                Err(_) => "MPTCP".to_string(),
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
    /// `--backend daemon`: the client host's daemon.
    daemon: Option<Client>,
    target: SocketAddr,
    mptcp: bool,
    /// `--netns`: the client's namespace, entered by the connecting thread.
    ns: Option<Arc<Ns>>,
    /// TCP/MPTCP: the congestion control to give each stream ("" = the system default).
    congestion: String,
}

impl Connector {
    /// Where the client connects: the server host's IP and the vsocket (or TCP) port.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Give a TCP (or MPTCP) stream this run opened itself the run's congestion control.
    pub fn tune(&self, s: &TcpStream) -> Result<()> {
        set_congestion(s, &self.congestion).context(|| {
            format!("cannot set congestion control {:?} on the stream to {}", self.congestion, self.target)
        })
    }

    /// Open the stream; TCP and MPTCP streams get `TCP_NODELAY`. With `--netns` the calling
    /// thread first moves into the client's namespace (and stays there).
    pub fn connect(&self) -> Result<Box<dyn Conn>> {
        if let Some(ns) = &self.ns {
            ns.enter()?;
        }
        let what = || format!("cannot connect to {}", self.target);
        if let Some(d) = &self.daemon {
            return Ok(Box::new(d.connect_stream(self.target).context(what)?));
        }
        match &self.host {
            Some(host) => Ok(Box::new(host.connect(self.target).context(what)?)),
            None if self.mptcp => {
                let s = mptcp::connect(self.target).map_err(|e| match mptcp::unavailable(&e) {
                    Some(msg) => Error::from(msg),
                    None => Error::from(format!("{}: {}", what(), describe(&e))),
                })?;
                s.set_nodelay(true)
                    .context(|| format!("cannot set TCP_NODELAY on the MPTCP stream to {}", self.target))?;
                self.tune(&s)?;
                Ok(Box::new(MptcpStream(s)))
            }
            None => {
                let s = TcpStream::connect(self.target).context(what)?;
                s.set_nodelay(true)
                    .context(|| format!("cannot set TCP_NODELAY on the stream to {}", self.target))?;
                self.tune(&s)?;
                Ok(Box::new(s))
            }
        }
    }

    /// Open a stream of traffic class `class`: a vsocket of that class for NetChannel; TCP has
    /// no classes, so there this is [`Connector::connect`].
    pub fn connect_class(&self, class: Class) -> Result<Box<dyn Conn>> {
        if let Some(ns) = &self.ns {
            ns.enter()?;
        }
        if let Some(d) = &self.daemon {
            return Ok(Box::new(
                d.connect_class(self.target, class)
                    .context(|| format!("cannot connect to {}", self.target))?,
            ));
        }
        match &self.host {
            Some(host) => Ok(Box::new(
                host.connect_class(self.target, class)
                    .context(|| format!("cannot connect to {}", self.target))?,
            )),
            None => self.connect(),
        }
    }
}

/// Give TCP (or MPTCP) socket `s` the congestion control `name` (`TCP_CONGESTION`); nothing
/// for an empty name (the system default).
pub fn set_congestion(s: &impl std::os::fd::AsRawFd, name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    // SAFETY: setsockopt reads `name.len()` bytes from a live buffer; the fd is open (borrowed).
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
    /// MPTCP with `--role both`: the subflows each connection is set up to have.
    subflows: Option<usize>,
    /// `--backend daemon`: the daemons' clients (server side, client side) and, with
    /// `--role both`, the daemon processes this run started.
    server_daemon: Option<Client>,
    client_daemon: Option<Client>,
    daemons: Vec<Daemon>,
    /// TCP/MPTCP: the congestion control of the baseline's sockets (the channels' one).
    congestion: String,
    /// `--netns`, or MPTCP's private loopback namespace; removed on drop, so it comes last.
    topology: Option<Topology>,
}

impl Net {
    /// Start what `stack` needs for `opts.role`: NetChannel hosts are started here (with the
    /// role's listen address put into `config`); TCP needs nothing until [`Net::listen`];
    /// MPTCP is probed (and, with `--role both` as root, its path manager configured). With
    /// `--netns` the namespaces are created here.
    pub fn open(stack: Stack, opts: &CommonOpts, config: &Config) -> Result<Net> {
        let mut net = Net {
            stack,
            role: opts.role,
            port: opts.port,
            server_host: None,
            server_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            client_host: None,
            target: None,
            subflows: None,
            server_daemon: None,
            client_daemon: None,
            daemons: Vec::new(),
            congestion: config.channel_congestion.clone(),
            topology: None,
        };
        if opts.netns && opts.role != Role::Both {
            return Err(
                "--netns runs both ends in this process in two namespaces: it needs --role both".into()
            );
        }
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
            (Role::Both, _) if opts.netns => net.open_in(Topology::veth_pair(opts.rate)?, opts, config)?,
            (Role::Both, Stack::Mptcp) if is_root() => net.open_in(Topology::loopback()?, opts, config)?,
            (Role::Both, Stack::Mptcp) => {
                if opts.subflows > 1 {
                    return Err(format!(
                        "MPTCP is not available with --subflows {}: the extra subflows need path \
                         manager endpoints, set in a private network namespace, which needs root \
                         (run as root, or use --subflows 1)",
                        opts.subflows
                    )
                    .into());
                }
                mptcp::probe(IpAddr::V4(LOOPBACK_SERVER))?;
                net.server_ip = IpAddr::V4(LOOPBACK_SERVER);
                net.subflows = Some(1);
            }
            (Role::Both, Stack::Tcp) => net.server_ip = IpAddr::V4(LOOPBACK_SERVER),
            (Role::Both, Stack::Daemon) => {
                let port = free_port_pair().context(|| "cannot find a free loopback port".to_string())?;
                let a = Daemon::start(config, SocketAddr::new(IpAddr::V4(LOOPBACK_CLIENT), port), None)?;
                let b = Daemon::start(config, SocketAddr::new(IpAddr::V4(LOOPBACK_SERVER), port), None)?;
                net.server_ip = IpAddr::V4(LOOPBACK_SERVER);
                net.target = Some(SocketAddr::new(net.server_ip, opts.port));
                net.client_daemon = Some(a.client.clone());
                net.server_daemon = Some(b.client.clone());
                net.daemons = vec![a, b];
            }
            (Role::Server | Role::Client, Stack::Daemon) => {
                // The host's own daemon (`[daemon] socket` of --config, or NETCHANNEL_SOCKET).
                let c = Client::from_config(config).map_err(|e| {
                    Error::from(format!("--backend daemon needs a running daemon: {}", describe(&e)))
                })?;
                if opts.role == Role::Server {
                    net.server_daemon = Some(c);
                } else {
                    let s = opts
                        .connect
                        .as_deref()
                        .ok_or("--role client needs --connect ADDR (the server's --listen)")?;
                    let (ip, _) = parse_host_addr("--connect", s)?;
                    net.target = Some(SocketAddr::new(ip, opts.port));
                    net.client_daemon = Some(c);
                }
            }
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
                if stack == Stack::Mptcp {
                    mptcp::probe(ip)?;
                }
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
                if stack == Stack::Mptcp {
                    mptcp::probe(ip)?;
                }
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

    /// `--role both` inside `topo`: the client in its client namespace, the server in its
    /// server namespace (the same one for a loopback topology).
    fn open_in(&mut self, topo: Topology, opts: &CommonOpts, config: &Config) -> Result<()> {
        self.server_ip = topo.server_ip();
        match self.stack {
            Stack::Tcp => {}
            Stack::Daemon => {
                let port = match config.listen.port() {
                    0 => Config::default().listen.port(),
                    p => p,
                };
                let a = Daemon::start(
                    config,
                    SocketAddr::new(topo.client_ip(), port),
                    Some(topo.client_ns().name()),
                )?;
                let b = Daemon::start(
                    config,
                    SocketAddr::new(topo.server_ip(), port),
                    Some(topo.server_ns().name()),
                )?;
                self.target = Some(SocketAddr::new(self.server_ip, opts.port));
                self.client_daemon = Some(a.client.clone());
                self.server_daemon = Some(b.client.clone());
                self.daemons = vec![a, b];
            }
            Stack::Mptcp => {
                topo.client_ns().run(|| mptcp::probe(topo.client_ip()))??;
                topo.configure_mptcp(opts.subflows - 1).map_err(|e| {
                    Error::from(format!("MPTCP is not available: cannot configure the path manager: {e}"))
                })?;
                self.subflows = Some(opts.subflows);
            }
            Stack::Netchannel => {
                // Each namespace has its own ports: the configured one is free in both.
                let port = match config.listen.port() {
                    0 => Config::default().listen.port(),
                    p => p,
                };
                let cfg = |ip: IpAddr| Config {
                    listen: SocketAddr::new(ip, port),
                    peer_port: Some(port),
                    ..config.clone()
                };
                let (a, b) = (cfg(topo.client_ip()), cfg(topo.server_ip()));
                // The engine binds its channel listener in the thread that starts the host.
                let a = topo.client_ns().run(|| start_host(a))??;
                let b = match topo.server_ns().run(|| start_host(b)) {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) | Err(e) => {
                        a.shutdown();
                        return Err(e);
                    }
                };
                self.target = Some(SocketAddr::new(self.server_ip, opts.port));
                self.client_host = Some(a);
                self.server_host = Some(b);
            }
        }
        self.topology = Some(topo);
        Ok(())
    }

    /// MPTCP with `--role both`: the subflows each connection is set up to have.
    pub fn subflows(&self) -> Option<usize> {
        self.subflows
    }

    /// `--netns`: the two namespaces the ends run in; `None` otherwise (also for MPTCP's
    /// private loopback namespace).
    pub fn netns(&self) -> Option<&Topology> {
        self.topology.as_ref().filter(|t| t.kind() == netns::Kind::Veth)
    }

    /// The server's listener: a vsocket port on the server host, or a TCP (MPTCP) listener,
    /// bound inside the server's namespace if there is one.
    pub fn listen(&mut self) -> Result<Listener> {
        if !self.role.has_server() {
            return Err("internal: listen() on a client-only run".into());
        }
        if let Some(d) = &self.server_daemon {
            let l = d.bind(self.port).context(|| {
                format!(
                    "cannot listen on vsocket port {} through the daemon at {}",
                    self.port,
                    d.path().display()
                )
            })?;
            let addr = l.local_addr().context(|| "cannot read the listener's address".to_string())?;
            return Ok(Listener::Vsock(l, addr));
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
                let mptcp = self.stack == Stack::Mptcp;
                let kind = if mptcp { "MPTCP" } else { "TCP" };
                let congestion = &self.congestion;
                let bind = || {
                    let l = if mptcp { mptcp::listen(addr) } else { TcpListener::bind(addr) };
                    let l = l.map_err(|e| match mptcp::unavailable(&e).filter(|_| mptcp) {
                        Some(msg) => Error::from(msg),
                        None => Error::from(format!("cannot listen on {kind} {addr}: {}", describe(&e))),
                    })?;
                    // Accepted streams inherit the listener's congestion control.
                    set_congestion(&l, congestion).context(|| {
                        format!("cannot set congestion control {congestion:?} on {kind} listener {addr}")
                    })?;
                    Ok::<_, Error>(l)
                };
                let l = match &self.topology {
                    Some(t) => t.server_ns().run(bind)??,
                    None => bind()?,
                };
                if self.role == Role::Both {
                    self.target =
                        Some(l.local_addr().context(|| format!("cannot read the address of {kind} {addr}"))?);
                }
                Ok(if mptcp { Listener::Mptcp(l) } else { Listener::Tcp(l) })
            }
        }
    }

    /// The client's connector. With `--role both` over TCP, call [`Net::listen`] first.
    pub fn connector(&self) -> Result<Connector> {
        let target = self.target.ok_or("internal: connector() before the target is known")?;
        Ok(Connector {
            host: self.client_host.clone(),
            daemon: self.client_daemon.clone(),
            target,
            mptcp: self.stack == Stack::Mptcp,
            ns: self.topology.as_ref().map(|t| t.client_ns().clone()),
            congestion: self.congestion.clone(),
        })
    }

    /// Bytes of the client → server direction per throughput channel, in index order: counted
    /// as sent by the client host when it is in this process, else as received by the server
    /// host from `peer_ip` (the client). Empty for TCP. Only channels to/from that peer are
    /// counted; if the engine names peers differently and none match, every throughput channel is.
    /// Empty for MPTCP too (its per-subflow counts come from the connection, [`Conn::subflows`]).
    pub fn client_to_server_channel_bytes(&self, peer_ip: Option<IpAddr>) -> Vec<u64> {
        if self.stack == Stack::Daemon {
            let (daemon, sent, ip) = match (&self.client_daemon, &self.server_daemon) {
                (Some(c), _) => (c, true, self.target.map(|t| t.ip())),
                (None, Some(s)) => (s, false, peer_ip),
                _ => return Vec::new(),
            };
            return daemon_throughput_counts(daemon, ip, sent);
        }
        if self.stack != Stack::Netchannel {
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

    /// The NetChannel hosts this process runs (client, then server); none for TCP.
    pub fn hosts(&self) -> Vec<Host> {
        [&self.client_host, &self.server_host].into_iter().flatten().cloned().collect()
    }

    /// Stop the hosts, then remove the namespaces.
    pub fn shutdown(self) {
        for host in [self.client_host, self.server_host].into_iter().flatten() {
            host.shutdown();
        }
        drop(self.daemons);
        drop(self.topology);
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

/// [`throughput_counts`] from a daemon's status.
fn daemon_throughput_counts(daemon: &Client, peer_ip: Option<IpAddr>, sent: bool) -> Vec<u64> {
    let Ok(st) = daemon.status() else { return Vec::new() };
    let mut chans: Vec<(String, u64, u64)> = st["channels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["class"] == "throughput")
        .map(|c| {
            let key = if sent { "bytes_sent" } else { "bytes_received" };
            (
                c["peer"].as_str().unwrap_or("").to_string(),
                c["index"].as_u64().unwrap_or(0),
                c[key].as_u64().unwrap_or(0),
            )
        })
        .collect();
    if let Some(ip) = peer_ip {
        let of_ip = |p: &str| p.parse::<SocketAddr>().is_ok_and(|a| a.ip() == ip);
        if chans.iter().any(|c| of_ip(&c.0)) {
            chans.retain(|c| of_ip(&c.0));
        }
    }
    chans.sort_by_key(|c| c.1);
    chans.iter().map(|c| c.2).collect()
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

fn is_root() -> bool {
    netns::require_root("").is_ok()
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
