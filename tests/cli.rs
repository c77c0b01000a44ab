//! What a new user meets on the command line: a wrong or missing argument
//! gets one line that names it and where to read more, help is there when
//! asked for, and `demo` picks up where it left off when restarted.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    output_of(windflow_command(args, env))
}

/// The command fails with exactly one line on stderr, containing each of `says`.
fn fails_with_one_line(args: &[&str], env: &[(&str, &str)], says: &[&str]) -> String {
    let (code, _, stderr) = run(args, env);
    assert_ne!(code, 0, "{args:?} must fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line, got: {stderr}");
    for needle in says {
        assert!(lines[0].contains(needle), "{args:?}: {needle:?} in: {}", lines[0]);
    }
    lines[0].to_string()
}

const NO_DATABASE: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none");

#[test]
fn no_command_lists_the_commands() {
    let (code, stdout, stderr) = run(&[], &[]);
    assert_eq!(code, 2);
    assert_eq!(stdout, "");
    for command in ["serve", "migrate", "check", "token", "tail", "demo", "help"] {
        assert!(stderr.contains(&format!("\n  {command} ")), "{command} listed: {stderr}");
    }
}

#[test]
fn help_answers_with_and_without_a_command_and_takes_help() {
    let (code, stdout, _) = run(&["help"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Commands:") && stdout.contains("check"), "{stdout}");
    let (code, stdout, stderr) = run(&["help", "--help"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Usage: windflow-notify help "), "{stdout}");
    let (code, stdout, _) = run(&["help", "token"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Usage: windflow-notify token") && stdout.contains("--sub"), "{stdout}");
    fails_with_one_line(&["help", "sevre"], &[], &["no command 'sevre'", "serve", "tail"]);
}

#[test]
fn a_missing_argument_is_named_with_where_to_read_more() {
    fails_with_one_line(&["token"], &[], &["--sub <SUB>", "`windflow-notify token --help`"]);
    fails_with_one_line(&["tail"], &[], &["--topic <TOPIC>", "--token <WINDFLOW_TOKEN>", "tail --help"]);
}

#[test]
fn an_id_that_is_no_uuid_says_a_uuid_is_expected() {
    fails_with_one_line(&["token", "--sub", "abc"], &[], &["--sub", "expected a UUID", "\"abc\""]);
    let sub = uuid::Uuid::new_v4().to_string();
    fails_with_one_line(&["token", "--sub", &sub, "--org", "acme"], &[], &["--org", "expected a UUID"]);
}

#[test]
fn zero_connections_says_at_least_one() {
    fails_with_one_line(
        &["serve"],
        &[("WINDFLOW_MAX_CONNECTIONS", "0"), ("JWT_SECRET_KEY", "s"), NO_DATABASE],
        &["WINDFLOW_MAX_CONNECTIONS", "must be at least 1"],
    );
}

#[test]
fn a_host_name_in_windflow_bind_is_resolved() {
    // The start gets past the address and fails on the database instead.
    let line = fails_with_one_line(
        &["serve"],
        &[("WINDFLOW_BIND", "localhost:0"), ("JWT_SECRET_KEY", "s"), NO_DATABASE],
        &["DATABASE_URL"],
    );
    assert!(!line.contains("WINDFLOW_BIND"), "{line}");
    fails_with_one_line(
        &["serve"],
        &[("WINDFLOW_BIND", "localhost"), ("JWT_SECRET_KEY", "s"), NO_DATABASE],
        &["WINDFLOW_BIND", "HOST:PORT", "localhost:8000"],
    );
}

#[test]
fn the_log_filters_help_is_one_line() {
    let (_, help, _) = run(&["serve", "--help"], &[]);
    let at = help.find("--rust-log").expect("--rust-log in serve --help");
    let mut lines = help[at..].lines();
    let flag = lines.next();
    let entry: Vec<&str> =
        flag.into_iter().chain(lines.take_while(|line| !line.trim_start().starts_with("--"))).collect();
    // The flag's line and one line of help.
    assert_eq!(entry.len(), 2, "{entry:#?}");
}

#[tokio::test]
async fn a_demo_on_a_taken_port_says_so_once_with_the_fix() {
    let database = TestDatabase::create().await;
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let line = fails_with_one_line(
        &["demo"],
        &[("DATABASE_URL", &database.url), ("WINDFLOW_BIND", &address)],
        &["WINDFLOW_BIND", &address, "stop it, or set WINDFLOW_BIND"],
    );
    assert_eq!(line.matches("in use").count(), 1, "said once: {line}");
}

/// A running `demo`, killed when dropped, and what its banner said.
struct Demo {
    _child: tokio::process::Child,
    /// Kept open: the banner goes on after what is read of it, and a demo
    /// whose stdout is closed dies on its next line (println! panics on a
    /// broken pipe).
    _stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    url: String,
    token: String,
    you: String,
}

impl Demo {
    /// Start `demo` on `database` without JWT_SECRET_KEY and read its banner.
    async fn start(database: &TestDatabase) -> Demo {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
            .arg("demo")
            .env_clear()
            .env("RUST_LOG", "error")
            .env("DATABASE_URL", &database.url)
            .env("WINDFLOW_BIND", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start windflow-notify demo");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let (mut url, mut you) = (None, None);
        while url.is_none() || you.is_none() {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("the banner in time")
                .expect("read stdout")
                .expect("demo exited before its banner");
            if let Some(at) = line.find("http://") {
                url = Some(line[at..].trim().to_string());
            }
            if let Some(rest) = line.trim().strip_prefix("You are user ") {
                you = rest.split_whitespace().next().map(str::to_string);
            }
        }
        let url = url.unwrap_or_default();
        let token = url.split_once("?token=").map(|(_, token)| token.to_string()).expect("a token in the URL");
        Demo { _child: child, _stdout: lines, url, token, you: you.unwrap_or_default() }
    }

    /// The address this demo serves on.
    fn address(&self) -> std::net::SocketAddr {
        let origin = self.url.trim_start_matches("http://");
        let origin = origin.split_once('/').map_or(origin, |(origin, _)| origin);
        origin.parse().unwrap_or_else(|e| panic!("{origin}: {e}"))
    }
}

#[tokio::test]
async fn a_restarted_demo_keeps_its_user_its_deployments_and_accepts_the_open_pages_token() {
    let database = TestDatabase::create().await;
    let first = Demo::start(&database).await;
    let old_token = first.token.clone();
    drop(first);

    let second = Demo::start(&database).await;
    let client = database.client().await;
    let rows: i64 = client.query_one("SELECT count(*) FROM deployments", &[]).await.expect("count").get(0);
    assert_eq!(rows, 5, "the same five deployments, not five more");

    // The page left open still holds the first run's token.
    let request = windflow_testkit::upgrade_request(second.address(), Some(&old_token)).expect("request");
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("the old token is accepted");
    let authenticated = windflow_testkit::next_json(&mut socket, WAIT).await.expect("a message");
    assert_eq!(authenticated["type"], "authenticated", "{authenticated}");
    assert_eq!(authenticated["data"]["user_id"], second.you.as_str(), "the same user");
    // And its deployments are driven again: their events reach it.
    let event = windflow_testkit::next_json(&mut socket, WAIT).await.expect("an event");
    assert!(event["event_id"].is_i64(), "{event}");
}
