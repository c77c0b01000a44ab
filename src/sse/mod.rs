//! `GET /events`: the same events as Server-Sent Events, for `curl -N`,
//! `EventSource` and proxies that refuse WebSocket. The request names its
//! topics and its resume point; once it passes the gate
//! ([`crate::session::gate`]) and its topics are checked, the answer is a
//! stream that one session task ([`crate::session::driver`]) writes through
//! a [`stream::EventStream`].

pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Request, Response, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use self::stream::{EventBody, EventStream};
use crate::event::{EventKind, Topic};
use crate::protocol::ErrorCode;
use crate::session::core::MAX_SUBSCRIPTIONS;
use crate::session::gate::{Admitted, Refusal, query_values};
use crate::session::{Endpoint, Opening, ResumeAsk, driver};

/// A topic that carries nothing (no deployment has the nil id): a stream
/// without topics or a resume point subscribes to it for the cursor of
/// `ready`, which the hub gives in its answer to a subscribe.
const CURSOR_ONLY: Topic = Topic::Deployment { kind: EventKind::StatusChanged, deployment: Uuid::nil() };

/// Answer `GET /events`: a stream (its session runs on as a task), or why
/// it is refused. `ended` is the HTTP connection's: cancelled when the
/// stream ends.
pub async fn open<B>(
    endpoint: &Arc<Endpoint>,
    request: Request<B>,
    remote: SocketAddr,
    ended: CancellationToken,
) -> Result<Response<EventBody>, Refusal> {
    let Admitted { conn, claims, slot, user } = endpoint.admit(&request, remote, true)?;
    let Some(claims) = claims else {
        return Err(Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "a stream needs a token"));
    };
    let bad = |code, message: String| {
        warn!(%remote, %message, "events refused: 400");
        Refusal::new(StatusCode::BAD_REQUEST, code, message)
    };
    let mut topics = Vec::new();
    for name in query_values(&request, "topic") {
        let topic =
            Topic::parse(&name).ok_or_else(|| bad(ErrorCode::InvalidTopic, format!("unknown topic: {name}")))?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    if topics.len() > MAX_SUBSCRIPTIONS {
        let message = format!("at most {MAX_SUBSCRIPTIONS} topics per stream");
        return Err(bad(ErrorCode::TooManySubscriptions, message));
    }
    let since = match since_of(&request) {
        Ok(since) => since,
        Err(message) => return Err(bad(ErrorCode::BadRequest, message)),
    };
    for &topic in &topics {
        match endpoint.log.may_watch(claims.viewer, topic).await {
            Ok(true) => {}
            Ok(false) => {
                info!(%remote, user_id = %claims.viewer.user_id, %topic, "events refused: 403");
                let message = format!("{topic}: no such deployment, or not yours to see");
                return Err(Refusal::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message));
            }
            Err(e) => {
                warn!(%remote, %topic, error = %e, "events refused: 503, permission check failed");
                let message = "cannot check permission now; try again";
                return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, message));
            }
        }
    }
    // The owner feed and every topic, resumed at one point of the feed.
    let mut names: Vec<String> = topics.iter().map(Topic::to_string).collect();
    if topics.is_empty() && since.is_none() {
        names.push(CURSOR_ONLY.to_string());
    }
    let resume = ResumeAsk { topics: names, since, bad_since: None, checked: true };
    let opening = Opening { claims: Some(claims), resume };
    let (stream, body) = EventStream::new(topics, since, ended);
    let session_endpoint = Arc::clone(endpoint);
    endpoint.tasks.spawn(async move {
        let _slot = slot;
        driver::run(stream, session_endpoint, conn, opening, user, remote).await
    });
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    // A stream is never followed by another request on its connection.
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    // nginx would otherwise hold events back to fill its buffers.
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    Ok(response)
}

/// The resume point: `Last-Event-ID` (what EventSource sends by itself)
/// wins over `?since=`.
fn since_of<B>(request: &Request<B>) -> Result<Option<i64>, String> {
    let parse = |value: &str, from: &str| match value.trim().parse::<i64>() {
        Ok(id) if id >= 0 => Ok(id),
        _ => Err(format!("{from} must be a non-negative event id, not {value:?}")),
    };
    if let Some(value) = request.headers().get("last-event-id") {
        let value = value.to_str().map_err(|_| "Last-Event-ID must be a non-negative event id".to_string())?;
        return parse(value, "Last-Event-ID").map(Some);
    }
    query_values(request, "since").next().map(|value| parse(&value, "since")).transpose()
}
