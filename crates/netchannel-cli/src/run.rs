//! `netchannel run -- PROGRAM ARGS…`: run an unmodified program with the preload shim
//! (`libnetchannel_preload.so`, crate `netchannel-preload`) so that its TCP sockets become
//! vsockets served by the local daemon.
//!
//! Before it replaces itself with the program (`exec`), `run` checks what the shim could not
//! fix later: a program it cannot serve (statically linked) runs unchanged on kernel TCP.
//! A program linked with io_uring keeps its vsockets: io_uring is decided per socket
//! operation (one that bypasses the shim on a vsocket resets it, with one line in the
//! daemon's log naming the program and fd), and so does every program when no daemon answers (after one
//! warning line; `[preload] require_daemon = true` makes that an error).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use clap::Args;
use netchannel::daemon::Client;
use netchannel::Config;

use crate::error::{Context, Error, Result};

/// The preload library's file name.
pub const LIBRARY: &str = "libnetchannel_preload.so";

/// `netchannel run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML configuration file: `[daemon] socket` names the daemon, `[preload]` says which
    /// sockets become vsockets (docs/config.md)
    #[arg(long)]
    config: Option<PathBuf>,
    /// The program and its arguments (after `--`)
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    program: Vec<OsString>,
}

fn say(msg: &str) {
    eprintln!("netchannel run: {msg}");
}

/// Where the preload library is: `[preload] library`, `NETCHANNEL_PRELOAD_LIB`, or next to
/// this binary (also `../lib/netchannel/`). A library named by the config or the environment
/// must be there: the loader would only warn and run the program without it.
fn library(cfg: &Config) -> Result<PathBuf> {
    let named = match (&cfg.preload.library, std::env::var_os("NETCHANNEL_PRELOAD_LIB")) {
        (Some(l), _) => Some((l.clone(), "[preload] library")),
        (None, Some(l)) => Some((l.into(), "NETCHANNEL_PRELOAD_LIB")),
        (None, None) => None,
    };
    if let Some((l, by)) = named {
        return match std::fs::metadata(&l) {
            Ok(m) if m.is_file() => Ok(l),
            Ok(_) => Err(Error::from(format!("the preload library {} ({by}) is not a file", l.display()))),
            Err(e) => Err(Error::from(format!("cannot use the preload library {} ({by}): {e}", l.display()))),
        };
    }
    let exe = std::env::current_exe().context(|| "locating the netchannel binary".to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    for cand in [dir.join(LIBRARY), dir.join("../lib/netchannel").join(LIBRARY)] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(Error::from(format!(
        "cannot find {LIBRARY} next to {} (build the whole workspace, or set [preload] library \
         or NETCHANNEL_PRELOAD_LIB)",
        exe.display()
    )))
}

/// The program's file, as `exec` would find it on `PATH`.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Why the shim cannot serve the ELF file `bytes`, if it cannot.
pub fn unservable(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return None; // A script: its interpreter is dynamically linked as a rule.
    }
    let is64 = bytes[4] == 2;
    let le = bytes[5] == 1;
    let rd = |off: usize, n: usize| -> u64 {
        let b = &bytes[off..off + n];
        let mut v = 0u64;
        for i in 0..n {
            let byte = if le { b[i] } else { b[n - 1 - i] } as u64;
            v |= byte << (8 * i);
        }
        v
    };
    let (phoff, phentsize, phnum) = if is64 {
        (rd(0x20, 8) as usize, rd(0x36, 2) as usize, rd(0x38, 2) as usize)
    } else {
        (rd(0x1c, 4) as usize, rd(0x2a, 2) as usize, rd(0x2c, 2) as usize)
    };
    let has_interp = (0..phnum).any(|i| {
        let off = phoff + i * phentsize;
        off + 4 <= bytes.len() && rd(off, 4) == 3 // PT_INTERP
    });
    if !has_interp {
        return Some("it is statically linked, so the preload library cannot be loaded into it");
    }
    None
}

/// Run the program; returns only on failure.
pub fn run(args: &RunArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => match std::env::var_os("NETCHANNEL_CONFIG") {
            Some(p) => Config::load(Path::new(&p))?,
            None => Config::default(),
        },
    };
    let program = PathBuf::from(&args.program[0]);
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&args.program[1..]);
    let name = program.display().to_string();
    let exec = |mut cmd: std::process::Command| -> Result<()> {
        let e = cmd.exec();
        Err(Error::from(format!("cannot run {name}: {e}")))
    };
    if let Some(why) = resolve(&program).and_then(|p| std::fs::read(p).ok()).and_then(|b| unservable(&b)) {
        say(&format!("{name} runs unchanged on kernel TCP: {why}"));
        return exec(cmd);
    }
    let lib = library(&cfg)?;
    if let Err(e) = Client::from_config(&cfg) {
        if cfg.preload.require_daemon {
            return Err(Error::from(format!("{e} ([preload] require_daemon is set)")));
        }
        say(&format!("{e}; {name} runs on plain TCP"));
        return exec(cmd);
    }
    if let Some(c) = &args.config {
        let abs = std::fs::canonicalize(c).unwrap_or_else(|_| c.clone());
        cmd.env("NETCHANNEL_CONFIG", abs);
    }
    let mut preload = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    cmd.env("LD_PRELOAD", preload);
    exec(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_servable_and_garbage_is_not_elf() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Rust test binaries link glibc dynamically.
        assert_eq!(unservable(&me), None);
        assert_eq!(unservable(b"#!/bin/sh\necho hi\n"), None);
    }

    #[test]
    fn a_static_elf_is_refused() {
        // An ELF64 header with no program headers at all: no PT_INTERP.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        assert!(unservable(&h).unwrap().contains("statically linked"));
    }
}
