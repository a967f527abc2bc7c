//! NetChannel: a user-space disaggregated host network stack.
pub mod config;
pub mod wire;

pub use config::{Config, ConfigError, Policy};
pub use wire::Class;
