//! The suite's numbers for people: each run's JSON reduced, per experiment and variant, to the
//! median over repetitions (with min–max), the CPU cores it kept busy, throughput per core
//! (experiment 8) and the ratio to Linux TCP, as one Markdown [`Table`] per experiment; and
//! `summary.md`, which holds those tables, the machine's context, the charts and the failures.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use super::{last_line, Experiment, Machine, Outcome, Plan, Record};
use crate::bench::rpc::us_human;

/// A number at `path` in `v` (`["loaded", "p99_us"]`).
pub fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_f64().filter(|x| x.is_finite())
}

/// Median, min and max of some repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    /// The statistics of `xs`, none if empty.
    pub fn of(mut xs: Vec<f64>) -> Option<Stat> {
        if xs.is_empty() {
            return None;
        }
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 };
        Some(Stat { median, min: xs[0], max: xs[n - 1] })
    }

    /// The statistics of `f` over `reports` (reports where `f` is none are left out).
    pub fn over(reports: &[&Value], f: impl Fn(&Value) -> Option<f64>) -> Option<Stat> {
        Stat::of(reports.iter().filter_map(|v| f(v)).collect())
    }

    /// (min, max).
    pub fn range(&self) -> (f64, f64) {
        (self.min, self.max)
    }
}

/// One measured configuration of an experiment: backend and variant.
#[derive(Debug, Clone)]
pub struct Variant {
    /// "tcp", "netchannel", "mptcp", "all".
    pub backend: &'static str,
    /// File-name tag.
    pub variant: String,
    /// For people.
    pub label: String,
    /// Channels (stream, short).
    pub channels: Option<usize>,
    /// Copy workers (stream).
    pub copy_workers: Option<usize>,
}

/// The variants of `e`, in plan order.
pub fn variants(plan: &Plan, e: Experiment) -> Vec<Variant> {
    let mut out: Vec<Variant> = Vec::new();
    for j in plan.jobs.iter().filter(|j| j.experiment == e) {
        if !out.iter().any(|v| v.backend == j.backend && v.variant == j.variant) {
            out.push(Variant {
                backend: j.backend,
                variant: j.variant.clone(),
                label: j.label.clone(),
                channels: j.channels,
                copy_workers: j.copy_workers,
            });
        }
    }
    out
}

/// The successful reports of one variant, over repetitions.
pub fn reports<'a>(records: &'a [Record], e: Experiment, backend: &str, variant: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r.job.experiment == e && r.job.backend == backend && r.job.variant == variant)
        .filter_map(Record::report)
        .collect()
}

/// The isolation runs of `setup` ("netchannel", "tcp", "tcp-prio") over repetitions.
pub fn isolation_runs<'a>(records: &'a [Record], setup: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r.job.experiment == Experiment::Isolation)
        .filter_map(Record::report)
        .flat_map(|v| match v.get("runs").and_then(Value::as_array) {
            Some(runs) => runs.iter().collect::<Vec<_>>(),
            None => vec![v],
        })
        .filter(|run| run.get("backend").and_then(Value::as_str) == Some(setup))
        .collect()
}

/// Why a variant has no numbers: "skipped" or "failed".
fn missing(records: &[Record], e: Experiment, v: &Variant) -> &'static str {
    let mine = records
        .iter()
        .filter(|r| r.job.experiment == e && r.job.backend == v.backend && r.job.variant == v.variant);
    if mine.clone().count() > 0 && mine.clone().all(|r| matches!(r.outcome, Outcome::Skipped { .. })) {
        "skipped"
    } else {
        "failed"
    }
}

/// CPU cores a report kept busy: `cpu_cores`, else `cpu_seconds / seconds`.
pub fn cores(v: &Value) -> Option<f64> {
    num(v, &["cpu_cores"]).or_else(|| Some(num(v, &["cpu_seconds"])? / num(v, &["seconds"])?))
}

/// CPU cores during an isolation run's loaded phase.
pub fn loaded_cores(v: &Value) -> Option<f64> {
    let s = num(v, &["loaded", "seconds"])?;
    (s > 0.0).then(|| num(v, &["loaded", "cpu_seconds"]).map(|c| c / s)).flatten()
}

/// `value / per` when `per` is positive.
fn per(value: Option<f64>, per: Option<f64>) -> Option<f64> {
    match (value, per) {
        (Some(v), Some(p)) if p > 0.0 => Some(v / p),
        _ => None,
    }
}

/// A Markdown table with a heading.
#[derive(Debug, Clone)]
pub struct Table {
    /// Which experiment it shows.
    pub experiment: Experiment,
    /// The heading.
    pub title: String,
    /// A sentence under the heading.
    pub note: String,
    /// Column names.
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of `experiment` with these column names.
    fn new(
        experiment: Experiment,
        title: String,
        note: String,
        header: &[&str],
        rows: Vec<Vec<String>>,
    ) -> Table {
        Table { experiment, title, note, header: header.iter().map(|h| h.to_string()).collect(), rows }
    }

    /// Heading, note and the table, columns padded to line up (numbers right-aligned).
    pub fn markdown(&self) -> String {
        let cols = self.header.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([self.header[i].chars().count(), 3])
                .max()
                .unwrap_or(3)
        };
        let widths: Vec<usize> = (0..cols).map(width).collect();
        let right = |i: usize| i >= 2 || (i == 1 && self.experiment == Experiment::Isolation);
        let cell = |i: usize, s: &str| {
            let pad = widths[i].saturating_sub(s.chars().count());
            if right(i) {
                format!("{}{s}", " ".repeat(pad))
            } else {
                format!("{s}{}", " ".repeat(pad))
            }
        };
        let mut out = format!("### {}\n\n{}\n\n", self.title, self.note);
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        out += &line((0..cols).map(|i| cell(i, &self.header[i])).collect());
        out +=
            &line(
                (0..cols)
                    .map(|i| {
                        if right(i) {
                            format!("{}:", "-".repeat(widths[i] - 1))
                        } else {
                            "-".repeat(widths[i])
                        }
                    })
                    .collect(),
            );
        for r in &self.rows {
            out += &line((0..cols).map(|i| cell(i, r.get(i).map_or("", String::as_str))).collect());
        }
        out
    }
}

fn f2(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.2}"))
}

/// `564.3k`, `1.23M`, `950`.
fn rate(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e4 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

fn us(v: Option<f64>) -> String {
    v.map_or("-".to_string(), us_human)
}

fn range_of(s: Option<Stat>, f: impl Fn(Option<f64>) -> String) -> String {
    s.map_or("-".to_string(), |s| format!("{}–{}", f(Some(s.min)), f(Some(s.max))))
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".to_string(),
    }
}

fn median(s: Option<Stat>) -> Option<f64> {
    s.map(|s| s.median)
}

/// The statistics over `rs` of the number at `key`.
fn stat_of(rs: &[&Value], key: &str) -> Option<Stat> {
    Stat::over(rs, |r| num(r, &[key]))
}

/// The median over `rs` of the number at `key`.
fn median_of(rs: &[&Value], key: &str) -> Option<f64> {
    median(stat_of(rs, key))
}

/// The median over `rs` of the number at `key` per CPU core.
fn per_core(rs: &[&Value], key: &str) -> Option<f64> {
    median(Stat::over(rs, |r| per(num(r, &[key]), cores(r))))
}

/// One row per variant of `e`, in plan order: its backend and label, then `cells` of its
/// reports over the repetitions, or why it has none.
fn variant_rows(
    plan: &Plan,
    records: &[Record],
    e: Experiment,
    cells: impl Fn(&[&Value]) -> Vec<String>,
) -> Vec<Vec<String>> {
    variants(plan, e)
        .iter()
        .map(|v| {
            let rs = reports(records, e, v.backend, &v.variant);
            let mut row = vec![v.backend.to_string(), v.label.clone()];
            if rs.is_empty() {
                row.push(missing(records, e, v).to_string());
            } else {
                row.extend(cells(&rs));
            }
            row
        })
        .collect()
}

/// One table per experiment, in the order of the summary.
pub fn tables(plan: &Plan, records: &[Record]) -> Vec<Table> {
    let reps = plan.reps;
    let med = format!("median of {reps} repetition{}", if reps == 1 { "" } else { "s" });
    let mut out = Vec::new();

    // 6a/6b, 8a: stream.
    let e = Experiment::Stream;
    let tcp = reports(records, e, "tcp", "1flow");
    let (tcp_gbps, tcp_per_core) = (median_of(&tcp, "gbps"), per_core(&tcp, "gbps"));
    let rows = variant_rows(plan, records, e, |rs| {
        let g = stat_of(rs, "gbps");
        let pc = per_core(rs, "gbps");
        vec![
            f2(median(g)),
            range_of(g, f2),
            f2(median(Stat::over(rs, cores))),
            f2(pc),
            ratio(median(g), tcp_gbps),
            ratio(pc, tcp_per_core),
        ]
    });
    out.push(Table::new(
        e,
        "Stream: one app thread per end, 10 MiB writes, verified (6a/6b; cost: 8a)".to_string(),
        format!(
            "Throughput at the receiver, {med} (min–max beside it). CPU cores = CPU seconds of the whole \
             process (both ends, all threads) / seconds. Higher is better."
        ),
        &[
            "backend",
            "variant",
            "Gbit/s",
            "min–max",
            "CPU cores",
            "Gbit/s per core",
            "vs tcp",
            "per core vs tcp",
        ],
        rows,
    ));

    // 6c, 8b: short messages.
    let e = Experiment::Short;
    let tcp = reports(records, e, "tcp", "1conn");
    let (tcp_rate, tcp_per_core) = (median_of(&tcp, "msgs_per_sec"), per_core(&tcp, "msgs_per_sec"));
    let rows = variant_rows(plan, records, e, |rs| {
        let m = stat_of(rs, "msgs_per_sec");
        let pc = per_core(rs, "msgs_per_sec");
        vec![
            rate(median(m)),
            range_of(m, rate),
            f2(median_of(rs, "gbps")),
            f2(median(Stat::over(rs, cores))),
            rate(pc),
            ratio(median(m), tcp_rate),
            ratio(pc, tcp_per_core),
        ]
    });
    out.push(Table::new(
        e,
        "Short messages: 4 KiB back to back, no reply, verified (6c; cost: 8b)".to_string(),
        format!("Complete messages per second at the receiver, {med}. Higher is better."),
        &[
            "backend",
            "variant",
            "messages/s",
            "min–max",
            "Gbit/s",
            "CPU cores",
            "messages/s per core",
            "vs tcp",
            "per core vs tcp",
        ],
        rows,
    ));

    // 6d, 8c: isolation.
    let e = Experiment::Isolation;
    let tcp = isolation_runs(records, "tcp");
    let tcp_p99 = median(Stat::over(&tcp, |v| num(v, &["loaded", "p99_us"])));
    let mut rows = Vec::new();
    for setup in ["netchannel", "tcp", "tcp-prio"] {
        let rs = isolation_runs(records, setup);
        if rs.is_empty() {
            let why = variants(plan, e).first().map_or("failed", |v| missing(records, e, v));
            rows.push(vec![setup.to_string(), why.to_string()]);
            continue;
        }
        let p = |phase: &str| {
            ["p50_us", "p99_us", "p999_us"]
                .map(|k| us(median(Stat::over(&rs, |r| num(r, &[phase, k])))))
                .join(" / ")
        };
        let loaded_p99 = Stat::over(&rs, |r| num(r, &["loaded", "p99_us"]));
        rows.push(vec![
            setup.to_string(),
            p("isolated"),
            p("loaded"),
            range_of(loaded_p99, us),
            f2(median_of(&rs, "bulk_gbps")),
            f2(median(Stat::over(&rs, loaded_cores))),
            f2(median(Stat::over(&rs, |r| per(num(r, &["bulk_gbps"]), loaded_cores(r))))),
            ratio(median(loaded_p99), tcp_p99),
        ]);
    }
    out.push(Table::new(
        e,
        format!(
            "Latency isolation: 4 KiB ping-pong L-app alone, then beside {} bulk apps (6d; cost: 8c)",
            plan.bulk_apps
        ),
        format!(
            "L-app round-trip percentiles in µs, {med}; bulk Gbit/s and CPU cores during the loaded \
             phase. netchannel: L-app in the latency class; tcp-prio: L-app sockets with SO_PRIORITY 6. \
             Lower latency is better (the ratio is loaded p99 / tcp's)."
        ),
        &[
            "backend",
            "isolated p50 / p99 / p99.9",
            "loaded p50 / p99 / p99.9",
            "loaded p99 min–max",
            "bulk Gbit/s",
            "CPU cores (loaded)",
            "bulk Gbit/s per core",
            "loaded p99 vs tcp",
        ],
        rows,
    ));

    // Pingpong.
    let e = Experiment::Pingpong;
    let tcp_p99 = median_of(&reports(records, e, "tcp", "1conn"), "p99_us");
    let rows = variant_rows(plan, records, e, |rs| {
        let p99 = stat_of(rs, "p99_us");
        vec![
            us(median_of(rs, "p50_us")),
            us(median(p99)),
            us(median_of(rs, "p999_us")),
            range_of(p99, us),
            rate(median_of(rs, "round_trips_per_sec")),
            f2(median(Stat::over(rs, cores))),
            ratio(median(p99), tcp_p99),
        ]
    });
    out.push(Table::new(
        e,
        "Ping-pong: 4 KiB request and response, one in flight".to_string(),
        format!("Round-trip percentiles in µs, {med}. Lower is better (the ratio is p99 / tcp's)."),
        &[
            "backend",
            "variant",
            "p50",
            "p99",
            "p99.9",
            "p99 min–max",
            "round trips/s",
            "CPU cores",
            "p99 vs tcp",
        ],
        rows,
    ));

    // Connect.
    let e = Experiment::Connect;
    let tcp_rate = median_of(&reports(records, e, "tcp", "1conn"), "connects_per_sec");
    let rows = variant_rows(plan, records, e, |rs| {
        let c = stat_of(rs, "connects_per_sec");
        vec![
            rate(median(c)),
            range_of(c, rate),
            us(median_of(rs, "p50_us")),
            us(median_of(rs, "p99_us")),
            f2(median(Stat::over(rs, cores))),
            ratio(median(c), tcp_rate),
        ]
    });
    out.push(Table::new(
        e,
        "Connection rate: connect, one 4 KiB request/response, close".to_string(),
        format!(
            "Connections per second, {med}; p50/p99 of one connect+RPC+close in µs. Higher rate is better."
        ),
        &["backend", "variant", "connects/s", "min–max", "p50", "p99", "CPU cores", "vs tcp"],
        rows,
    ));

    // 7: Redis.
    let e = Experiment::Redis;
    let mut rows = Vec::new();
    for v in variants(plan, e) {
        let rs = reports(records, e, v.backend, &v.variant);
        let clients =
            rs.first().and_then(|r| num(r, &["clients"])).map_or(v.label.clone(), |c| format!("{c}"));
        let Some(first) = rs.first() else {
            rows.push(vec![v.label.clone(), missing(records, e, &v).to_string()]);
            continue;
        };
        for (test, depth) in redis_points(first) {
            let rps = |stack: &str| redis_stat(&rs, stack, &test, depth, "rps");
            let p50 = |stack: &str| median(redis_stat(&rs, stack, &test, depth, "p50_ms"));
            let (tcp, nc) = (rps("tcp"), rps("daemon"));
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            rows.push(vec![
                clients.clone(),
                test.clone(),
                depth.to_string(),
                rate(median(tcp)),
                rate(median(nc)),
                range_of(nc, rate),
                ratio(median(nc), median(tcp)),
                ms(p50("tcp")),
                ms(p50("daemon")),
                ratio(p50("daemon"), p50("tcp")),
            ]);
        }
    }
    // The shim's data path the runs used (`bench redis` reports it).
    let paths: Vec<&str> = {
        let mut p: Vec<&str> = variants(plan, e)
            .iter()
            .flat_map(|v| reports(records, e, v.backend, &v.variant))
            .filter_map(|r| r["datapath"].as_str())
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let path = if paths.is_empty() { "unknown".to_string() } else { paths.join(", ") };
    out.push(Table::new(
        e,
        "Redis (experiment 7): unmodified redis-server and redis-benchmark, queue depth 1…64".to_string(),
        format!(
            "Requests per second, {med}: plain loopback TCP beside both programs under `netchannel run` \
             through two daemons (the preload shim, data path `{path}`). Higher rate is better; p50 latency \
             in ms, lower is better."
        ),
        &[
            "clients",
            "test",
            "-P",
            "tcp req/s",
            "netchannel req/s",
            "min–max",
            "vs tcp",
            "tcp p50 ms",
            "netchannel p50 ms",
            "p50 vs tcp",
        ],
        rows,
    ));
    out
}

/// (test, depth) of every point of a `bench redis` report, in its order.
pub fn redis_points(report: &Value) -> Vec<(String, u32)> {
    let runs = report.get("runs").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut out: Vec<(String, u32)> = Vec::new();
    for run in &runs {
        for p in run.get("points").and_then(Value::as_array).into_iter().flatten() {
            let (Some(t), Some(d)) = (p["test"].as_str(), p["pipeline"].as_u64()) else { continue };
            if !out.iter().any(|(x, y)| x == t && u64::from(*y) == d) {
                out.push((t.to_string(), d as u32));
            }
        }
    }
    out
}

/// `key` of one point (stack, test, depth) of `bench redis` reports, over repetitions.
pub fn redis_stat(reports: &[&Value], stack: &str, test: &str, depth: u32, key: &str) -> Option<Stat> {
    Stat::over(reports, |r| {
        let run = r.get("runs")?.as_array()?.iter().find(|x| x["stack"].as_str() == Some(stack))?;
        let p =
            run.get("points")?.as_array()?.iter().find(|p| {
                p["test"].as_str() == Some(test) && p["pipeline"].as_u64() == Some(u64::from(depth))
            })?;
        num(p, &[key])
    })
}

/// A few words on one successful run, for the progress lines.
pub fn headline(e: Experiment, v: &Value) -> String {
    let f = |k: &str| num(v, &[k]);
    match e {
        Experiment::Stream => format!("{} Gbit/s, {} CPU cores", f2(f("gbps")), f2(cores(v))),
        Experiment::Short => format!("{} messages/s, {} Gbit/s", rate(f("msgs_per_sec")), f2(f("gbps"))),
        Experiment::Pingpong => format!("p50 {} µs, p99 {} µs", us(f("p50_us")), us(f("p99_us"))),
        Experiment::Connect => {
            format!("{} connects/s, p99 {} µs", rate(f("connects_per_sec")), us(f("p99_us")))
        }
        Experiment::Redis => {
            let each: Vec<String> = v
                .get("ratios")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|r| {
                    format!(
                        "{} -P {} {}x",
                        r["test"].as_str().unwrap_or("?"),
                        r["pipeline"].as_u64().unwrap_or(0),
                        f2(r["rps"].as_f64())
                    )
                })
                .collect();
            format!("netchannel / tcp: {}", each.join(", "))
        }
        Experiment::Isolation => {
            let runs: Vec<&Value> = match v.get("runs").and_then(Value::as_array) {
                Some(r) => r.iter().collect(),
                None => vec![v],
            };
            let each: Vec<String> = runs
                .iter()
                .map(|r| {
                    format!(
                        "{} {} µs",
                        r.get("backend").and_then(Value::as_str).unwrap_or("?"),
                        us(num(r, &["loaded", "p99_us"]))
                    )
                })
                .collect();
            format!("loaded p99: {}", each.join(", "))
        }
    }
}

/// `Machine: 2 CPUs (...), Linux 6.1.0; 2026-05-01 12:00:00 UTC; quick (...)`.
pub fn context_line(plan: &Plan, c: &Machine) -> String {
    let cpu = c.cpu_model.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
    format!(
        "Machine: {} CPU{}{cpu}, Linux {}, loopback (127.0.0.1 -> 127.0.0.2). Date: {}. Suite: {}.",
        c.nproc,
        if c.nproc == 1 { "" } else { "s" },
        c.kernel,
        c.date,
        plan.describe()
    )
}

/// The whole summary.md.
pub fn markdown(
    plan: &Plan,
    context: &Machine,
    tables: &[Table],
    records: &[Record],
    notes: &[String],
    charts: &[PathBuf],
) -> String {
    let mut md = String::from("# NetChannel bench suite\n\n");
    let _ = writeln!(md, "{}\n", context_line(plan, context));
    md += "Every run is a child process (`netchannel bench <mode> ... --json`) whose JSON is saved \
           beside this file as `<experiment>_<backend>_<variant>_rep<N>.json`; within each repetition \
           the baseline runs first, then the NetChannel variants. Figures are medians over the \
           repetitions, with min–max beside them.\n\n";
    for t in tables {
        md += &t.markdown();
        let id = t.experiment.id();
        let written = |f: &str| charts.iter().any(|p| p.file_name().is_some_and(|n| n == f));
        let (png, svg) = (format!("{id}.png"), format!("{id}.svg"));
        if written(&png) {
            let _ = write!(md, "\n![{id}]({png})");
            if written(&svg) {
                let _ = write!(md, " ([SVG]({svg}))");
            }
            md += "\n";
        }
        md += "\n";
    }
    if !notes.is_empty() {
        md += "## Notes\n\n";
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        md += "\n";
    }
    let failed: Vec<&Record> =
        records.iter().filter(|r| matches!(r.outcome, Outcome::Failed { .. })).collect();
    if !failed.is_empty() {
        let _ = writeln!(md, "## Failed runs ({} of {})\n", failed.len(), records.len());
        for r in failed {
            if let Outcome::Failed { why, stderr } = &r.outcome {
                let _ = writeln!(
                    md,
                    "- `{}` ({}): {why}: {}",
                    r.job.file_name(),
                    r.job.args.join(" "),
                    last_line(stderr)
                );
            }
        }
        md += "\n";
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(Stat::of(vec![]), None);
        assert_eq!(Stat::of(vec![3.0, 1.0, 2.0]), Some(Stat { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Stat::of(vec![4.0, 1.0]).unwrap().median, 2.5);
    }

    #[test]
    fn tables_line_up() {
        let t = Table {
            experiment: Experiment::Connect,
            title: "T".into(),
            note: "n".into(),
            header: vec!["backend".into(), "variant".into(), "rate".into()],
            rows: vec![
                vec!["tcp".into(), "".into(), "12.5k".into()],
                vec!["netchannel".into(), "x".into(), "7".into()],
            ],
        };
        let md = t.markdown();
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].chars().count()), "{md}");
        assert!(lines[1].ends_with("-: |"), "{md}");
        assert!(lines[2].ends_with(" 12.5k |"), "{md}");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(rate(Some(564_297.5)), "564.3k");
        assert_eq!(rate(Some(1_234_567.0)), "1.23M");
        assert_eq!(rate(Some(950.2)), "950");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), None), "-");
        let v: Value = serde_json::json!({"loaded": {"p99_us": 12.5, "seconds": 2.0, "cpu_seconds": 3.0}});
        assert_eq!(num(&v, &["loaded", "p99_us"]), Some(12.5));
        assert_eq!(loaded_cores(&v), Some(1.5));
    }
}
