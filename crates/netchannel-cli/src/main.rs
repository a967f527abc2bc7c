//! `netchannel`: the command-line tool of NetChannel, a user-space disaggregated host network
//! stack. This file is the entry point: it parses the command line (clap), dispatches to the
//! subcommand, and turns a failure into `netchannel: <reason>` on stderr and exit status 1
//! (usage errors are clap's, exit status 2).
//!
//! Subcommands: `demo` runs the quick benchmark suite and prints its summary (see [`demo`]);
//! `bench <mode>` measures NetChannel beside Linux TCP (see [`bench`]); `bench suite` runs
//! every experiment with charts.

mod bench;
mod cpu;
mod daemon;
mod demo;
mod error;
mod logging;
mod pattern;
mod plot;
mod progress;
mod run;

use clap::{Parser, Subcommand};

/// NetChannel: one app byte stream striped over many TCP channels between hosts.
#[derive(Parser, Debug)]
#[command(name = "netchannel", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
enum Command {
    /// Start here: NetChannel beside Linux TCP in every experiment, about two minutes
    ///
    /// Runs the quick benchmark suite (`bench suite --quick`) on loopback, prints one table
    /// per experiment and saves the per-run JSON, summary.md and charts (PNG and SVG) under
    /// netchannel-results/demo-<timestamp>.
    Demo(demo::DemoArgs),
    /// Measure NetChannel and Linux TCP with the same workload
    #[command(subcommand)]
    Bench(bench::Mode),
    /// Run the per-host daemon in the foreground: one engine for every local process
    ///
    /// Apps reach it through a Unix socket (`[daemon] socket`, NETCHANNEL_SOCKET, default
    /// /run/netchannel/netchannel.sock for root); their vsockets' data moves through shared
    /// memory. Stops on SIGINT or SIGTERM.
    Up(daemon::UpArgs),
    /// Show the daemon's peers, channels, vsockets and counters
    Status(daemon::StatusArgs),
    /// Inject faults through the daemon (for testing recovery)
    #[command(subcommand)]
    Fault(daemon::Fault),
    /// Run an unmodified program with its TCP sockets on NetChannel vsockets (LD_PRELOAD)
    ///
    /// `netchannel run [--config FILE] -- PROGRAM ARGS…`: connections to NetChannel hosts and
    /// listening sockets become vsockets served by the local daemon (`[preload]` in the
    /// config says which); everything else stays on kernel TCP.
    Run(run::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    // The daemon reports what it serves (info); every other command only what went wrong.
    let logs = match &cli.command {
        Command::Up(args) => logging::init(args.log_format, "info"),
        _ => logging::init(logging::LogFormat::Text, "warn"),
    };
    if let Err(e) = logs {
        eprintln!("netchannel: {e}");
        std::process::exit(1);
    }
    let result = match &cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(mode) => bench::run(mode),
        Command::Up(args) => daemon::up(args),
        Command::Status(args) => daemon::status(args),
        Command::Fault(f) => daemon::fault(f),
        Command::Run(args) => run::run(args),
    };
    if let Err(e) = result {
        eprintln!("netchannel: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
