//! Connections: how many one user may hold, and what happens when the
//! process runs out of file descriptors.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite;

fn refused_status(error: tungstenite::Error) -> (u16, Value) {
    match error {
        tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().map(|b| serde_json::from_slice(b).unwrap()).unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_users_connections_past_the_limit_get_429_or_an_error_and_1013() {
    let app = spawn_app_with(|s| s.max_connections_per_user = NonZeroUsize::new(2).unwrap()).await;
    let viewer = user();
    let first = app.server.connect_as(viewer).await;
    let _second = app.server.connect_as(viewer).await;
    let request = windflow_testkit::upgrade_request(app.server.addr, Some(&token(viewer))).unwrap();
    let (status, body) = refused_status(Client::connect(request).await.err().expect("a third is refused"));
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_connections")));
    // Authenticating in-band: a clear error, then a close.
    let mut in_band = app.server.connect_anonymous().await;
    in_band.send(json!({"type": "auth", "token": token(viewer)})).await;
    let error = in_band.recv_type("error").await;
    assert_eq!(error["data"]["code"], "too_many_connections");
    assert!(error["data"]["message"].as_str().unwrap().contains("WINDFLOW_MAX_CONNECTIONS_PER_USER"));
    assert_eq!(in_band.close_code().await, 1013);
    // Other users are not counted with this one; a connection that ends
    // gives its place back.
    app.server.connect_as(user()).await;
    drop(first);
    eventually("the place is given back", || async {
        let request = windflow_testkit::upgrade_request(app.server.addr, Some(&token(viewer))).unwrap();
        Client::connect(request).await.is_ok()
    })
    .await;
}

/// `windflow-notify serve` under an open-file limit (`prlimit`), its
/// stderr collected line by line.
struct LimitedServer {
    child: tokio::process::Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl LimitedServer {
    async fn start(database: &TestDatabase, nofile: &str, env: &[(&str, &str)]) -> LimitedServer {
        let port = windflow_testkit::free_port().unwrap();
        let url = format!("postgres://postgres@127.0.0.1:5432/{}", database.name);
        let mut command = tokio::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}"))
            .arg(env!("CARGO_BIN_EXE_windflow-notify"))
            .arg("serve")
            .env("DATABASE_URL", &url)
            .env("WINDFLOW_BIND", format!("127.0.0.1:{port}"))
            .env("JWT_SECRET_KEY", SECRET)
            .env("RUST_LOG", "info")
            .env("WINDFLOW_LOG_FORMAT", "text")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("prlimit runs the server");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let collected = Arc::clone(&stderr);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("the server answers /healthz", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok() && http_get(addr, "/healthz", &[]).await.0 == 200
        })
        .await;
        LimitedServer { child, addr, stderr }
    }

    fn lines_with(&self, text: &str) -> usize {
        self.stderr.lock().unwrap().iter().filter(|line| line.contains(text)).count()
    }

    fn limits(&self) -> String {
        let pid = self.child.id().expect("running");
        std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap()
    }
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_and_one_line_says_when_it_cannot_hold_the_connections() {
    let database = TestDatabase::create().await;
    let server = LimitedServer::start(&database, "256:4096", &[("WINDFLOW_MAX_CONNECTIONS", "100000")]).await;
    let open_files = server.limits().lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "soft raised to hard: {open_files}");
    assert_eq!(server.lines_with("cannot hold WINDFLOW_MAX_CONNECTIONS"), 1);
    // A limit that holds them says nothing.
    let quiet = LimitedServer::start(&database, "256:4096", &[("WINDFLOW_MAX_CONNECTIONS", "1000")]).await;
    assert_eq!(quiet.lines_with("cannot hold WINDFLOW_MAX_CONNECTIONS"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_new_connections_are_answered_503_and_the_open_ones_served() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let server = LimitedServer::start(&database, "64:64", &[("WINDFLOW_MAX_CONNECTIONS", "1000")]).await;
    let as_test_server = TestServer { addr: server.addr, shutdown: Default::default(), handle: None };
    let (owner, mut watching, deployment) = owner_with_deployment(&as_test_server, &writer).await;
    // Connections until the server is out of descriptors: every attempt is
    // answered at once (upgraded, or 503), none waits in the backlog.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let request = windflow_testkit::upgrade_request(server.addr, Some(&token(user()))).unwrap();
        let attempt = tokio::time::timeout(WAIT, Client::connect(request)).await.expect("answered, not left waiting");
        match attempt {
            Ok(client) => open.push(client),
            Err(error) => {
                let (status, body) = refused_status(error);
                assert_eq!(status, 503, "{body}");
                assert!(body["message"].as_str().unwrap().contains("file descriptors"), "{body}");
                refused += 1;
                if refused == 20 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 20, "the limit was reached after {} connections", open.len());
    // The connections already open are served.
    writer.log(deployment, "still served").await;
    assert_eq!(watching.recv_event().await.2["logs"], "still served");
    assert_eq!(server.lines_with("out of file descriptors"), 1, "one line, not one per attempt");
    assert_eq!(server.lines_with("accept failed"), 0);
    // Descriptors come back as connections close: new ones are accepted again.
    drop(open.drain(..10).collect::<Vec<_>>());
    eventually("a new connection is accepted", || async {
        let request = windflow_testkit::upgrade_request(server.addr, Some(&token(user()))).unwrap();
        Client::connect(request).await.is_ok()
    })
    .await;
    assert_eq!(server.lines_with("file descriptors available again"), 1);
    let _ = owner;
}
