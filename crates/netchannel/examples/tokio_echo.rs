//! A tokio echo server and client over vsockets.
//!
//! `cargo run -p netchannel --features tokio --example tokio_echo` starts two NetChannel
//! hosts in this process (on 127.0.0.1 and 127.0.0.2), an echo server on the second, and
//! `CLIENTS` (default 16) concurrent clients on the first, each sending messages of random
//! sizes and checking that every byte comes back.
//!
//! With arguments it runs one side on the process-wide host (`NETCHANNEL_CONFIG`):
//! `… --example tokio_echo -- server 7000` and `… --example tokio_echo -- client 127.0.0.1:7000`.

use netchannel::tokio::{VListener, VStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(listener: VListener) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            if let Err(e) = tokio::io::copy(&mut rd, &mut wr).await {
                eprintln!("echo for {peer}: {e}");
            }
        });
    }
}

/// Send `rounds` messages of pseudo-random sizes and check each echo.
async fn client(mut s: VStream, seed: u64, rounds: usize) -> std::io::Result<usize> {
    let mut x = seed | 1;
    let mut total = 0;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % 20_000) as usize;
        let msg: Vec<u8> = (0..len).map(|i| (x as usize + i) as u8).collect();
        s.write_all(&msg).await?;
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).await?;
        assert_eq!(back, msg, "the echo differs");
        total += len;
    }
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    assert!(rest.is_empty());
    Ok(total)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => {
            let port = args.get(1).map_or("7000", String::as_str);
            let l = VListener::bind(format!("0.0.0.0:{port}")).await?;
            println!("echo server on {}", l.local_addr()?);
            return serve(l).await;
        }
        Some("client") => {
            let addr = args.get(1).map_or("127.0.0.1:7000", String::as_str);
            let n = client(VStream::connect(addr).await?, 7, 100).await?;
            println!("{n} bytes echoed by {addr}");
            return Ok(());
        }
        Some(other) => {
            eprintln!("usage: tokio_echo [server PORT | client ADDR] (not {other:?})");
            std::process::exit(2);
        }
        None => {}
    }
    let clients: usize = std::env::var("CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let (a, b) = two_hosts()?;
    let listener = VListener::from_std(b.bind(0)?)?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener));
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let s = VStream::connect_with(&a, addr).await?;
        tasks.push(tokio::spawn(client(s, i as u64 + 1, 50)));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client task")?;
    }
    println!(
        "{clients} clients: {total} bytes echoed over vsockets to {addr} in {:.1?}, all verified",
        start.elapsed()
    );
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
