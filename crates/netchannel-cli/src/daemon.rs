//! `netchannel up` (the per-host daemon, in the foreground) and `netchannel status`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::Args;
use netchannel::daemon::{Client, Server};
use netchannel::Config;
use serde_json::Value;

use crate::error::{Context, Result};

/// `netchannel up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// TOML configuration file (docs/config.md); the `[daemon]` table configures the daemon
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket for apps (overrides `[daemon] socket` and NETCHANNEL_SOCKET)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Address to accept channels on (overrides `listen`)
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Log lines as text or as one JSON object per line (for log shippers); NETCHANNEL_LOG or
    /// RUST_LOG filter them (default info)
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
}

/// `netchannel status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// TOML configuration file naming the daemon's socket
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's Unix socket (overrides the config and NETCHANNEL_SOCKET)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the daemon's state as one JSON object
    #[arg(long)]
    json: bool,
}

/// `netchannel fault`.
#[derive(clap::Subcommand, Debug)]
pub enum Fault {
    /// Ask the daemon to abort one channel to a peer (its TCP connection is shut down), as a
    /// failure would: no vsocket may lose or duplicate a byte
    KillChannel(KillChannelArgs),
}

/// `netchannel fault kill-channel`.
#[derive(Args, Debug)]
pub struct KillChannelArgs {
    /// The peer host's channel address (IP:PORT, as `netchannel status` lists it)
    #[arg(long)]
    peer: std::net::SocketAddr,
    /// Index of the channel within its class
    #[arg(long, default_value_t = 0)]
    index: u16,
    /// Class of the channel: throughput or latency
    #[arg(long, default_value = "throughput", value_parser = ["throughput", "latency"])]
    class: String,
    /// TOML configuration file naming the daemon's socket
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's Unix socket (overrides the config and NETCHANNEL_SOCKET)
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// Inject a fault through the daemon.
pub fn fault(f: &Fault) -> Result<()> {
    match f {
        Fault::KillChannel(a) => {
            let cfg = load(&a.config, &a.socket)?;
            let class =
                if a.class == "latency" { netchannel::Class::Latency } else { netchannel::Class::Throughput };
            let client = Client::from_config(&cfg).context(|| "fault kill-channel".to_string())?;
            client
                .kill_channel(a.peer, class, a.index)
                .context(|| format!("cannot kill {} channel {} to {}", a.class, a.index, a.peer))?;
            eprintln!("netchannel: killed {} channel {} to {}", a.class, a.index, a.peer);
            Ok(())
        }
    }
}

/// The configuration of `--config` (or the defaults), with `--socket` applied: the flag wins
/// over the file and over `NETCHANNEL_SOCKET`.
fn load(config: &Option<PathBuf>, socket: &Option<PathBuf>) -> Result<Config> {
    let mut cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = socket {
        cfg.daemon.socket = Some(s.clone());
        std::env::remove_var("NETCHANNEL_SOCKET");
    }
    Ok(cfg)
}

/// Write end of the pipe SIGINT and SIGTERM are reported on (-1 until `up` makes it).
static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop(_sig: libc::c_int) {
    let fd = STOP_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) of one live byte is async-signal-safe; a full pipe means a stop
        // is reported already.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// Run the daemon until SIGINT or SIGTERM.
pub fn up(args: &UpArgs) -> Result<()> {
    let mut cfg = load(&args.config, &args.socket)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    // The handler writes a byte to a pipe; a thread waiting on it stops the server.
    let mut pipe = [-1; 2];
    // SAFETY: pipe2 fills two descriptors, which are ours from here on.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context(|| "cannot make the daemon's stop pipe".to_string());
    }
    // SAFETY: both descriptors were just made and are owned by nothing else.
    let (stop_read, stop_write) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    STOP_PIPE.store(stop_write.as_raw_fd(), Ordering::SeqCst);
    // SAFETY: the handler only loads an atomic and writes to a pipe, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    raise_fd_limit();
    let server = Server::start(cfg).context(|| "cannot start the daemon".to_string())?;
    tracing::info!(
        apps = %server.socket().display(),
        channels = %server.channel_addr(),
        pid = std::process::id(),
        "daemon up"
    );
    let stopper = server.stopper();
    std::thread::Builder::new()
        .name("nc-signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            // Blocking read until a signal is reported (EINTR: the handler ran, read again).
            loop {
                // SAFETY: reads one byte into a live buffer from our own pipe.
                let n = unsafe { libc::read(stop_read.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    break;
                }
            }
            stopper.stop();
        })
        .context(|| "cannot start the daemon's signal thread".to_string())?;
    let res = server.run().context(|| "daemon".to_string());
    STOP_PIPE.store(-1, Ordering::SeqCst);
    drop(stop_write);
    res?;
    Ok(())
}

/// Raise the soft descriptor limit to the hard one: the daemon's own caps (`[daemon] max_*`)
/// should bind before `RLIMIT_NOFILE` does, and the soft limit is often a low 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(
                    from = soft,
                    to = lim.rlim_max,
                    "raised the descriptor limit (RLIMIT_NOFILE)"
                );
            }
        }
    }
}

/// Print the daemon's state. One request on one connection, so that a daemon out of
/// descriptors still answers it.
pub fn status(args: &StatusArgs) -> Result<()> {
    let cfg = load(&args.config, &args.socket)?;
    let path = cfg.daemon.socket_path().context(|| "status".to_string())?;
    let st = Client::status_of(&path).context(|| "status".to_string())?;
    if args.json {
        println!("{st}");
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The human form of a status object.
fn render(st: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let d = &st["daemon"];
    let _ = writeln!(
        o,
        "daemon pid {}  socket {}  channels on {}  up {:.0} s  {}",
        s(&d["pid"]),
        s(&d["socket"]),
        s(&d["listen"]),
        d["uptime_s"].as_f64().unwrap_or(0.0),
        if d["authenticated"].as_bool() == Some(true) { "authenticated" } else { "unauthenticated channels" }
    );
    let w = &st["workers"];
    let _ = writeln!(
        o,
        "workers: {} channel, {} latency, {} copy",
        s(&w["channel_workers"]),
        s(&w["latency_workers"]),
        s(&w["copy_workers"])
    );
    let t = &st["totals"];
    let _ = writeln!(
        o,
        "totals: {} vsockets opened ({} open), {} bytes sent, {} bytes received, {} channels refused, {} bad frames, {} channels redialed, {} peers lost, {} clients refused, {} disconnected",
        s(&t["vsockets_opened"]),
        s(&t["vsockets_open"]),
        s(&t["bytes_sent"]),
        s(&t["bytes_received"]),
        s(&t["channels_refused"]),
        s(&t["bad_frames"]),
        s(&t["channels_redialed"]),
        s(&t["peers_lost"]),
        s(&t["clients_refused"]),
        s(&t["clients_disconnected"])
    );
    let l = &st["limits"];
    let _ = writeln!(
        o,
        "limits: {} connections ({} per process), {} vsockets per process, ring memory {} of {} bytes pinned ({} per process); {} requests refused at a limit",
        s(&l["max_connections"]),
        s(&l["max_connections_per_process"]),
        s(&l["max_vsockets_per_process"]),
        s(&l["buffer_pinned"]),
        s(&l["max_buffer"]),
        s(&l["max_buffer_per_process"]),
        s(&t["limits_refused"])
    );
    let _ = writeln!(o, "\npeers:");
    for p in st["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<22} {} throughput + {} latency channels",
            s(&p["address"]),
            s(&p["throughput_channels"]),
            s(&p["latency_channels"])
        );
    }
    let _ = writeln!(
        o,
        "\nchannels:\n  {:<22} {:<10} {:>3} {:>6} {:>14} {:>14} {:>10} {:>10} {:>8}",
        "peer", "class", "idx", "worker", "bytes out", "bytes in", "frames out", "frames in", "queued"
    );
    for c in st["channels"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<22} {:<10} {:>3} {:>6} {:>14} {:>14} {:>10} {:>10} {:>8}",
            s(&c["peer"]),
            s(&c["class"]),
            s(&c["index"]),
            s(&c["worker"]),
            s(&c["bytes_sent"]),
            s(&c["bytes_received"]),
            s(&c["frames_sent"]),
            s(&c["frames_received"]),
            s(&c["queued_bytes"])
        );
    }
    let _ = writeln!(o, "\nqueues per class (bytes/frames waiting in our queues; kernel unsent bytes):");
    for q in st["class_queues"].as_array().into_iter().flatten() {
        let lane = |l: &str| format!("{}/{}", s(&q["queue"][l]["bytes"]), s(&q["queue"][l]["frames"]));
        let _ = writeln!(
            o,
            "  {:<10} {} channels  control {}  latency {}  bulk {}  kernel {}",
            s(&q["class"]),
            s(&q["channels"]),
            lane("control"),
            lane("latency"),
            lane("bulk"),
            s(&q["kernel_unsent_bytes"])
        );
    }
    let _ = writeln!(
        o,
        "\nvsockets:\n  {:>6} {:>7} {:<22} {:<22} {:<10} {:>14} {:>14}  state",
        "id", "pid", "local", "remote", "class", "bytes out", "bytes in"
    );
    for v in st["vsockets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:>6} {:>7} {:<22} {:<22} {:<10} {:>14} {:>14}  {}",
            s(&v["id"]),
            s(&v["pid"]),
            s(&v["local"]),
            s(&v["remote"]),
            s(&v["class"]),
            s(&v["bytes_sent"]),
            s(&v["bytes_received"]),
            s(&v["state"])
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let st = serde_json::json!({
            "daemon": {"pid": 7, "socket": "/tmp/s", "listen": "127.0.0.1:9000", "uptime_s": 3.0, "authenticated": false},
            "workers": {"channel_workers": 2, "latency_workers": 1, "copy_workers": 1},
            "peers": [{"address": "127.0.0.2:9000", "throughput_channels": 4, "latency_channels": 1}],
            "channels": [{"peer": "127.0.0.2:9000", "class": "throughput", "index": 0, "worker": 1,
                          "bytes_sent": 10, "bytes_received": 20, "frames_sent": 1, "frames_received": 2, "queued_bytes": 0}],
            "vsockets": [{"id": 3, "pid": 42, "local": "127.0.0.1:32768", "remote": "127.0.0.2:7000",
                          "class": "latency", "bytes_sent": 5, "bytes_received": 6, "state": "open"}],
            "class_queues": [{"class": "latency", "channels": 1, "kernel_unsent_bytes": 0,
                              "queue": {"control": {"bytes": 0, "frames": 0}, "latency": {"bytes": 96, "frames": 2},
                                        "bulk": {"bytes": 0, "frames": 0}}}],
            "totals": {"vsockets_opened": 1, "vsockets_open": 1, "bytes_sent": 5, "bytes_received": 6,
                       "channels_refused": 0, "clients_refused": 0, "clients_disconnected": 0, "limits_refused": 2},
            "limits": {"max_connections": 1024, "max_connections_per_process": 256, "max_vsockets_per_process": 4096,
                       "max_buffer_per_process": 4096000, "max_buffer": 8192000, "buffer_pinned": 8392704}
        });
        let out = render(&st);
        for needle in [
            "unauthenticated",
            "127.0.0.2:9000",
            "4 throughput + 1 latency",
            "127.0.0.2:7000",
            "latency",
            "open",
            "limits: 1024 connections (256 per process), 4096 vsockets per process, ring memory 8392704 of 8192000",
            "2 requests refused at a limit",
        ] {
            assert!(out.contains(needle), "{needle} missing from\n{out}");
        }
    }
}
