//! What a hostile or careless client, writer or database login tries, and
//! what it must not achieve: forged events, starved neighbours, lost or
//! reordered events, broken framing, resets instead of closes.

mod common;

use common::*;
use serde_json::json;
use uuid::Uuid;

/// A login role with no privileges on any table, dropped with the value.
struct Stranger {
    name: String,
}

impl Stranger {
    async fn create() -> Stranger {
        let name = format!("wf_stranger_{}", Uuid::new_v4().simple());
        admin_client().await.batch_execute(&format!("CREATE ROLE {name} LOGIN")).await.expect("create role");
        Stranger { name }
    }

    async fn connect(&self, database: &TestDatabase) -> tokio_postgres::Client {
        let mut config = database.config.clone();
        config.user(&self.name);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("stranger connects");
        tokio::spawn(connection);
        client
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP ROLE IF EXISTS {name}")).await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_notify_from_another_login_neither_injects_nor_suppresses_an_event() {
    let app = spawn_app().await;
    let (owner, mut victim, deployment) = app.owner_with_deployment().await;
    let stranger = Stranger::create().await;
    let forger = stranger.connect(&app.database).await;
    assert!(
        forger.query("SELECT secret FROM windflow_notify_key", &[]).await.is_err(),
        "a login without privileges must not read the signing key"
    );
    let next_id: i64 =
        app.writer.db.query_one("SELECT last_value + 1 FROM windflow_events_id_seq", &[]).await.unwrap().get(0);
    let forged = json!({
        "event_id": next_id, "type": "DEPLOYMENT_STATUS_CHANGED", "deployment_id": deployment,
        "user_id": owner.user_id, "organization_id": null,
        "data": {"deployment_id": deployment, "status": "failed", "old_status": "pending",
                 "timestamp": "2026-01-01T00:00:00.000000Z", "user_id": owner.user_id,
                 "name": "forged", "error_message": "forged"}
    });
    let with_fake_sig = format!(r#"{{"sig":"{}",{}"#, "0".repeat(64), &forged.to_string()[1..]);
    for payload in [forged.to_string(), with_fake_sig, "typo".to_string()] {
        forger.execute("SELECT pg_notify('windflow_events', $1)", &[&payload]).await.expect("NOTIFY is open to all");
    }
    app.writer.log(deployment, "the real event").await;
    let (kind, id, data) = victim.recv_event().await;
    assert_eq!((kind.as_str(), id), ("DEPLOYMENT_LOGS_UPDATE", next_id), "the real event, with the claimed id");
    assert_eq!(data["logs"], "the real event");
    eventually("forgeries counted", || async { app.server.metric("windflow_forged_notifications_total").await == 3.0 })
        .await;
}

/// Run `statements` in one transaction at `isolation`, after another
/// writer changed the deployment row since the transaction's snapshot.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_waits_for_a_repeatable_read_log_writer_so_ids_follow_commit_order() {
    let app = spawn_app().await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let first = Writer::new(&app.database).await;
    first.execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    first.log(deployment, "first").await;
    let second_pid: i32 = {
        let second = Writer::new(&app.database).await;
        let pid = second.db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        tokio::spawn(async move { second.set_status(deployment, "running").await });
        pid
    };
    let admin = admin_client().await;
    eventually("the status change waits for the log writer", || async {
        admin
            .query_one(
                "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
                &[&second_pid],
            )
            .await
            .is_ok_and(|row| row.get(0))
    })
    .await;
    first.execute("COMMIT").await;
    let (kind, log_id, _) = owner.recv_event().await;
    assert_eq!(kind, "DEPLOYMENT_LOGS_UPDATE");
    let (kind, status_id, _) = owner.recv_event().await;
    assert_eq!(kind, "DEPLOYMENT_STATUS_CHANGED");
    assert!(status_id > log_id, "the later commit has the larger id");
}
