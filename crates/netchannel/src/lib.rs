//! NetChannel: a user-space disaggregated host network stack.
//!
//! One application byte stream (a *vsocket*, [`VStream`]) is cut into segments that the
//! *NetDriver* spreads over many *network channels* — long-lived TCP connections to the
//! peer host, served by a pool of channel workers — and reassembled by offset at the other
//! end. Large reads and writes are copied by several copy workers in parallel. Channels,
//! channel workers and copy workers are independent knobs ([`Config`]).
//!
//! Layers, by module:
//! * [`vsock`]: the virtual socket layer (`VStream`, `VListener`), with [`ring`] and [`copy`];
//! * [`engine`]: the host engine: NetDriver per peer, channels and their workers;
//! * [`proto`]: the sans-IO protocol core (stream state, credit, reassembly, scheduler);
//! * [`wire`]: the frame codec; [`config`]: the TOML configuration.
//!
//! Logging: the library never prints. It emits [`tracing`](https://docs.rs/tracing) events
//! (warnings such as a refused channel or a peer whose every channel went down, information
//! such as a channel that came back) inside spans named `channel`, `peer`, `vsocket` and
//! `client` (a daemon's client process) whose fields are addresses and ids. A program decides
//! where they go by installing a subscriber; without one nothing is printed. The spans are at
//! the `ERROR` level so that any filter that lets an event through keeps its context; they
//! are only created on rare paths (a handshake, a channel lost, a daemon client), never per
//! frame.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use netchannel::{Config, Host};
//!
//! // Two hosts in one process, on two loopback addresses.
//! let mut a = Config::default();
//! a.listen = "127.0.0.1:9000".parse().unwrap();
//! let mut b = a.clone();
//! b.listen = "127.0.0.2:9000".parse().unwrap();
//! let (ha, hb) = (netchannel::Host::start(a)?, Host::start(b)?);
//! let listener = hb.bind(7000)?;
//! let mut client = ha.connect("127.0.0.2:7000".parse().unwrap())?;
//! let (mut server, _) = listener.accept()?;
//! client.write_all(b"ping")?;
//! let mut buf = [0u8; 4];
//! server.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//! # Ok::<(), std::io::Error>(())
//! ```

pub mod config;
pub mod copy;
pub mod daemon;
pub mod engine;
pub(crate) mod placement;
pub mod proto;
pub(crate) mod readiness;
pub mod ring;
pub mod shm;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod vsock;
pub mod wire;

pub use config::{Config, ConfigError, DaemonConfig, Deployment, Policy, PreloadConfig, PreloadDatapath};
pub use engine::{ChannelStats, ClassQueue, Host, HostStats, LaneDepths};
pub use proto::sched::Depth;
pub use vsock::{VListener, VStream};
pub use wire::Class;
