//! Engine log lines on stderr, filtered by level.
//!
//! `NETCHANNEL_LOG` sets the level: `error`, `warn` (default), `info` or `debug`. Lines look
//! like `netchannel WARN: every channel to 10.0.0.2:9000 is down (…)`.

use std::sync::OnceLock;

/// Severity of a log line, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    /// Upper-case name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// The most verbose level printed.
pub fn max_level() -> Level {
    static MAX: OnceLock<Level> = OnceLock::new();
    *MAX.get_or_init(|| match std::env::var("NETCHANNEL_LOG").as_deref().map(str::to_ascii_lowercase) {
        Ok(ref s) if s == "error" => Level::Error,
        Ok(ref s) if s == "info" => Level::Info,
        Ok(ref s) if s == "debug" => Level::Debug,
        _ => Level::Warn,
    })
}

/// Print one line at `level` if enabled.
pub fn line(level: Level, msg: std::fmt::Arguments<'_>) {
    if level <= max_level() {
        eprintln!("netchannel {}: {msg}", level.name());
    }
}

/// `log!(Warn, "format {}", args)`.
#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($lvl:ident, $($t:tt)*) => {
        $crate::log::line($crate::log::Level::$lvl, format_args!($($t)*))
    };
}
