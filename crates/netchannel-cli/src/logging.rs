//! Where the library's `tracing` events go: the binary's one subscriber. The `netchannel`
//! library only emits events (with spans for channels, peers, vsockets and daemon clients);
//! this module decides that they are printed on stderr, with timestamps, filtered by
//! `NETCHANNEL_LOG` (or else `RUST_LOG`) as an `EnvFilter` (`warn`, `info`,
//! `netchannel::engine=debug`, …), as text or, for `netchannel up --log-format json`, as one
//! JSON object per line for log shippers.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::error::{Error, Result};

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, spans, target, message, fields
    #[default]
    Text,
    /// One JSON object per event (timestamp, level, fields, target, spans)
    Json,
}

/// The filter: `NETCHANNEL_LOG`, else `RUST_LOG`, else `default` (a directive such as `warn`).
fn filter(default: &str) -> Result<EnvFilter> {
    for var in ["NETCHANNEL_LOG", "RUST_LOG"] {
        if let Ok(spec) = std::env::var(var) {
            if spec.trim().is_empty() {
                continue;
            }
            return EnvFilter::try_new(&spec).map_err(|e| {
                Error::from(format!(
                    "{var}={spec:?} is not a log filter ({e}); use a level (error, warn, info, debug, trace) \
                     or directives such as netchannel::engine=debug"
                ))
            });
        }
    }
    Ok(EnvFilter::new(default))
}

/// Install the process's subscriber: events at or above the filter go to stderr in `format`.
pub fn init(format: LogFormat, default: &str) -> Result<()> {
    let filter = filter(default)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
    installed.map_err(|e| Error::from(format!("cannot install the log subscriber: {e}")))
}
