//! `netchannel bench suite`: every experiment NetChannel is judged by (6a–6d, their cost 8a–8c,
//! ping-pong latency and connection rate), NetChannel beside its baselines, in one invocation;
//! `netchannel demo` is built on it.
//!
//! The suite builds a [`Plan`] (one [`Job`] per measurement and repetition: within each
//! repetition the baseline first, then the NetChannel variants, then the next experiment, then
//! the next repetition) and runs every job as a child process of this same binary
//! (`bench <mode> ... --json`), one at a time, so each run's CPU seconds are its own and a
//! crashed run cannot take the suite with it: the suite records the failure with its stderr
//! and goes on, and exits non-zero at the end. Each run's result is written to
//! `DIR/<experiment>_<backend>_<variant>_rep<N>.json`; [`summary`] then reduces the runs to
//! medians (with min–max, CPU cores and the ratio to TCP) in `DIR/summary.md`, and [`charts`]
//! draws one chart per experiment, as PNG and SVG. Progress goes to stderr through
//! [`crate::progress`]: a bar redrawn in place on a terminal, and one line per finished run.

pub mod charts;
pub mod summary;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{json, Value};

use super::parse_secs;
use crate::error::{describe, Context, Result};
use crate::progress::Bar;

/// Flags of `bench suite`.
#[derive(Args, Debug, Clone, Default)]
pub struct SuiteArgs {
    /// Short runs: 2 repetitions of 2 s runs (isolation: 1.5 s phases, 4 bulk apps); about
    /// two minutes on a 2-core machine
    #[arg(long)]
    pub quick: bool,

    /// Directory for the results [default: netchannel-results/<timestamp>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Repetitions of every run [default: 3, or 2 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: Option<u32>,

    /// Seconds per run, and per isolation phase [default: 5, or 2 with --quick (isolation 1.5)]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,

    /// TCP congestion control of every run: the channels and the TCP/MPTCP baselines alike
    /// (each run gets `--congestion NAME`); "" = the system default [default: cubic]
    #[arg(long, value_name = "NAME")]
    pub congestion: Option<String>,

    /// Test hook: a tiny suite (one repetition, 0.3 s runs, 2 bulk apps, fewer variants)
    #[arg(long, hide = true)]
    pub smoke: bool,

    /// Test hook: corrupt one byte of the first NetChannel stream run, so that it fails
    #[arg(long, hide = true)]
    pub fail_one: bool,
}

/// Run `bench suite`.
pub fn run(args: &SuiteArgs) -> Result<()> {
    run_suite(args, "", None)
}

/// The experiments, in the order of each repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experiment {
    /// 6a/6b (and 8a): one bulk stream.
    Stream,
    /// 6c (and 8b): 4 KiB messages.
    Short,
    /// Request/response latency.
    Pingpong,
    /// Connection rate.
    Connect,
    /// 6d (and 8c): latency beside bulk.
    Isolation,
    /// 7: unmodified redis-server and redis-benchmark, queue depth 1…64.
    Redis,
}

impl Experiment {
    /// All of them, in run order.
    pub const ALL: [Experiment; 6] = [
        Experiment::Stream,
        Experiment::Short,
        Experiment::Pingpong,
        Experiment::Connect,
        Experiment::Isolation,
        Experiment::Redis,
    ];

    /// File-name prefix and `bench` mode.
    pub fn id(self) -> &'static str {
        match self {
            Experiment::Stream => "stream",
            Experiment::Short => "short",
            Experiment::Pingpong => "pingpong",
            Experiment::Connect => "connect",
            Experiment::Isolation => "isolation",
            Experiment::Redis => "redis",
        }
    }
}

/// The suite's sizes: repetitions, durations, sweeps.
#[derive(Debug, Clone)]
pub struct Plan {
    /// "quick", "full" or "smoke".
    pub flavor: &'static str,
    /// Repetitions.
    pub reps: u32,
    /// Seconds per stream, short, pingpong and connect run.
    pub duration: f64,
    /// Seconds per isolation phase.
    pub isolation_duration: f64,
    /// Bulk apps beside the L-app.
    pub bulk_apps: u16,
    /// Stream: channels swept with one copy worker.
    pub stream_channels: Vec<usize>,
    /// Stream: copy workers swept at [`Plan::sweep_channels`] channels.
    pub copy_workers: Vec<usize>,
    /// Channels of the copy-worker sweep.
    pub sweep_channels: usize,
    /// Short: channels swept.
    pub short_channels: Vec<usize>,
    /// Redis: queue depths (`redis-benchmark -P`).
    pub redis_depths: Vec<u32>,
    /// Redis: requests per test at depth 1 (`bench redis --requests`).
    pub redis_requests: u64,
    /// MPTCP subflows, when `bench stream --backend mptcp` exists.
    pub mptcp_subflows: Option<usize>,
    /// Whether `bench stream` takes `--subflows`.
    pub subflows_flag: bool,
    /// Why MPTCP is not in the plan, if it is not.
    pub mptcp_note: Option<String>,
    /// The congestion control every run uses (`--congestion`; "" = the system default).
    pub congestion: String,
    /// The jobs, in run order.
    pub jobs: Vec<Job>,
}

/// One child run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Which experiment.
    pub experiment: Experiment,
    /// "tcp", "netchannel", "mptcp" or (isolation) "all".
    pub backend: &'static str,
    /// Short variant tag for the file name, e.g. "ch2-cw1".
    pub variant: String,
    /// The variant for people, e.g. "2 channels, 1 copy worker".
    pub label: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// Arguments after `netchannel`.
    pub args: Vec<String>,
    /// Seconds it should take, for the ETA and its time limit.
    pub expected_secs: f64,
    /// Stream/short: NetChannel channels.
    pub channels: Option<usize>,
    /// Stream: NetChannel copy workers.
    pub copy_workers: Option<usize>,
}

impl Job {
    /// `stream_netchannel_ch2-cw1_rep1.json`.
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}_rep{}.json", self.experiment.id(), self.backend, self.variant, self.rep)
    }

    /// `stream netchannel ch=2 cw=1 rep 1`, for progress lines.
    fn describe(&self) -> String {
        let mut s = format!("{} {}", self.experiment.id(), self.backend);
        if let Some(c) = self.channels {
            s += &format!(" ch={c}");
        }
        if let Some(w) = self.copy_workers {
            s += &format!(" cw={w}");
        }
        if self.backend == "mptcp" {
            s += &format!(" {}", self.variant);
        }
        s + &format!(" rep {}", self.rep)
    }
}

/// Warm-up the latency modes use by default for a `duration`.
fn warmup(duration: f64) -> f64 {
    (duration * 0.1).min(0.5)
}

impl Plan {
    /// The plan for `args`, given what `bench stream --help` says about MPTCP.
    pub fn new(args: &SuiteArgs, stream_help: &str) -> Plan {
        let flavor = if args.smoke {
            "smoke"
        } else if args.quick {
            "quick"
        } else {
            "full"
        };
        let (reps, duration, isolation_duration, bulk_apps) = match flavor {
            "smoke" => (1, 0.3, 0.3, 2),
            "quick" => (2, 2.0, 1.5, 4),
            _ => (3, 5.0, 5.0, 8),
        };
        let reps = args.reps.unwrap_or(reps);
        let duration = args.duration.unwrap_or(duration);
        let isolation_duration = args.duration.unwrap_or(isolation_duration);
        let smoke = flavor == "smoke";
        let has_mptcp = stream_help.contains("mptcp");
        let mut plan = Plan {
            flavor,
            reps,
            duration,
            isolation_duration,
            bulk_apps,
            stream_channels: if smoke { vec![1, 4] } else { vec![1, 2, 4] },
            copy_workers: if smoke { vec![0, 1] } else { vec![0, 1, 2] },
            sweep_channels: 4,
            short_channels: if smoke { vec![1, 4] } else { vec![1, 2, 4] },
            redis_depths: if smoke { vec![1, 8] } else { vec![1, 2, 4, 8, 16, 32, 64] },
            redis_requests: match flavor {
                "smoke" => 500,
                "quick" => 2000,
                _ => 20_000,
            },
            mptcp_subflows: has_mptcp.then_some(4),
            subflows_flag: stream_help.contains("--subflows"),
            mptcp_note: (!has_mptcp)
                .then(|| "MPTCP: skipped, this build's `bench stream` has no `--backend mptcp`".to_string()),
            congestion: args
                .congestion
                .clone()
                .unwrap_or_else(|| netchannel::config::DEFAULT_CONGESTION.into()),
            jobs: Vec::new(),
        };
        for rep in 1..=reps {
            for e in Experiment::ALL {
                plan.add_jobs(e, rep);
            }
        }
        if args.fail_one {
            if let Some(j) =
                plan.jobs.iter_mut().find(|j| j.experiment == Experiment::Stream && j.backend == "netchannel")
            {
                j.args.extend(["--corrupt-at".to_string(), "1000000".to_string()]);
            }
        }
        plan
    }

    /// The stream variants of NetChannel: (channels, copy workers), each once.
    pub fn stream_variants(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self.stream_channels.iter().map(|&c| (c, 1)).collect();
        for &w in &self.copy_workers {
            if !v.contains(&(self.sweep_channels, w)) {
                v.push((self.sweep_channels, w));
            }
        }
        v
    }

    fn add_jobs(&mut self, e: Experiment, rep: u32) {
        let d = self.duration;
        let secs = |d: f64| format!("{d}");
        let congestion = self.congestion.clone();
        let base = |mode: &str, backend: &str, d: f64| -> Vec<String> {
            [
                mode,
                "--backend",
                backend,
                "--duration",
                &secs(d),
                "--verify",
                "--json",
                "--congestion",
                &congestion,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let job = |backend: &'static str, variant: &str, label: &str, args: Vec<String>, expected: f64| Job {
            experiment: e,
            backend,
            variant: variant.to_string(),
            label: label.to_string(),
            rep,
            args: std::iter::once("bench".to_string()).chain(args).collect(),
            expected_secs: expected,
            channels: None,
            copy_workers: None,
        };
        let start = 0.3;
        match e {
            Experiment::Stream => {
                self.jobs.push(job("tcp", "1flow", "1 connection", base("stream", "tcp", d), d + start));
                if let Some(n) = self.mptcp_subflows {
                    let mut args = base("stream", "mptcp", d);
                    if self.subflows_flag {
                        args.extend(["--subflows".to_string(), n.to_string()]);
                    }
                    self.jobs.push(job(
                        "mptcp",
                        &format!("sf{n}"),
                        &format!("{n} subflows"),
                        args,
                        d + start,
                    ));
                }
                for (c, w) in self.stream_variants() {
                    let mut args = base("stream", "netchannel", d);
                    args.extend(
                        ["--channels", &c.to_string(), "--copy-workers", &w.to_string()].map(String::from),
                    );
                    let label = format!("{c} channel{}, {w} copy worker{}", plural(c), plural(w));
                    let mut j = job("netchannel", &format!("ch{c}-cw{w}"), &label, args, d + start);
                    (j.channels, j.copy_workers) = (Some(c), Some(w));
                    self.jobs.push(j);
                }
                // The same stream through two `netchannel up` daemons (default knobs).
                let label = "through daemons, 4 channels";
                let mut j = job("daemon", "ch4-cw1", label, base("stream", "daemon", d), d + start + 0.5);
                (j.channels, j.copy_workers) = (Some(4), Some(1));
                self.jobs.push(j);
            }
            Experiment::Short => {
                let with_size = |mut a: Vec<String>| {
                    a.extend(["--size".to_string(), "4KiB".to_string()]);
                    a
                };
                self.jobs.push(job(
                    "tcp",
                    "1conn",
                    "1 connection",
                    with_size(base("short", "tcp", d)),
                    d + start,
                ));
                for c in self.short_channels.clone() {
                    let mut args = with_size(base("short", "netchannel", d));
                    args.extend(["--channels".to_string(), c.to_string()]);
                    let label = format!("{c} channel{}", plural(c));
                    let mut j = job("netchannel", &format!("ch{c}"), &label, args, d + start);
                    j.channels = Some(c);
                    self.jobs.push(j);
                }
                let args = with_size(base("short", "daemon", d));
                let mut j = job("daemon", "ch4", "through daemons, 4 channels", args, d + start + 0.5);
                j.channels = Some(4);
                self.jobs.push(j);
            }
            Experiment::Pingpong | Experiment::Connect => {
                let mode = e.id();
                let expected = d + warmup(d) + start;
                self.jobs.push(job("tcp", "1conn", "1 connection", base(mode, "tcp", d), expected));
                let label = if e == Experiment::Pingpong { "latency class" } else { "a vsocket each" };
                self.jobs.push(job("netchannel", "default", label, base(mode, "netchannel", d), expected));
                if e == Experiment::Connect {
                    let mut args = base(mode, "netchannel", d);
                    args.push("--optimistic".to_string());
                    self.jobs.push(job("netchannel", "optimistic", "optimistic open", args, expected));
                }
                let label = if e == Experiment::Pingpong {
                    "through daemons, latency class"
                } else {
                    "through daemons, a vsocket each"
                };
                self.jobs.push(job("daemon", "default", label, base(mode, "daemon", d), expected + 0.5));
            }
            Experiment::Isolation => {
                let d = self.isolation_duration;
                let mut args = base("isolation", "all", d);
                args.extend(["--bulk-apps".to_string(), self.bulk_apps.to_string()]);
                let expected = 3.0 * 2.0 * (d + warmup(d)) + 1.0;
                let label = format!("{} bulk apps", self.bulk_apps);
                self.jobs.push(job("all", &format!("bulk{}", self.bulk_apps), &label, args, expected));
            }
            Experiment::Redis => {
                // One child per repetition runs TCP and the daemons back to back at every depth.
                let depths: Vec<String> = self.redis_depths.iter().map(u32::to_string).collect();
                let n = self.redis_requests;
                let redis = |clients: u32, depths: &str| -> Vec<String> {
                    let mut a: Vec<String> = ["redis", "--backend", "both", "--reps", "1", "--json"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                    a.extend([
                        "--clients".into(),
                        clients.to_string(),
                        "--depths".into(),
                        depths.to_string(),
                    ]);
                    a.extend(["--requests".into(), n.to_string()]);
                    a
                };
                // Two tests per run at ~10k requests/s through today's shim at depth 1, more
                // with depth; TCP is several times faster.
                let scaled: u64 = self.redis_depths.iter().map(|&d| n * u64::from(d.min(16))).sum();
                let expected = 2.0 * scaled as f64 / 40_000.0 + 3.0;
                let label = format!("50 clients, -P {}", depths.join(","));
                self.jobs.push(job("both", "c50", &label, redis(50, &depths.join(",")), expected));
                let expected = 2.0 * n as f64 / 3_000.0 + 2.0;
                self.jobs.push(job("both", "c1", "1 client, -P 1", redis(1, "1"), expected));
            }
        }
    }

    /// Seconds the whole plan should take.
    pub fn expected_secs(&self) -> f64 {
        self.jobs.iter().map(|j| j.expected_secs).sum()
    }

    /// One line describing the sizes, for the summary.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} repetition{}, {} s per run, isolation {} s per phase with {} bulk apps); congestion \
             control {} on every channel and every TCP/MPTCP baseline",
            self.flavor,
            self.reps,
            plural(self.reps as usize),
            self.duration,
            self.isolation_duration,
            self.bulk_apps,
            super::congestion_name(&self.congestion)
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The child's JSON report.
    Ok(Value),
    /// The child failed (or could not be started, or said something that is not JSON).
    Failed {
        /// What went wrong, in a few words ("exit status 1", "killed after 60 s").
        why: String,
        /// Its stderr.
        stderr: String,
    },
    /// Not run, or its backend is not available here (MPTCP).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// A job and how it went.
#[derive(Debug, Clone)]
pub struct Record {
    /// The job.
    pub job: Job,
    /// Its result.
    pub outcome: Outcome,
    /// Wall seconds the child took.
    pub wall_seconds: f64,
}

impl Record {
    /// The child's report, if it succeeded.
    pub fn report(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Ok(v) => Some(v),
            _ => None,
        }
    }

    /// What goes into the run's JSON file.
    fn to_json(&self, exe_name: &str) -> Value {
        let (status, report, stderr, why) = match &self.outcome {
            Outcome::Ok(v) => ("ok", v.clone(), None, None),
            Outcome::Failed { why, stderr } => {
                ("failed", Value::Null, Some(stderr.clone()), Some(why.clone()))
            }
            Outcome::Skipped { reason } => ("skipped", Value::Null, None, Some(reason.clone())),
        };
        let mut command = vec![exe_name.to_string()];
        command.extend(self.job.args.iter().cloned());
        json!({
            "experiment": self.job.experiment.id(),
            "backend": self.job.backend,
            "variant": self.job.variant,
            "rep": self.job.rep,
            "command": command,
            "status": status,
            "reason": why,
            "stderr": stderr,
            "wall_seconds": self.wall_seconds,
            "report": report,
        })
    }
}

/// Machine and run context for the summary.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs this process may use (`nproc`).
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model, if /proc/cpuinfo says.
    pub cpu_model: Option<String>,
    /// When the suite started, UTC.
    pub date: String,
}

impl Machine {
    fn gather(started: SystemTime) -> Machine {
        let nproc = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.split_whitespace().collect::<Vec<_>>().join(" "))
        });
        let (date, time) = utc(started);
        Machine { nproc, kernel, cpu_model, date: format!("{date} {time} UTC") }
    }
}

/// (`YYYY-MM-DD`, `HH:MM:SS`) of `t` in UTC.
fn utc(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{d:02}"), format!("{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60))
}

/// `20260501-134502` (UTC), for directory names.
fn stamp(t: SystemTime) -> String {
    let (d, t) = utc(t);
    format!("{}-{}", d.replace('-', ""), t.replace(':', ""))
}

/// The default results directory under `root`: `<prefix><timestamp>`, made unique.
fn default_out(root: &str, prefix: &str, started: SystemTime) -> PathBuf {
    let base = Path::new(root).join(format!("{prefix}{}", stamp(started)));
    let mut dir = base.clone();
    let mut n = 2;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    dir
}

/// Where results go unless `--out` says otherwise: `RESULTS_ROOT/<prefix><timestamp>`.
pub const RESULTS_ROOT: &str = "netchannel-results";

/// Run the suite: plan, run the children, write the JSON files, summary.md and the charts,
/// print `intro` and the summary on stdout. Results go to `args.out`, else
/// `RESULTS_ROOT/<prefix><timestamp>`.
pub fn run_suite(args: &SuiteArgs, prefix: &str, intro: Option<&str>) -> Result<()> {
    let started = SystemTime::now();
    let exe = std::env::current_exe().context(|| "cannot find this program's own path".to_string())?;
    let stream_help = help_of(&exe, "stream");
    let plan = Plan::new(args, &stream_help);
    let out = args.out.clone().unwrap_or_else(|| default_out(RESULTS_ROOT, prefix, started));
    std::fs::create_dir_all(&out)
        .context(|| format!("cannot create the results directory {}", out.display()))?;
    let context = Machine::gather(started);
    eprintln!(
        "netchannel: bench suite, {}: {} runs, about {}; results in {}",
        plan.describe(),
        plan.jobs.len(),
        human_secs(plan.expected_secs()),
        out.display()
    );

    let mut progress = Progress::new(&plan);
    let mut records: Vec<Record> = Vec::new();
    let mut mptcp_skip: Option<String> = None;
    let mut redis_skip: Option<String> = None;
    for job in &plan.jobs {
        progress.begin(job);
        let begun = Instant::now();
        let outcome = match (&mptcp_skip, &redis_skip, job.backend, job.experiment) {
            (Some(reason), _, "mptcp", _) => Outcome::Skipped { reason: reason.clone() },
            (_, Some(reason), _, Experiment::Redis) => Outcome::Skipped { reason: reason.clone() },
            _ => run_child(&exe, job, &mut progress),
        };
        if let Outcome::Skipped { reason } = &outcome {
            let first = if job.experiment == Experiment::Redis { &mut redis_skip } else { &mut mptcp_skip };
            first.get_or_insert_with(|| reason.clone());
        }
        let record = Record { job: job.clone(), outcome, wall_seconds: begun.elapsed().as_secs_f64() };
        let path = out.join(job.file_name());
        let text = serde_json::to_string_pretty(&record.to_json("netchannel"))
            .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
        std::fs::write(&path, text + "\n").context(|| format!("cannot write {}", path.display()))?;
        progress.end(&record);
        records.push(record);
    }
    progress.finish();

    let mut notes: Vec<String> = plan.mptcp_note.iter().cloned().collect();
    if let Some(reason) = &mptcp_skip {
        notes.push(format!("MPTCP: skipped, {reason}"));
    }
    if let Some(reason) = &redis_skip {
        notes.push(format!("Redis (experiment 7): skipped, {reason}"));
    }
    let tables = summary::tables(&plan, &records);
    let chart_files = charts::write_all(&out, &plan, &records)?;
    let md = summary::markdown(&plan, &context, &tables, &records, &notes, &chart_files);
    let md_path = out.join("summary.md");
    std::fs::write(&md_path, &md).context(|| format!("cannot write {}", md_path.display()))?;

    let failed: Vec<&Record> =
        records.iter().filter(|r| matches!(r.outcome, Outcome::Failed { .. })).collect();
    let mut text = intro.map(|s| format!("{s}\n\n")).unwrap_or_default();
    text += &format!("{}\n\n", summary::context_line(&plan, &context));
    for t in &tables {
        text += &t.markdown();
        text += "\n";
    }
    for n in &notes {
        text += &format!("Note: {n}\n");
    }
    if !failed.is_empty() {
        text += &format!("{} of {} runs FAILED:\n", failed.len(), records.len());
        for r in &failed {
            if let Outcome::Failed { why, stderr } = &r.outcome {
                text += &format!("  {}: {why}: {}\n", r.job.file_name(), last_line(stderr));
            }
        }
        text += "\n";
    }
    let ok = records.iter().filter(|r| r.report().is_some()).count();
    text += &format!(
        "Results in {}/: {} JSON files (one per run, {ok} ok), summary.md, {}\n",
        out.display(),
        records.len(),
        chart_files
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += &format!("Took {}.\n", human_secs(progress.start.elapsed().as_secs_f64()));
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
        .map_err(|e| format!("cannot write the summary to stdout: {}", describe(&e)))?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} runs failed (see {})", failed.len(), records.len(), md_path.display()).into())
    }
}

/// `netchannel bench <mode> --help`, or empty if it cannot be run.
fn help_of(exe: &Path, mode: &str) -> String {
    Command::new(exe)
        .args(["bench", mode, "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The last non-empty line of `s`.
fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output on stderr)").trim()
}

/// Whether a failed MPTCP run says MPTCP is not available here (rather than crashing).
fn mptcp_unavailable(stderr: &str) -> bool {
    let s = stderr.to_lowercase();
    s.contains("mptcp")
        && [
            "unavailable",
            "not available",
            "not supported",
            "not enabled",
            "disabled",
            "protocol not available",
            "eprotonosupport",
            "enoprotoopt",
        ]
        .iter()
        .any(|w| s.contains(w))
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Run one job as a child process; wait for it (sleeping, redrawing the progress bar), kill
/// it if it runs far past its expected time.
fn run_child(exe: &Path, job: &Job, progress: &mut Progress) -> Outcome {
    let mut child = match Command::new(exe)
        .args(&job.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                why: format!("cannot start {}: {}", exe.display(), describe(&e)),
                stderr: String::new(),
            }
        }
    };
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let limit = Duration::from_secs_f64(job.expected_secs * 3.0 + 60.0);
    let begun = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if begun.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "killed after {:.0} s (expected about {:.0} s)",
                    limit.as_secs_f64(),
                    job.expected_secs
                ));
            }
            Ok(None) => {
                progress.tick();
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("cannot wait for the child: {}", describe(&e)));
            }
        }
    };
    let stdout = stdout.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let stderr = stderr.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    match status {
        Err(why) => Outcome::Failed { why, stderr },
        Ok(s) if s.success() => match serde_json::from_str::<Value>(stdout.trim()) {
            Ok(v) if v.is_object() => Outcome::Ok(v),
            _ => Outcome::Failed {
                why: format!("exit status 0 but stdout is not one JSON object: {:?}", truncate(&stdout, 200)),
                stderr,
            },
        },
        Ok(s) => {
            if job.experiment == Experiment::Redis && stderr.contains("install Redis") {
                return Outcome::Skipped {
                    reason: last_line(&stderr).trim_start_matches("netchannel: ").to_string(),
                };
            }
            if job.backend == "mptcp" && mptcp_unavailable(&stderr) {
                return Outcome::Skipped {
                    reason: last_line(&stderr).trim_start_matches("netchannel: ").to_string(),
                };
            }
            let why = match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "failed".to_string(),
            };
            Outcome::Failed { why, stderr }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `45 s`, `2m05s`.
fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// The suite's progress on stderr (a [`Bar`]): on a terminal, a bar with the run in progress
/// and the time left, and each finished run's line above it; otherwise that line alone.
struct Progress {
    bar: Bar,
    total: usize,
    done: usize,
    start: Instant,
    expected_total: f64,
    expected_done: f64,
    /// Wall seconds of the finished runs.
    actual_done: f64,
    current: String,
    current_expected: f64,
    current_start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    fn new(plan: &Plan) -> Progress {
        Progress {
            bar: Bar::steps(plan.jobs.len() as u64),
            total: plan.jobs.len(),
            done: 0,
            start: Instant::now(),
            expected_total: plan.expected_secs(),
            expected_done: 0.0,
            actual_done: 0.0,
            current: String::new(),
            current_expected: 0.0,
            current_start: Instant::now(),
            last_draw: None,
        }
    }

    fn begin(&mut self, job: &Job) {
        self.current = job.describe();
        self.current_expected = job.expected_secs;
        self.current_start = Instant::now();
        self.bar.set_prefix(format!("{}/{}", self.done + 1, self.total));
        self.draw();
    }

    /// Seconds left: the plan's remaining expected time, scaled by how the finished runs
    /// compared with their expectation.
    fn eta(&self) -> f64 {
        let factor = if self.expected_done > 0.0 {
            (self.actual_done / self.expected_done).clamp(0.5, 4.0)
        } else {
            1.0
        };
        let in_current = self.current_start.elapsed().as_secs_f64().min(self.current_expected);
        (self.expected_total - self.expected_done - in_current).max(0.0) * factor
    }

    fn tick(&mut self) {
        if self.last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_message(format!("{}  ETA {}", self.current, human_secs(self.eta())));
        self.last_draw = Some(Instant::now());
    }

    fn end(&mut self, r: &Record) {
        self.done += 1;
        self.expected_done += r.job.expected_secs;
        self.actual_done += r.wall_seconds;
        self.bar.set_position(self.done as u64);
        let result = match &r.outcome {
            Outcome::Ok(v) => summary::headline(r.job.experiment, v),
            Outcome::Failed { why, stderr } => format!("FAILED ({why}): {}", last_line(stderr)),
            Outcome::Skipped { reason } => format!("skipped: {reason}"),
        };
        self.bar.line(&format!(
            "[{:>w$}/{}] {}: {result} ({:.1} s)",
            self.done,
            self.total,
            r.job.describe(),
            r.wall_seconds,
            w = self.total.to_string().len()
        ));
    }

    fn finish(&mut self) {
        self.bar.finish(&format!(
            "{}/{} runs done in {}",
            self.done,
            self.total,
            human_secs(self.start.elapsed().as_secs_f64())
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plan_alternates_backends_within_each_repetition() {
        let args = SuiteArgs { quick: true, ..SuiteArgs::default() };
        let plan = Plan::new(&args, "--backend <BACKEND> [possible values: netchannel, tcp, both]");
        assert_eq!(plan.reps, 2);
        assert!(plan.mptcp_subflows.is_none() && plan.mptcp_note.is_some());
        let names: Vec<String> = plan.jobs.iter().map(Job::file_name).collect();
        let first = names.iter().position(|n| n == "stream_tcp_1flow_rep1.json").unwrap();
        let second = names.iter().position(|n| n == "stream_tcp_1flow_rep2.json").unwrap();
        assert_eq!(first, 0);
        assert!(names[..second].contains(&"isolation_all_bulk4_rep1.json".to_string()));
        assert!(names.contains(&"stream_netchannel_ch2-cw1_rep1.json".to_string()));
        assert!(names.contains(&"stream_netchannel_ch4-cw0_rep2.json".to_string()));
        assert!(names.contains(&"short_netchannel_ch4_rep1.json".to_string()));
        // 4 channels with 1 copy worker is in both sweeps but runs once.
        assert_eq!(names.iter().filter(|n| *n == "stream_netchannel_ch4-cw1_rep1.json").count(), 1);
        assert!(names.contains(&"pingpong_daemon_default_rep2.json".to_string()));
        // stream: tcp, 5 netchannel, daemon; short: tcp, 3 netchannel, daemon; ping-pong:
        // tcp, netchannel, daemon; connect: the same and netchannel optimistic; isolation.
        assert!(names.contains(&"connect_netchannel_optimistic_rep1.json".to_string()));
        assert!(names.contains(&"redis_both_c50_rep1.json".to_string()));
        assert!(names.contains(&"redis_both_c1_rep2.json".to_string()));
        // ...; redis: 50 clients at every depth, 1 client at depth 1.
        assert_eq!(names.len(), 2 * ((1 + 5 + 1) + (1 + 3 + 1) + 3 + 4 + 1 + 2));
        let total = plan.expected_secs();
        assert!(total > 60.0 && total < 150.0, "{total}");
    }

    #[test]
    fn mptcp_is_planned_when_the_binary_has_it() {
        let args = SuiteArgs { smoke: true, ..SuiteArgs::default() };
        let plan = Plan::new(&args, "[possible values: netchannel, tcp, mptcp, both, all]\n --subflows <N>");
        let j = plan.jobs.iter().find(|j| j.backend == "mptcp").expect("an mptcp job");
        assert_eq!(j.file_name(), "stream_mptcp_sf4_rep1.json");
        assert!(j.args.windows(2).any(|w| w == ["--subflows", "4"]), "{:?}", j.args);
        assert!(mptcp_unavailable("netchannel: MPTCP is not available: protocol not supported"));
        assert!(!mptcp_unavailable("netchannel: verify failed at offset 12"));
    }

    #[test]
    fn dates_and_durations() {
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56 UTC
        assert_eq!(utc(t), ("2024-02-29".to_string(), "12:34:56".to_string()));
        assert_eq!(stamp(t), "20240229-123456");
        assert_eq!(human_secs(45.2), "45 s");
        assert_eq!(human_secs(125.0), "2m05s");
    }
}
