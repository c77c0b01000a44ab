//! The Node side of the test suite, run against this build's binary: the
//! browser client's and the Vue composable's tests, the fixture app (type
//! check, builds, Chromium), and in headless Chromium the dashboard and
//! `GET /events` through `EventSource` (`clients/tests/`). Needs
//! `npm ci --prefix clients`, `npm ci --prefix clients/fixture-app` and
//! Chromium (`.ci/run` installs them).
//!
//! It has its own harness (`harness = false` in Cargo.toml) for one
//! reason: a test that cannot run must not count as passed. When
//! `clients/node_modules` is missing it counts as ignored, and when Node
//! skips some of its tests (no Chromium), the summary line, where the
//! counts are, says SKIPPED and why.

use std::path::Path;
use std::process::{Command, ExitCode};

const NAME: &str = "composable_and_dashboard_in_a_real_browser";

/// How the run went.
enum Outcome {
    /// Every Node test ran and passed.
    Passed,
    /// Nothing ran: why.
    NotRun(String),
    /// The Node tests passed, but these were skipped (Node's reasons).
    PartlySkipped(Vec<String>),
    /// What npm printed.
    Failed(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    if !selected(&args) {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n");
        return ExitCode::SUCCESS;
    }
    println!("\nrunning 1 test");
    let (line, summary, failed) = match run() {
        Outcome::Passed => ("ok".to_string(), "ok. 1 passed; 0 failed; 0 ignored".to_string(), false),
        Outcome::NotRun(why) => {
            (format!("SKIPPED ({why})"), format!("ok. 0 passed; 0 failed; 1 ignored; SKIPPED: {why}"), false)
        }
        Outcome::PartlySkipped(skipped) => {
            let why = skipped.join("; ");
            let count = skipped.len();
            (
                format!("ok, but {count} of its Node tests SKIPPED"),
                format!("ok. 1 passed; 0 failed; 0 ignored; SKIPPED: {count} of its Node tests: {why}"),
                false,
            )
        }
        Outcome::Failed(output) => {
            println!("{output}");
            ("FAILED".to_string(), "FAILED. 0 passed; 1 failed; 0 ignored".to_string(), true)
        }
    };
    println!("test {NAME} ... {line}\n\ntest result: {summary}\n");
    if failed { ExitCode::from(101) } else { ExitCode::SUCCESS }
}

/// Whether `cargo test [FILTER…] [-- ARGS]` asks for this test: no name
/// filter, or one that matches (`--exact`: equal), and not `--skip`ped.
fn selected(args: &[String]) -> bool {
    // libtest's options that take a value as the next argument.
    const WITH_VALUE: [&str; 6] = ["--test-threads", "--skip", "--color", "--format", "--logfile", "-Z"];
    let exact = args.iter().any(|arg| arg == "--exact");
    let matches = |filter: &str| if exact { filter == NAME } else { NAME.contains(filter) };
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--skip" {
            skips.extend(rest.next());
        } else if WITH_VALUE.contains(&arg.as_str()) {
            rest.next();
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    // `--ignored` runs only ignored tests, and this one is not.
    let ignored_only = args.iter().any(|arg| arg == "--ignored");
    !ignored_only && (filters.is_empty() || filters.iter().any(|f| matches(f))) && !skips.iter().any(|s| matches(s))
}

fn run() -> Outcome {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    if !clients.join("node_modules").is_dir() {
        return Outcome::NotRun("clients/node_modules is missing: run `npm ci --prefix clients` (.ci/run does)".into());
    }
    let output = match Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&clients)
        .env("WINDFLOW_BIN", env!("CARGO_BIN_EXE_windflow-notify"))
        .output()
    {
        Ok(output) => output,
        Err(e) => return Outcome::Failed(format!("cannot run `npm test` in clients/ (is Node.js installed?): {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Outcome::Failed(format!(
            "npm test in clients/ failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Node's TAP output: `ok 3 - the dashboard … # SKIP Chromium not found …`.
    let skipped: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.split_once("# SKIP").map(|(test, why)| (test, why.trim())))
        .map(|(test, why)| {
            let test = test.trim().trim_start_matches("ok ").trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{} ({why})", test.trim_start_matches(" - ").trim())
        })
        .collect();
    if skipped.is_empty() { Outcome::Passed } else { Outcome::PartlySkipped(skipped) }
}
