//! Copy a file over a vsocket with the blocking API (`VStream`/`VListener`, `std::io`).
//!
//! `cargo run -p netchannel --example file_copy -- SRC DST` starts two NetChannel hosts in
//! this process (on 127.0.0.1 and 127.0.0.2), sends SRC from the first to a receiver on the
//! second, which writes DST; both sides count the bytes and the receiver compares a checksum.
//! Without arguments it copies a generated 32 MiB file inside the system's temp directory.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

/// FNV-1a over a file's bytes, to check the copy.
fn checksum(path: &PathBuf) -> io::Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut f = BufReader::new(File::open(path)?);
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h);
        }
        for &b in &buf[..n] {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn main() -> io::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (src, dst) = match args.as_slice() {
        [s, d] => (s.clone(), d.clone()),
        [] => {
            let dir = std::env::temp_dir().join(format!("netchannel-file-copy-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let src = dir.join("src.bin");
            let mut f = BufWriter::new(File::create(&src)?);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..(32 << 20) / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.write_all(&x.to_le_bytes())?;
            }
            f.flush()?;
            (src, dir.join("dst.bin"))
        }
        _ => {
            eprintln!("usage: file_copy [SRC DST]");
            std::process::exit(2);
        }
    };
    let (a, b) = two_hosts()?;
    let listener = b.bind(0)?;
    let addr = listener.local_addr()?;
    let out = dst.clone();
    let receiver = std::thread::spawn(move || -> io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut f = File::create(&out)?;
        let n = io::copy(&mut s, &mut f)?;
        f.sync_all()?;
        Ok(n)
    });
    let start = std::time::Instant::now();
    let mut s = a.connect(addr)?;
    let sent = io::copy(&mut File::open(&src)?, &mut s)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let received = receiver.join().expect("receiver thread")?;
    let took = start.elapsed();
    assert_eq!(sent, received, "bytes sent and received differ");
    let (c1, c2) = (checksum(&src)?, checksum(&dst)?);
    assert_eq!(c1, c2, "the copy's checksum differs");
    println!(
        "copied {} -> {} over vsocket {addr}: {sent} bytes in {took:.1?} ({:.2} Gbit/s), checksum {c1:016x} verified",
        src.display(),
        dst.display(),
        sent as f64 * 8.0 / took.as_secs_f64() / 1e9
    );
    if args.is_empty() {
        std::fs::remove_dir_all(src.parent().expect("temp dir"))?;
    }
    Ok(())
}

/// Two NetChannel hosts in this process on 127.0.0.1 and 127.0.0.2, with the first channel
/// port from a range (picked by the process id) that is free on both addresses.
fn two_hosts() -> std::io::Result<(netchannel::Host, netchannel::Host)> {
    let base = 30000 + (std::process::id() % 20000) as u16;
    let mut last = None;
    for port in base..base + 50 {
        let mut cfg = netchannel::Config {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            ..Default::default()
        };
        let a = match netchannel::Host::start(cfg.clone()) {
            Ok(h) => h,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 2], port));
        match netchannel::Host::start(cfg) {
            Ok(b) => return Ok((a, b)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least one port"))
}
