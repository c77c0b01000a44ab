//! Test harness: a real server on port 0 against a fresh PostgreSQL
//! database per test (created, migrated, dropped), and a WebSocket client
//! that waits on messages with a timeout. Set TEST_LOG=1 to see the
//! server's logs. What the benchmark needs too lives in `windflow-testkit`
//! (`testkit/`); this wraps it to panic with what failed.
#![allow(dead_code)]

pub mod cluster;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use windflow_notify::auth::{Verifier, Viewer};
use windflow_notify::config::{JwtArgs, ServerArgs};
pub use windflow_testkit::SECRET;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn admin_url() -> String {
    windflow_testkit::admin_url("TEST_DATABASE_URL")
}

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().init();
        }
    });
}

pub async fn admin_client() -> tokio_postgres::Client {
    let admin = admin_url().parse().expect("TEST_DATABASE_URL");
    windflow_testkit::connect(&admin).await.expect("PostgreSQL must be running")
}

/// A fresh, empty database; dropped when the value is.
pub struct TestDatabase(windflow_testkit::Database);

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        Self::create_in(&admin_url()).await
    }

    /// A fresh database on the server `admin_url` points to.
    pub async fn create_in(admin_url: &str) -> TestDatabase {
        TestDatabase(
            windflow_testkit::Database::create_at(admin_url, "wf_test").await.unwrap_or_else(|e| panic!("{e:#}")),
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.0.client().await.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Deref for TestDatabase {
    type Target = windflow_testkit::Database;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// `windflow-notify ARGS` with only `env` (and `RUST_LOG=error`, so only
/// what the command itself says is seen), not yet run.
pub fn windflow_command(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"));
    command.args(args).env_clear().env("RUST_LOG", "error").envs(env.iter().copied());
    command
}

/// Run `command` to its end; returns (exit code, stdout, stderr).
pub fn output_of(mut command: std::process::Command) -> (i32, String, String) {
    let output = command.output().expect("run the command");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

pub fn jwt_args() -> JwtArgs {
    JwtArgs {
        jwt_algorithm: jsonwebtoken::Algorithm::HS256,
        jwt_secret_key: Some(SECRET.into()),
        jwt_public_key_file: None,
        jwt_audience: None,
        jwt_issuer: None,
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Start a server on port 0; returns once it accepts clients (which it
    /// does only when its listener is up).
    pub async fn start(database: &TestDatabase, configure: impl FnOnce(&mut ServerArgs)) -> TestServer {
        Self::start_with_jwt(database, jwt_args(), configure).await
    }

    pub async fn start_with_jwt(
        database: &TestDatabase,
        jwt: JwtArgs,
        configure: impl FnOnce(&mut ServerArgs),
    ) -> TestServer {
        Self::start_on(&database.config, jwt, configure).await
    }

    pub async fn start_on(
        database: &tokio_postgres::Config,
        jwt: JwtArgs,
        configure: impl FnOnce(&mut ServerArgs),
    ) -> TestServer {
        init_logging();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let mut settings = ServerArgs::with_bind(addr);
        configure(&mut settings);
        let verifier = Verifier::from_args(&jwt).expect("verifier");
        let shutdown = CancellationToken::new();
        let config = database.clone();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            windflow_notify::serve(listener, &config, settings, verifier, token).await.expect("server failed");
        });
        let server = TestServer { addr, shutdown, handle: Some(handle) };
        let (status, body) = server.get("/healthz").await;
        assert_eq!(status, 200, "healthz: {body}");
        server
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(WAIT, handle).await.expect("server stops in time").expect("server task");
        }
    }

    /// A plain HTTP/1.1 GET; returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, &[]).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connect with a token in the Authorization header and read the
    /// `authenticated` reply.
    pub async fn connect(&self, token: &str) -> Client {
        let request = windflow_testkit::upgrade_request(self.addr, Some(token)).expect("request");
        let mut client = Client::connect(request).await.expect("upgrade accepted");
        client.recv_type("authenticated").await;
        client
    }

    pub async fn connect_anonymous(&self) -> Client {
        Client::connect(self.ws_url().into_client_request().expect("request")).await.expect("upgrade accepted")
    }

    pub async fn connect_as(&self, viewer: Viewer) -> Client {
        self.connect(&token(viewer)).await
    }

    /// Expect the upgrade with `?token=` to be refused with 401.
    pub async fn assert_refused_in_url(&self, token: &str) {
        let url = format!("{}?token={token}", self.ws_url());
        match Client::connect(url.into_client_request().expect("request")).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 401),
            Err(other) => panic!("expected HTTP 401, got {other}"),
            Ok(_) => panic!("token {token:.20}… was accepted"),
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        windflow_testkit::metric(self.addr, name).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Wait until the feed read the event log twice more: the second read
    /// began after this call, so it saw everything committed before it.
    pub async fn two_log_reads_pass(&self) {
        let start = self.metric("windflow_log_reads_total").await;
        eventually("two reads of the log", || async { self.metric("windflow_log_reads_total").await >= start + 2.0 })
            .await;
    }
}

/// The real `windflow-notify serve` binary as a child process on a free
/// port, with `RUST_LOG=rust_log` and its stderr piped; returns once it
/// answers `/healthz`, with a [`TestServer`] that talks to it (stopping the
/// child is the caller's: SIGTERM by its pid, or drop).
pub async fn spawn_binary(database: &TestDatabase, rust_log: &str) -> (tokio::process::Child, TestServer) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", database.name);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("WINDFLOW_BIND", format!("127.0.0.1:{port}"))
        .env("JWT_SECRET_KEY", SECRET)
        .env("RUST_LOG", rust_log)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the server binary");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    eventually("the server answers /healthz", || async {
        TcpStream::connect(addr).await.is_ok() && http_get(addr, "/healthz", &[]).await.0 == 200
    })
    .await;
    (child, TestServer { addr, shutdown: CancellationToken::new(), handle: None })
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Wait until `check` holds, checking every 20 ms, for at most [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    windflow_testkit::http_get(addr, path, headers).await.unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

pub fn user() -> Viewer {
    Viewer { user_id: Uuid::new_v4(), organization_id: None, is_superuser: false }
}

pub fn member_of(org: Uuid) -> Viewer {
    Viewer { organization_id: Some(org), ..user() }
}

pub fn superuser() -> Viewer {
    Viewer { is_superuser: true, ..user() }
}

pub fn token(viewer: Viewer) -> String {
    token_for(viewer, Duration::from_secs(3600))
}

pub fn token_for(viewer: Viewer, ttl: Duration) -> String {
    windflow_testkit::token(viewer, ttl).expect("sign")
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(request: tungstenite::handshake::client::Request) -> Result<Client, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    pub async fn send(&mut self, value: Value) {
        self.ws.send(Message::Text(value.to_string().into())).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.send(json!({"type": "subscribe", "topic": topic})).await;
        let reply = self.recv_type("subscribed").await;
        assert_eq!(reply["data"]["topic"], topic.to_lowercase());
    }

    /// The next JSON message (pings and pongs are skipped).
    pub async fn recv(&mut self) -> Value {
        windflow_testkit::next_json(&mut self.ws, WAIT).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The next message, which must be of `kind`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let message = self.recv().await;
        assert_eq!(message["type"], kind, "unexpected message: {message}");
        message
    }

    /// The next message, which must be an event; returns (type, event_id, data).
    pub async fn recv_event(&mut self) -> (String, i64, Value) {
        let message = self.recv().await;
        let id = message["event_id"].as_i64().unwrap_or_else(|| panic!("not an event: {message}"));
        (message["type"].as_str().unwrap_or_default().to_string(), id, message["data"].clone())
    }

    /// Read until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("not closed within {WAIT:?}"));
            match frame {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close_code(&mut self) -> u16 {
        self.closed().await.map(|f| u16::from(f.code)).expect("a close frame")
    }
}

/// Writes as a backend writer would: plain SQL.
/// A login role of its own (no privileges unless granted), dropped with
/// the value, with whatever it was granted.
pub struct Role {
    pub name: String,
    granted_in: Option<tokio_postgres::Config>,
}

impl Role {
    pub async fn create() -> Role {
        Role::create_with("").await
    }

    /// A role with these attributes besides LOGIN (`SUPERUSER`, ...).
    pub async fn create_with(attributes: &str) -> Role {
        let name = format!("wf_role_{}", Uuid::new_v4().simple());
        admin_client()
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN {attributes}"))
            .await
            .expect("create role");
        Role { name, granted_in: None }
    }

    /// A writer: SELECT, INSERT and UPDATE on `deployments` and
    /// `deployment_logs`, nothing else.
    pub async fn writer(database: &TestDatabase) -> Role {
        let mut role = Role::create().await;
        database
            .client()
            .await
            .batch_execute(&format!("GRANT SELECT, INSERT, UPDATE ON deployments, deployment_logs TO {}", role.name))
            .await
            .expect("grant a writer's privileges");
        role.granted_in = Some(database.config.clone());
        role
    }

    pub async fn connect(&self, database: &TestDatabase) -> tokio_postgres::Client {
        let mut config = database.config.clone();
        config.user(&self.name);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("role connects");
        tokio::spawn(connection);
        client
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (name, granted_in) = (self.name.clone(), self.granted_in.take());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                if let Some(config) = granted_in
                    && let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP OWNED BY {name}")).await;
                }
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP ROLE IF EXISTS {name}")).await;
                }
            });
        })
        .join();
    }
}

pub struct Writer {
    pub db: tokio_postgres::Client,
}

impl Writer {
    pub async fn new(database: &TestDatabase) -> Writer {
        Writer { db: database.client().await }
    }

    pub async fn create_deployment(&self, owner: Uuid, org: Option<Uuid>) -> Uuid {
        self.db
            .query_one(
                "INSERT INTO deployments (user_id, organization_id, name) VALUES ($1, $2, 'app') RETURNING id",
                &[&owner, &org],
            )
            .await
            .expect("insert deployment")
            .get(0)
    }

    pub async fn execute(&self, sql: &str) {
        self.db.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn log(&self, deployment: Uuid, message: &str) {
        self.db
            .execute("INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)", &[&deployment, &message])
            .await
            .expect("insert log");
    }

    pub async fn set_status(&self, deployment: Uuid, status: &str) {
        self.db
            .execute("UPDATE deployments SET status = $2 WHERE id = $1", &[&deployment, &status])
            .await
            .expect("update status");
    }

    pub async fn set_progress(&self, deployment: Uuid, progress: i32) {
        self.db
            .execute("UPDATE deployments SET progress = $2 WHERE id = $1", &[&deployment, &progress])
            .await
            .expect("update progress");
    }
}

/// One database, one server, one writer: what most tests need.
pub struct TestApp {
    pub server: TestServer,
    pub writer: Writer,
    pub database: TestDatabase,
}

impl TestApp {
    /// A user connected with one deployment of their own, its creation
    /// event already read.
    pub async fn owner_with_deployment(&self) -> (Viewer, Client, Uuid) {
        owner_with_deployment(&self.server, &self.writer).await
    }
}

/// A user connected to `server` with one deployment of their own, its
/// creation event already read.
pub async fn owner_with_deployment(server: &TestServer, writer: &Writer) -> (Viewer, Client, Uuid) {
    let owner = user();
    let mut client = server.connect_as(owner).await;
    let deployment = writer.create_deployment(owner.user_id, None).await;
    client.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
    (owner, client, deployment)
}

/// Two servers on one database: an owner connected to each, and an
/// organization member on the second subscribed to `deployment_events`,
/// each get the same 51 events once. Returns the owner, its connection to
/// `first`, and the events as that connection got them.
pub async fn two_instances_each_deliver_every_event_once(
    first: &TestServer,
    second: &TestServer,
    writer: &Writer,
) -> (Viewer, Client, Vec<(i64, Value)>) {
    let org = Uuid::new_v4();
    let owner = member_of(org);
    let mut on_first = first.connect_as(owner).await;
    let mut on_second = second.connect_as(owner).await;
    let mut colleague = second.connect_as(member_of(org)).await;
    colleague.subscribe("deployment_events").await;
    let deployment = writer.create_deployment(owner.user_id, Some(org)).await;
    for i in 0..50 {
        writer.log(deployment, &format!("{i}")).await;
    }
    let reference = receive_exactly_once(&mut on_first, 51).await;
    let ids = |events: &[(i64, Value)]| events.iter().map(|e| e.0).collect::<Vec<_>>();
    for client in [&mut on_second, &mut colleague] {
        let got = receive_exactly_once(client, 51).await;
        assert_eq!(ids(&got), ids(&reference), "both instances deliver the same events in the same order");
    }
    (owner, on_first, reference)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut ServerArgs)) -> TestApp {
    let database = TestDatabase::create().await;
    let server = TestServer::start(&database, configure).await;
    let writer = Writer::new(&database).await;
    TestApp { server, writer, database }
}

/// Receive `count` events; check none repeats and each deployment's ids
/// increase (commit order). Returns (event_id, data) in arrival order.
pub async fn receive_exactly_once(client: &mut Client, count: usize) -> Vec<(i64, Value)> {
    let mut seen = HashSet::new();
    let mut last_per_deployment: HashMap<String, i64> = HashMap::new();
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        let (_, id, data) = client.recv_event().await;
        assert!(seen.insert(id), "event {id} delivered twice");
        let deployment = data["deployment_id"].as_str().unwrap().to_string();
        let last = last_per_deployment.entry(deployment).or_insert(0);
        assert!(id > *last, "event {id} after {last} of the same deployment: out of commit order");
        *last = id;
        events.push((id, data));
    }
    events
}

/// A fence: the next event the client receives must be this one.
pub async fn assert_nothing_more(app_writer: &Writer, client: &mut Client, owner: Uuid) {
    let fence = app_writer.create_deployment(owner, None).await;
    let message = client.recv().await;
    assert_eq!(message["data"]["deployment_id"], fence.to_string(), "unexpected extra message: {message}");
}

/// Writers that each insert numbered log rows, one per transaction, until
/// told to stop; returns how many each wrote.
pub fn spawn_log_writers(
    database: &TestDatabase,
    deployments: &[Uuid],
    stop: Arc<AtomicBool>,
    minimum: usize,
) -> Vec<tokio::task::JoinHandle<usize>> {
    deployments
        .iter()
        .enumerate()
        .map(|(w, deployment)| {
            let config = database.config.clone();
            let (deployment, stop) = (*deployment, Arc::clone(&stop));
            tokio::spawn(async move {
                let (db, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                let mut written = 0;
                while written < minimum || !stop.load(Ordering::Relaxed) {
                    db.execute(
                        "INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)",
                        &[&deployment, &format!("{w}:{written}")],
                    )
                    .await
                    .unwrap();
                    written += 1;
                }
                written
            })
        })
        .collect()
}

/// Kill the event source's connection three times (`kill` returns how many
/// backends it terminated) while four writers insert log rows; then every
/// event arrives exactly once, in commit order per deployment, and nothing
/// more.
pub async fn killing_the_source_three_times_loses_and_duplicates_nothing<F, Fut>(
    server: &TestServer,
    database: &TestDatabase,
    writer: &Writer,
    kill: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let admin = superuser();
    let mut client = server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let mut deployments = Vec::new();
    for _ in 0..4 {
        deployments.push(writer.create_deployment(Uuid::new_v4(), None).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_log_writers(database, &deployments, Arc::clone(&stop), 100);
    for killed in 1..=3u64 {
        eventually("source up", || async { server.metric("windflow_listener_up").await == 1.0 }).await;
        assert_eq!(kill().await, 1, "one source connection to kill");
        eventually("source reconnected", || async {
            server.metric("windflow_listener_reconnects_total").await >= killed as f64
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    let events = receive_exactly_once(&mut client, deployments.len() + written).await;
    let logs: HashSet<String> = events.iter().filter_map(|(_, d)| d["logs"].as_str().map(String::from)).collect();
    assert_eq!(logs.len(), written, "every log row arrived");
    assert_nothing_more(writer, &mut client, admin.user_id).await;
}

/// `GET /events…` on `server`: the stream when it answered 200, else the
/// status and the JSON body.
pub async fn open_events(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<windflow_testkit::sse::SseStream, (u16, Value)> {
    let answer =
        windflow_testkit::sse::open(server.addr, path, headers, None).await.unwrap_or_else(|e| panic!("{e:#}"));
    match answer {
        windflow_testkit::sse::SseAnswer::Stream(stream) => Ok(stream),
        windflow_testkit::sse::SseAnswer::Refused(status, body) => {
            Err((status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))))
        }
    }
}

/// The next SSE event, which must come within [`WAIT`].
pub async fn next_sse(stream: &mut windflow_testkit::sse::SseStream) -> windflow_testkit::sse::SseEvent {
    stream.next_event(WAIT).await.unwrap_or_else(|e| panic!("{e:#}")).expect("an event, not the end of the stream")
}
