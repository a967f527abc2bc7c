//! `netchannel`: the command-line tool of NetChannel, a user-space disaggregated host network
//! stack. This file is the entry point: it parses the command line (clap), dispatches to the
//! subcommand, and turns a failure into `netchannel: <reason>` on stderr and exit status 1
//! (usage errors are clap's, exit status 2).
//!
//! Subcommands: `bench <mode>` measures NetChannel beside Linux TCP (see [`bench`]).

mod bench;
mod cpu;
mod error;
mod pattern;

use clap::{Parser, Subcommand};

/// NetChannel: one app byte stream striped over many TCP channels between hosts.
#[derive(Parser, Debug)]
#[command(name = "netchannel", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure NetChannel and Linux TCP with the same workload
    #[command(subcommand)]
    Bench(bench::Mode),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Bench(mode) => bench::run(mode),
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
