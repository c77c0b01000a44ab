//! `GET /events`: the same events as Server-Sent Events, with the same
//! visibility, limits, resume guarantees and shutdown as `/ws`.

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// A request for a stream (path, headers) and the status and code of its refusal.
type Refused<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);

fn bearer(viewer: windflow_notify::auth::Viewer) -> String {
    format!("Bearer {}", token(viewer))
}

#[tokio::test]
async fn a_stream_starts_with_ready_then_carries_each_event_as_id_event_and_data() {
    let app = spawn_app().await;
    let owner = user();
    let auth = bearer(owner);
    let mut stream = open_events(&app.server, "/events", &[("Authorization", &auth)]).await.expect("a stream");
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-cache"));
    let ready = next_sse(&mut stream).await;
    assert_eq!(ready.event, "ready");
    let data: Value = serde_json::from_str(&ready.data).unwrap();
    assert_eq!(data, json!({"event_id": ready.id.expect("ready has an id"), "topics": []}));
    // The owner feed, without subscribing.
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    let event = next_sse(&mut stream).await;
    assert_eq!(event.event, "DEPLOYMENT_STATUS_CHANGED");
    let message: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(message["type"], "DEPLOYMENT_STATUS_CHANGED", "the same JSON as on WebSocket");
    assert_eq!(message["event_id"].as_i64(), event.id);
    assert_eq!(message["data"]["deployment_id"], deployment.to_string());
    // And what a WebSocket gets, byte for byte.
    let mut ws = app.server.connect_as(owner).await;
    app.writer.log(deployment, "both").await;
    let on_ws = ws.recv().await;
    let on_sse: Value = serde_json::from_str(&next_sse(&mut stream).await.data).unwrap();
    assert_eq!(on_sse, on_ws);
}

#[tokio::test]
async fn a_stream_refused_gets_401_400_or_403_with_a_json_body() {
    let app = spawn_app().await;
    let owner = user();
    let theirs = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let auth = bearer(owner);
    let cases: [Refused; 7] = [
        ("/events".into(), vec![], 401, "unauthorized"),
        ("/events?token=garbage".into(), vec![], 401, "unauthorized"),
        ("/events".into(), vec![("Authorization", "Basic eDp5")], 401, "unauthorized"),
        ("/events?topic=deployments".into(), vec![("Authorization", &auth)], 400, "invalid_topic"),
        (format!("/events?topic=deployment_logs_{theirs}"), vec![("Authorization", &auth)], 403, "forbidden"),
        ("/events?since=-1".into(), vec![("Authorization", &auth)], 400, "bad_request"),
        ("/events".into(), vec![("Authorization", &auth), ("Last-Event-ID", "x")], 400, "bad_request"),
    ];
    for (path, headers, status, code) in cases {
        let (got, body) = open_events(&app.server, &path, &headers).await.err().expect("refused");
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{path} {headers:?}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    let expired = token_for(owner, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = open_events(&app.server, &format!("/events?token={expired}"), &[]).await.err().unwrap();
    assert_eq!((status, body["code"].as_str()), (401, Some("token_expired")));
    assert_eq!(app.server.metric("windflow_connections").await, 0.0, "no refusal holds a connection");
}

#[tokio::test]
async fn a_stream_resumes_from_last_event_id_which_wins_over_since() {
    let app = spawn_app().await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    for i in 0..5 {
        app.writer.log(deployment, &format!("line {i}")).await;
    }
    let ids: Vec<i64> = app
        .writer
        .db
        .query("SELECT id FROM windflow_events WHERE type = 'DEPLOYMENT_LOGS_UPDATE' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let watcher = superuser();
    let auth = bearer(watcher);
    let path = format!("/events?topic=deployment_logs_{deployment}&since=0");
    let last = ids[1].to_string();
    let mut stream =
        open_events(&app.server, &path, &[("Authorization", &auth), ("Last-Event-ID", &last)]).await.expect("a stream");
    let ready = next_sse(&mut stream).await;
    assert_eq!((ready.event.as_str(), ready.id), ("ready", Some(ids[1])), "the cursor is where it resumes from");
    let mut got = Vec::new();
    for _ in 2..5 {
        got.push(next_sse(&mut stream).await.id.unwrap());
    }
    assert_eq!(got, ids[2..], "the events after Last-Event-ID, not after since");
    app.writer.log(deployment, "live").await;
    let live = next_sse(&mut stream).await;
    assert!(live.data.contains("\"logs\":\"live\""), "then live: {live:?}");
}

#[tokio::test]
async fn a_stream_is_pinged_with_comments_and_ends_with_token_expired() {
    let app = spawn_app_with(|s| s.ping_interval = Duration::from_millis(300)).await;
    let viewer = user();
    let path = format!("/events?token={}", token_for(viewer, Duration::from_secs(2)));
    let mut stream = open_events(&app.server, &path, &[]).await.expect("a stream");
    assert_eq!(next_sse(&mut stream).await.event, "ready");
    stream.comment("ping", WAIT).await.unwrap_or_else(|e| panic!("{e:#}"));
    let expired = next_sse(&mut stream).await;
    assert_eq!(expired.event, "token_expired");
    let message: Value = serde_json::from_str(&expired.data).unwrap();
    assert_eq!(message["data"]["code"], "token_expired");
    assert!(stream.next_event(WAIT).await.unwrap().is_none(), "the stream ends after token_expired");
}

#[tokio::test]
async fn shutdown_ends_every_stream() {
    let mut app = spawn_app().await;
    let mut stream = open_events(&app.server, "/events", &[("Authorization", &bearer(user()))]).await.unwrap();
    assert_eq!(next_sse(&mut stream).await.event, "ready");
    app.server.stop().await;
    assert!(stream.next_event(WAIT).await.unwrap().is_none(), "the stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_reader_gets_a_gap_free_prefix_and_its_stream_ends() {
    let app = spawn_app_with(|s| s.client_queue = NonZeroUsize::new(8).unwrap()).await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    let auth = bearer(superuser());
    let path = format!("/events?topic=deployment_logs_{deployment}");
    let answer =
        windflow_testkit::sse::open(app.server.addr, &path, &[("Authorization", &auth)], Some(4096)).await.unwrap();
    let windflow_testkit::sse::SseAnswer::Stream(mut slow) = answer else { panic!("a stream") };
    assert_eq!(next_sse(&mut slow).await.event, "ready");
    let from: i64 = app.writer.db.query_one("SELECT max(id) FROM windflow_events", &[]).await.unwrap().get(0);
    // It stops reading while lines far larger than its buffers come.
    let line = "s".repeat(20_000);
    for _ in 0..200 {
        app.writer.log(deployment, &line).await;
    }
    eventually("the slow reader is kicked", || async {
        app.server.metric("windflow_slow_consumer_disconnects_total").await >= 1.0
    })
    .await;
    let mut received = Vec::new();
    while let Some(event) = slow.next_event(WAIT).await.unwrap() {
        received.push(event.id.expect("events have ids"));
    }
    let owed: Vec<i64> = app
        .writer
        .db
        .query("SELECT id FROM windflow_events WHERE id > $1 ORDER BY id", &[&from])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(received.len() < owed.len(), "kicked before it had everything");
    assert_eq!(received, owed[..received.len()], "what it got is a prefix of what it was owed");
}

#[tokio::test]
async fn streams_count_against_the_connection_limits() {
    let app = spawn_app_with(|s| s.max_connections_per_user = NonZeroUsize::new(2).unwrap()).await;
    let viewer = user();
    let auth = bearer(viewer);
    let _ws = app.server.connect_as(viewer).await;
    let _stream = open_events(&app.server, "/events", &[("Authorization", &auth)]).await.expect("the second");
    let (status, body) = open_events(&app.server, "/events", &[("Authorization", &auth)]).await.err().unwrap();
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_connections")));
    open_events(&app.server, "/events", &[("Authorization", &bearer(user()))]).await.expect("another user's");
}

#[tokio::test]
async fn the_client_and_the_stream_may_be_used_from_another_origin() {
    let app = spawn_app().await;
    let stream = open_events(&app.server, "/events", &[("Authorization", &bearer(user()))]).await.unwrap();
    assert_eq!(stream.header("access-control-allow-origin"), Some("*"));
    let answer = windflow_testkit::sse::open(app.server.addr, "/client.js", &[("Origin", "http://app.example")], None);
    let windflow_testkit::sse::SseAnswer::Stream(client) = answer.await.unwrap() else { panic!("200") };
    assert_eq!(client.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn curl_gets_the_stream() {
    let app = spawn_app().await;
    let owner = user();
    let url = format!("http://{}/events", app.server.addr);
    let mut curl = tokio::process::Command::new("curl")
        .args(["-N", "-s", "-H", &format!("Authorization: {}", bearer(owner)), &url])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl is installed");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(curl.stdout.take().unwrap()));
    let mut next = async || tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(next().await.starts_with("id: "));
    assert_eq!(next().await, "event: ready");
    assert!(next().await.starts_with("data: {\"event_id\":"));
    assert_eq!(next().await, "");
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    assert!(next().await.starts_with("id: "));
    assert_eq!(next().await, "event: DEPLOYMENT_STATUS_CHANGED");
    let data = next().await;
    assert!(data.starts_with("data: {") && data.contains(&deployment.to_string()), "{data}");
}
