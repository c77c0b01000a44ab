//! Topics and who receives what — including what a user must
//! not receive. Negative checks write a "fence" event the client must get
//! next: anything it should not have received would arrive before it.

mod common;

use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn owner_receives_every_event_of_own_deployment_without_subscribing() {
    let app = spawn_app().await;
    let owner = user();
    let mut client = app.server.connect_as(owner).await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.set_progress(deployment, 40).await;
    app.writer.log(deployment, "hello").await;
    let kinds: Vec<String> = [client.recv_event().await, client.recv_event().await, client.recv_event().await]
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    assert_eq!(kinds, ["DEPLOYMENT_STATUS_CHANGED", "DEPLOYMENT_PROGRESS", "DEPLOYMENT_LOGS_UPDATE"]);
}

#[tokio::test]
async fn every_connection_of_the_owner_receives_the_event() {
    let app = spawn_app().await;
    let owner = user();
    let mut first = app.server.connect_as(owner).await;
    let mut second = app.server.connect_as(owner).await;
    let deployment = app.writer.create_deployment(owner.user_id, None).await;
    for client in [&mut first, &mut second] {
        assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
    }
}

#[tokio::test]
async fn stranger_receives_nothing_of_anothers_deployment() {
    let app = spawn_app().await;
    let (owner, stranger) = (user(), user());
    let mut client = app.server.connect_as(stranger).await;
    client.subscribe("deployment_events").await;
    let theirs = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.log(theirs, "secret").await;
    let own = app.writer.create_deployment(stranger.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], own.to_string());
}

#[tokio::test]
async fn deployment_events_delivers_organization_deployments_to_members() {
    let app = spawn_app().await;
    let org = Uuid::new_v4();
    let (owner, colleague, outsider) = (member_of(org), member_of(org), member_of(Uuid::new_v4()));
    let mut colleague_client = app.server.connect_as(colleague).await;
    let mut outsider_client = app.server.connect_as(outsider).await;
    colleague_client.subscribe("deployment_events").await;
    outsider_client.subscribe("deployment_events").await;
    let deployment = app.writer.create_deployment(owner.user_id, Some(org)).await;
    app.writer.log(deployment, "for the team").await;
    assert_eq!(colleague_client.recv().await["type"], "DEPLOYMENT_STATUS_CHANGED");
    assert_eq!(colleague_client.recv().await["data"]["logs"], "for the team");
    let fence = app.writer.create_deployment(outsider.user_id, None).await;
    assert_eq!(outsider_client.recv().await["data"]["deployment_id"], fence.to_string());
}

#[tokio::test]
async fn members_without_subscribing_get_only_their_own_deployments() {
    let app = spawn_app().await;
    let org = Uuid::new_v4();
    let (owner, colleague) = (member_of(org), member_of(org));
    let mut client = app.server.connect_as(colleague).await;
    app.writer.create_deployment(owner.user_id, Some(org)).await;
    let own = app.writer.create_deployment(colleague.user_id, Some(org)).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], own.to_string());
}

#[tokio::test]
async fn superuser_on_deployment_events_sees_everyone() {
    let app = spawn_app().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let a = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let b = app.writer.create_deployment(Uuid::new_v4(), Some(Uuid::new_v4())).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], a.to_string());
    assert_eq!(client.recv().await["data"]["deployment_id"], b.to_string());
}

#[tokio::test]
async fn logs_topic_carries_only_that_deployments_logs() {
    let app = spawn_app().await;
    let org = Uuid::new_v4();
    let owner = member_of(org);
    let watcher = member_of(org);
    let watched = app.writer.create_deployment(owner.user_id, Some(org)).await;
    let other = app.writer.create_deployment(owner.user_id, Some(org)).await;
    let mut client = app.server.connect_as(watcher).await;
    client.subscribe(&format!("deployment_logs_{watched}")).await;
    app.writer.set_status(watched, "deploying").await; // not a log
    app.writer.set_progress(watched, 5).await; // not a log
    app.writer.log(other, "other deployment").await;
    app.writer.log(watched, "mine").await;
    let message = client.recv().await;
    assert_eq!(message["type"], "DEPLOYMENT_LOGS_UPDATE", "{message}");
    assert_eq!(message["data"]["logs"], "mine");
}

#[tokio::test]
async fn progress_topic_carries_only_that_deployments_progress() {
    let app = spawn_app().await;
    let admin = superuser();
    let watched = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let other = app.writer.create_deployment(Uuid::new_v4(), None).await;
    let mut client = app.server.connect_as(admin).await;
    client.subscribe(&format!("deployment_progress_{watched}")).await;
    app.writer.log(watched, "not progress").await;
    app.writer.set_progress(other, 30).await;
    app.writer.set_status(watched, "running").await;
    app.writer.set_progress(watched, 60).await;
    let message = client.recv().await;
    assert_eq!(message["type"], "DEPLOYMENT_PROGRESS", "{message}");
    assert_eq!(message["data"]["deployment_id"], watched.to_string());
    assert_eq!(message["data"]["progress"], 60);
}

#[tokio::test]
async fn status_topic_carries_only_that_deployments_status_changes() {
    let app = spawn_app().await;
    let org = Uuid::new_v4();
    let (owner, watcher) = (member_of(org), member_of(org));
    let watched = app.writer.create_deployment(owner.user_id, Some(org)).await;
    let other = app.writer.create_deployment(owner.user_id, Some(org)).await;
    let mut client = app.server.connect_as(watcher).await;
    client.subscribe(&format!("deployment_status_{watched}")).await;
    app.writer.log(watched, "not a status").await;
    app.writer.set_progress(watched, 10).await;
    app.writer.set_status(other, "running").await;
    app.writer.set_status(watched, "deploying").await;
    let message = client.recv().await;
    assert_eq!(message["type"], "DEPLOYMENT_STATUS_CHANGED", "{message}");
    assert_eq!(message["data"]["deployment_id"], watched.to_string());
    assert_eq!(message["data"]["status"], "deploying");
}

#[tokio::test]
async fn status_topic_replays_only_that_deployments_history() {
    let app = spawn_app().await;
    let owner = user();
    let watched = app.writer.create_deployment(owner.user_id, None).await;
    let other = app.writer.create_deployment(owner.user_id, None).await;
    app.writer.set_status(other, "failed").await;
    app.writer.log(watched, "a line").await;
    app.writer.set_status(watched, "running").await;
    // Connected after the server has all of it: none of it comes live on
    // the owner feed, in the middle of the replay.
    app.server.two_log_reads_pass().await;
    let mut client = app.server.connect_as(owner).await;
    let topic = format!("deployment_status_{watched}");
    client.send(json!({"type": "subscribe", "topic": topic, "since": 0})).await;
    assert_eq!(client.recv_type("subscribed").await["data"]["topic"], topic);
    let statuses: Vec<Value> =
        [client.recv().await, client.recv().await].into_iter().map(|m| m["data"].clone()).collect();
    assert_eq!(statuses.iter().map(|d| d["status"].clone()).collect::<Vec<_>>(), [json!("pending"), json!("running")]);
    assert!(statuses.iter().all(|d| d["deployment_id"] == watched.to_string()), "{statuses:?}");
    // Nothing else was replayed: the next message answers the ping.
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn subscribing_to_anothers_deployment_is_forbidden() {
    let app = spawn_app().await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), Some(Uuid::new_v4())).await;
    let mut client = app.server.connect_as(member_of(Uuid::new_v4())).await;
    for topic in [
        format!("deployment_logs_{deployment}"),
        format!("deployment_progress_{deployment}"),
        format!("deployment_status_{deployment}"),
    ] {
        client.send(json!({"type": "subscribe", "topic": topic})).await;
        let error = client.recv_type("error").await;
        assert_eq!(error["data"]["code"], "forbidden");
        assert_eq!(error["data"]["topic"], topic);
    }
    // And nothing of it arrives afterwards.
    app.writer.log(deployment, "private").await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn subscribing_to_a_missing_deployment_is_forbidden_except_for_superusers() {
    let app = spawn_app().await;
    let missing = Uuid::new_v4();
    let topic = format!("deployment_logs_{missing}");
    let mut client = app.server.connect_as(user()).await;
    client.send(json!({"type": "subscribe", "topic": topic})).await;
    assert_eq!(client.recv_type("error").await["data"]["code"], "forbidden");
    let mut admin = app.server.connect_as(superuser()).await;
    admin.subscribe(&topic).await;
    // The subscription stands: once the deployment exists, its events arrive.
    app.writer
        .db
        .execute("INSERT INTO deployments (id, user_id, name) VALUES ($1, $2, 'late')", &[&missing, &Uuid::new_v4()])
        .await
        .expect("insert the deployment");
    app.writer.log(missing, "now it exists").await;
    assert_eq!(admin.recv_type("DEPLOYMENT_LOGS_UPDATE").await["data"]["logs"], "now it exists");
}

#[tokio::test]
async fn organization_member_may_subscribe_to_a_colleagues_deployment() {
    let app = spawn_app().await;
    let org = Uuid::new_v4();
    let deployment = app.writer.create_deployment(Uuid::new_v4(), Some(org)).await;
    let mut client = app.server.connect_as(member_of(org)).await;
    client.subscribe(&format!("deployment_progress_{deployment}")).await;
    app.writer.set_progress(deployment, 90).await;
    assert_eq!(client.recv_type("DEPLOYMENT_PROGRESS").await["data"]["progress"], 90);
}

#[tokio::test]
async fn an_event_matching_several_subscriptions_arrives_once() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    client.subscribe("deployment_events").await;
    client.subscribe(&format!("deployment_logs_{deployment}")).await;
    app.writer.log(deployment, "once").await;
    app.writer.set_progress(deployment, 1).await;
    assert_eq!(client.recv().await["data"]["logs"], "once");
    assert_eq!(client.recv().await["type"], "DEPLOYMENT_PROGRESS");
}

#[tokio::test]
async fn unsubscribe_stops_the_topic() {
    let app = spawn_app().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    client.recv_type("DEPLOYMENT_STATUS_CHANGED").await;
    let topic = format!("deployment_logs_{deployment}");
    client.subscribe(&topic).await;
    app.writer.log(deployment, "before").await;
    assert_eq!(client.recv().await["data"]["logs"], "before");
    client.send(json!({"type": "unsubscribe", "topic": topic})).await;
    assert_eq!(client.recv_type("unsubscribed").await["data"]["topic"], topic);
    client.send(json!({"type": "unsubscribe", "topic": "deployment_events"})).await;
    client.recv_type("unsubscribed").await;
    app.writer.log(deployment, "after").await;
    // The superuser's own deployment is the fence.
    let own = app.writer.create_deployment(admin.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], own.to_string());
}

#[tokio::test]
async fn subscribing_twice_is_one_subscription() {
    let app = spawn_app().await;
    let admin = superuser();
    let mut client = app.server.connect_as(admin).await;
    client.subscribe("deployment_events").await;
    client.subscribe("deployment_events").await;
    assert_eq!(app.server.metric("windflow_subscriptions").await, 1.0);
    let deployment = app.writer.create_deployment(Uuid::new_v4(), None).await;
    app.writer.log(deployment, "x").await;
    assert_eq!(client.recv().await["type"], "DEPLOYMENT_STATUS_CHANGED");
    assert_eq!(client.recv().await["type"], "DEPLOYMENT_LOGS_UPDATE");
}

#[tokio::test]
async fn topic_with_uppercase_uuid_is_answered_in_lowercase() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    let upper = format!("deployment_logs_{}", deployment.to_string().to_uppercase());
    client.send(json!({"type": "subscribe", "topic": upper})).await;
    assert_eq!(client.recv_type("subscribed").await["data"]["topic"], format!("deployment_logs_{deployment}"));
}

#[tokio::test]
async fn events_of_one_deployment_arrive_in_commit_order() {
    let app = spawn_app().await;
    let (_, mut client, deployment) = app.owner_with_deployment().await;
    // Four writers race on one deployment.
    let mut writers = Vec::new();
    for w in 0..4 {
        let writer = Writer::new(&app.database).await;
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                writer.log(deployment, &format!("{w}:{i}")).await;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut last_id = 0;
    let mut last_per_writer = [-1i64; 4];
    for _ in 0..100 {
        let (_, id, data) = client.recv_event().await;
        assert!(id > last_id, "ids follow commit order within a deployment");
        last_id = id;
        let (w, i) = data["logs"].as_str().unwrap().split_once(':').unwrap();
        let (w, i): (usize, i64) = (w.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, last_per_writer[w] + 1, "each writer's rows arrive in its order");
        last_per_writer[w] = i;
    }
}
