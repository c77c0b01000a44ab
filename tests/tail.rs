//! `windflow-notify tail`: the terminal client prints each server message
//! as one JSON line, resumes by itself after the server goes away, and gives
//! up with one clear line when retrying cannot help.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use windflow_notify::auth::Verifier;
use windflow_notify::config::ServerArgs;

/// A running `windflow-notify tail`; killed when dropped.
struct Tail {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Tail {
    fn start(server: SocketAddr, token: &str, extra: &[&str]) -> Tail {
        let url = format!("ws://{server}/ws");
        let mut args = vec!["--url", &url, "--token", token];
        args.extend_from_slice(extra);
        Tail::spawn(&args, &[])
    }

    /// `windflow-notify tail ARGS` with only these environment variables
    /// (and RUST_LOG), so a WINDFLOW_BIND of the caller's shell cannot leak in.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
            .arg("tail")
            .args(args)
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start windflow-notify tail");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        Tail { child, lines: BufReader::new(stdout).lines(), stderr: BufReader::new(stderr).lines() }
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

    /// The next stderr line containing `needle`.
    async fn stderr_line(&mut self, needle: &str) -> String {
        loop {
            let line = tokio::time::timeout(WAIT, self.stderr.next_line())
                .await
                .unwrap_or_else(|_| panic!("no stderr line with {needle:?} within {WAIT:?}"))
                .expect("read tail's stderr")
                .unwrap_or_else(|| panic!("tail's stderr ended before a line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Wait for tail to exit by itself; returns its exit code and stderr.
    async fn exit(mut self) -> (Option<i32>, Vec<String>) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("tail still running after {WAIT:?}: it should have given up"))
            .expect("wait for tail");
        let mut lines = Vec::new();
        while let Ok(Some(line)) = self.stderr.next_line().await {
            lines.push(line);
        }
        (status.code(), lines)
    }
}

/// Tail gave up with a non-zero exit, after no retry, on one last line
/// that contains each of `says`.
async fn assert_gives_up(tail: Tail, says: &[&str]) {
    let (code, stderr) = tail.exit().await;
    assert!(matches!(code, Some(c) if c != 0), "non-zero exit, got {code:?}: {stderr:?}");
    assert!(!stderr.iter().any(|l| l.contains("retry_in")), "a permanent failure is not retried: {stderr:?}");
    let last = stderr.last().map(String::as_str).unwrap_or_default();
    for needle in says {
        assert!(last.contains(needle), "the last line says {needle:?}: {stderr:?}");
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
    let tail = Tail::start(app.server.addr, "not-a-jwt", &["--topic", "deployment_events"]);
    assert_gives_up(tail, &["--token", "HTTP 401", "not a JWT"]).await;
}

#[tokio::test]
async fn tail_without_the_ws_path_says_so_instead_of_retrying() {
    let app = spawn_app().await;
    // `/` is the dashboard: HTTP 200 instead of an upgrade.
    let url = format!("ws://{}", app.server.addr);
    let tail = Tail::spawn(&["--url", &url, "--token", &token(user()), "--topic", "deployment_events"], &[]);
    assert_gives_up(tail, &["HTTP 200", &format!("ws://{}/ws", app.server.addr)]).await;
}

#[tokio::test]
async fn tail_with_a_wrong_path_says_so_instead_of_retrying() {
    let app = spawn_app().await;
    let url = format!("ws://{}/nope", app.server.addr);
    let tail = Tail::spawn(&["--url", &url, "--token", &token(user()), "--topic", "deployment_events"], &[]);
    assert_gives_up(tail, &["HTTP 404", &format!("ws://{}/ws", app.server.addr)]).await;
}

#[tokio::test]
async fn tail_refuses_a_topic_that_is_no_topic() {
    let tail = Tail::spawn(&["--url", "ws://127.0.0.1:1/ws", "--token", "t", "--topic", "deployments"], &[]);
    assert_gives_up(tail, &["--topic deployments", "deployment_events"]).await;
}

#[tokio::test]
async fn tail_exits_when_the_server_refuses_the_topic() {
    let app = spawn_app().await;
    let someone_elses = app.writer.create_deployment(user().user_id, None).await;
    let topic = format!("deployment_logs_{someone_elses}");
    let mut tail = Tail::start(app.server.addr, &token(user()), &["--topic", &topic]);
    tail.next_of("authenticated").await;
    assert_eq!(tail.next_of("error").await["data"]["code"], "forbidden");
    assert_gives_up(tail, &[&topic, "forbidden"]).await;
}

#[tokio::test]
async fn tail_defaults_its_url_to_windflow_bind_and_waits_for_the_server() {
    let database = TestDatabase::create().await;
    // A free port with nothing on it yet: tail must retry "connection refused".
    let addr = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let bind = addr.to_string();
    let owner = user();
    let mut tail =
        Tail::spawn(&["--topic", "deployment_events", "--token", &token(owner)], &[("WINDFLOW_BIND", bind.as_str())]);
    let said = tail.stderr_line("connecting").await;
    assert!(said.contains(&format!("ws://{addr}/ws")) && said.contains("WINDFLOW_BIND"), "says where: {said}");
    tail.stderr_line("cannot connect; will retry").await;

    let _server = server_on(addr, &database).await;
    assert_eq!(tail.next_of("authenticated").await["data"]["user_id"], owner.user_id.to_string());
    tail.next_of("subscribed").await;
}

/// An owner's tail reconnects with its topic and its cursor in the URL: the
/// owner feed and the topic resume at one point, each event once.
#[tokio::test]
async fn tail_reconnects_with_its_topics_and_cursor_in_the_url() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let addr = server.addr;
    let owner = user();
    let deployment = writer.create_deployment(owner.user_id, None).await;
    let topic = format!("deployment_logs_{deployment}");
    let url = format!("ws://{addr}/ws");
    let owner_token = token(owner);
    let args = ["--url", url.as_str(), "--token", owner_token.as_str(), "--topic", topic.as_str()];
    let mut tail = Tail::spawn(&args, &[("RUST_LOG", "windflow_notify::tail=debug")]);
    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    writer.log(deployment, "before restart").await;
    // The owner feed and the topic both carry it: once.
    let before = tail.next_of("DEPLOYMENT_LOGS_UPDATE").await["event_id"].as_i64().expect("event id");

    server.stop().await;
    writer.log(deployment, "while down").await;
    writer.set_status(deployment, "running").await;
    let _server = server_on(addr, &database).await;
    let reconnect = tail.stderr_line(&format!("since={before}")).await;
    assert!(reconnect.contains(&format!("topic={topic}")), "the topic is in the URL: {reconnect}");
    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    assert_eq!(tail.next_of("DEPLOYMENT_LOGS_UPDATE").await["data"]["logs"], "while down");
    assert_eq!(tail.next_of("DEPLOYMENT_STATUS_CHANGED").await["data"]["status"], "running", "the owner feed too");
    writer.log(deployment, "after restart").await;
    assert_eq!(tail.next_of("DEPLOYMENT_LOGS_UPDATE").await["data"]["logs"], "after restart", "nothing twice");
}

/// A fresh subscriber whose first reconnect comes before any event: the
/// `event_id` of its `subscribed` reply is where it resumes, so a
/// deployment created while the server was down still reaches it.
#[tokio::test]
async fn tail_resumes_from_subscribed_when_no_event_came_before_the_restart() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let addr = server.addr;
    // A superuser: no owner feed, only what deployment_events carries.
    let mut tail = Tail::start(addr, &token(superuser()), &["--topic", "deployment_events"]);
    tail.next_of("authenticated").await;
    let subscribed = tail.next_of("subscribed").await;
    assert!(subscribed["data"]["event_id"].is_i64(), "subscribed carries the resume cursor: {subscribed}");

    server.stop().await;
    let deployment = writer.create_deployment(user().user_id, None).await;
    let _server = server_on(addr, &database).await;

    tail.next_of("authenticated").await;
    tail.next_of("subscribed").await;
    let missed = tail.next_of("DEPLOYMENT_STATUS_CHANGED").await;
    assert_eq!(missed["data"]["deployment_id"], deployment.to_string(), "written while tail was reconnecting");
}

#[tokio::test]
async fn tail_retries_a_full_server_and_gets_in_once_a_slot_frees() {
    let app = spawn_app_with(|settings| settings.max_connections = NonZeroUsize::new(1).unwrap()).await;
    let occupant = app.server.connect_as(user()).await;
    let owner = user();
    let mut tail = Tail::start(app.server.addr, &token(owner), &["--topic", "deployment_events"]);
    let said = tail.stderr_line("cannot connect; will retry").await;
    assert!(said.contains("503"), "HTTP 503 is worth retrying: {said}");
    drop(occupant);
    assert_eq!(tail.next_of("authenticated").await["data"]["user_id"], owner.user_id.to_string());
}

/// A port that answers whatever it is sent with `answer` and closes: not
/// a windflow-notify server. Returns its address; it lives as long as the test.
async fn not_http(answer: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(answer).await;
        }
    });
    addr
}

#[tokio::test]
async fn tail_at_a_port_that_does_not_speak_http_says_so_instead_of_retrying() {
    let addr = not_http(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let tail = Tail::start(addr, "t", &["--topic", "deployment_events"]);
    assert_gives_up(tail, &[&format!("ws://{addr}/ws"), "does not speak HTTP", "WINDFLOW_BIND"]).await;
}

#[tokio::test]
async fn tail_at_a_port_that_closes_without_an_answer_says_so_instead_of_retrying() {
    // What PostgreSQL's port does with an HTTP request.
    let addr = not_http(b"").await;
    let tail = Tail::start(addr, "t", &["--topic", "deployment_events"]);
    assert_gives_up(tail, &[&format!("ws://{addr}/ws"), "without an HTTP answer"]).await;
}

#[tokio::test]
async fn tail_at_a_stopped_server_asks_whether_it_runs_there_then_gives_up() {
    let addr = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let mut tail = Tail::start(addr, "t", &["--topic", "deployment_events", "--wait", "1s"]);
    let retry = tail.stderr_line("cannot connect; will retry").await;
    assert!(retry.contains("is windflow-notify serve running at this URL?"), "the first retry asks: {retry}");
    let (code, stderr) = tail.exit().await;
    assert_eq!(code, Some(1), "{stderr:?}");
    let last = stderr.last().map(String::as_str).unwrap_or_default();
    let url = format!("ws://{addr}/ws");
    for needle in [url.as_str(), "nothing answered for 1s", "--url", "--wait"] {
        assert!(last.contains(needle), "{needle:?} in {last}");
    }
}
