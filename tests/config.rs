//! Settings and what the operator sees: a missing or wrong setting fails at
//! start with one clear line naming it (and what to do); a flag wins over
//! its environment variable; logs are plain text off a terminal, or JSON.

mod common;

use std::process::Command;

/// Run `windflow-notify serve` with only these variables; returns (exit
/// code, stderr).
fn serve_with(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_windflow-notify"));
    // Port 0: a busy port 8000 must not be what fails.
    command.arg("serve").args(args).env_clear().env("RUST_LOG", "error").env("WINDFLOW_BIND", "127.0.0.1:0");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run windflow-notify");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn assert_one_line_naming(env: &[(&str, &str)], args: &[&str], setting: &str) {
    let (code, stderr) = serve_with(env, args);
    assert_ne!(code, 0, "must fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    assert!(lines[0].contains(setting), "{setting} named in: {stderr}");
}

const SECRET: (&str, &str) = ("JWT_SECRET_KEY", "s");
const NO_DATABASE: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none");

#[test]
fn missing_secret_names_jwt_secret_key() {
    assert_one_line_naming(&[NO_DATABASE], &[], "JWT_SECRET_KEY");
}

#[test]
fn wrong_durations_and_counts_name_their_variable() {
    for (name, value) in [
        ("WINDFLOW_PING_INTERVAL", "soon"),
        ("WINDFLOW_EVENT_RETENTION", "0s"),
        ("WINDFLOW_MAX_CONNECTIONS", "0"),
        ("WINDFLOW_CLIENT_QUEUE", "-5"),
        ("WINDFLOW_HISTORY_SIZE", "lots"),
        ("WINDFLOW_HISTORY_BYTES", "64 megs"),
        ("WINDFLOW_SEND_BUFFER", "0"),
        ("WINDFLOW_BIND", "localhost"),
        ("JWT_ALGORITHM", "none"),
    ] {
        assert_one_line_naming(&[SECRET, NO_DATABASE, (name, value)], &[], name);
    }
}

#[test]
fn missing_public_key_file_names_it() {
    assert_one_line_naming(&[NO_DATABASE, ("JWT_ALGORITHM", "ES256")], &[], "JWT_PUBLIC_KEY_FILE");
    assert_one_line_naming(
        &[NO_DATABASE, ("JWT_ALGORITHM", "RS256"), ("JWT_PUBLIC_KEY_FILE", "/nonexistent.pem")],
        &[],
        "JWT_PUBLIC_KEY_FILE",
    );
}

#[test]
fn bad_or_unreachable_database_names_database_url() {
    assert_one_line_naming(&[SECRET, ("DATABASE_URL", "nope://")], &[], "DATABASE_URL");
    assert_one_line_naming(&[SECRET, NO_DATABASE], &[], "DATABASE_URL");
}

#[test]
fn a_flag_wins_over_its_variable() {
    // The variable is wrong, the flag is right: the failure is now about
    // the database, not the interval.
    let (_, stderr) =
        serve_with(&[SECRET, NO_DATABASE, ("WINDFLOW_PING_INTERVAL", "soon")], &["--ping-interval", "5s"]);
    assert!(stderr.contains("DATABASE_URL") && !stderr.contains("ping"), "{stderr}");
    // And a wrong flag is reported under the flag's name even when the variable is fine.
    let (_, stderr) = serve_with(&[SECRET, NO_DATABASE, ("WINDFLOW_PING_INTERVAL", "5s")], &["--ping-interval", "x"]);
    assert!(stderr.contains("--ping-interval"), "{stderr}");
}

/// `windflow-notify migrate` on a fresh database, stderr piped (not a
/// terminal); returns its stderr lines.
async fn migrate_logs(env: &[(&str, &str)], args: &[&str]) -> Vec<String> {
    let database = common::TestDatabase::create().await;
    let admin = common::admin_url();
    let server = admin.rsplit_once('/').map_or(admin.as_str(), |(server, _)| server);
    let url = format!("{server}/{}", database.name);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .args(args)
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &url)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run windflow-notify migrate");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "migrate failed: {stderr}");
    stderr.lines().map(str::to_string).collect()
}

#[tokio::test]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let lines = migrate_logs(&[], &[]).await;
    assert!(lines.iter().any(|l| l.contains("migration applied")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "no ANSI escape codes: {lines:?}");
}

#[tokio::test]
async fn log_format_json_writes_one_object_a_line_by_flag_or_variable() {
    for (env, args) in [(vec![], vec!["--log-format", "json"]), (vec![("WINDFLOW_LOG_FORMAT", "json")], vec![])] {
        let lines = migrate_logs(&env, &args).await;
        assert!(!lines.is_empty());
        let applied = lines
            .iter()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{line}: {e}")))
            .find(|entry| entry["message"] == "migration applied")
            .unwrap_or_else(|| panic!("a `migration applied` entry: {lines:?}"));
        assert_eq!(applied["level"], "INFO");
        assert!(applied["migration"].is_string(), "fields are keys of the object: {applied}");
    }
}

#[test]
fn a_url_of_another_database_says_what_is_expected() {
    let (code, stderr) = serve_with(&[SECRET, ("DATABASE_URL", "mysql://root@localhost/app")], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("`mysql://` is not a PostgreSQL URL") && stderr.contains("postgres://"), "{stderr}");
}

#[test]
fn a_missing_database_says_how_to_create_it() {
    let admin = common::admin_url();
    let server = admin.rsplit_once('/').map_or(admin.as_str(), |(server, _)| server);
    let url = format!("{server}/wf_missing_{}", uuid::Uuid::new_v4().simple());
    let (code, stderr) = serve_with(&[SECRET, ("DATABASE_URL", &url)], &[]);
    assert_ne!(code, 0);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("does not exist") && lines[0].contains("createdb") && lines[0].contains("demo"),
        "{stderr}"
    );
    assert!(!lines[0].contains("3D000"), "words, not the SQLSTATE: {stderr}");
}

#[tokio::test]
async fn demo_logs_each_migration_once_and_names_the_dashboard() {
    use tokio::io::AsyncBufReadExt;
    let database = common::TestDatabase::create().await;
    let admin = common::admin_url();
    let server = admin.rsplit_once('/').map_or(admin.as_str(), |(server, _)| server);
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .arg("demo")
        .env_clear()
        .env("DATABASE_URL", format!("{server}/{}", database.name))
        .env("WINDFLOW_BIND", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start windflow-notify demo");
    let mut stderr = tokio::io::BufReader::new(demo.stderr.take().expect("piped stderr")).lines();
    let mut seen = Vec::new();
    let start = loop {
        let line = tokio::time::timeout(common::WAIT, stderr.next_line())
            .await
            .expect("demo starts in time")
            .expect("read stderr")
            .unwrap_or_else(|| panic!("demo exited early: {seen:?}"));
        if line.contains("serving") {
            break line;
        }
        seen.push(line);
    };
    assert!(start.contains("dashboard") && start.contains("http://127.0.0.1:"), "{start}");
    for migration in ["V1__schema", "V2__events"] {
        let mentions = seen.iter().filter(|line| line.contains(migration)).count();
        assert_eq!(mentions, 1, "{migration} logged once: {seen:#?}");
    }
}
