//! `--backend daemon`: the benchmark's two hosts are `netchannel up` daemons, child processes
//! of this one, and the benchmark's apps reach them as daemon clients (Unix socket + shared
//! memory), exactly as unmodified programs do.
//!
//! Each daemon gets the run's engine configuration (written as TOML into a temporary
//! directory, with its own socket and channel address). With `--netns` each daemon starts
//! inside its namespace (`ip netns exec`). The daemons' CPU seconds are added to this
//! process's in every report ([`crate::cpu::process_seconds`]) while they run, so that the
//! daemon path is charged for all the work it does. They are stopped (SIGTERM, then SIGKILL)
//! when the [`Daemon`] goes away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netchannel::daemon::Client;
use netchannel::Config;

use crate::error::{describe, Result};

/// One daemon process.
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    /// The daemon's client handle for this process's apps.
    pub client: Client,
}

impl Daemon {
    /// Start `netchannel up` with `config` listening for channels on `listen`, in network
    /// namespace `netns` if given; wait until it answers (at most 20 s).
    pub fn start(config: &Config, listen: SocketAddr, netns: Option<&str>) -> Result<Daemon> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("netchannel-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {}", dir.display(), describe(&e)))?;
        let socket = dir.join("daemon.sock");
        let mut cfg = config.clone();
        cfg.listen = listen;
        cfg.peer_port = Some(listen.port());
        cfg.daemon.socket = Some(socket.clone());
        let conf = dir.join("daemon.toml");
        std::fs::write(&conf, cfg.to_toml())
            .map_err(|e| format!("cannot write {}: {}", conf.display(), describe(&e)))?;
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this program: {}", describe(&e)))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("up").arg("--config").arg(&conf).stdin(Stdio::null()).stdout(Stdio::null());
        // The daemon's log goes to a file, quoted if it fails to come up.
        let log_path = dir.join("daemon.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {}", log_path.display(), describe(&e)))?;
        cmd.stderr(log).env_remove("NETCHANNEL_SOCKET");
        let mut child = cmd.spawn().map_err(|e| format!("cannot start a daemon: {}", describe(&e)))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match Client::connect(&socket) {
                Ok(c) => break c,
                Err(e) => {
                    let why = if let Ok(Some(st)) = child.try_wait() {
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        format!(
                            "the daemon for {listen} exited ({st}) before it served {}: {}",
                            socket.display(),
                            log.trim()
                        )
                    } else if Instant::now() > deadline {
                        format!(
                            "the daemon for {listen} did not come up on {}: {}",
                            socket.display(),
                            describe(&e)
                        )
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(why.into());
                }
            }
        };
        let d = Daemon { child: Some(child), dir, client };
        crate::cpu::add_child(d.pid());
        Ok(d)
    }

    /// The daemon's configuration file (what `netchannel run --config` takes to use it).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("daemon.toml")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        crate::cpu::remove_child(self.pid());
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
