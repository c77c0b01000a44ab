//! Which writes make which events, and their wire format.

mod common;

use common::*;
use serde_json::Value;
use uuid::Uuid;

fn assert_utc_timestamp(value: &Value) {
    let text = value.as_str().unwrap_or_else(|| panic!("timestamp is a string: {value}"));
    assert!(text.ends_with('Z'), "{text} ends in Z");
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text} is RFC 3339: {e}"));
}

#[tokio::test]
async fn insert_deployment_makes_status_changed_with_null_old_status() {
    let app = spawn_app().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;

    let message = client.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
    assert!(message["event_id"].is_i64());
    let data = &message["data"];
    assert_eq!(data["deployment_id"], deployment.to_string());
    assert_eq!(data["status"], "pending");
    assert_eq!(data["old_status"], Value::Null);
    assert_eq!(data["user_id"], owner.user_id.to_string());
    assert_eq!(data["name"], "app");
    assert_eq!(data["error_message"], Value::Null);
    assert_utc_timestamp(&data["timestamp"]);
}

#[tokio::test]
async fn status_update_makes_status_changed_with_old_status() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!("UPDATE deployments SET status = 'failed', error_message = 'boom' WHERE id = '{deployment}'"))
        .await;
    let data = client.recv_type("DEPLOYMENT_STATUS_CHANGED").await["data"].clone();
    assert_eq!(data["status"], "failed");
    assert_eq!(data["old_status"], "pending");
    assert_eq!(data["error_message"], "boom");
}

#[tokio::test]
async fn progress_update_carries_the_row_after_the_update() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!(
            "UPDATE deployments SET progress = 75, current_step = 'Starting containers', total_steps = 100 WHERE id = '{deployment}'"
        ))
        .await;
    let data = client.recv_type("DEPLOYMENT_PROGRESS").await["data"].clone();
    assert_eq!(data["deployment_id"], deployment.to_string());
    assert_eq!(data["progress"], 75);
    assert_eq!(data["current_step"], "Starting containers");
    assert_eq!(data["total_steps"], 100);
    assert_utc_timestamp(&data["timestamp"]);
}

#[tokio::test]
async fn each_of_current_step_and_total_steps_alone_makes_progress() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer.execute(&format!("UPDATE deployments SET current_step = 'pull' WHERE id = '{deployment}'")).await;
    assert_eq!(client.recv_type("DEPLOYMENT_PROGRESS").await["data"]["current_step"], "pull");
    app.writer.execute(&format!("UPDATE deployments SET total_steps = 7 WHERE id = '{deployment}'")).await;
    assert_eq!(client.recv_type("DEPLOYMENT_PROGRESS").await["data"]["total_steps"], 7);
}

#[tokio::test]
async fn status_and_progress_in_one_update_make_both_status_first() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!("UPDATE deployments SET status = 'deploying', progress = 10 WHERE id = '{deployment}'"))
        .await;
    let (first, first_id, _) = client.recv_event().await;
    let (second, second_id, _) = client.recv_event().await;
    assert_eq!(first, "DEPLOYMENT_STATUS_CHANGED");
    assert_eq!(second, "DEPLOYMENT_PROGRESS");
    assert!(first_id < second_id);
}

#[tokio::test]
async fn update_of_other_columns_makes_no_event() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer.execute(&format!("UPDATE deployments SET name = 'renamed' WHERE id = '{deployment}'")).await;
    app.writer
        .execute(&format!("UPDATE deployments SET status = status, progress = progress WHERE id = '{deployment}'"))
        .await;
    // A fence: the next event must be this one, so the updates above made none.
    app.writer.log(deployment, "fence").await;
    let message = client.recv().await;
    assert_eq!(message["type"], "DEPLOYMENT_LOGS_UPDATE", "{message}");
    assert_eq!(message["data"]["logs"], "fence");
}

#[tokio::test]
async fn log_insert_makes_logs_update_one_per_row() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!(
            "INSERT INTO deployment_logs (deployment_id, message) VALUES ('{deployment}', 'one'), ('{deployment}', 'two')"
        ))
        .await;
    for expected in ["one", "two"] {
        let data = client.recv_type("DEPLOYMENT_LOGS_UPDATE").await["data"].clone();
        assert_eq!(data["deployment_id"], deployment.to_string());
        assert_eq!(data["logs"], expected);
        assert_eq!(data["append"], true);
        assert_utc_timestamp(&data["timestamp"]);
    }
}

#[tokio::test]
async fn identical_log_rows_in_one_transaction_are_two_events() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!(
            "BEGIN;
             INSERT INTO deployment_logs (deployment_id, message) VALUES ('{deployment}', 'same');
             INSERT INTO deployment_logs (deployment_id, message) VALUES ('{deployment}', 'same');
             COMMIT;"
        ))
        .await;
    let (_, first, a) = client.recv_event().await;
    let (_, second, b) = client.recv_event().await;
    assert_eq!(a["logs"], "same");
    assert_eq!(b["logs"], "same");
    assert_ne!(first, second);
}

#[tokio::test]
async fn rolled_back_transaction_emits_nothing() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    app.writer
        .execute(&format!(
            "BEGIN;
             UPDATE deployments SET status = 'running', progress = 50 WHERE id = '{deployment}';
             INSERT INTO deployment_logs (deployment_id, message) VALUES ('{deployment}', 'ghost');
             ROLLBACK;"
        ))
        .await;
    app.writer.log(deployment, "after rollback").await;
    let message = client.recv().await;
    assert_eq!(message["data"]["logs"], "after rollback", "{message}");
}

#[tokio::test]
async fn events_arrive_at_commit_not_before() {
    let app = spawn_app().await;
    let (owner, mut client, deployment) = app.owner_with_deployment().await;
    let other = Writer::new(&app.database).await;
    app.writer.execute("BEGIN").await;
    app.writer.log(deployment, "inside").await;
    // While the first transaction is open, a second writer commits.
    let second = other.create_deployment(owner.user_id, None).await;
    let message = client.recv().await;
    assert_eq!(message["data"]["deployment_id"], second.to_string(), "{message}");
    app.writer.execute("COMMIT").await;
    assert_eq!(client.recv().await["data"]["logs"], "inside");
}

#[tokio::test]
async fn one_mebibyte_log_line_arrives_intact() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    // Varied content (not one repeated byte), with characters JSON escapes.
    let line: String = (0..1_048_576usize)
        .map(|i| match i % 97 {
            0 => '\n',
            1 => '"',
            2 => '\\',
            3 => 'é',
            n => char::from(b'a' + (n % 26) as u8),
        })
        .collect();
    app.writer.log(deployment, &line).await;
    let data = client.recv_type("DEPLOYMENT_LOGS_UPDATE").await["data"].clone();
    assert_eq!(data["logs"].as_str().map(str::len), Some(line.len()));
    assert!(data["logs"] == line.as_str(), "content differs");
}

#[tokio::test]
async fn database_rejects_unknown_status_and_out_of_range_progress() {
    let app = spawn_app().await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    for sql in [
        format!("UPDATE deployments SET status = 'exploded' WHERE id = '{deployment}'"),
        format!("UPDATE deployments SET progress = 101 WHERE id = '{deployment}'"),
        format!("UPDATE deployments SET progress = -1 WHERE id = '{deployment}'"),
    ] {
        assert!(app.writer.db.batch_execute(&sql).await.is_err(), "{sql} must fail");
    }
}

#[tokio::test]
async fn updated_at_is_kept_current_by_the_database() {
    let app = spawn_app().await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    app.writer.execute(&format!("UPDATE deployments SET updated_at = '2000-01-01' WHERE id = '{deployment}'")).await;
    let row = app
        .writer
        .db
        .query_one("SELECT updated_at > now() - interval '1 hour' FROM deployments WHERE id = $1", &[&deployment])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test]
async fn raw_notify_stream_shows_event_id_and_type() {
    let app = spawn_app().await;
    let (listener, mut connection) = app.database.config.connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    listener.batch_execute("LISTEN windflow_events").await.unwrap();
    app.writer.create_deployment(Uuid::new_v4(), None).await;
    let notification = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let payload: Value = serde_json::from_str(notification.payload()).unwrap();
    assert!(payload["event_id"].is_i64());
    assert_eq!(payload["type"], "DEPLOYMENT_STATUS_CHANGED");
}
