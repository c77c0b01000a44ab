//! Replies, error codes, limits and bad input, and
//! the HTTP endpoints. Every bad input is answered and survived.

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

async fn expect_error(client: &mut Client, code: &str) -> Value {
    let error = client.recv_type("error").await;
    assert_eq!(error["data"]["code"], code, "{error}");
    assert!(error["data"]["message"].is_string());
    error
}

#[tokio::test]
async fn ping_in_json_or_text_gets_pong_with_utc_timestamp() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(user()).await;
    client.send(json!({"type": "ping"})).await;
    let pong = client.recv_type("pong").await;
    assert!(pong["data"]["timestamp"].as_str().unwrap().ends_with('Z'));
    client.send_text("ping").await;
    client.recv_type("pong").await;
}

#[tokio::test]
async fn malformed_messages_get_bad_request_and_the_connection_stays() {
    let app = spawn_app().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    for text in [
        "not json",
        "{",
        "[]",
        "42",
        r#"{"no_type":1}"#,
        r#"{"type":"dance"}"#,
        r#"{"type":null}"#,
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","topic":7}"#,
        r#"{"type":"subscribe","topic":"deployment_events","since":"3"}"#,
        r#"{"type":"subscribe","topic":"deployment_events","since":-3}"#,
        r#"{"type":"subscribe","topic":"deployment_events","since":1.5}"#,
        r#"{"type":"unsubscribe"}"#,
        r#"{"type":"auth"}"#,
        r#"{"type":"auth","token":{}}"#,
    ] {
        client.send_text(text).await;
        expect_error(&mut client, "bad_request").await;
    }
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
}

#[tokio::test]
async fn binary_frame_gets_bad_request() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(user()).await;
    client.ws.send(Message::Binary(vec![1u8, 2, 3].into())).await.unwrap();
    expect_error(&mut client, "bad_request").await;
    client.send_text("ping").await;
    client.recv_type("pong").await;
}

#[tokio::test]
async fn invalid_topics_get_invalid_topic_naming_it() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(superuser()).await;
    let id = Uuid::new_v4();
    for topic in [
        "deployments".to_string(),
        "DEPLOYMENT_EVENTS".into(),
        format!("deployment_logs_{}", id.simple()),
        format!("deployment_status_{}", id.simple()),
        format!("deployment_state_{id}"),
        "deployment_logs_".into(),
    ] {
        client.send(json!({"type": "subscribe", "topic": topic})).await;
        let error = expect_error(&mut client, "invalid_topic").await;
        assert_eq!(error["data"]["topic"], topic);
        let message = error["data"]["message"].as_str().unwrap_or_default();
        for form in ["deployment_events", "deployment_logs_<deployment UUID>", "deployment_progress_<deployment UUID>"]
        {
            assert!(message.contains(form), "the valid forms are listed: {message}");
        }
    }
}

#[tokio::test]
async fn at_most_256_subscriptions_per_connection() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(superuser()).await;
    let topics: Vec<String> = (0..256).map(|_| format!("deployment_progress_{}", Uuid::new_v4())).collect();
    for topic in &topics {
        client.send(json!({"type": "subscribe", "topic": topic})).await;
    }
    for _ in &topics {
        client.recv_type("subscribed").await;
    }
    client.send(json!({"type": "subscribe", "topic": "deployment_events"})).await;
    expect_error(&mut client, "too_many_subscriptions").await;
    // Re-subscribing to one it has is not a new subscription.
    client.subscribe(&topics[0]).await;
    // Unsubscribing frees a place.
    client.send(json!({"type": "unsubscribe", "topic": topics[1]})).await;
    client.recv_type("unsubscribed").await;
    client.subscribe("deployment_events").await;
}

#[tokio::test]
async fn message_over_64_kib_closes_with_1009() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(user()).await;
    // Exactly 64 KiB is allowed (and answered as the bad request it is).
    let exactly = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(65_536 - 24));
    assert_eq!(exactly.len(), 65_536);
    client.send_text(&exactly).await;
    client.recv_type("pong").await;
    client.send_text(&"x".repeat(65_537)).await;
    assert_eq!(client.close_code().await, 1009);
}

#[tokio::test]
async fn upgrades_past_max_connections_get_503() {
    let app = spawn_app_with(|settings| settings.max_connections = NonZeroUsize::new(2).unwrap()).await;
    let _first = app.server.connect_as(user()).await;
    let mut second = app.server.connect_as(user()).await;
    let refused = Client::connect(app.server.ws_url().into_client_request().unwrap()).await.err().expect("refused");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status().as_u16(), 503),
        other => panic!("expected 503, got {other}"),
    }
    // A place frees when a client leaves.
    second.ws.close(None).await.unwrap();
    second.closed().await;
    drop(second);
    let (_, metrics) = app.server.get("/metrics").await;
    let open: f64 = metrics.lines().find_map(|l| l.strip_prefix("windflow_connections ")).unwrap().parse().unwrap();
    assert!(open <= 2.0);
}

#[tokio::test]
async fn server_pings_and_drops_a_client_silent_for_two_intervals() {
    let app = spawn_app_with(|settings| settings.ping_interval = Duration::from_millis(200)).await;
    let mut silent = app.server.connect_as(user()).await;
    let mut lively = app.server.connect_as(user()).await;
    // The lively client reads, so its WebSocket library answers pings.
    let mut pings = 0;
    while pings < 5 {
        if let Some(Ok(Message::Ping(_))) = tokio::time::timeout(WAIT, lively.ws.next()).await.unwrap() {
            pings += 1;
        }
    }
    lively.send_text("ping").await;
    lively.recv_type("pong").await;
    // The silent one has not read (so has not answered) for five intervals.
    let ended = loop {
        match tokio::time::timeout(WAIT, silent.ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => continue,
            other => break other,
        }
    };
    assert!(matches!(ended, None | Some(Err(_)) | Some(Ok(Message::Close(_)))), "{ended:?}");
}

#[tokio::test]
async fn token_expiry_sends_token_expired_then_1008() {
    let app = spawn_app().await;
    let mut client = app.server.connect(&token_for(user(), Duration::from_secs(2))).await;
    expect_error(&mut client, "token_expired").await;
    assert_eq!(client.close_code().await, 1008);
}

#[tokio::test]
async fn fresh_auth_before_exp_keeps_the_connection() {
    let app = spawn_app().await;
    let viewer = user();
    let mut client = app.server.connect(&token_for(viewer, Duration::from_secs(2))).await;
    client.send(json!({"type": "auth", "token": token(viewer)})).await;
    client.recv_type("authenticated").await;
    // Let the first token's exp pass: the connection must stay open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let deployment = app.writer.create_deployment(viewer.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
}

#[tokio::test]
async fn healthz_says_ok_while_the_listener_is_connected() {
    let app = spawn_app().await;
    let (status, body) = app.server.get("/healthz").await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn metrics_expose_every_required_series_from_start() {
    let app = spawn_app().await;
    let (status, body) = app.server.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "windflow_connections 0",
        "windflow_subscriptions 0",
        "windflow_events_total 0",
        "windflow_messages_sent_total 0",
        "windflow_listener_up 1",
        "windflow_listener_reconnects_total 0",
        "windflow_slow_consumer_disconnects_total 0",
        "windflow_delivery_latency_seconds_bucket{le=\"+Inf\"} 0",
        "windflow_notification_queue_usage",
    ] {
        assert!(body.contains(name), "{name} missing from\n{body}");
    }
}

#[tokio::test]
async fn metrics_count_events_and_messages() {
    let app = spawn_app().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.log(deployment, "x").await;
    client.recv().await;
    client.recv().await;
    assert_eq!(app.server.metric("windflow_events_total").await, 2.0);
    assert_eq!(app.server.metric("windflow_messages_sent_total").await, 2.0);
    assert_eq!(app.server.metric("windflow_connections").await, 1.0);
    assert_eq!(app.server.metric("windflow_delivery_latency_seconds_count").await, 2.0);
}

#[tokio::test]
async fn unknown_paths_get_404_and_plain_get_on_ws_gets_426() {
    let app = spawn_app().await;
    assert_eq!(app.server.get("/nope").await.0, 404);
    assert_eq!(app.server.get("/ws").await.0, 426);
}

/// docs/protocol.md: `subscribed.event_id` is `since` itself, unless no
/// event ever had that id; then it is the newest event, with `resync`.
#[tokio::test]
async fn a_since_past_the_newest_event_gets_the_newest_as_cursor_and_resync() {
    let app = spawn_app().await;
    let mut watcher = app.server.connect_as(superuser()).await;
    watcher.subscribe("deployment_events").await;
    app.writer.create_deployment(user().user_id, None).await;
    let (_, newest, _) = watcher.recv_event().await;

    let mut client = app.server.connect_as(superuser()).await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": newest})).await;
    assert_eq!(client.recv_type("subscribed").await["data"]["event_id"], newest, "an existing since is the cursor");

    let mut client = app.server.connect_as(superuser()).await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": newest + 1000})).await;
    assert_eq!(client.recv_type("subscribed").await["data"]["event_id"], newest, "the newest, not the since");
    assert_eq!(client.recv_type("resync").await["data"]["topic"], "deployment_events");
}
