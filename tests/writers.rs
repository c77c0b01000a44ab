//! Writers stay writers, and never wait on each other: what a role with a
//! writer's usual rights (SELECT, INSERT and UPDATE on `deployments` and
//! `deployment_logs`, nothing else) can do to the event log, and what the
//! triggers add to its transactions (nothing that would not happen
//! without them).

mod common;

use common::*;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn a_writer_role_with_only_its_usual_privileges_emits_events() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    let role = Role::writer(&app.database).await;
    let writer = role.connect(&app.database).await;
    writer
        .execute(
            "INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, 'from the api role')",
            &[&deployment],
        )
        .await
        .expect("a writer needs no privilege on the event log");
    writer.execute("UPDATE deployments SET status = 'running' WHERE id = $1", &[&deployment]).await.expect("update");
    assert_eq!(client.recv_event().await.2["logs"], "from the api role");
    assert_eq!(client.recv_event().await.2["status"], "running");
}

#[tokio::test]
async fn a_writer_can_neither_read_nor_write_the_event_log_nor_call_what_writes_it() {
    let app = spawn_app().await;
    let role = Role::writer(&app.database).await;
    let writer = role.connect(&app.database).await;
    for sql in [
        "SELECT * FROM windflow_events",
        "INSERT INTO windflow_events (type, deployment_id, user_id, data) VALUES ('DEPLOYMENT_PROGRESS', gen_random_uuid(), gen_random_uuid(), '{}')",
        "SELECT nextval('windflow_event_ids')",
        "UPDATE windflow_events_pruned SET upto = 0",
        "SELECT FROM windflow_wakeup FOR UPDATE",
        "SELECT windflow_record('DEPLOYMENT_PROGRESS', gen_random_uuid(), gen_random_uuid(), NULL, '{}')",
        "TRUNCATE windflow_events",
    ] {
        let error = writer.batch_execute(sql).await.expect_err(sql);
        let message = error.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(message.contains("permission denied"), "{sql}: {message}");
    }
}

/// The attack of the second hostile review: a temp table named like the
/// event log, with a trigger of the writer's own. Had the owner's functions
/// searched pg_temp first, that trigger would have run as the owner (here
/// `postgres`, a superuser) and made the writer one.
#[tokio::test]
async fn a_writers_temp_table_named_like_the_event_log_never_runs_as_its_owner() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    let role = Role::writer(&app.database).await;
    let writer = role.connect(&app.database).await;
    writer
        .batch_execute(&format!(
            "CREATE TEMP TABLE windflow_events (id bigint, type text, deployment_id uuid, user_id uuid,
                 organization_id uuid, data json);
             CREATE TEMP TABLE windflow_wakeup (singleton boolean);
             CREATE FUNCTION pg_temp.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 ALTER ROLE {} SUPERUSER;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER escalate BEFORE INSERT ON pg_temp.windflow_events
                 FOR EACH ROW EXECUTE FUNCTION pg_temp.escalate();",
            role.name
        ))
        .await
        .expect("any writer may create temp tables");
    writer
        .execute("INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, 'ordinary line')", &[&deployment])
        .await
        .expect("the insert itself succeeds");
    let (kind, _, data) = client.recv_event().await;
    assert_eq!((kind.as_str(), data["logs"].as_str()), ("DEPLOYMENT_LOGS_UPDATE", Some("ordinary line")));
    let superuser: bool = app
        .writer
        .db
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role.name])
        .await
        .expect("role")
        .get(0);
    assert!(!superuser, "the writer's trigger ran with the event log owner's rights");
    let shadowed: i64 =
        writer.query_one("SELECT count(*) FROM pg_temp.windflow_events", &[]).await.expect("temp table").get(0);
    assert_eq!(shadowed, 0, "the event went to the writer's temp table");
}

/// A temp `deployments` that names another owner for the deployment must
/// not re-route its events.
#[tokio::test]
async fn a_writers_temp_deployments_table_cannot_reroute_events() {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let thief = user();
    let mut thief_client = app.server.connect_as(thief).await;
    let role = Role::writer(&app.database).await;
    let writer = role.connect(&app.database).await;
    writer
        .batch_execute(&format!(
            "CREATE TEMP TABLE deployments (id uuid, user_id uuid, organization_id uuid);
             INSERT INTO pg_temp.deployments VALUES ('{deployment}', '{}', NULL);",
            thief.user_id
        ))
        .await
        .expect("temp table");
    writer
        .execute(
            "INSERT INTO public.deployment_logs (deployment_id, message) VALUES ($1, 'for the owner only')",
            &[&deployment],
        )
        .await
        .expect("insert");
    assert_eq!(owner.recv_event().await.2["logs"], "for the owner only");
    assert_nothing_more(&app.writer, &mut thief_client, thief.user_id).await;
}

/// Writers of two deployments, in opposite orders: with per-deployment
/// locks this deadlocked (one of the two failed after deadlock_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_two_deployments_in_opposite_orders_both_commit() {
    let app = spawn_app().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    let (d1, d2) = (
        app.writer.create_deployment(owner.user_id, None).await,
        app.writer.create_deployment(owner.user_id, None).await,
    );
    receive_exactly_once(&mut client, 2).await;
    let (a, b) = (Writer::new(&app.database).await, Writer::new(&app.database).await);
    for writer in [&a, &b] {
        writer.execute("SET statement_timeout = '5s'; BEGIN").await;
    }
    a.log(d1, "a1").await;
    b.log(d2, "b2").await;
    tokio::join!(a.log(d2, "a2"), b.log(d1, "b1"));
    a.execute("COMMIT").await;
    b.execute("COMMIT").await;
    let events = receive_exactly_once(&mut client, 4).await;
    let logs: Vec<&str> = events.iter().filter_map(|(_, d)| d["logs"].as_str()).collect();
    assert_eq!(logs, ["a1", "a2", "b2", "b1"], "each transaction's events together, in commit order");
}

/// A writer idle in its transaction after a log line holds up neither a
/// log insert nor a status change of the same deployment (with
/// per-deployment locks both waited for it until statement_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_idle_in_its_transaction_holds_up_no_other_writer() {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let idle = Writer::new(&app.database).await;
    idle.execute("BEGIN").await;
    idle.log(deployment, "from the idle transaction").await;
    let other = Writer::new(&app.database).await;
    other.execute("SET statement_timeout = '5s'").await;
    other.log(deployment, "not held up").await;
    other.set_status(deployment, "running").await;
    assert_eq!(owner.recv_event().await.2["logs"], "not held up");
    assert_eq!(owner.recv_event().await.2["status"], "running");
    idle.execute("COMMIT").await;
    let (kind, _, data) = owner.recv_event().await;
    assert_eq!((kind.as_str(), data["logs"].as_str()), ("DEPLOYMENT_LOGS_UPDATE", Some("from the idle transaction")));
}

/// Log in one transaction at `isolation`, after another writer changed the
/// deployment row since the transaction's snapshot.
async fn log_after_concurrent_update(isolation: &str) {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let late = Writer::new(&app.database).await;
    late.execute(&format!("BEGIN ISOLATION LEVEL {isolation}; SELECT count(*) FROM deployments")).await;
    app.writer.set_status(deployment, "deploying").await;
    late.log(deployment, "written from an older snapshot").await;
    late.execute("COMMIT").await;
    let (kind, status_id, _) = owner.recv_event().await;
    assert_eq!(kind, "DEPLOYMENT_STATUS_CHANGED");
    let (kind, log_id, data) = owner.recv_event().await;
    assert_eq!(kind, "DEPLOYMENT_LOGS_UPDATE");
    assert_eq!(data["logs"], "written from an older snapshot");
    assert!(log_id > status_id, "ids follow commit order within the deployment");
}

#[tokio::test]
async fn a_repeatable_read_writer_logs_to_a_deployment_changed_since_its_snapshot() {
    log_after_concurrent_update("REPEATABLE READ").await;
}

#[tokio::test]
async fn a_serializable_writer_logs_to_a_deployment_changed_since_its_snapshot() {
    log_after_concurrent_update("SERIALIZABLE").await;
}

/// Two serializable writers of one deployment, each reading before it
/// writes: without the triggers both commit; the triggers' own reads must
/// not turn that into a serialization failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serializable_log_writers_of_one_deployment_both_commit() {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let (a, b) = (Writer::new(&app.database).await, Writer::new(&app.database).await);
    for writer in [&a, &b] {
        writer.execute("SET statement_timeout = '5s'; BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1").await;
    }
    a.log(deployment, "a").await;
    b.log(deployment, "b").await;
    a.execute("COMMIT").await;
    b.execute("COMMIT").await;
    let logs: Vec<String> = [owner.recv_event().await, owner.recv_event().await]
        .into_iter()
        .map(|(_, _, data)| data["logs"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(logs, ["a", "b"]);
}

/// The ordering promise across deployments: a transaction that wrote
/// before another one committed, but committed after it, is "after" it
/// for a resume too, on an instance whose history holds neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_the_log_after_a_late_commit_gets_the_late_event() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut first = TestServer::start(&database, |_| {}).await;
    let watcher = superuser();
    let mut client = first.connect_as(watcher).await;
    client.subscribe("deployment_events").await;
    let (d1, d2) =
        (writer.create_deployment(Uuid::new_v4(), None).await, writer.create_deployment(Uuid::new_v4(), None).await);
    receive_exactly_once(&mut client, 2).await;
    let slow = Writer::new(&database).await;
    slow.execute("BEGIN").await;
    slow.log(d1, "wrote first, committed last").await;
    writer.log(d2, "committed first").await;
    let (_, cursor, data) = client.recv_event().await;
    assert_eq!(data["logs"], "committed first");
    first.stop().await;
    slow.execute("COMMIT").await;
    let second = TestServer::start(&database, |_| {}).await;
    let mut resumed = second.connect_as(watcher).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": cursor})).await;
    resumed.recv_type("subscribed").await;
    assert_eq!(resumed.recv_event().await.2["logs"], "wrote first, committed last");
    assert_nothing_more(&writer, &mut resumed, watcher.user_id).await;
}

/// `TRUNCATE windflow_events RESTART IDENTITY` while serving: new events
/// are not taken for ones already seen, and a resume from before the
/// truncate that the log must answer gets `resync`.
#[tokio::test]
async fn truncating_the_event_log_loses_no_new_event_and_old_resumes_get_resync() {
    let app = spawn_app().await;
    let watcher = superuser();
    let mut client = app.server.connect_as(watcher).await;
    client.subscribe("deployment_events").await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    for i in 0..3 {
        app.writer.log(deployment, &format!("before {i}")).await;
    }
    let before = receive_exactly_once(&mut client, 4).await;
    app.writer.execute("TRUNCATE windflow_events RESTART IDENTITY").await;
    for i in 0..5 {
        app.writer.log(deployment, &format!("after {i}")).await;
    }
    let after = receive_exactly_once(&mut client, 5).await;
    let logs: Vec<&str> = after.iter().filter_map(|(_, d)| d["logs"].as_str()).collect();
    assert_eq!(logs, ["after 0", "after 1", "after 2", "after 3", "after 4"]);
    // Another instance: its history starts after the truncate.
    let other = TestServer::start(&app.database, |_| {}).await;
    let mut resumed = other.connect_as(watcher).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": before[1].0})).await;
    resumed.recv_type("subscribed").await;
    resumed.recv_type("resync").await;
    let replayed = receive_exactly_once(&mut resumed, 5).await;
    assert_eq!(
        replayed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        after.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
}
