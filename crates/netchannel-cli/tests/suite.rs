//! End-to-end tests of `netchannel bench suite` and `netchannel demo`, shrunk with the hidden
//! `--smoke` flag (one repetition of 0.3 s runs, fewer variants): each runs the built command
//! as a child process (killed after [`TIMEOUT`]) into a temporary directory and checks what it
//! wrote: one parseable JSON file per run, a summary.md with a table per experiment, and the
//! charts: PNGs that decode to their intended sizes with something drawn on them, SVGs that
//! parse as XML and hold the charts' titles and legends. They assert behaviour, not speed.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use common::{run, run_on_terminal, TempDir};

/// Longest a smoke suite may run.
const TIMEOUT: Duration = Duration::from_secs(90);

/// The charts, their sizes in pixels and a text each must show (a title or a legend entry).
const CHARTS: [(&str, u32, u32, &str); 6] = [
    ("stream", 1400, 560, "Linux TCP, 1 flow"),
    ("short", 800, 560, "Short messages (6c): 4 KiB, no reply"),
    ("isolation", 1300, 620, "p99.9 loaded"),
    ("pingpong", 900, 560, "Ping-pong: 4 KiB request/response"),
    ("connect", 1400, 560, "Time per connection"),
    ("redis", 1400, 560, "Linux TCP"),
];

/// The runs of the smoke suite (MPTCP's only when the binary has it).
const RUNS: [&str; 19] = [
    "stream_tcp_1flow_rep1.json",
    "stream_netchannel_ch1-cw1_rep1.json",
    "stream_netchannel_ch4-cw1_rep1.json",
    "stream_netchannel_ch4-cw0_rep1.json",
    "stream_daemon_ch4-cw1_rep1.json",
    "short_tcp_1conn_rep1.json",
    "short_netchannel_ch1_rep1.json",
    "short_netchannel_ch4_rep1.json",
    "short_daemon_ch4_rep1.json",
    "pingpong_tcp_1conn_rep1.json",
    "pingpong_netchannel_default_rep1.json",
    "pingpong_daemon_default_rep1.json",
    "connect_tcp_1conn_rep1.json",
    "connect_netchannel_default_rep1.json",
    "connect_netchannel_optimistic_rep1.json",
    "connect_daemon_default_rep1.json",
    "isolation_all_bulk2_rep1.json",
    "redis_both_c50_rep1.json",
    "redis_both_c1_rep1.json",
];

/// Whether a run went as it should: ok, or (Redis) skipped because Redis is not installed.
fn went_well(name: &str, v: &Value) -> bool {
    v["status"] == "ok"
        || name.starts_with("redis")
            && v["status"] == "skipped"
            && v["reason"].as_str().is_some_and(|r| r.contains("install Redis"))
}

fn has_mptcp() -> bool {
    let out = run(&["bench", "stream", "--help"]);
    out.stdout.contains("mptcp")
}

fn read_json(dir: &Path, name: &str) -> Value {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert!(v.is_object(), "{}: {v}", path.display());
    v
}

/// Every run's JSON file, summary.md and the charts are there and well formed; returns the
/// runs' JSON by file name.
fn check_results(dir: &Path) -> Vec<(String, Value)> {
    let mut names: Vec<String> = RUNS.iter().map(|s| s.to_string()).collect();
    if has_mptcp() {
        names.push("stream_mptcp_sf4_rep1.json".to_string());
    }
    let runs: Vec<(String, Value)> = names.iter().map(|n| (n.clone(), read_json(dir, n))).collect();
    for (name, v) in &runs {
        assert_eq!(v["rep"], 1, "{name}: {v}");
        assert!(v["command"].as_array().is_some_and(|c| c.len() > 3), "{name}: {v}");
        let status = v["status"].as_str().unwrap_or_else(|| panic!("{name}: no status in {v}"));
        assert!(["ok", "failed", "skipped"].contains(&status), "{name}: {v}");
        if status == "ok" {
            assert!(v["report"]["mode"].is_string(), "{name}: the child's report is missing: {v}");
        }
    }
    for (name, v) in runs.iter().filter(|(n, v)| n.starts_with("redis") && v["status"] == "ok") {
        let r = &v["report"];
        assert_eq!(r["runs"].as_array().map(Vec::len), Some(2), "{name}: tcp and daemon: {v}");
        assert!(r["runs"][1]["vsockets_opened"].as_u64().is_some_and(|n| n > 0), "{name}: {v}");
        assert_eq!(r["datapath"], "shm", "{name}: experiment 7 runs on the default data path: {v}");
        assert!(r["ratios"].as_array().is_some_and(|a| !a.is_empty()), "{name}: {v}");
    }
    let (_, iso) = runs.iter().find(|(n, _)| n.starts_with("isolation")).unwrap();
    assert_eq!(iso["report"]["runs"].as_array().map(Vec::len), Some(3), "{iso}");

    let md = std::fs::read_to_string(dir.join("summary.md")).expect("summary.md");
    assert!(md.contains("Machine: ") && md.contains("Suite: smoke"), "{md}");
    for heading in
        ["### Stream", "### Short messages", "### Latency isolation", "### Ping-pong", "### Connection rate"]
    {
        let at = md.find(heading).unwrap_or_else(|| panic!("no `{heading}` table in summary.md:\n{md}"));
        let rest = &md[at..];
        assert!(rest.contains("| backend"), "`{heading}` has no table header:\n{md}");
        assert!(rest.contains("| tcp "), "`{heading}` has no tcp row:\n{md}");
        assert!(rest.contains("| netchannel "), "`{heading}` has no netchannel row:\n{md}");
        if heading != "### Latency isolation" {
            assert!(rest.contains("| daemon "), "`{heading}` has no daemon row:\n{md}");
        }
    }
    let at = md.find("### Redis").unwrap_or_else(|| panic!("no Redis table in summary.md:\n{md}"));
    assert!(md[at..].contains("| clients"), "the Redis table has no header:\n{md}");

    for (chart, w, h, text) in CHARTS {
        let name = format!("{chart}.png");
        let bytes = std::fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap_or_else(|e| panic!("{name} is not a PNG: {e}"));
        let mut buf = vec![0; reader.output_buffer_size().expect("a buffer size")];
        let info = reader.next_frame(&mut buf).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((info.width, info.height), (w, h), "{name}");
        assert_eq!(info.color_type, png::ColorType::Rgb, "{name}");
        // Not blank: a white background with text and axes in black, and colour (the series).
        let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
        assert_eq!(pixels[0], [255, 255, 255], "{name}: the background");
        assert!(pixels.iter().filter(|p| **p == [0, 0, 0]).count() > 1000, "{name}: no text or axes");
        assert!(pixels.iter().filter(|p| p[0].abs_diff(p[2]) > 60).count() > 300, "{name}: no colour");
        assert!(md.contains(&format!("]({name})")), "summary.md does not show {name}");

        let name = format!("{chart}.svg");
        let svg = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{name} is not XML: {e}"));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg", "{name}");
        assert_eq!(
            (root.attribute("width"), root.attribute("height")),
            (Some(&*w.to_string()), Some(&*h.to_string()))
        );
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        assert!(texts.contains(&text), "{name} has no text {text:?}: {texts:?}");
        assert!(md.contains(&format!("]({name})")), "summary.md does not link {name}");
    }
    runs
}

#[test]
fn smoke_suite_writes_every_run_the_summary_and_the_charts_and_reports_a_failed_run() {
    let dir = TempDir::new("suite");
    let args = ["bench", "suite", "--quick", "--smoke", "--fail-one", "--out", dir.path()];
    let out = run(&args);
    // The corrupted run fails verification; the suite goes on, records it and exits 1.
    assert_eq!(out.status.code(), Some(1), "{args:?}\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("1 of "), "{}", out.stderr);
    let runs = check_results(&dir.0);
    let (_, failed) = runs.iter().find(|(n, _)| n == "stream_netchannel_ch1-cw1_rep1.json").unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["stderr"].as_str().is_some_and(|s| s.contains("verify failed")), "{failed}");
    assert!(failed["report"].is_null(), "{failed}");
    for (name, v) in runs.iter().filter(|(n, _)| !n.contains("ch1-cw1") && !n.contains("mptcp")) {
        assert!(went_well(name, v), "{name}: {v}");
    }
    // One progress line per run when stderr is not a terminal, and no bar drawn.
    assert_eq!(out.stderr.lines().filter(|l| l.starts_with('[')).count(), runs.len(), "{}", out.stderr);
    assert!(!out.stderr.contains('\r') && !out.stderr.contains('\u{1b}'), "{}", out.stderr);
    let md = std::fs::read_to_string(dir.0.join("summary.md")).unwrap();
    assert!(md.contains("## Failed runs (1 of"), "{md}");
    assert!(out.stdout.contains("FAILED"), "{}", out.stdout);
}

#[test]
fn demo_prints_the_tables_and_where_the_results_are_with_a_progress_bar_on_a_terminal() {
    let dir = TempDir::new("demo");
    let out = run_on_terminal(&["demo", "--smoke", "--out", dir.path()]);
    assert!(
        out.status.success(),
        "demo failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.starts_with("NetChannel demo"), "{}", out.stdout);
    for needle in
        ["### Stream", "### Short messages", "### Latency isolation", "### Ping-pong", "### Connection rate"]
    {
        assert!(out.stdout.contains(needle), "no `{needle}` in:\n{}", out.stdout);
    }
    assert!(out.stdout.contains(&format!("Results in {}/", dir.path())), "{}", out.stdout);
    for file in ["summary.md", "stream.png", "stream.svg"] {
        assert!(out.stdout.contains(file), "no {file} in:\n{}", out.stdout);
    }
    let runs = check_results(&dir.0);
    assert!(runs.iter().all(|(_, v)| v["status"] != "failed"), "{runs:?}");
    // The bar, with the run in progress and the time left; each finished run's line above it.
    let terminal = &out.stderr;
    assert!(terminal.contains("] 1/") && terminal.contains("  ETA "), "terminal: {terminal:?}");
    assert!(terminal.contains("stream tcp") && terminal.contains(" runs done in "), "terminal: {terminal:?}");
    assert_eq!(terminal.matches("[ 1/").count(), 1, "the first run's line, once: {terminal:?}");
}
