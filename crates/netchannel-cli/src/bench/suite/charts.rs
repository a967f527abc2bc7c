//! The suite's charts, one PNG and one SVG per experiment, drawn with [`crate::plot`] from the same
//! medians (and min–max whiskers) as the summary tables: stream throughput vs channels and vs
//! copy workers with the TCP (and MPTCP) baselines as dashed lines; short-message rate vs
//! channels with the TCP baseline; the isolation experiment's L-app latency percentiles,
//! isolated vs loaded, per backend; ping-pong percentiles per backend; connection rate per
//! backend. Colours are fixed per backend across charts.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::summary::{isolation_runs, num, redis_points, redis_stat, reports, variants, Stat};
use super::{Experiment, Plan, Record};
use crate::error::Result;
use crate::plot::{
    lighten, BarChart, BarSeries, Baseline, Chart, Figure, LineChart, Point, Rgb, Scale, Series, BLUE, GREEN,
    ORANGE, PURPLE, RED,
};

/// A backend's colour.
pub fn color(backend: &str) -> Rgb {
    match backend {
        "netchannel" => BLUE,
        "tcp" => ORANGE,
        "tcp-prio" => GREEN,
        "mptcp" => PURPLE,
        _ => RED,
    }
}

/// The colour of each of `vs`: its backend's, lighter for each further variant of the same
/// backend (netchannel's optimistic open beside its default), so bars and legend tell them apart.
fn variant_colors(vs: &[super::summary::Variant]) -> Vec<Rgb> {
    vs.iter()
        .enumerate()
        .map(|(i, v)| {
            let earlier = vs[..i].iter().filter(|w| w.backend == v.backend).count();
            lighten(color(v.backend), (0.45 * earlier as f64).min(0.8))
        })
        .collect()
}

fn note(plan: &Plan) -> String {
    format!("median of {} rep{}; whiskers: min-max", plan.reps, if plan.reps == 1 { "" } else { "s" })
}

/// The note of a chart with baselines: their min–max is the band behind them.
fn line_note(plan: &Plan) -> String {
    format!(
        "median of {} rep{}; whiskers and bands: min-max",
        plan.reps,
        if plan.reps == 1 { "" } else { "s" }
    )
}

/// Draw every chart into `dir`, as `NAME.png` and `NAME.svg`; returns the files written.
pub fn write_all(dir: &Path, plan: &Plan, records: &[Record]) -> Result<Vec<PathBuf>> {
    let figures = [
        ("stream", stream(plan, records)),
        ("short", short(plan, records)),
        ("isolation", isolation(plan, records)),
        ("pingpong", pingpong(plan, records)),
        ("connect", connect(plan, records)),
        ("redis", redis(plan, records)),
    ];
    let mut written = Vec::new();
    for (name, fig) in figures {
        written.extend(fig.save(dir, name)?);
    }
    Ok(written)
}

/// Median and min–max of `metric` over the runs of one variant.
fn stat(records: &[Record], e: Experiment, backend: &str, variant: &str, metric: &[&str]) -> Option<Stat> {
    Stat::over(&reports(records, e, backend, variant), |v| num(v, metric))
}

fn point(x: f64, s: Option<Stat>) -> Option<Point> {
    s.map(|s| Point { x, y: s.median, range: Some(s.range()) })
}

fn stream(plan: &Plan, records: &[Record]) -> Figure {
    let e = Experiment::Stream;
    let vs = variants(plan, e);
    let gbps = |backend: &str, variant: &str| stat(records, e, backend, variant, &["gbps"]);
    let mut baselines = Vec::new();
    if let Some(s) = gbps("tcp", "1flow") {
        baselines.push(Baseline {
            name: "Linux TCP, 1 flow".into(),
            color: ORANGE,
            y: s.median,
            range: Some(s.range()),
        });
    }
    for v in vs.iter().filter(|v| v.backend == "mptcp") {
        if let Some(s) = gbps("mptcp", &v.variant) {
            baselines.push(Baseline {
                name: format!("MPTCP, {}", v.label),
                color: PURPLE,
                y: s.median,
                range: Some(s.range()),
            });
        }
    }
    let nc = |pick: &dyn Fn(&super::summary::Variant) -> Option<f64>| -> Vec<Point> {
        vs.iter()
            .filter(|v| v.backend == "netchannel")
            .filter_map(|v| pick(v).and_then(|x| point(x, gbps(v.backend, &v.variant))))
            .collect()
    };
    let by_channels = nc(&|v| (v.copy_workers == Some(1)).then_some(v.channels).flatten().map(|c| c as f64));
    let by_workers = nc(&|v| {
        (v.channels == Some(plan.sweep_channels)).then_some(v.copy_workers).flatten().map(|w| w as f64)
    });
    // One y range for both panels.
    let y_include: Vec<f64> =
        by_channels.iter().chain(&by_workers).flat_map(|p| [p.y, p.range.map_or(p.y, |r| r.1)]).collect();
    let panel = |title: String, x_title: &str, points: Vec<Point>| {
        Chart::Line(LineChart {
            title,
            x_title: x_title.into(),
            y_title: "throughput (Gbit/s)".into(),
            series: vec![Series { name: "NetChannel".into(), color: BLUE, points }],
            baselines: baselines.clone(),
            y_scale: Scale::Linear,
            y_include: y_include.clone(),
            x_ticks: vec![],
            note: Some(line_note(plan)),
        })
    };
    Figure {
        width: 1400,
        height: 560,
        panels: vec![
            panel("Stream (6a): one app thread, 1 copy worker".into(), "throughput channels", by_channels),
            panel(
                format!("Stream (6b): {} channels", plan.sweep_channels),
                "copy workers per host",
                by_workers,
            ),
        ],
    }
}

fn short(plan: &Plan, records: &[Record]) -> Figure {
    let e = Experiment::Short;
    let rate = |backend: &str, variant: &str| stat(records, e, backend, variant, &["msgs_per_sec"]);
    let points = variants(plan, e)
        .iter()
        .filter(|v| v.backend == "netchannel")
        .filter_map(|v| point(v.channels? as f64, rate(v.backend, &v.variant)))
        .collect();
    let baselines = rate("tcp", "1conn")
        .map(|s| {
            vec![Baseline {
                name: "Linux TCP, 1 connection".into(),
                color: ORANGE,
                y: s.median,
                range: Some(s.range()),
            }]
        })
        .unwrap_or_default();
    Figure {
        width: 800,
        height: 560,
        panels: vec![Chart::Line(LineChart {
            title: "Short messages (6c): 4 KiB, no reply".into(),
            x_title: "throughput channels".into(),
            y_title: "messages per second".into(),
            series: vec![Series { name: "NetChannel".into(), color: BLUE, points }],
            baselines,
            y_scale: Scale::Linear,
            y_include: vec![],
            x_ticks: vec![],
            note: Some(line_note(plan)),
        })],
    }
}

/// Median of `phase.key` over isolation runs.
fn iso(runs: &[&Value], phase: &str, key: &str) -> Option<Stat> {
    Stat::over(runs, |r| num(r, &[phase, key]))
}

fn isolation(plan: &Plan, records: &[Record]) -> Figure {
    let setups = ["netchannel", "tcp", "tcp-prio"];
    let runs: Vec<Vec<&Value>> = setups.iter().map(|s| isolation_runs(records, s)).collect();
    let pct = [("p50_us", "p50", BLUE), ("p99_us", "p99", ORANGE), ("p999_us", "p99.9", RED)];
    let mut series = Vec::new();
    for (key, name, c) in pct {
        for (phase, shade) in [("isolated", 0.55), ("loaded", 0.0)] {
            let stats: Vec<Option<Stat>> = runs.iter().map(|r| iso(r, phase, key)).collect();
            series.push(BarSeries {
                name: format!("{name} {phase}"),
                color: lighten(c, shade),
                bar_colors: vec![],
                values: stats.iter().map(|s| s.map(|s| s.median)).collect(),
                ranges: stats.iter().map(|s| s.map(|s| s.range())).collect(),
            });
        }
    }
    let group_notes = runs
        .iter()
        .map(|r| {
            Stat::over(r, |v| num(v, &["bulk_gbps"]))
                .map(|s| format!("bulk {:.1} Gbit/s", s.median))
                .unwrap_or_default()
        })
        .collect();
    Figure {
        width: 1300,
        height: 620,
        panels: vec![Chart::Bar(BarChart {
            title: format!(
                "Latency isolation (6d): 4 KiB L-app alone vs beside {} bulk apps",
                plan.bulk_apps
            ),
            x_title: String::new(),
            y_title: "L-app round trip (us, log scale)".into(),
            groups: setups.map(String::from).to_vec(),
            group_notes,
            series,
            y_scale: Scale::Log,
            value_labels: false,
            note: Some(format!("{}; light: isolated, dark: loaded", note(plan))),
        })],
    }
}

/// Bars per backend of the latency percentiles of a mode's report.
fn percentile_bars(plan: &Plan, records: &[Record], e: Experiment) -> Vec<BarSeries> {
    let vs = variants(plan, e);
    vs.iter()
        .zip(variant_colors(&vs))
        .map(|(v, c)| {
            let stats: Vec<Option<Stat>> = ["p50_us", "p99_us", "p999_us"]
                .iter()
                .map(|k| stat(records, e, v.backend, &v.variant, &[k]))
                .collect();
            BarSeries {
                name: if v.label.is_empty() {
                    v.backend.to_string()
                } else {
                    format!("{} ({})", v.backend, v.label)
                },
                color: c,
                bar_colors: vec![],
                values: stats.iter().map(|s| s.map(|s| s.median)).collect(),
                ranges: stats.iter().map(|s| s.map(|s| s.range())).collect(),
            }
        })
        .collect()
}

fn pingpong(plan: &Plan, records: &[Record]) -> Figure {
    Figure {
        width: 900,
        height: 560,
        panels: vec![Chart::Bar(BarChart {
            title: "Ping-pong: 4 KiB request/response".into(),
            x_title: "percentile".into(),
            y_title: "round trip (us, log scale)".into(),
            groups: ["p50", "p99", "p99.9"].map(String::from).to_vec(),
            group_notes: vec![],
            series: percentile_bars(plan, records, Experiment::Pingpong),
            y_scale: Scale::Log,
            value_labels: true,
            note: Some(note(plan)),
        })],
    }
}

fn connect(plan: &Plan, records: &[Record]) -> Figure {
    let e = Experiment::Connect;
    let vs = variants(plan, e);
    let stats: Vec<Option<Stat>> =
        vs.iter().map(|v| stat(records, e, v.backend, &v.variant, &["connects_per_sec"])).collect();
    let rate = Chart::Bar(BarChart {
        title: "Connection rate: connect + 4 KiB RPC + close".into(),
        x_title: "backend".into(),
        y_title: "connections per second".into(),
        // A variant other than a backend's default (netchannel's optimistic open) is named
        // under its bar.
        groups: vs
            .iter()
            .map(|v| match v.variant.as_str() {
                "default" | "1conn" => v.backend.to_string(),
                other => format!("{} {other}", v.backend),
            })
            .collect(),
        group_notes: vec![],
        series: vec![BarSeries {
            name: String::new(),
            color: BLUE,
            bar_colors: variant_colors(&vs),
            values: stats.iter().map(|s| s.map(|s| s.median)).collect(),
            ranges: stats.iter().map(|s| s.map(|s| s.range())).collect(),
        }],
        y_scale: Scale::Linear,
        value_labels: true,
        note: Some(note(plan)),
    });
    let latency = Chart::Bar(BarChart {
        title: "Time per connection".into(),
        x_title: "percentile".into(),
        y_title: "connect+RPC+close (us, log)".into(),
        groups: ["p50", "p99", "p99.9"].map(String::from).to_vec(),
        group_notes: vec![],
        series: percentile_bars(plan, records, e),
        y_scale: Scale::Log,
        value_labels: true,
        note: None,
    });
    Figure { width: 1400, height: 560, panels: vec![rate, latency] }
}

/// Experiment 7: requests/s against queue depth, one panel per redis-benchmark test, TCP and
/// NetChannel (through daemons) as lines; x is log2 of the depth, labelled with the depth.
fn redis(plan: &Plan, records: &[Record]) -> Figure {
    let e = Experiment::Redis;
    let rs = reports(records, e, "both", "c50");
    let points = rs.first().map(|r| redis_points(r)).unwrap_or_default();
    let mut tests: Vec<String> = Vec::new();
    for (t, _) in &points {
        if !tests.contains(t) {
            tests.push(t.clone());
        }
    }
    let mut depths: Vec<u32> = points.iter().map(|&(_, d)| d).collect();
    depths.sort_unstable();
    depths.dedup();
    if tests.is_empty() {
        tests = vec!["GET".into(), "SET".into()];
    }
    let panel = |test: &str| {
        let line = |stack: &str| -> Vec<Point> {
            points
                .iter()
                .filter(|(t, _)| t == test)
                .filter_map(|&(_, d)| point(f64::from(d).log2(), redis_stat(&rs, stack, test, d, "rps")))
                .collect()
        };
        Chart::Line(LineChart {
            title: format!("Redis (7): {test}, 50 clients"),
            x_title: "queue depth (redis-benchmark -P), log scale".into(),
            y_title: "requests per second".into(),
            series: vec![
                Series {
                    name: "NetChannel (netchannel run, daemons)".into(),
                    color: BLUE,
                    points: line("daemon"),
                },
                Series { name: "Linux TCP".into(), color: ORANGE, points: line("tcp") },
            ],
            baselines: vec![],
            y_scale: Scale::Log,
            y_include: vec![],
            x_ticks: depths.iter().map(|&d| (f64::from(d).log2(), d.to_string())).collect(),
            note: Some(note(plan)),
        })
    };
    Figure { width: 1400, height: 560, panels: tests.iter().take(2).map(|t| panel(t)).collect() }
}
