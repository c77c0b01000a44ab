//! SPEC §8 `tail`: the terminal client prints each server message as one
//! JSON line and resumes by itself after the server goes away.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use windflow_notify::auth::Verifier;
use windflow_notify::config::ServerArgs;

/// A running `windflow-notify tail`; killed when dropped.
struct Tail {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Tail {
    fn start(server: SocketAddr, token: &str, extra: &[&str]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
            .args(["tail", "--url", &format!("ws://{server}/ws"), "--token", token])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start windflow-notify tail");
        let stdout = child.stdout.take().expect("piped stdout");
        Tail { child, lines: BufReader::new(stdout).lines() }
    }

    /// The next line, parsed; every line must be one JSON object.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line from tail within {WAIT:?}"))
            .expect("read tail's stdout")
            .expect("tail exited early");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object per line: {line}: {e}"))
    }

    async fn next_of(&mut self, kind: &str) -> Value {
        let message = self.next().await;
        assert_eq!(message["type"], kind, "unexpected line: {message}");
        message
    }
}

/// A server on a fixed address, so a restarted one is found at the same URL.
async fn server_on(addr: SocketAddr, database: &TestDatabase) -> TestServer {
    let listener = TcpListener::bind(addr).await.expect("bind the same address again");
    let verifier = Verifier::from_args(&jwt_args()).expect("verifier");
    let shutdown = CancellationToken::new();
    let (config, token) = (database.config.clone(), shutdown.clone());
    let handle = tokio::spawn(async move {
        windflow_notify::serve(listener, &config, ServerArgs::with_bind(addr), verifier, token)
            .await
            .expect("server failed");
    });
    let server = TestServer { addr, shutdown, handle: Some(handle) };
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, 200, "healthz: {body}");
    server
}

#[tokio::test]
async fn tail_prints_each_message_as_one_json_line() {
    let app = spawn_app().await;
    let owner = user();
    let mut tail = Tail::start(app.server.addr, &token(owner), &["--topic", "deployment_events"]);
    assert_eq!(tail.next_of("authenticated").await["data"]["user_id"], owner.user_id.to_string());
    assert_eq!(tail.next_of("subscribed").await["data"]["topic"], "deployment_events");

    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    let status = tail.next_of("DEPLOYMENT_STATUS_CHANGED").await;
    assert_eq!(status["data"]["deployment_id"], deployment.to_string());
    assert!(status["event_id"].is_i64());
    app.writer.log(deployment, "[INFO] line one\nline two").await;
    let log = tail.next_of("DEPLOYMENT_LOGS_UPDATE").await;
    assert_eq!(log["data"]["logs"], "[INFO] line one\nline two", "a multi-line log stays on one output line");
}

// A deployment created before tail starts would reach its owner's tail
// through the owner feed, racing `subscribed`: these tails watch as a
// superuser, who gets only what it subscribes to.
#[tokio::test]
async fn tail_subscribes_to_every_topic_given() {
    let app = spawn_app().await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    let logs = format!("deployment_logs_{deployment}");
    let progress = format!("deployment_progress_{deployment}");
    let mut tail = Tail::start(app.server.addr, &token(superuser()), &["--topic", &logs, "--topic", &progress]);
    tail.next_of("authenticated").await;
    assert_eq!(tail.next_of("subscribed").await["data"]["topic"], logs);
    assert_eq!(tail.next_of("subscribed").await["data"]["topic"], progress);
}

#[tokio::test]
async fn tail_since_replays_what_happened_before_it_started() {
    let app = spawn_app().await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.log(deployment, "before tail").await;
    let topic = format!("deployment_logs_{deployment}");
    let mut tail = Tail::start(app.server.addr, &token(superuser()), &["--topic", &topic, "--since", "0"]);
    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    assert_eq!(tail.next_of("DEPLOYMENT_LOGS_UPDATE").await["data"]["logs"], "before tail");
}

#[tokio::test]
async fn tail_resumes_after_a_server_restart_without_gap_or_duplicate() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let addr = server.addr;
    let owner = user();
    let deployment = writer.create_deployment(owner.user_id, None).await;
    let topic = format!("deployment_logs_{deployment}");
    let mut tail = Tail::start(addr, &token(superuser()), &["--topic", &topic]);
    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    writer.log(deployment, "before restart").await;
    let before = tail.next_of("DEPLOYMENT_LOGS_UPDATE").await["event_id"].as_i64().expect("event id");

    server.stop().await;
    writer.log(deployment, "while down 1").await;
    writer.log(deployment, "while down 2").await;
    let _server = server_on(addr, &database).await;

    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    let mut seen = vec![before];
    for expected in ["while down 1", "while down 2"] {
        let event = tail.next_of("DEPLOYMENT_LOGS_UPDATE").await;
        assert_eq!(event["data"]["logs"], expected);
        seen.push(event["event_id"].as_i64().expect("event id"));
    }
    writer.log(deployment, "after restart").await;
    let live = tail.next_of("DEPLOYMENT_LOGS_UPDATE").await;
    assert_eq!(live["data"]["logs"], "after restart", "nothing replayed twice before the live event");
    seen.push(live["event_id"].as_i64().expect("event id"));
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique, seen);
}

#[tokio::test]
async fn tail_exits_with_a_clear_error_when_the_token_is_refused() {
    let app = spawn_app().await;
    let mut tail = Tail::start(app.server.addr, "not-a-jwt", &["--topic", "deployment_events"]);
    let status = tokio::time::timeout(WAIT, tail.child.wait()).await.expect("tail exits").expect("wait");
    assert!(!status.success());
    let mut stderr = String::new();
    if let Some(mut pipe) = tail.child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stderr).await.expect("read stderr");
    }
    assert!(stderr.contains("--token"), "the error names the flag: {stderr}");
}
