//! The WebSocket endpoint: the gate before the upgrade (token, connection
//! limit), then one [`session`] task per client.

pub mod fragments;
pub mod protocol;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{info, warn};

use crate::app::App;
use crate::http::{Body, json_response};
use crate::metrics::Metrics;
use crate::ws::protocol::ErrorCode;

/// A message over 64 KiB closes the connection with 1009.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// tungstenite's buffers, sized for many mostly idle connections (S3 in
/// BENCHMARKS.md). The read buffer is allocated and zero-filled up to its
/// full size on every read, so its size is resident per connection: at the
/// default 128 KiB an idle connection cost 141 KiB of RSS, at 512 bytes 13 KiB.
/// Client messages are small (auth, subscribe); a larger frame grows the
/// buffer to the frame's length. The write buffer collects a batch of
/// frames into one write(2) up to 8 KiB.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE))
}

/// A token from `Authorization: Bearer T` or `?token=T`; `Err` when the
/// header is there but is not a bearer token.
fn token_of(request: &Request<Incoming>) -> Option<Result<String, &'static str>> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        return Some(match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Ok(token.trim().to_string())
            }
            _ => Err("the Authorization header must be `Bearer <token>`"),
        });
    }
    let query = request.uri().query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == "token").map(|(_, token)| Ok(token.into_owned()))
}

/// One open WebSocket connection, counted in `windflow_connections` for as
/// long as this lives.
pub struct ConnectionSlot(Arc<Metrics>);

impl ConnectionSlot {
    fn acquire(metrics: &Arc<Metrics>, max: usize) -> Option<Self> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        metrics
            .connections
            .fetch_update(Relaxed, Relaxed, |open| (open < max).then_some(open + 1))
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(metrics)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, json!({"error": code, "message": message}))
}

pub fn upgrade(mut request: Request<Incoming>, app: Arc<App>, remote: SocketAddr) -> Response<Body> {
    if !hyper_tungstenite::is_upgrade_request(&request) {
        return refuse(StatusCode::UPGRADE_REQUIRED, "bad_request", "this endpoint speaks WebSocket only");
    }
    let claims = match token_of(&request) {
        None => None,
        Some(Err(why)) => {
            warn!(%remote, reason = why, "upgrade refused: 401");
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", why);
        }
        Some(Ok(token)) => match app.verifier.verify(&token) {
            Ok(claims) => Some(claims),
            Err(e) => {
                warn!(%remote, reason = %e, "upgrade refused: 401");
                return refuse(StatusCode::UNAUTHORIZED, ErrorCode::for_auth(&e).as_str(), &e.to_string());
            }
        },
    };
    let Some(slot) = ConnectionSlot::acquire(&app.metrics, app.settings.max_connections) else {
        warn!(%remote, max = app.settings.max_connections, "upgrade refused: 503, connection limit reached");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "too many connections; try again later");
    };
    let (response, websocket) = match hyper_tungstenite::upgrade(&mut request, Some(websocket_config())) {
        Ok(pair) => pair,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let conn = app.next_conn_id();
    let tasks = app.tasks.clone();
    tasks.spawn(async move {
        let _slot = slot;
        match websocket.await {
            Ok(stream) => session::run(stream, app, conn, claims, remote).await,
            Err(e) => info!(conn, %remote, error = %e, "websocket handshake did not complete"),
        }
    });
    response
}
