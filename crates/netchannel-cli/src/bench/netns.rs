//! Network-namespace topologies, so that the two ends of a benchmark look like two hosts
//! (`--netns`): [`Topology::veth_pair`] creates namespaces `nc-a-<pid>-<n>` (the client) and
//! `nc-b-<pid>-<n>` (the server) joined by a veth pair with addresses `10.X.Y.1/24` and
//! `10.X.Y.2/24` (X.Y derived from the pid), brings `lo` and the veths up and, with `--rate`,
//! puts a `tbf` qdisc on both veth ends. [`Topology::loopback`] creates one namespace
//! `nc-m-<pid>-<n>` with only `lo`, where a run can change per-namespace settings (the MPTCP
//! path manager) without touching the machine's. Everything is done with iproute2 (`ip`, `tc`);
//! a failure quotes the command and its stderr. Only addresses inside the new namespaces are
//! ever used, so no packet of a run leaves them.
//!
//! One process runs both ends: a thread moves itself into a namespace with
//! `setns(CLONE_NEWNET)` ([`Ns::enter`]), which affects only that thread, and every socket it
//! creates afterwards lives in that namespace (threads it spawns inherit it). [`Ns::run`] runs
//! a closure on a short-lived thread inside the namespace, e.g. to start a host whose listener
//! must be bound there.
//!
//! The namespaces are removed when the [`Topology`] is dropped (normal return, error, panic),
//! and on SIGINT/SIGTERM/SIGHUP: the first [`Topology`] installs handlers that wake a cleanup
//! thread, which removes every namespace still registered and exits with `128 + signal`.
//! Only SIGKILL can leave one behind (`ip netns list`, `ip netns del NAME`).

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{describe, Error, Result};

/// A rate limit for the veth pair, in bits per second (`--rate 10gbit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(u64);

impl Rate {
    /// Bits per second.
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// The `tbf` burst in bytes: 2 ms at the rate, at least 128 KiB so that a 64 KiB GSO
    /// packet always fits in the bucket.
    pub fn burst_bytes(self) -> u64 {
        (self.0 / 8 / 500).max(128 << 10)
    }

    /// clap parser: `10gbit`, `500mbit`, `1.5gbit`, `100kbit`, `2tbit` or plain bits per
    /// second. Byte units (`mbps`, tc's megabytes per second) are refused as ambiguous.
    pub fn parse(s: &str) -> std::result::Result<Rate, String> {
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let scale: f64 = match unit {
            "" | "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            _ if unit.ends_with("bps") || unit == "b" => {
                return Err(format!("{s:?}: give the rate in bits, e.g. 10gbit or 500mbit"))
            }
            _ => return Err(format!("{s:?} is not a rate: use e.g. 10gbit, 500mbit, 100kbit")),
        };
        match num.parse::<f64>() {
            Ok(v) if v.is_finite() && v * scale >= 8_000.0 && v * scale <= 1e15 => {
                Ok(Rate((v * scale) as u64))
            }
            Ok(_) => Err(format!("{s:?} is out of range 8kbit..=1000tbit")),
            Err(_) => Err(format!("{s:?} is not a rate: use e.g. 10gbit, 500mbit, 100kbit")),
        }
    }
}

impl fmt::Display for Rate {
    /// The shortest exact form: `10gbit`, `1500mbit`, `123456bit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, unit) in
            [(1_000_000_000_000, "tbit"), (1_000_000_000, "gbit"), (1_000_000, "mbit"), (1_000, "kbit")]
        {
            if self.0 / div * div == self.0 {
                return write!(f, "{}{unit}", self.0 / div);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

/// Fail unless this process runs as root (namespaces, veths and qdiscs need CAP_NET_ADMIN
/// and CAP_SYS_ADMIN). `what` names the feature, e.g. `--netns`.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    check_root(what, unsafe { libc::geteuid() })
}

fn check_root(what: &str, euid: u32) -> Result<()> {
    if euid == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what} needs root: it creates network namespaces with `ip netns` (running as uid {euid}; \
             run as root, e.g. with sudo)"
        )
        .into())
    }
}

/// Run `program args…` (iproute2) and return its stdout; a failure quotes the command and its
/// stderr. Call it from a thread in the original namespace: a child inherits the caller's.
pub fn command(program: &str, args: &[&str]) -> Result<String> {
    let shown = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound { " (is iproute2 installed?)" } else { "" };
            Error::from(format!("cannot run `{shown}`: {}{hint}", describe(&e)))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let why = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
        return Err(format!("`{shown}` failed ({}){why}", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`.
pub fn ip(args: &[&str]) -> Result<String> {
    command("ip", args)
}

/// A named network namespace, held open so that threads can enter it.
#[derive(Debug)]
pub struct Ns {
    name: String,
    file: File,
    /// Unique in this process (inode numbers of namespaces can be reused).
    id: u64,
}

thread_local! {
    /// The [`Ns::id`] the calling thread last entered.
    static ENTERED: Cell<Option<u64>> = const { Cell::new(None) };
}

impl Ns {
    fn open(name: &str) -> Result<Ns> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut last = None;
        for dir in ["/run/netns", "/var/run/netns"] {
            match File::open(format!("{dir}/{name}")) {
                Ok(file) => {
                    return Ok(Ns {
                        name: name.to_string(),
                        file,
                        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.expect("two paths were tried");
        Err(format!("cannot open network namespace {name} (/run/netns/{name}): {}", describe(&e)).into())
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Move the calling thread into this namespace (a no-op if it is already there): sockets
    /// it creates from now on, and threads it spawns, live in the namespace.
    pub fn enter(&self) -> Result<()> {
        if ENTERED.with(Cell::get) == Some(self.id) {
            return Ok(());
        }
        // SAFETY: the fd is a namespace file kept open by `self.file`; setns only changes the
        // calling thread's network namespace.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(
                format!("cannot enter network namespace {}: setns: {}", self.name, describe(&e)).into()
            );
        }
        ENTERED.with(|c| c.set(Some(self.id)));
        Ok(())
    }

    /// Run `f` on a new thread inside this namespace and return its result (a panic in `f`
    /// is resumed on the caller).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(s, || self.enter().map(|()| f()))
                .map_err(|e| Error::from(format!("cannot start a thread: {}", describe(&e))))?;
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// The shape of a [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Two namespaces joined by a veth pair.
    Veth,
    /// One namespace with only `lo`: both ends use 127.0.0.1 and 127.0.0.2.
    Loopback,
}

/// Network namespaces created for one run, removed on drop.
pub struct Topology {
    kind: Kind,
    client: Arc<Ns>,
    server: Arc<Ns>,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    /// The client's device (veth end or `lo`).
    client_dev: String,
    rate: Option<Rate>,
    /// Last, so the namespace files are closed before the names are removed.
    _names: Registered,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Device names of the veth pair; each lives only inside its own namespace.
const VETH_CLIENT: &str = "nc-veth-a";
const VETH_SERVER: &str = "nc-veth-b";

/// Highest number of extra MPTCP subflows a namespace accepts (the kernel's
/// `MPTCP_PM_ADDR_MAX`).
pub const MPTCP_MAX_EXTRA_SUBFLOWS: usize = 8;

impl Topology {
    /// Namespaces `nc-a-<pid>-<n>` (client, `10.X.Y.1/24`) and `nc-b-<pid>-<n>` (server,
    /// `10.X.Y.2/24`) joined by a veth pair; with `rate`, a `tbf` qdisc on both veth ends.
    pub fn veth_pair(rate: Option<Rate>) -> Result<Topology> {
        require_root("--netns")?;
        let (pid, seq) = (std::process::id(), next_seq());
        let [x, y] = subnet_of(pid);
        let a = format!("nc-a-{pid}-{seq}");
        let b = format!("nc-b-{pid}-{seq}");
        let mut names = Registered::new()?;
        let client_ip = Ipv4Addr::new(10, x, y, 1);
        let server_ip = Ipv4Addr::new(10, x, y, 2);
        names.create(&a)?;
        names.create(&b)?;
        // Both ends are created inside their namespaces: nothing appears in ours.
        ip(&[
            "link",
            "add",
            VETH_CLIENT,
            "netns",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            VETH_SERVER,
            "netns",
            &b,
        ])?;
        for (ns, dev, addr) in [(&a, VETH_CLIENT, client_ip), (&b, VETH_SERVER, server_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            if let Some(r) = rate {
                let (rate, burst) = (format!("{}bit", r.bits_per_sec()), r.burst_bytes().to_string());
                let args =
                    ["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst];
                command("tc", &[&args[..], &["latency", "50ms"]].concat())?;
            }
        }
        Ok(Topology {
            kind: Kind::Veth,
            client: Arc::new(Ns::open(&a)?),
            server: Arc::new(Ns::open(&b)?),
            client_ip,
            server_ip,
            client_dev: VETH_CLIENT.to_string(),
            rate,
            _names: names,
        })
    }

    /// One namespace `nc-m-<pid>-<n>` with only `lo` up: the client is 127.0.0.1, the server
    /// 127.0.0.2, as on the machine's loopback, but per-namespace settings are private.
    pub fn loopback() -> Result<Topology> {
        require_root("a private loopback namespace")?;
        let name = format!("nc-m-{}-{}", std::process::id(), next_seq());
        let mut names = Registered::new()?;
        names.create(&name)?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        let ns = Arc::new(Ns::open(&name)?);
        Ok(Topology {
            kind: Kind::Loopback,
            client: ns.clone(),
            server: ns,
            client_ip: Ipv4Addr::new(127, 0, 0, 1),
            server_ip: Ipv4Addr::new(127, 0, 0, 2),
            client_dev: "lo".to_string(),
            rate: None,
            _names: names,
        })
    }

    /// Which shape this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The client's namespace (`nc-a-…`, or the only one).
    pub fn client_ns(&self) -> &Arc<Ns> {
        &self.client
    }

    /// The server's namespace (`nc-b-…`, or the only one).
    pub fn server_ns(&self) -> &Arc<Ns> {
        &self.server
    }

    /// The client's address inside its namespace.
    pub fn client_ip(&self) -> IpAddr {
        IpAddr::V4(self.client_ip)
    }

    /// The server's address inside its namespace.
    pub fn server_ip(&self) -> IpAddr {
        IpAddr::V4(self.server_ip)
    }

    /// The veth rate limit, if any.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// Configure the in-kernel MPTCP path manager so that a connection from the client to the
    /// server opens `extra` subflows beside its initial one: limits on both sides, and on the
    /// client `extra` more addresses (10.X.Y.11…, or 127.0.0.3… on `lo`) as `subflow`
    /// endpoints. Returns those addresses.
    pub fn configure_mptcp(&self, extra: usize) -> Result<Vec<IpAddr>> {
        if extra > MPTCP_MAX_EXTRA_SUBFLOWS {
            return Err(
                format!("at most {MPTCP_MAX_EXTRA_SUBFLOWS} extra MPTCP subflows are possible").into()
            );
        }
        let n = extra.to_string();
        let mut sides = vec![self.client.name()];
        if self.kind == Kind::Veth {
            sides.push(self.server.name());
        }
        for ns in sides {
            ip(&["-n", ns, "mptcp", "limits", "set", "subflows", &n, "add_addr_accepted", &n])?;
        }
        let [a, b, c, _] = self.client_ip.octets();
        let mut addrs = Vec::with_capacity(extra);
        for i in 0..extra as u8 {
            let addr = match self.kind {
                Kind::Veth => Ipv4Addr::new(a, b, c, 11 + i),
                Kind::Loopback => Ipv4Addr::new(127, 0, 0, 3 + i),
            };
            let ns = self.client.name();
            if self.kind == Kind::Veth {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", &self.client_dev])?;
            }
            let addr_s = addr.to_string();
            ip(&["-n", ns, "mptcp", "endpoint", "add", &addr_s, "dev", &self.client_dev, "subflow"])?;
            addrs.push(IpAddr::V4(addr));
        }
        Ok(addrs)
    }

    /// "namespaces nc-a-1-0 (10.64.1.1) and nc-b-1-0 (10.64.1.2), veth, tbf 1gbit".
    pub fn describe(&self) -> String {
        match self.kind {
            Kind::Loopback => format!("namespace {} (lo)", self.client.name()),
            Kind::Veth => {
                let rate = self.rate.map(|r| format!(", tbf {r}")).unwrap_or_default();
                format!(
                    "namespaces {} ({}) and {} ({}), veth{rate}",
                    self.client.name(),
                    self.client_ip,
                    self.server.name(),
                    self.server_ip
                )
            }
        }
    }
}

/// `[X, Y]` of the subnet 10.X.Y.0/24 for process `pid`: X in 64..=191, Y the low byte.
fn subnet_of(pid: u32) -> [u8; 2] {
    [64 + ((pid >> 8) & 0x7f) as u8, (pid & 0xff) as u8]
}

fn next_seq() -> usize {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Namespaces this value created and removes on drop; the signal cleanup thread removes
/// every name in [`LIVE`] if the process is interrupted first.
struct Registered(Vec<String>);

/// Every [`Registered`] name of this process.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl Registered {
    fn new() -> Result<Registered> {
        install_signal_cleanup()?;
        Ok(Registered(Vec::new()))
    }

    /// `ip netns add name`, registered first so that an interruption mid-way removes it; if
    /// the command fails the name is not ours and is forgotten again.
    fn create(&mut self, name: &str) -> Result<()> {
        let live = || LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live().push(name.to_string());
        match ip(&["netns", "add", name]) {
            Ok(_) => {
                self.0.push(name.to_string());
                Ok(())
            }
            Err(e) => {
                live().retain(|n| n != name);
                Err(e)
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("netchannel: warning: could not remove network namespace {name}: {e}");
            }
        }
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| !self.0.contains(n));
    }
}

/// Write end of the pipe that wakes the cleanup thread; -1 until installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNALS_SEEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe only: a second signal while cleaning up exits at once.
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) > 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    let byte = sig as u8;
    // SAFETY: write is async-signal-safe; the buffer is one valid byte.
    unsafe { libc::write(WAKE_FD.load(Ordering::SeqCst), (&byte as *const u8).cast(), 1) };
}

/// Once per process: a thread that removes every registered namespace and exits with
/// `128 + signal` when SIGINT, SIGTERM or SIGHUP arrives.
fn install_signal_cleanup() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED.get_or_init(install).clone().map_err(Error::from)
}

fn install() -> std::result::Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot create a pipe: {}", describe(&io::Error::last_os_error())));
    }
    let [read_fd, write_fd] = fds;
    WAKE_FD.store(write_fd, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("netns-cleanup".into())
        .spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: reads one byte into `byte` from the pipe this thread owns.
                let n = unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return; // the pipe is gone: nothing will wake us
            }
            let names: Vec<String> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for name in &names {
                let _ = ip(&["netns", "del", name]);
            }
            if !names.is_empty() {
                eprintln!("\nnetchannel: interrupted; removed network namespaces {}", names.join(", "));
            }
            std::process::exit(128 + byte as i32);
        })
        .map_err(|e| format!("cannot start the namespace cleanup thread: {}", describe(&e)))?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well formed;
        // the handler only does async-signal-safe work.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "cannot install a signal handler: {}",
                describe(&io::Error::last_os_error())
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bits() {
        assert_eq!(Rate::parse("10gbit"), Ok(Rate(10_000_000_000)));
        assert_eq!(Rate::parse("1.5Gbit"), Ok(Rate(1_500_000_000)));
        assert_eq!(Rate::parse("500mbit"), Ok(Rate(500_000_000)));
        assert_eq!(Rate::parse("100kbit"), Ok(Rate(100_000)));
        assert_eq!(Rate::parse("1000000"), Ok(Rate(1_000_000)));
        assert!(Rate::parse("10gbps").unwrap_err().contains("bits"));
        assert!(Rate::parse("fast").is_err());
        assert!(Rate::parse("1bit").is_err());
        assert!(Rate::parse("").is_err());
    }

    #[test]
    fn rates_print_in_their_shortest_exact_form() {
        assert_eq!(Rate(10_000_000_000).to_string(), "10gbit");
        assert_eq!(Rate(1_500_000_000).to_string(), "1500mbit");
        assert_eq!(Rate(123_456).to_string(), "123456bit");
    }

    #[test]
    fn burst_holds_two_milliseconds_and_a_gso_packet() {
        assert_eq!(Rate(10_000_000_000).burst_bytes(), 2_500_000);
        assert_eq!(Rate(1_000_000_000).burst_bytes(), 250_000);
        assert_eq!(Rate(10_000_000).burst_bytes(), 128 << 10);
    }

    #[test]
    fn root_is_required_and_the_error_says_so() {
        assert!(check_root("--netns", 0).is_ok());
        let e = check_root("--netns", 1000).unwrap_err().to_string();
        assert!(e.starts_with("--netns needs root"), "{e}");
        assert!(e.contains("uid 1000"), "{e}");
    }

    #[test]
    fn subnets_stay_in_10_slash_8_and_differ_by_pid() {
        assert_eq!(subnet_of(0), [64, 0]);
        assert_eq!(subnet_of(0x7fff), [191, 0xff]);
        assert_ne!(subnet_of(1234), subnet_of(1235));
    }

    #[test]
    fn a_failing_command_is_quoted_with_its_stderr() {
        let e = command("sh", &["-c", "echo nope >&2; exit 3"]).unwrap_err().to_string();
        assert!(e.starts_with("`sh -c echo nope >&2; exit 3` failed ("), "{e}");
        assert!(e.ends_with(": nope"), "{e}");
        let e = command("no-such-program-nc", &[]).unwrap_err().to_string();
        assert!(e.contains("iproute2"), "{e}");
    }
}
