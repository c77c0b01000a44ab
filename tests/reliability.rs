//! `since`, limits and faults: nothing is lost, nothing is duplicated —
//! through listener kills, a database restart, client resumes, retention,
//! slow consumers, hostile input, shutdown and several instances.

mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

async fn kill_listener(database: &TestDatabase) -> u64 {
    let admin = admin_client().await;
    let row = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = 'windflow-notify-listener' AND datname = $1",
            &[&database.name],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listener_mid_stream_loses_and_duplicates_nothing() {
    let app = spawn_app().await;
    killing_the_source_three_times_loses_and_duplicates_nothing(&app.server, &app.database, &app.writer, || {
        kill_listener(&app.database)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_loses_and_duplicates_nothing() {
    let cluster = Cluster::start_new();
    let database = TestDatabase::create_in(&cluster.url("postgres")).await;
    let server = TestServer::start_on(&database.config, jwt_args(), |_| {}).await;
    let owner = user();
    let mut client = server.connect_as(owner).await;
    let writer = Writer::new(&database).await;
    let deployment = writer.create_deployment(owner.user_id, None).await;
    for i in 0..50 {
        writer.log(deployment, &format!("before {i}")).await;
    }
    cluster.stop();
    eventually("healthz 503 while the database is down", || async { server.get("/healthz").await.0 == 503 }).await;
    assert_eq!(server.metric("windflow_listener_up").await, 0.0);
    // The outage itself: a few seconds of reconnect attempts against a
    // database that is not there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.get("/healthz").await.0, 503);
    cluster.start();
    // Written as soon as the database is back, likely before the listener
    // is: these come from the event log.
    let writer = Writer::new(&database).await;
    for i in 0..50 {
        writer.log(deployment, &format!("after {i}")).await;
    }
    let events = receive_exactly_once(&mut client, 101).await;
    assert_eq!(events.last().unwrap().1["logs"], "after 49");
    eventually("healthz 200 again", || async { server.get("/healthz").await.0 == 200 }).await;
    assert_nothing_more(&writer, &mut client, owner.user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_replays_then_goes_live_without_gap_or_duplicate() {
    let app = spawn_app().await;
    let watcher = superuser();
    let mut reference = app.server.connect_as(watcher).await;
    reference.subscribe("deployment_events").await;
    let mut deployments = Vec::new();
    for _ in 0..3 {
        deployments.push(app.writer.create_deployment(Uuid::new_v4(), None).await);
    }
    let stop = Arc::new(AtomicBool::new(true));
    for writer in spawn_log_writers(&app.database, &deployments, Arc::clone(&stop), 40) {
        writer.await.unwrap();
    }
    let before = receive_exactly_once(&mut reference, 123).await;
    let since = before[60].0;
    // Writers keep going while the resuming client replays.
    let busy = spawn_log_writers(&app.database, &deployments, Arc::clone(&stop), 60);
    let mut resumed = app.server.connect_as(superuser()).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": since})).await;
    resumed.recv_type("subscribed").await;
    for writer in busy {
        writer.await.unwrap();
    }
    let after = receive_exactly_once(&mut reference, 180).await;
    let expected: Vec<i64> = before[61..].iter().chain(&after).map(|(id, _)| *id).collect();
    let got: Vec<i64> = receive_exactly_once(&mut resumed, expected.len()).await.iter().map(|(id, _)| *id).collect();
    assert_eq!(got, expected, "the resumed stream is the reference stream after `since`");
    // The resumed client is a superuser: any owner's deployment is a fence.
    assert_nothing_more(&app.writer, &mut resumed, Uuid::new_v4()).await;
}

#[tokio::test]
async fn resume_older_than_the_history_reads_the_event_log() {
    let app = spawn_app_with(|settings| settings.history_size = NonZeroUsize::new(10).unwrap()).await;
    let (owner, mut reference, deployment) = app.owner_with_deployment().await;
    for i in 0..40 {
        app.writer.log(deployment, &format!("{i}")).await;
    }
    let all = receive_exactly_once(&mut reference, 40).await;
    let mut resumed = app.server.connect_as(owner).await;
    let topic = format!("deployment_logs_{deployment}");
    resumed.send(json!({"type": "subscribe", "topic": topic, "since": all[4].0})).await;
    resumed.recv_type("subscribed").await;
    let replayed = receive_exactly_once(&mut resumed, 35).await;
    assert_eq!(
        replayed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        all[5..].iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    app.writer.log(deployment, "live").await;
    assert_eq!(resumed.recv().await["data"]["logs"], "live");
}

#[tokio::test]
async fn retention_prunes_and_a_resume_from_pruned_events_gets_resync_first() {
    let app = spawn_app_with(|settings| {
        settings.event_retention = Duration::from_secs(3);
        settings.history_size = NonZeroUsize::MIN;
    })
    .await;
    let (_, mut reference, deployment) = app.owner_with_deployment().await;
    for i in 0..5 {
        app.writer.log(deployment, &format!("old {i}")).await;
    }
    let old = receive_exactly_once(&mut reference, 5).await;
    let db = &app.writer.db;
    eventually("the server prunes the old events", || async {
        db.query_one("SELECT count(*) FROM windflow_events", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    app.writer.log(deployment, "new 0").await;
    app.writer.log(deployment, "new 1").await;
    // The server has them (the history of one no longer holds "old 4",
    // pruned from the log but otherwise still owed to this resume).
    app.server.two_log_reads_pass().await;
    // A superuser resumes: no owner feed to race the replay.
    let mut resumed = app.server.connect_as(superuser()).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": old[0].0})).await;
    resumed.recv_type("subscribed").await;
    assert_eq!(resumed.recv_type("resync").await["data"]["topic"], "deployment_events");
    // Then what the log still holds, once each and in order.
    let mut logs = Vec::new();
    while logs.len() < 2 {
        let (_, _, data) = resumed.recv_event().await;
        logs.push(data["logs"].as_str().unwrap().to_string());
    }
    assert_eq!(logs, ["new 0", "new 1"]);
    assert_nothing_more(&app.writer, &mut resumed, Uuid::new_v4()).await;
}

#[tokio::test]
async fn retention_deletes_what_precedes_the_first_event_within_it_and_nothing_within_it() {
    let database = TestDatabase::create().await;
    windflow_notify::db::migrate(&database.config).await.unwrap();
    let pool = windflow_notify::db::pool(&database.config);
    let db = database.client().await;
    let retention = Duration::from_secs(3600);
    let prune = || windflow_notify::db::retention::prune(&pool, retention);
    let ids = || async {
        let rows = db.query("SELECT id FROM windflow_events ORDER BY id", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()
    };
    let upto =
        || async { db.query_one("SELECT upto FROM windflow_events_pruned", &[]).await.unwrap().get::<_, i64>(0) };
    assert_eq!(prune().await.unwrap(), 0, "an empty log");
    // Ages by id: old, old, new, old (an older stamp after a newer one, as
    // two writers inserting at once can leave), new.
    for age in ["2 hours", "2 hours", "1 minute", "2 hours", "0 seconds"] {
        db.execute(
            "INSERT INTO windflow_events (type, deployment_id, user_id, data, created_at)
             VALUES ('DEPLOYMENT_LOGS_UPDATE', gen_random_uuid(), gen_random_uuid(), '{}', now() - $1::text::interval)",
            &[&age],
        )
        .await
        .unwrap();
    }
    let all = ids().await;
    assert_eq!(prune().await.unwrap(), 2);
    assert_eq!(ids().await, all[2..], "everything from the first event within the retention on stays");
    assert_eq!(upto().await, all[1], "a resume from before the cut gets resync");
    assert_eq!(prune().await.unwrap(), 0, "the old event behind a newer one waits for it");
    db.execute("UPDATE windflow_events SET created_at = now() - interval '2 hours' WHERE id <= $1", &[&all[2]])
        .await
        .unwrap();
    assert_eq!(prune().await.unwrap(), 2);
    assert_eq!(ids().await, all[4..]);
    db.execute("UPDATE windflow_events SET created_at = now() - interval '2 hours'", &[]).await.unwrap();
    assert_eq!(prune().await.unwrap(), 1, "a log entirely past the retention is emptied");
    assert_eq!((ids().await, upto().await), (vec![], all[4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_while_a_reader_gets_all_20000_events() {
    // Default queue (4096 messages). Lines of 1 kB, so that 20,000 of them
    // are more than the sleeper's socket buffers can absorb.
    let app = spawn_app().await;
    let owner = user();
    let mut reader = app.server.connect_as(superuser()).await;
    reader.subscribe("deployment_events").await;
    let mut sleeper = app.server.connect_as(superuser()).await;
    sleeper.subscribe("deployment_events").await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    reader.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
    // The sleeper now stops reading. The reader keeps up with 40 commits of
    // 500 rows; bursts smaller than its queue.
    let writes = {
        let writer = Writer::new(&app.database).await;
        tokio::spawn(async move {
            for batch in 0..40 {
                writer
                    .execute(&format!(
                        "INSERT INTO deployment_logs (deployment_id, message)
                         SELECT '{deployment}', 'line ' || ({batch} * 500 + i) || ' ' || repeat('x', 1000)
                           FROM generate_series(1, 500) i"
                    ))
                    .await;
            }
        })
    };
    let events = receive_exactly_once(&mut reader, 20_000).await;
    writes.await.unwrap();
    assert_eq!(events.last().unwrap().1["logs"].as_str().unwrap().split(' ').nth(1), Some("20000"));
    eventually("the slow consumer is counted", || async {
        app.server.metric("windflow_slow_consumer_disconnects_total").await == 1.0
    })
    .await;
    // The sleeper wakes up: what was queued, then close 1013.
    let mut received = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, sleeper.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(close, Some(1013), "after {received} messages");
    assert!(received < 20_000);
    // The reader is unaffected.
    reader.send_text("ping").await;
    reader.recv_type("pong").await;
}

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutated_message(rng: &mut Rng, seeds: &[String]) -> Message {
    let seed = seeds[rng.below(seeds.len())].clone().into_bytes();
    match rng.below(6) {
        0 => Message::Binary((0..rng.below(300)).map(|_| rng.next() as u8).collect::<Vec<u8>>().into()),
        1 => Message::Text(
            String::from_utf8_lossy(&(0..rng.below(300)).map(|_| rng.next() as u8).collect::<Vec<_>>())
                .into_owned()
                .into(),
        ),
        _ => {
            let mut bytes = seed;
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len().max(1));
                match rng.below(3) {
                    0 if !bytes.is_empty() => {
                        bytes.remove(at.min(bytes.len() - 1));
                    }
                    1 => bytes.insert(at.min(bytes.len()), b"{}[]\":,0a-\\"[rng.below(11)]),
                    _ => {
                        if let Some(b) = bytes.get_mut(at) {
                            *b = rng.next() as u8;
                        }
                    }
                }
            }
            Message::Text(String::from_utf8_lossy(&bytes).into_owned().into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_and_mutated_messages_leave_a_good_client_served() {
    let app = spawn_app().await;
    let (_, mut good, deployment) = app.owner_with_deployment().await;
    let seeds = vec![
        json!({"type": "auth", "token": token(user())}).to_string(),
        json!({"type": "subscribe", "topic": "deployment_events", "since": 1}).to_string(),
        json!({"type": "subscribe", "topic": format!("deployment_logs_{deployment}")}).to_string(),
        json!({"type": "unsubscribe", "topic": format!("deployment_progress_{deployment}")}).to_string(),
        json!({"type": "ping"}).to_string(),
        "ping".to_string(),
    ];
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut sent = 0;
    while sent < 3000 {
        // Half the fuzzing connections authenticate first.
        let mut fuzzer =
            if rng.below(2) == 0 { app.server.connect_as(user()).await } else { app.server.connect_anonymous().await };
        for _ in 0..100 {
            let message = mutated_message(&mut rng, &seeds);
            sent += 1;
            if fuzzer.ws.send(message).await.is_err() {
                break; // closed by the server (1008 for a bad auth): reconnect
            }
        }
        let _ = fuzzer.ws.close(None).await;
    }
    app.writer.log(deployment, "still served").await;
    let message = good.recv().await;
    assert_eq!(message["data"]["logs"], "still served", "{message}");
    good.send_text("ping").await;
    good.recv_type("pong").await;
    assert_eq!(app.server.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001_and_every_task_ends() {
    let mut app = spawn_app().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = app.server.connect_as(superuser()).await;
        client.subscribe("deployment_events").await;
        clients.push(client);
    }
    let mut anonymous = app.server.connect_anonymous().await;
    let started = std::time::Instant::now();
    app.server.stop().await; // fails if serve() reports lingering tasks
    assert!(started.elapsed() < Duration::from_secs(5), "stopped in {:?}", started.elapsed());
    for client in clients.iter_mut().chain([&mut anonymous]) {
        assert_eq!(client.close_code().await, 1001);
    }
}

#[tokio::test]
async fn sigterm_closes_clients_and_exits_zero_within_5_seconds() {
    let database = TestDatabase::create().await;
    let (mut child, server) = spawn_binary(&database, "warn").await;
    let mut client = server.connect_as(user()).await;
    let pid = child.id().unwrap().to_string();
    let started = std::time::Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(client.close_code().await, 1001);
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await.expect("exits within 5 s").unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_each_deliver_every_event_once() {
    let app = spawn_app().await;
    let second = TestServer::start(&app.database, |_| {}).await;
    let (owner, mut on_first, _) =
        common::two_instances_each_deliver_every_event_once(&app.server, &second, &app.writer).await;
    assert_nothing_more(&app.writer, &mut on_first, owner.user_id).await;
}

#[tokio::test]
async fn a_resume_works_on_another_instance() {
    let app = spawn_app().await;
    let second = TestServer::start(&app.database, |_| {}).await;
    let (_, mut first, deployment) = app.owner_with_deployment().await;
    for i in 0..10 {
        app.writer.log(deployment, &format!("{i}")).await;
    }
    let seen = receive_exactly_once(&mut first, 10).await;
    // Not the owner: the second instance may not have seen these events yet,
    // and an owner's connection would get them live ahead of `subscribed`.
    let mut moved = second.connect_as(superuser()).await;
    moved
        .send(json!({"type": "subscribe", "topic": format!("deployment_logs_{deployment}"), "since": seen[3].0}))
        .await;
    moved.recv_type("subscribed").await;
    let replayed = receive_exactly_once(&mut moved, 6).await;
    let ids = |events: &[(i64, Value)]| events.iter().map(|(id, _)| *id).collect::<Vec<_>>();
    assert_eq!(ids(&replayed), ids(&seen[4..]));
}

#[tokio::test]
async fn refuses_to_start_against_a_standby() {
    let primary = Cluster::start_new();
    let standby = primary.start_standby();
    let config: tokio_postgres::Config = standby.url("postgres").parse().unwrap();
    let error = windflow_notify::db::migrate(&config).await.expect_err("refused");
    assert!(error.to_string().contains("standby"), "{error}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_windflow-notify"))
        .arg("serve")
        .env("DATABASE_URL", standby.url("postgres"))
        .env("JWT_SECRET_KEY", SECRET)
        .env("WINDFLOW_BIND", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pg_is_in_recovery"), "{stderr}");
}

/// A transaction that wrote before the server started commits while the
/// feed is cut off: its event comes once, from the log, with an id taken
/// at its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_since_before_the_server_started_arrives_once_across_an_outage() {
    let database = TestDatabase::create().await;
    windflow_notify::db::migrate(&database.config).await.unwrap();
    let writer = Writer::new(&database).await;
    let (old_deployment, other_deployment) =
        (writer.create_deployment(Uuid::new_v4(), None).await, writer.create_deployment(Uuid::new_v4(), None).await);
    let slow = Writer::new(&database).await;
    slow.execute("BEGIN").await;
    slow.log(old_deployment, "older than the server").await;
    let server = TestServer::start(&database, |_| {}).await;
    let admin = superuser();
    let mut client = server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    writer.log(other_deployment, "early").await;
    let (_, early_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "early");
    server.two_log_reads_pass().await;
    assert_eq!(kill_listener(&database).await, 1);
    slow.execute("COMMIT").await;
    let (_, old_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "older than the server");
    assert!(old_id > early_id, "the id is taken at commit");
    assert_nothing_more(&writer, &mut client, admin.user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_wrote_first_and_commits_last_across_a_listener_outage_arrives_once() {
    let app = spawn_app().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    let late_deployment = app.writer.create_deployment(x, None).await;
    let early_deployment = app.writer.create_deployment(y, None).await;
    receive_exactly_once(&mut client, 2).await;
    // A writes first but commits last.
    let slow = Writer::new(&app.database).await;
    slow.execute("BEGIN").await;
    slow.log(late_deployment, "late").await;
    app.writer.log(early_deployment, "early").await;
    let (_, early_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "early");
    app.server.two_log_reads_pass().await;
    // Cut the feed off and commit A: A comes from the event log (or live,
    // if the feed is back first), once.
    assert_eq!(kill_listener(&app.database).await, 1);
    slow.execute("COMMIT").await;
    let (_, late_id, data) = client.recv_event().await;
    assert_eq!(data["logs"], "late");
    assert!(late_id > early_id, "commit order: the later commit has the larger id");
    assert_nothing_more(&app.writer, &mut client, admin.user_id).await;
}

/// A superuser on `deployment_events`, and two deployments: a transaction
/// takes an id early for a line on the first (`SET CONSTRAINTS ALL
/// IMMEDIATE` fires the event triggers at once) and stays open, then a line
/// on the second commits with a larger id.
struct EarlyId {
    app: TestApp,
    admin: windflow_notify::auth::Viewer,
    client: Client,
    early: Writer,
}

async fn early_id(early_line: &str, later_line: &str) -> EarlyId {
    let app = spawn_app().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let (d1, d2) = (
        app.writer.create_deployment(Uuid::new_v4(), None).await,
        app.writer.create_deployment(Uuid::new_v4(), None).await,
    );
    receive_exactly_once(&mut client, 2).await;
    let early = Writer::new(&app.database).await;
    early.execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE").await;
    early.log(d1, early_line).await;
    app.writer.log(d2, later_line).await;
    EarlyId { app, admin, client, early }
}

/// Ids taken before commit (`SET CONSTRAINTS ALL IMMEDIATE` fires the event
/// triggers at once): a larger id that commits first waits for the smaller
/// one, so the log's order stays the order of delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waits_for_a_smaller_id_still_committing() {
    let EarlyId { app, admin, mut client, early } =
        early_id("smaller id, committed second", "larger id, committed first").await;
    app.server.two_log_reads_pass().await;
    early.execute("COMMIT").await;
    let (_, first, data) = client.recv_event().await;
    assert_eq!(data["logs"], "smaller id, committed second", "nothing overtakes a smaller id still committing");
    let (_, second, data) = client.recv_event().await;
    assert_eq!(data["logs"], "larger id, committed first");
    assert!(first < second);
    assert_nothing_more(&app.writer, &mut client, admin.user_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_taken_by_a_transaction_that_rolled_back_holds_up_nothing() {
    let EarlyId { app, admin, mut client, early } = early_id("rolled back", "after the gap").await;
    app.server.two_log_reads_pass().await;
    early.execute("ROLLBACK").await;
    let (_, _, data) = client.recv_event().await;
    assert_eq!(data["logs"], "after the gap");
    assert_nothing_more(&app.writer, &mut client, admin.user_id).await;
}

/// A transaction that takes its ids early and then sits idle holds up
/// delivery for at most 10 s; its events come late if it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holding_an_early_id_for_long_is_passed_and_its_event_comes_late() {
    let EarlyId { app, admin, mut client, early } = early_id("held", "passes it after a while").await;
    let (_, passed, data) = client.recv_event().await;
    assert_eq!(data["logs"], "passes it after a while");
    early.execute("COMMIT").await;
    let (_, late, data) = client.recv_event().await;
    assert_eq!(data["logs"], "held");
    assert!(late < passed, "the late event keeps its id");
    assert_eq!(app.server.metric("windflow_late_events_total").await, 1.0);
    assert_nothing_more(&app.writer, &mut client, admin.user_id).await;
}

/// The "already sent" check of a resume asks who the viewer was when each
/// event was fed: the old organization could not see these, so they were
/// not sent, and are owed now.
#[tokio::test]
async fn a_resume_after_a_token_that_changes_the_organization_gets_what_became_visible() {
    let app = spawn_app().await;
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut viewer = member_of(org_a);
    let mut client = app.server.connect_as(viewer).await;
    client.subscribe("deployment_events").await;
    let d_b = app.writer.create_deployment(Uuid::new_v4(), Some(org_b)).await;
    let created: i64 = app.writer.db.query_one("SELECT max(id) FROM windflow_events", &[]).await.unwrap().get(0);
    app.writer.log(d_b, "b1").await;
    app.writer.log(d_b, "b2").await;
    viewer.organization_id = Some(org_b);
    client.send(json!({"type": "auth", "token": token(viewer)})).await;
    client.recv_type("authenticated").await;
    client.send(json!({"type": "subscribe", "topic": format!("deployment_logs_{d_b}"), "since": created})).await;
    // Each once. In commit order when the feed handed both over before the
    // re-authentication; when it handed b2 over after it, b2 came live on
    // deployment_events (visible now), before `subscribed`, and the replay
    // brings b1 after it: a replay comes after what was sent before its
    // `subscribe` (docs/protocol.md, "Resuming").
    let (mut got, mut subscribed) = (Vec::new(), false);
    while !subscribed || got.len() < 2 {
        let message = client.recv().await;
        match message["type"].as_str() {
            Some("subscribed") => subscribed = true,
            Some("DEPLOYMENT_LOGS_UPDATE") => got.push(message["data"]["logs"].as_str().unwrap().to_string()),
            _ => panic!("unexpected message: {message}"),
        }
    }
    got.sort();
    assert_eq!(got, ["b1", "b2"]);
    assert_nothing_more(&app.writer, &mut client, viewer.user_id).await;
}

/// A transaction open in another database, with an xid (any login can hold
/// one): the feed does not wait for it, neither live nor after a reconnect.
/// (The logical source's reconnect used to wait for every such transaction
/// when it created its slot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_in_another_database_holds_up_nothing() {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let elsewhere = TestDatabase::create().await;
    let idle = elsewhere.client().await;
    idle.batch_execute("BEGIN; SELECT pg_current_xact_id()").await.unwrap();
    app.writer.log(deployment, "while it is open").await;
    assert_eq!(owner.recv_event().await.2["logs"], "while it is open");
    assert_eq!(kill_listener(&app.database).await, 1);
    app.writer.log(deployment, "across a reconnect").await;
    assert_eq!(owner.recv_event().await.2["logs"], "across a reconnect");
    eventually("the feed back up", || async { app.server.metric("windflow_listener_up").await == 1.0 }).await;
    idle.batch_execute("ROLLBACK").await.unwrap();
}
