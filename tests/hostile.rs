//! What a hostile or careless client, writer or database login tries, and
//! what it must not achieve: forged events, starved neighbours, lost or
//! reordered events, broken framing, resets instead of closes.

mod common;

use common::*;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn a_notify_from_another_login_neither_injects_nor_suppresses_an_event() {
    let app = spawn_app().await;
    let (owner, mut victim, deployment) = app.owner_with_deployment().await;
    let stranger = Role::create().await;
    let forger = stranger.connect(&app.database).await;
    let direct = forger
        .batch_execute(
            "SELECT windflow_record('DEPLOYMENT_STATUS_CHANGED', gen_random_uuid(), gen_random_uuid(), NULL, '{}')",
        )
        .await
        .expect_err("a login without privileges must not call the function that writes events");
    let refused = direct.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(refused.contains("permission denied for function windflow_record"), "{refused}");
    let next_id: i64 =
        app.writer.db.query_one("SELECT last_value + 1 FROM windflow_event_ids", &[]).await.unwrap().get(0);
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

// ---------------------------------------------------------------------
// Clients that stop reading, pipeline, send garbage, resume from odd places.
// ---------------------------------------------------------------------

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async};

type RawSocket = WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket over a socket with a tiny receive buffer, for a client
/// that stops reading: the server's writes block almost at once.
async fn tiny_buffer_client(server: &TestServer, token: &str) -> RawSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    client_async(request, stream).await.expect("upgrade").0
}

/// Send text frames without waiting for anything.
async fn pipeline(ws: &mut RawSocket, messages: &[serde_json::Value]) {
    for message in messages {
        ws.feed(Message::Text(message.to_string().into())).await.unwrap();
    }
    ws.flush().await.unwrap();
}

/// Every text message until the server closes (or the stream ends): the
/// JSON values, and the close code if a close frame came.
async fn read_to_close(ws: &mut RawSocket) -> (Vec<serde_json::Value>, Option<u16>, Option<tungstenite::Error>) {
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(WAIT * 2, ws.next()).await.expect("the server ends the connection") {
            Some(Ok(Message::Text(text))) => messages.push(serde_json::from_str(text.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => return (messages, frame.map(|f| u16::from(f.code)), None),
            Some(Ok(_)) => {}
            Some(Err(e)) => return (messages, None, Some(e)),
            None => return (messages, None, None),
        }
    }
}

fn event_ids(messages: &[serde_json::Value]) -> Vec<i64> {
    messages.iter().filter_map(|m| m["event_id"].as_i64().filter(|_| m["type"] != "subscribed")).collect()
}

async fn ids_after(writer: &Writer, deployment: Uuid, after: i64) -> Vec<i64> {
    writer
        .db
        .query(
            "SELECT id FROM windflow_events WHERE deployment_id = $1 AND id > $2 ORDER BY id",
            &[&deployment, &after],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_slow_consumer_got_a_gap_free_prefix_and_resumes_without_loss() {
    let app = spawn_app_with(|s| s.client_queue = NonZeroUsize::new(4).unwrap()).await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.log(deployment, "before").await;
    let since = *ids_after(&app.writer, deployment, 0).await.last().unwrap();
    let line = "r".repeat(30_000);
    for _ in 0..200 {
        app.writer.log(deployment, &line).await;
    }
    let watcher = superuser();
    let mut slow = tiny_buffer_client(&app.server, &token(watcher)).await;
    let topic = format!("deployment_logs_{deployment}");
    pipeline(&mut slow, &[json!({"type": "subscribe", "topic": topic, "since": since})]).await;
    // Live events larger than a fragment, while the replay is stuck.
    let big = "L".repeat(200_000);
    for _ in 0..10 {
        app.writer.log(deployment, &big).await;
    }
    eventually("the slow consumer is kicked", || async {
        app.server.metric("windflow_slow_consumer_disconnects_total").await >= 1.0
    })
    .await;
    let (messages, _, error) = read_to_close(&mut slow).await;
    if let Some(tungstenite::Error::Protocol(e)) = &error {
        assert_eq!(*e, tungstenite::error::ProtocolError::ResetWithoutClosingHandshake, "framing broken: {e}");
    }
    let owed = ids_after(&app.writer, deployment, since).await;
    let received = event_ids(&messages);
    assert!(received.len() < owed.len(), "the client was kicked before it had everything");
    assert_eq!(received, owed[..received.len()], "what a kicked client got is a prefix of what it was owed");
    // Every event reaches the server before the resume: one still arriving
    // live while the replay is written would fill this 4-slot queue and
    // get the resume kicked too (a slow consumer, rightly, but not this test).
    let written: i64 = app.writer.db.query_one("SELECT count(*) FROM windflow_events", &[]).await.unwrap().get(0);
    eventually("every event reached the server", || async {
        app.server.metric("windflow_events_total").await >= written as f64
    })
    .await;
    // Resume from the last event it saw.
    let resume_from = received.last().copied().unwrap_or(since);
    let mut again = app.server.connect_as(watcher).await;
    again.send(json!({"type": "subscribe", "topic": topic, "since": resume_from})).await;
    again.recv_type("subscribed").await;
    let mut rest = Vec::new();
    while rest.len() < owed.len() - received.len() {
        rest.push(again.recv_event().await.1);
    }
    assert_eq!(rest, owed[received.len()..], "the resume delivers exactly the rest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayers_that_never_read_neither_starve_others_nor_outlive_the_ping_timeout() {
    let database = TestDatabase::create().await;
    // The log fills before the server starts: its history is empty, so
    // every `since 0` replays from the log.
    let writer = Writer::new(&database).await;
    {
        let _migrated = TestServer::start(&database, |_| {}).await;
    }
    let heavy = writer.create_deployment(Uuid::new_v4(), None).await;
    let line = "h".repeat(500_000);
    for _ in 0..20 {
        writer.log(heavy, &line).await;
    }
    let server = TestServer::start(&database, |s| s.ping_interval = Duration::from_secs(1)).await;
    let mut hostile = Vec::new();
    for _ in 0..16 {
        let mut ws = tiny_buffer_client(&server, &token(superuser())).await;
        pipeline(&mut ws, &[json!({"type": "subscribe", "topic": "deployment_events", "since": 0})]).await;
        hostile.push(ws);
    }
    // Another user is served meanwhile: a permission check, a subscribe, an event.
    let owner = user();
    let mut good = server.connect_as(owner).await;
    let own = writer.create_deployment(owner.user_id, None).await;
    good.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
    good.subscribe(&format!("deployment_logs_{own}")).await;
    let mut replayer = server.connect_as(superuser()).await;
    replayer.send(json!({"type": "subscribe", "topic": "deployment_events", "since": 0})).await;
    replayer.recv_type("subscribed").await;
    writer.log(own, "served").await;
    assert_eq!(good.recv_event().await.2["logs"], "served");
    // A well-behaved replayer of the same log gets it all, in order.
    let mut replayed = Vec::new();
    while !replayed.iter().any(|(_, d): &(i64, serde_json::Value)| d["logs"] == "served") {
        let (_, id, data) = replayer.recv_event().await;
        replayed.push((id, data));
    }
    assert_eq!(replayed.len(), 1 + 20 + 1 + 1, "heavy deployment, its 20 lines, own deployment, the line");
    // The non-readers are dropped by the ping timeout, replay or not. The
    // well-behaved clients leave first: with a 1 s ping interval and no one
    // reading them, they would be dropped as silent too, at a moment of
    // their own.
    drop((good, replayer));
    eventually("silent replayers dropped", || async { server.metric("windflow_connections").await == 0.0 }).await;
    drop(hostile);
}

#[tokio::test]
async fn a_resume_above_the_highest_id_seen_after_a_restart_gets_the_late_and_the_missed_events() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let watcher = superuser();
    let mut client = server.connect_as(watcher).await;
    client.subscribe("deployment_events").await;
    let (d1, d2) =
        (writer.create_deployment(Uuid::new_v4(), None).await, writer.create_deployment(Uuid::new_v4(), None).await);
    client.recv_event().await;
    client.recv_event().await;
    let open = Writer::new(&database).await;
    open.execute("BEGIN").await;
    open.log(d1, "late").await;
    writer.log(d2, "seen").await;
    let (_, seen, _) = client.recv_event().await;
    server.stop().await;
    writer.log(d2, "missed").await;
    let server = TestServer::start(&database, |_| {}).await;
    open.execute("COMMIT").await;
    let mut resumed = server.connect_as(watcher).await;
    resumed.send(json!({"type": "subscribe", "topic": "deployment_events", "since": seen})).await;
    resumed.recv_type("subscribed").await;
    let logs: Vec<String> = [resumed.recv_event().await, resumed.recv_event().await]
        .into_iter()
        .map(|(_, _, data)| data["logs"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(logs, ["missed", "late"], "both, in commit order");
}

#[tokio::test]
async fn a_fresh_subscriber_resumes_from_the_cursor_in_subscribed() {
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut server = TestServer::start(&database, |_| {}).await;
    let watcher = superuser();
    let mut client = server.connect_as(watcher).await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events"})).await;
    let cursor = client.recv_type("subscribed").await["data"]["event_id"].as_i64().expect("event_id in subscribed");
    server.stop().await;
    let missed = writer.create_deployment(Uuid::new_v4(), None).await;
    let server = TestServer::start(&database, |_| {}).await;
    let mut client = server.connect_as(watcher).await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": cursor})).await;
    client.recv_type("subscribed").await;
    assert_eq!(client.recv_event().await.2["deployment_id"], missed.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_resuming_at_connect_gets_nothing_up_to_since_then_its_deployment_in_commit_order() {
    let app = spawn_app().await;
    let owner = user();
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = {
        let (writer, stop) = (Writer::new(&app.database).await, std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(2));
            for n in 0..6000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                interval.tick().await;
                writer.log(deployment, &format!("line {n}")).await;
            }
        })
    };
    let topic = format!("deployment_logs_{deployment}");
    eventually("a dozen lines written", || async { ids_after(&app.writer, deployment, 0).await.len() > 12 }).await;
    for attempt in 0..40 {
        let latest = *ids_after(&app.writer, deployment, 0).await.last().unwrap();
        let since = latest - 10;
        // Resume at connect: the topic and since in the URL, nothing sent.
        let url = format!("{}?token={}&topic={topic}&since={since}", app.server.ws_url(), token(owner));
        let (mut ws, _) = tokio_tungstenite::connect_async(url.into_client_request().unwrap()).await.unwrap();
        let mut ids = Vec::new();
        while ids.len() < 20 {
            let message = match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(Message::Text(text))) => serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("attempt {attempt}: {other:?}"),
            };
            if let Some(id) = message["event_id"].as_i64().filter(|_| message["type"] != "subscribed") {
                ids.push(id);
            }
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(ids, sorted, "attempt {attempt}: out of commit order or repeated");
        // The owner feed is resumed at since too, even when this server's
        // feed had not read that far yet (`since` came from the database):
        // nothing up to since, and no gap after it.
        assert_eq!(ids[0], since + 1, "attempt {attempt}: not right after since: {ids:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writing.await.unwrap();
}

#[tokio::test]
async fn a_bad_auth_followed_at_once_by_requests_still_gets_its_error_and_close() {
    let app = spawn_app().await;
    for attempt in 0..4 {
        let socket = tokio::net::TcpStream::connect(app.server.addr).await.unwrap();
        let (mut ws, _) = client_async(app.server.ws_url(), socket).await.unwrap();
        let mut burst = vec![json!({"type": "auth", "token": "not-a-token"})];
        burst.extend((0..50).map(|i| json!({"type": "subscribe", "topic": format!("deployment_events{i}")})));
        pipeline(&mut ws, &burst).await;
        // Read only once the server is done with the connection: what it
        // sent must still be there (a reset would have discarded it).
        eventually("the server ends the session", || async { app.server.metric("windflow_connections").await == 0.0 })
            .await;
        // A client still sending: after a reset (the server closing with
        // requests unread) this write fails, and most clients give up
        // without reading what the server sent.
        let sent = ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
        assert!(sent.is_ok(), "attempt {attempt}: the server reset the connection: {sent:?}");
        let (messages, code, error) = read_to_close(&mut ws).await;
        assert_eq!(
            messages.first().map(|m| m["data"]["code"].clone()),
            Some(json!("unauthorized")),
            "attempt {attempt}"
        );
        assert_eq!(code, Some(1008), "attempt {attempt}: a close frame, not a reset ({error:?})");
    }
}

#[tokio::test]
async fn an_expired_token_closes_with_a_handshake_while_the_client_pings() {
    let app = spawn_app().await;
    let mut client = app.server.connect(&token_for(user(), Duration::from_secs(2))).await;
    let mut messages = Vec::new();
    // A client that keeps pinging every few milliseconds, reading between.
    let code = loop {
        client.ws.feed(Message::Text(r#"{"type":"ping"}"#.into())).await.ok();
        client.ws.flush().await.ok();
        match tokio::time::timeout(Duration::from_millis(5), client.ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(text)))) => {
                messages.push(serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap())
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    // The client's reply to the close goes out on the next read: the
    // server must still be there to take it, not have reset the connection.
    let after = tokio::time::timeout(WAIT, client.ws.next()).await.expect("the stream ends");
    assert!(matches!(after, None | Some(Ok(Message::Close(_)))), "not a closing handshake: {after:?}");
    assert_eq!(code, Some(1008));
    assert!(messages.iter().any(|m| m["data"]["code"] == "token_expired"));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_request_order() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(superuser()).await;
    let mut burst: Vec<serde_json::Value> = Vec::new();
    burst.push(json!({"type": "subscribe", "topic": "deployment_events"}));
    burst.push(json!({"type": "ping"}));
    let topics: Vec<String> = (0..256).map(|_| format!("deployment_logs_{}", Uuid::new_v4())).collect();
    burst.extend(topics.iter().map(|t| json!({"type": "subscribe", "topic": t})));
    burst.push(json!({"type": "ping"}));
    for message in &burst {
        client.ws.feed(Message::Text(message.to_string().into())).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    let mut kinds = Vec::new();
    for _ in 0..burst.len() {
        let reply = client.recv().await;
        let kind = match reply["type"].as_str().unwrap() {
            "error" => reply["data"]["code"].as_str().unwrap().to_string(),
            other => other.to_string(),
        };
        kinds.push(kind);
    }
    let mut expected = vec!["subscribed".to_string(), "pong".to_string()];
    expected.extend(std::iter::repeat_n("subscribed".to_string(), 255));
    expected.push("too_many_subscriptions".into());
    expected.push("pong".into());
    assert_eq!(kinds, expected);
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    let app = spawn_app().await;
    let mut client = app.server.connect_as(user()).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    client.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(client.close_code().await, 1007);
}

#[tokio::test]
async fn a_frame_websocket_does_not_allow_closes_with_1002() {
    let app = spawn_app().await;
    let mut reserved = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    reserved.header_mut().rsv1 = true;
    let stray = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true);
    for frame in [reserved, stray] {
        let mut client = app.server.connect_as(user()).await;
        client.ws.send(Message::Frame(frame)).await.unwrap();
        assert_eq!(client.close_code().await, 1002);
    }
}

#[tokio::test]
async fn the_history_is_bounded_in_bytes_and_a_resume_past_it_reads_the_log() {
    let app = spawn_app_with(|s| s.history_bytes = 1 << 20).await;
    let (_, mut owner, deployment) = app.owner_with_deployment().await;
    let line = "b".repeat(200_000);
    for _ in 0..20 {
        app.writer.log(deployment, &line).await;
    }
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(owner.recv_event().await.1);
    }
    let held = app.server.metric("windflow_history_bytes").await;
    assert!(held > 0.0 && held <= (1 << 20) as f64, "history holds {held} bytes");
    let mut resumed = app.server.connect_as(superuser()).await;
    resumed.send(json!({"type": "subscribe", "topic": format!("deployment_logs_{deployment}"), "since": ids[0]})).await;
    resumed.recv_type("subscribed").await;
    let mut replayed = Vec::new();
    for _ in 1..20 {
        replayed.push(resumed.recv_event().await.1);
    }
    assert_eq!(replayed, ids[1..], "the evicted part from the log, then the history, no gap");
    let unique: HashSet<i64> = replayed.iter().copied().collect();
    assert_eq!(unique.len(), replayed.len());
}

#[tokio::test]
async fn two_resumes_read_from_the_log_on_one_connection_send_each_event_once() {
    // An owner resumes both topics of a dashboard after a server restart:
    // both `since`s are older than the new server's history, so both
    // replays read the event log, and their events overlap.
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut before = TestServer::start(&database, |_| {}).await;
    let owner = user();
    let deployment = writer.create_deployment(owner.user_id, None).await;
    writer.log(deployment, "L1").await;
    writer.set_progress(deployment, 1).await;
    writer.log(deployment, "L2").await;
    writer.set_progress(deployment, 2).await;
    let all = |after| ids_after(&writer, deployment, after);
    let ids = all(0).await;
    let (logs_since, events_since) = (ids[3], ids[4]);
    // Written while the client is away.
    writer.log(deployment, "L3").await;
    writer.set_progress(deployment, 3).await;
    writer.log(deployment, "L4").await;
    before.stop().await;
    let server = TestServer::start(&database, |_| {}).await;
    let mut client = server.connect_as(owner).await;
    let logs = format!("deployment_logs_{deployment}");
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": events_since})).await;
    client.send(json!({"type": "subscribe", "topic": logs, "since": logs_since})).await;
    writer.log(deployment, "L5").await;
    let owed = all(events_since).await;
    let mut received = Vec::new();
    let mut subscribed = 0;
    while subscribed < 2 || received.len() < owed.len() {
        let message = client.recv().await;
        match message["type"].as_str() {
            Some("subscribed") => subscribed += 1,
            Some(kind) if kind.starts_with("DEPLOYMENT_") => received.push(message["event_id"].as_i64().unwrap()),
            _ => panic!("unexpected {message}"),
        }
    }
    received.sort_unstable();
    assert_eq!(received, owed, "every event since the older cursor once, the live one included");
    assert_nothing_more(&writer, &mut client, owner.user_id).await;
}

#[tokio::test]
async fn a_resume_after_a_new_token_moved_the_user_to_another_organization_gets_that_organizations_events() {
    // What one log replay sent is left out of later ones on the connection,
    // but only while the viewer is the same: a fresh token for another
    // organization makes other events visible, and a resume must get them.
    let database = TestDatabase::create().await;
    let writer = Writer::new(&database).await;
    let mut before = TestServer::start(&database, |_| {}).await;
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let in_a = writer.create_deployment(Uuid::new_v4(), Some(org_a)).await;
    let in_b = writer.create_deployment(Uuid::new_v4(), Some(org_b)).await;
    for deployment in [in_a, in_b] {
        writer.log(deployment, "written before the restart").await;
    }
    before.stop().await;
    let server = TestServer::start(&database, |_| {}).await;
    let member = member_of(org_a);
    let mut client = server.connect_as(member).await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": 0})).await;
    client.recv_type("subscribed").await;
    let from_a: Vec<i64> = [client.recv_event().await.1, client.recv_event().await.1].into();
    assert_eq!(from_a, ids_after(&writer, in_a, 0).await);
    let moved = windflow_notify::auth::Viewer { organization_id: Some(org_b), ..member };
    client.send(json!({"type": "auth", "token": token(moved)})).await;
    client.recv_type("authenticated").await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events", "since": 0})).await;
    client.recv_type("subscribed").await;
    let from_b: Vec<i64> = [client.recv_event().await.1, client.recv_event().await.1].into();
    assert_eq!(from_b, ids_after(&writer, in_b, 0).await, "the new organization's events, from the log");
}

/// Text from a client or from the database is logged as data: a payload or
/// a request with a line break in it cannot print a line of its own (the
/// second hostile review printed a forged INFO line this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_clients_and_notifications_never_makes_a_log_line_of_its_own() {
    let database = TestDatabase::create().await;
    let (child, server) =
        spawn_binary(&database, "debug,tokio_postgres=warn,refinery_core=warn,hyper=warn,tungstenite=warn").await;
    let forged = "x\n2026-12-04T10:00:00.000000Z  INFO windflow_notify: FORGED superuser=true";
    let owner = user();
    let mut client = server.connect_as(owner).await;
    client.send(json!({"type": forged})).await;
    client.recv_type("error").await;
    Writer::new(&database).await.create_deployment(owner.user_id, None).await;
    let (_, real_id, _) = client.recv_event().await;
    let stranger = Role::create().await;
    let login = stranger.connect(&database).await;
    login.execute("SELECT pg_notify('windflow_events', $1)", &[&forged]).await.unwrap();
    let claim = json!({"event_id": real_id, "type": forged}).to_string();
    login.execute("SELECT pg_notify('windflow_events', $1)", &[&claim]).await.unwrap();
    eventually("both forgeries counted", || async {
        server.metric("windflow_forged_notifications_total").await == 2.0
    })
    .await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let output = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("FORGED"), "the forged text reached the log, as data:\n{log}");
    for line in log.lines() {
        assert!(!line.contains("FORGED") || line.contains("\\n2026"), "an unescaped line break:\n{line}");
        assert!(line.starts_with("20") && line.as_bytes().get(4) == Some(&b'-'), "a line of its own:\n{line}");
    }
}

// ---------------------------------------------------------------------
// A session waiting for the event log, a replay that fails, tokens from
// the far future, closes that must stay handshakes.
// ---------------------------------------------------------------------

/// What a client's reading half saw: a text message, or a ping.
#[derive(Debug)]
enum Seen {
    Text(serde_json::Value),
    Ping,
}

/// A client whose reading half runs on its own, as a browser's does: it
/// answers pings by itself; what it sees comes on the channel.
fn reading_on_its_own(
    client: Client,
) -> (
    futures_util::stream::SplitSink<WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, Message>,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    let (sink, mut stream) = client.ws.split();
    let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let _ = match message {
                Message::Text(text) => seen.send(Seen::Text(serde_json::from_str(text.as_str()).unwrap())),
                Message::Ping(_) => seen.send(Seen::Ping),
                _ => Ok(()),
            };
        }
    });
    (sink, rx)
}

async fn next_seen(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, seen.recv()).await.expect("in time").expect("the connection is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_for_the_event_log_still_reads_pongs_unsubscribes_and_closes() {
    let app = spawn_app_with(|s| s.ping_interval = Duration::from_millis(500)).await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let topic = format!("deployment_logs_{deployment}");
    // Every query on the event log waits behind this lock.
    let locker = Writer::new(&app.database).await;
    locker.execute("BEGIN; LOCK TABLE windflow_events IN ACCESS EXCLUSIVE MODE").await;
    let watcher = superuser();
    let (mut waiting, mut waiting_saw) = reading_on_its_own(app.server.connect_as(watcher).await);
    let (mut leaving, _leaving_saw) = reading_on_its_own(app.server.connect_as(watcher).await);
    // `since` 0 is older than the history: each session is answered
    // `subscribed`, then reads the log for its replay, and waits.
    let subscribe = json!({"type": "subscribe", "topic": topic, "since": 0}).to_string();
    waiting.send(Message::Text(subscribe.clone().into())).await.unwrap();
    leaving.send(Message::Text(subscribe.into())).await.unwrap();
    let subscribed = loop {
        if let Seen::Text(message) = next_seen(&mut waiting_saw).await {
            break message;
        }
    };
    assert_eq!((subscribed["type"].as_str(), subscribed["data"]["event_id"].as_i64()), (Some("subscribed"), Some(0)));
    let admin = admin_client().await;
    // The sessions' page queries (the feed's reads wait for the lock too,
    // and so may retention's first round, run as the server starts).
    let waiting_for_the_lock = || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = $1
                     AND application_name <> 'windflow-notify-listener'
                     AND query NOT LIKE '%make_interval%' AND query NOT LIKE '%DELETE FROM%'";
        admin.query_one(sql, &[&app.database.name]).await.unwrap().get::<_, i64>(0)
    };
    eventually("both replays wait for the lock", || async { waiting_for_the_lock().await == 2 }).await;
    // Four ping intervals of waiting: a session that did not read its
    // client's pongs meanwhile would drop it as silent after two.
    let mut pings = 0;
    while pings < 8 {
        match next_seen(&mut waiting_saw).await {
            Seen::Ping => pings += 1,
            other => panic!("while waiting for the log: {other:?}"),
        }
    }
    // A close ends the other session while its replay still waits.
    leaving.send(Message::Close(None)).await.unwrap();
    eventually("the closed session is gone", || async { app.server.metric("windflow_connections").await == 1.0 }).await;
    // An unsubscribe gives the replay up: `unsubscribed`, and nothing of it.
    let unsubscribe = json!({"type": "unsubscribe", "topic": topic}).to_string();
    waiting.send(Message::Text(unsubscribe.into())).await.unwrap();
    let reply = loop {
        if let Seen::Text(message) = next_seen(&mut waiting_saw).await {
            break message;
        }
    };
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    assert_eq!(waiting_for_the_lock().await, 2, "both answered while the log was still locked");
    locker.execute("ROLLBACK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_log_part_fails_is_followed_by_nothing_of_its_topic() {
    // The server runs as a role of its own that owns the event log (not a
    // superuser, so that a privilege can be taken from it): the fault is
    // that it may no longer read the events' sizes, which only a replay's
    // pages read, so live events still flow and the page query fails.
    let role = Role::create().await;
    let database = TestDatabase::create().await;
    let admin = admin_client().await;
    admin.batch_execute(&format!("ALTER DATABASE {} OWNER TO {}", database.name, role.name)).await.unwrap();
    let mut config = database.config.clone();
    config.user(&role.name);
    let server = TestServer::start_on(&config, jwt_args(), |_| {}).await;
    let writer = Writer::new(&database).await;
    let (watched, other) =
        (writer.create_deployment(Uuid::new_v4(), None).await, writer.create_deployment(Uuid::new_v4(), None).await);
    for i in 0..5 {
        writer.log(watched, &format!("before {i}")).await;
    }
    let watcher = superuser();
    let mut client = server.connect_as(watcher).await;
    client.subscribe(&format!("deployment_logs_{other}")).await;
    let topic = format!("deployment_logs_{watched}");
    let owner_db = {
        let mut owner = database.config.clone();
        owner.user(&role.name);
        let (owner, connection) = owner.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        owner
    };
    owner_db
        .batch_execute(&format!(
            "REVOKE SELECT ON windflow_events FROM {0};
             GRANT SELECT (id, type, deployment_id, user_id, organization_id, data) ON windflow_events TO {0}",
            role.name
        ))
        .await
        .unwrap();
    // `since` 0 is older than the history: the log is read, and fails.
    client.send(json!({"type": "subscribe", "topic": topic, "since": 0})).await;
    client.recv_type("subscribed").await;
    let error = client.recv_type("error").await;
    assert_eq!(
        (error["data"]["code"].as_str(), error["data"]["topic"].as_str()),
        (Some("unavailable"), Some(topic.as_str()))
    );
    // Nothing of the topic follows: not the history's events of it, not a
    // live one. The fence: an event of the other subscription.
    writer.log(watched, "after the failure").await;
    writer.log(other, "fence").await;
    let next = client.recv().await;
    assert_eq!(next["data"]["logs"], "fence", "nothing of {topic} after its unavailable: {next}");
    // The client resubscribes with the same since once the log can be
    // read: every event of the topic once, in order.
    owner_db.batch_execute(&format!("GRANT SELECT ON windflow_events TO {}", role.name)).await.unwrap();
    client.send(json!({"type": "subscribe", "topic": topic, "since": 0})).await;
    client.recv_type("subscribed").await;
    let owed = ids_after(&writer, watched, 0).await;
    let owed_logs: Vec<i64> = owed[1..].to_vec();
    let mut got = Vec::new();
    while got.len() < owed_logs.len() {
        got.push(client.recv_event().await.1);
    }
    assert_eq!(got, owed_logs);
    drop(admin);
}

#[tokio::test]
async fn a_token_valid_until_after_the_year_9999_is_answered() {
    let app = spawn_app().await;
    let sub = user().user_id;
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let now = windflow_notify::auth::unix_now();
    for exp in [253_402_300_800u64, 253_402_300_799 * 1000, u64::MAX] {
        let token = sign(json!({"sub": sub, "exp": exp}));
        // On the upgrade, and in an `auth` message.
        let mut client = app.server.connect(&token).await;
        client.send_text("ping").await;
        client.recv_type("pong").await;
        let mut late = app.server.connect_anonymous().await;
        late.send(json!({"type": "auth", "token": token})).await;
        let authenticated = late.recv_type("authenticated").await;
        assert_eq!(authenticated["data"]["expires_at"], "9999-12-31T23:59:59Z", "exp {exp}");
    }
    for nbf in [json!(253_402_300_800u64), json!(u64::MAX), json!(1e300)] {
        let token = sign(json!({"sub": sub, "exp": now + 60, "nbf": nbf}));
        let mut client = app.server.connect_anonymous().await;
        client.send(json!({"type": "auth", "token": token})).await;
        assert_eq!(client.recv_type("error").await["data"]["code"], "unauthorized", "nbf {nbf}");
        assert_eq!(client.close_code().await, 1008);
    }
}

#[tokio::test]
async fn an_oversize_message_sent_in_2000_fragments_gets_its_1009_close_frame() {
    let app = spawn_app().await;
    for attempt in 0..5 {
        let mut client = app.server.connect_as(user()).await;
        // 2,000 fragments of 40 bytes: 80,000 bytes, over 64 KiB, sent as a
        // client on a slower link does, a few at a time, before reading
        // anything: it is still sending when the server refuses the message.
        for i in 0..2000 {
            let opcode = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
            let frame = Frame::message(vec![b'x'; 40], opcode, i == 1999);
            if client.ws.feed(Message::Frame(frame)).await.is_err() {
                break;
            }
            if i % 50 == 49 {
                if client.ws.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let _ = client.ws.flush().await;
        let code = loop {
            match tokio::time::timeout(WAIT, client.ws.next()).await.expect("the server answers") {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("attempt {attempt}: no close frame: {other:?}"),
            }
        };
        assert_eq!(code, Some(1009), "attempt {attempt}");
    }
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_gets_a_close_frame_before_it_is_dropped() {
    let app = spawn_app_with(|s| s.ping_interval = Duration::from_millis(300)).await;
    let mut silent = app.server.connect_anonymous().await;
    silent.send(json!({"type": "auth", "token": token(user())})).await;
    // It reads nothing (so answers no ping) until the server has given up
    // on it; then it reads the bytes the server sent, frame by frame (a
    // WebSocket library would first try to answer the pings, and fail).
    eventually("the silent client is dropped", || async { app.server.metric("windflow_connections").await == 0.0 })
        .await;
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(silent.ws.get_mut(), &mut bytes))
        .await
        .expect("the stream ends")
        .ok();
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let opcode = bytes[at] & 0x0f;
        let (len, header) = match bytes[at + 1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize, 4),
            127 => panic!("no frame here is that long"),
            len => (len as usize, 2),
        };
        frames.push((opcode, bytes[at + header..at + header + len].to_vec()));
        at += header + len;
    }
    let kinds: Vec<u8> = frames.iter().map(|(opcode, _)| *opcode).collect();
    assert_eq!(kinds.first(), Some(&0x1), "authenticated first: {kinds:?}");
    assert!(kinds[1..kinds.len() - 1].iter().all(|&k| k == 0x9), "then pings: {kinds:?}");
    let (opcode, payload) = frames.last().expect("frames");
    assert_eq!(*opcode, 0x8, "the last frame is a close: {kinds:?}");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
}
