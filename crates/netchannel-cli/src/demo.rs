//! `netchannel demo`: the first command for a new user. It runs the quick benchmark suite
//! ([`bench::suite`](crate::bench::suite) with `--quick`) on loopback, about two minutes on a
//! 2-core machine, then prints the summary tables on stdout and where the per-run JSON
//! files, summary.md and the charts (PNG and SVG) were written (`netchannel-results/demo-<timestamp>`
//! unless `--out` says otherwise).

use std::path::PathBuf;

use clap::Args;

use crate::bench::suite::{self, SuiteArgs};
use crate::error::Result;

/// Flags of `netchannel demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the results [default: netchannel-results/demo-<timestamp>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Test hook: a tiny suite instead of the quick one
    #[arg(long, hide = true)]
    pub smoke: bool,
}

/// What the demo says before its tables.
const INTRO: &str = "NetChannel demo: every experiment of the paper's evaluation that runs on one \
machine, on loopback (127.0.0.1 -> 127.0.0.2), NetChannel beside Linux TCP, each run a child \
process, medians over the repetitions. Throughput and rates: higher is better; latency: lower \
is better; \"vs tcp\" is NetChannel's figure divided by TCP's.";

/// Run `netchannel demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    let suite_args =
        SuiteArgs { quick: true, out: args.out.clone(), smoke: args.smoke, ..SuiteArgs::default() };
    eprintln!("netchannel demo: about two minutes on a 2-core machine; progress below, results at the end.");
    suite::run_suite(&suite_args, "demo-", Some(INTRO))
}
