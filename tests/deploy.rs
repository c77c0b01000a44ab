//! deploy/: what can be checked on this machine about the systemd unit,
//! the container recipe, the settings file and the monitoring files.
//! (The container build itself needs base images this machine cannot
//! fetch.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use windflow_notify::check::RESERVED_FILES;
use windflow_notify::config::defaults;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// The value of `key=` in a unit file or an env file, if set (not commented out).
fn setting<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines().filter_map(|line| line.strip_prefix(key)?.strip_prefix('=')).collect()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("windflow-notify.service");
    // Where this machine has the binary, and no environment file: as an
    // installed unit would be, but for those two paths.
    let installed = unit
        .replace(
            "ExecStart=/usr/local/bin/windflow-notify",
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_windflow-notify")),
        )
        .replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/");
    assert_ne!(installed, unit, "ExecStart and EnvironmentFile as the file's comments install them");
    let dir = std::env::temp_dir().join(format!("wf-unit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("windflow-notify.service");
    std::fs::write(&path, installed).expect("write the unit");
    let output = Command::new("systemd-analyze").arg("verify").arg(&path).output();
    let _ = std::fs::remove_dir_all(&dir);
    let output = output.expect("systemd-analyze is missing: apt-get install systemd (.ci/run does)");
    // verify exits 0 on an unknown key or a bad value, and says so on stderr.
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

#[test]
fn the_systemd_unit_runs_as_its_own_user_sandboxed_restarted_and_stopped_by_sigterm() {
    let unit = read("windflow-notify.service");
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("User", "windflow-notify"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ExecStart", "/usr/local/bin/windflow-notify serve"),
    ] {
        assert_eq!(setting(&unit, key), [value], "{key}={value}");
    }
    let files: u64 = setting(&unit, "LimitNOFILE").first().and_then(|n| n.parse().ok()).expect("LimitNOFILE=N");
    let needed = defaults::MAX_CONNECTIONS.get() as u64 + RESERVED_FILES;
    assert!(files >= needed, "LimitNOFILE={files} holds the default WINDFLOW_MAX_CONNECTIONS plus {RESERVED_FILES}");
}

#[test]
fn the_container_recipe_builds_in_a_stage_of_its_own_and_ships_the_binary_alone_as_non_root() {
    let recipe = read("Containerfile");
    let instructions: Vec<&str> =
        recipe.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).collect();
    let stages: Vec<usize> =
        instructions.iter().enumerate().filter(|(_, line)| line.starts_with("FROM ")).map(|(i, _)| i).collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        instructions.iter().any(|line| line.starts_with("RUN cargo build --release --locked")),
        "the build stage builds with the lock file"
    );
    let last = &instructions[stages[stages.len() - 1]..];
    let copies: Vec<&&str> = last.iter().filter(|line| line.starts_with("COPY") || line.starts_with("ADD")).collect();
    assert_eq!(
        copies,
        [&"COPY --from=build /src/target/release/windflow-notify /usr/local/bin/windflow-notify"],
        "the final image gets the binary alone"
    );
    let user = last.iter().find_map(|line| line.strip_prefix("USER ")).expect("a USER in the final stage");
    assert!(!["root", "0"].contains(&user.split(':').next().unwrap_or_default()), "not root: {user}");
    assert!(last.contains(&"STOPSIGNAL SIGTERM"));
    assert!(last.contains(&"ENTRYPOINT [\"/usr/local/bin/windflow-notify\"]"));
}

#[test]
fn the_env_example_lists_every_setting_serve_reads_and_no_other() {
    let help = Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .expect("serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let read_by_serve: BTreeSet<&str> =
        help.split("[env: ").skip(1).filter_map(|rest| rest.split(['=', ']']).next()).collect();
    assert!(read_by_serve.len() > 10, "{read_by_serve:?}");
    let example = read(".env.example");
    let listed: BTreeSet<&str> = example
        .lines()
        .map(|line| line.trim_start_matches('#').trim())
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert_eq!(listed, read_by_serve, "deploy/.env.example lists exactly what serve reads");
}

/// Every PromQL expression in the monitoring files.
fn expressions() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("monitoring/grafana-dashboard.json")).expect("the dashboard is JSON");
    let mut all: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_string))
        .collect();
    let rules = read("monitoring/prometheus-alerts.yml");
    all.extend(rules.lines().filter_map(|line| line.trim().strip_prefix("expr: ")).map(str::to_string));
    all
}

/// The `windflow_…` names in a PromQL expression.
fn metric_names(expression: &str) -> Vec<&str> {
    expression
        .match_indices("windflow_")
        .map(|(at, _)| {
            let rest = &expression[at..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_read_is_on_metrics() {
    let expressions = expressions();
    let named: BTreeSet<&str> = expressions.iter().flat_map(|e| metric_names(e)).collect();
    assert!(named.len() >= 8, "the files read the server's metrics: {named:?}");
    let rules = read("monitoring/prometheus-alerts.yml");
    for alert in [
        "WindflowEventSourceDown",
        "WindflowSlowConsumerKicks",
        "WindflowNotificationQueueFilling",
        "WindflowForgedNotifications",
        "WindflowDeliveryLatencyHigh",
    ] {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "{alert} in prometheus-alerts.yml");
    }

    let app = spawn_app().await;
    let (status, exposed) = app.server.get("/metrics").await;
    assert_eq!(status, 200);
    let missing: Vec<&&str> = named
        .iter()
        .filter(|name| {
            !exposed.lines().any(|line| line.strip_prefix(**name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        })
        .collect();
    assert!(missing.is_empty(), "named in deploy/monitoring but not on /metrics: {missing:?}");
}
