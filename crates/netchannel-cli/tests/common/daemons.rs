//! `netchannel up` daemons of the multi-process tests (tests/daemon.rs, tests/hostile.rs):
//! each on loopback addresses of its own, with a config file and socket in a test directory,
//! killed when dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use netchannel::daemon::Client;
use serde_json::Value;

use super::{netchannel, KillOnDrop, TempDir};

/// A daemon process, killed when dropped.
pub struct Daemon {
    pub child: KillOnDrop,
    pub socket: PathBuf,
    pub addr: SocketAddr,
    pub config: PathBuf,
    /// `RLIMIT_NOFILE` (soft and hard) to start it under, if not inherited.
    nofile: Option<u64>,
    /// The file its stderr goes to, if not inherited.
    log: Option<PathBuf>,
}

/// How to start a daemon beyond its address.
#[derive(Default)]
pub struct Opts<'a> {
    /// Config lines before its `[daemon]` table.
    pub top: &'a str,
    /// Config lines in its `[daemon]` table.
    pub table: &'a str,
    /// Its descriptor limit, soft and hard (so that `up` cannot raise it).
    pub nofile: Option<u64>,
    /// Send its stderr to `NAME.log` in the test directory (read with [`Daemon::log`]).
    pub log: bool,
}

/// Two addresses 127.b.c.1 / 127.b.c.2 and a port, distinct per call and per process.
pub fn addr_pair() -> (SocketAddr, SocketAddr) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let b = (pid % 100) as u8 + 120;
    let c = (n % 250) as u8 + 1;
    let port = 40000 + (pid % 20000) as u16;
    (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 1)), port),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, 2)), port),
    )
}

/// The byte at offset `o` of the pattern stream `seed` (verified streams).
pub fn pattern(seed: u64, o: u64) -> u8 {
    let x = (o ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8 ^ (o as u8)
}

/// A fresh test directory others may enter (0755).
pub fn dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::create_dir_all(&d.0).unwrap();
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

impl Daemon {
    /// A daemon named `name` on `listen`, with `extra` lines in its `[daemon]` table.
    pub fn start(dir: &Path, name: &str, listen: SocketAddr, extra: &str) -> Daemon {
        Daemon::start_with(dir, name, listen, &Opts { table: extra, ..Opts::default() })
    }

    /// A daemon started with `opts`.
    pub fn start_with(dir: &Path, name: &str, listen: SocketAddr, opts: &Opts) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\n{}\n[daemon]\nsocket = \"{}\"\n{}\n",
                opts.top,
                socket.display(),
                opts.table
            ),
        )
        .unwrap();
        let log = opts.log.then(|| dir.join(format!("{name}.log")));
        let mut d =
            Daemon { child: KillOnDrop(None), socket, addr: listen, config, nofile: opts.nofile, log };
        d.spawn();
        d
    }

    /// What the daemon logged so far (started with `Opts::log`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("a daemon started with Opts::log")).unwrap()
    }

    /// Start (or restart) the process and wait until it answers on its socket.
    pub fn spawn(&mut self) {
        let mut cmd = netchannel(&["up", "--config", self.config.to_str().unwrap()]);
        cmd.stdout(Stdio::null()).stderr(match &self.log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::inherit(),
        });
        if let Some(n) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = KillOnDrop(Some(cmd.spawn().expect("spawn netchannel up")));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::connect(&self.socket).is_err() {
            if let Some(st) = self.child.0.as_mut().unwrap().try_wait().unwrap() {
                panic!("netchannel up exited: {st}");
            }
            assert!(Instant::now() < deadline, "the daemon did not come up on {}", self.socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.as_ref().unwrap().id()
    }

    pub fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    pub fn status(&self) -> Value {
        Client::connect(&self.socket).unwrap().status().unwrap()
    }

    pub fn kill(&mut self) {
        let mut c = self.child.0.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}
