//! The logical event source: the same guarantees as NOTIFY mode (nothing
//! lost, nothing duplicated, commit order) through a killed replication
//! connection, a database restart, a server restart, two instances, and
//! the database's readiness checks. Each test runs its own PostgreSQL
//! cluster with `wal_level = logical`.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use serde_json::json;
use uuid::Uuid;
use windflow_notify::db::DbError;
use windflow_notify::db::source::{self, EventSource, NotReady};

/// A server in logical mode on a private cluster. Fields drop in order:
/// the server, the writer, the database, then the cluster.
struct LogicalApp {
    server: TestServer,
    writer: Writer,
    database: TestDatabase,
    cluster: Cluster,
}

async fn logical_database(cluster: &Cluster) -> TestDatabase {
    let database = TestDatabase::create_in(&cluster.url("postgres")).await;
    windflow_notify::db::migrate(&database.config).await.expect("migrate");
    let mut client = database.client().await;
    assert_eq!(source::switch(&mut client, EventSource::Logical).await.expect("switch"), EventSource::Notify);
    database
}

impl LogicalApp {
    async fn start() -> LogicalApp {
        let cluster = Cluster::start_logical();
        let database = logical_database(&cluster).await;
        let server = TestServer::start(&database, |_| {}).await;
        let writer = Writer::new(&database).await;
        LogicalApp { server, writer, database, cluster }
    }

    async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.cluster.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Terminate the replication connections of this database; returns how many.
    async fn kill_replication(&self) -> i64 {
        self.admin()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE application_name = 'windflow-notify-replication' AND backend_type = 'walsender'
                    AND datname = $1",
                &[&self.database.name],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn slots(&self) -> i64 {
        self.admin()
            .await
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = $1", &[&self.database.name])
            .await
            .unwrap()
            .get(0)
    }
}

#[tokio::test]
async fn events_arrive_with_their_data_and_the_triggers_do_not_notify() {
    let app = LogicalApp::start().await;
    let (_, mut client, deployment) = owner_with_deployment(&app.server, &app.writer).await;
    // Far past NOTIFY's 8000 bytes: it comes from the WAL whole.
    let line = "x".repeat(200_000);
    app.writer.log(deployment, &line).await;
    app.writer.set_progress(deployment, 40).await;
    let (kind, _, data) = client.recv_event().await;
    assert_eq!((kind.as_str(), data["logs"].as_str().map(str::len)), ("DEPLOYMENT_LOGS_UPDATE", Some(200_000)));
    let (kind, _, data) = client.recv_event().await;
    assert_eq!((kind.as_str(), &data["progress"]), ("DEPLOYMENT_PROGRESS", &json!(40)));
    // No NOTIFY from the triggers: the first notification on the channel is
    // our own, sent after the writes.
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let (notifier, mut connection) = app.database.config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    notifier.batch_execute("LISTEN windflow_events").await.unwrap();
    app.writer.log(deployment, "one more").await;
    client.recv_event().await;
    app.writer.execute("NOTIFY windflow_events, 'fence'").await;
    let first = tokio::time::timeout(WAIT, notifications.recv()).await.expect("the fence arrives");
    assert_eq!(first.as_deref(), Some("fence"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replication_connection_mid_stream_loses_and_duplicates_nothing() {
    let app = LogicalApp::start().await;
    killing_the_source_three_times_loses_and_duplicates_nothing(&app.server, &app.database, &app.writer, || async {
        app.kill_replication().await as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_loses_and_duplicates_nothing() {
    let app = LogicalApp::start().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    for i in 0..50 {
        app.writer.log(deployment, &format!("before {i}")).await;
    }
    app.cluster.stop();
    eventually("healthz 503 while the database is down", || async { app.server.get("/healthz").await.0 == 503 }).await;
    // The outage itself: reconnect attempts against a database that is not there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.cluster.start();
    let writer = Writer::new(&app.database).await;
    for i in 0..50 {
        writer.log(deployment, &format!("after {i}")).await;
    }
    let events = receive_exactly_once(&mut client, 101).await;
    assert_eq!(events.last().unwrap().1["logs"], "after 49");
    eventually("healthz 200 again", || async { app.server.get("/healthz").await.0 == 200 }).await;
    assert_nothing_more(&writer, &mut client, owner.user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_holds_no_slot_and_resumes_exactly_after_a_restart() {
    let mut app = LogicalApp::start().await;
    let watcher = superuser();
    let mut client = app.server.connect_as(watcher).await;
    client.subscribe("deployment_events").await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let seen = receive_exactly_once(&mut client, 1).await;
    assert_eq!(app.slots().await, 1, "one temporary slot while the server runs");
    app.server.stop().await;
    eventually("the slot is gone with the server", || async { app.slots().await == 0 }).await;
    // Writers are not held up by the missing server, and no WAL is kept for it.
    for i in 0..30 {
        app.writer.log(deployment, &format!("while down {i}")).await;
    }
    let server = TestServer::start(&app.database, |_| {}).await;
    let mut resumed = server.connect_as(watcher).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": seen[0].0})).await;
    resumed.recv_type("subscribed").await;
    let replayed = receive_exactly_once(&mut resumed, 30).await;
    assert_eq!(replayed[29].1["logs"], "while down 29");
    assert_nothing_more(&app.writer, &mut resumed, Uuid::new_v4()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_each_deliver_every_event_once_and_a_resume_works_on_either() {
    let app = LogicalApp::start().await;
    let second = TestServer::start(&app.database, |_| {}).await;
    let (owner, mut on_first, reference) =
        two_instances_each_deliver_every_event_once(&app.server, &second, &app.writer).await;
    let mut moved = second.connect_as(superuser()).await;
    moved.send(json!({"type": "subscribe", "topic": "deployment_events", "since": reference[10].0})).await;
    moved.recv_type("subscribed").await;
    let replayed = receive_exactly_once(&mut moved, 40).await;
    assert_eq!(
        replayed.iter().map(|e| e.0).collect::<Vec<_>>(),
        reference[11..].iter().map(|e| e.0).collect::<Vec<_>>()
    );
    assert_nothing_more(&app.writer, &mut on_first, owner.user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_a_smaller_id_across_a_stream_outage_arrives_once() {
    let app = LogicalApp::start().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let late_deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let early_deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    receive_exactly_once(&mut client, 2).await;
    let slow = Writer::new(&app.database).await;
    slow.execute("BEGIN").await;
    slow.log(late_deployment, "late").await;
    app.writer.log(early_deployment, "early").await;
    let (_, early_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "early");
    // Markers taken while A holds its id: the catch-up must still read
    // from below that id (src/db/catchup.rs).
    app.server.two_markers_pass().await;
    // The new slot waits for the open transaction: it commits before the
    // slot's consistent point, so it can only come from the event log.
    assert_eq!(app.kill_replication().await, 1);
    slow.execute("COMMIT").await;
    let (_, late_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "late");
    assert!(late_id < early_id, "the late commit has the smaller id");
    assert_nothing_more(&app.writer, &mut client, admin.user_id).await;
}

#[tokio::test]
async fn the_slot_releases_wal_as_the_stream_is_read() {
    let app = LogicalApp::start().await;
    let (_, mut client, deployment) = owner_with_deployment(&app.server, &app.writer).await;
    for i in 0..20 {
        app.writer.log(deployment, &format!("{i}")).await;
    }
    receive_exactly_once(&mut client, 20).await;
    let admin = app.admin().await;
    let read_up_to: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    eventually("the slot confirms what the server read", || async {
        admin
            .query_one(
                "SELECT bool_and(confirmed_flush_lsn >= $1::text::pg_lsn) FROM pg_replication_slots WHERE database = $2",
                &[&read_up_to, &app.database.name],
            )
            .await
            .unwrap()
            .get::<_, Option<bool>>(0)
            == Some(true)
    })
    .await;
}

#[tokio::test]
async fn switching_the_database_stops_servers_of_the_other_mode() {
    let cluster = Cluster::start_logical();
    let database = TestDatabase::create_in(&cluster.url("postgres")).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let mut client = database.client().await;
    assert_eq!(source::switch(&mut client, EventSource::Logical).await.unwrap(), EventSource::Notify);
    let handle = server.handle.take().unwrap();
    let outcome = tokio::time::timeout(WAIT, handle).await.expect("the notify server stops");
    assert!(outcome.is_err(), "serve reports the switch as an error");
    // Started again, it follows the database.
    let server = TestServer::start(&database, |_| {}).await;
    let owner = user();
    let mut client = server.connect_as(owner).await;
    Writer::new(&database).await.create_deployment(owner.user_id, None).await;
    client.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
}

#[tokio::test]
async fn a_database_without_wal_level_logical_is_refused_with_the_fix() {
    // The machine's own cluster runs with wal_level = replica.
    let database = TestDatabase::create().await;
    windflow_notify::db::migrate(&database.config).await.unwrap();
    let mut client = database.client().await;
    let error = source::switch(&mut client, EventSource::Logical).await.expect_err("refused");
    assert!(matches!(error, DbError::NotReady(NotReady::WalLevel(_))), "{error}");
    // Set by hand anyway: serve refuses to start, in one line that names the fix.
    client.batch_execute("UPDATE windflow_event_source SET source = 'logical'").await.unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .arg("serve")
        .env("DATABASE_URL", format!("{}/{}", admin_url().rsplit_once('/').unwrap().0, database.name))
        .env("JWT_SECRET_KEY", SECRET)
        .env("WINDFLOW_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "off")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("set wal_level = logical in postgresql.conf"), "{stderr}");
}

#[tokio::test]
async fn a_role_without_replication_or_a_missing_publication_is_refused_with_the_fix() {
    let cluster = Cluster::start_logical();
    let admin = TestDatabase::create_in(&cluster.url("postgres")).await;
    admin.client().await.batch_execute("CREATE ROLE app LOGIN").await.unwrap();
    let mut config = admin.config.clone();
    config.user("app");
    // The database belongs to `app`, which runs the migrations as a server would.
    admin.client().await.batch_execute(&format!("ALTER DATABASE {} OWNER TO app", admin.name)).await.unwrap();
    admin.client().await.batch_execute("GRANT CREATE ON SCHEMA public TO app").await.unwrap();
    windflow_notify::db::migrate(&config).await.unwrap();
    let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let error = source::switch(&mut client, EventSource::Logical).await.expect_err("refused");
    assert!(matches!(error, DbError::NotReady(NotReady::NoReplicationPrivilege(_))), "{error}");
    assert!(error.to_string().contains("ALTER ROLE app WITH REPLICATION"), "{error}");

    admin.client().await.batch_execute("ALTER ROLE app WITH REPLICATION").await.unwrap();
    client.batch_execute("UPDATE windflow_event_source SET source = 'logical'").await.unwrap();
    let error = source::at_startup(&config).await.expect_err("no publication");
    assert!(matches!(error, DbError::NotReady(NotReady::NoPublication)), "{error}");

    // Ready now: the switch creates the publication and a server streams as `app`.
    assert_eq!(source::switch(&mut client, EventSource::Logical).await.unwrap(), EventSource::Logical);
    let server = TestServer::start_on(&config, jwt_args(), |_| {}).await;
    let owner = user();
    let mut watcher = server.connect_as(owner).await;
    let writer = Writer { db: client };
    writer.create_deployment(owner.user_id, None).await;
    watcher.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
}
