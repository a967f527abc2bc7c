//! An HTTP server and client with hyper 1.x over vsockets (hyper-util's `TokioIo`).
//!
//! `cargo run -p netchannel --features tokio --example hyper_http` starts two NetChannel
//! hosts in this process (on 127.0.0.1 and 127.0.0.2), an HTTP/1.1 server on the second
//! that answers `GET /` with a greeting and echoes the body of a `POST /echo`, and a client
//! on the first that makes both requests, the second with a 1 MiB body, and checks them.
//!
//! With arguments it runs one side on the process-wide host (`NETCHANNEL_CONFIG`):
//! `… --example hyper_http -- server 8080` and `… --example hyper_http -- client 127.0.0.1:8080`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netchannel::tokio::{VListener, VStream};

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => Response::new(Full::new(Bytes::from_static(b"hello over NetChannel\n"))),
        (&Method::POST, "/echo") => Response::new(Full::new(req.into_body().collect().await?.to_bytes())),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    })
}

async fn serve(listener: VListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            if let Err(e) = conn.await {
                eprintln!("http connection: {e}");
            }
        });
    }
}

async fn client(stream: VStream, authority: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("http client connection: {e}");
        }
    });
    let req = Request::get("/").header("host", authority).body(Full::<Bytes>::default())?;
    let res = send.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!("GET / -> {status}: {}", String::from_utf8_lossy(&body).trim_end());
    assert_eq!(status, StatusCode::OK);

    let payload: Bytes = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>().into();
    let req = Request::post("/echo").header("host", authority).body(Full::new(payload.clone()))?;
    let res = send.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, payload, "the echoed body differs");
    println!("POST /echo with {} bytes -> {status}, body verified", payload.len());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => {
            let port = args.get(1).map_or("8080", String::as_str);
            let l = VListener::bind(format!("0.0.0.0:{port}")).await?;
            println!("HTTP server on {}", l.local_addr()?);
            serve(l).await?;
            return Ok(());
        }
        Some("client") => {
            let addr = args.get(1).map_or("127.0.0.1:8080", String::as_str);
            return client(VStream::connect(addr).await?, addr).await;
        }
        Some(other) => {
            eprintln!("usage: hyper_http [server PORT | client ADDR] (not {other:?})");
            std::process::exit(2);
        }
        None => {}
    }
    let (a, b) = two_hosts()?;
    let listener = VListener::from_std(b.bind(0)?)?;
    let addr = listener.local_addr()?;
    println!("HTTP server on vsocket {addr}");
    tokio::spawn(serve(listener));
    client(VStream::connect_with(&a, addr).await?, &addr.to_string()).await
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
