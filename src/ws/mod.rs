//! The WebSocket endpoint: the gate before the upgrade (token, connection
//! limit), then one [`session`] task per client.

pub mod fragments;
pub mod protocol;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::config::ServerArgs;
use crate::db::events::EventLog;
use crate::hub::{ConnId, HubHandle};
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

/// What every session shares, built once in [`crate::serve`]. Its fields
/// are for this module's sessions only.
pub struct Endpoint {
    verifier: Verifier,
    hub: HubHandle,
    log: EventLog,
    metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM/SIGINT (or by the embedder): every session
    /// closes with 1001.
    shutdown: CancellationToken,
    /// Sessions are spawned here, so shutdown can wait for them.
    tasks: TaskTracker,
    ping_interval: Duration,
    client_queue: usize,
    max_connections: usize,
    next_conn: AtomicU64,
}

impl Endpoint {
    /// Sessions are spawned on `tasks` and close when `shutdown` is cancelled.
    pub fn new(
        settings: &ServerArgs,
        verifier: Verifier,
        hub: HubHandle,
        log: EventLog,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            verifier,
            hub,
            log,
            metrics: Arc::clone(metrics),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            ping_interval: settings.ping_interval,
            client_queue: settings.client_queue.get(),
            max_connections: settings.max_connections.get(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// Answer a request for `/ws`: the upgrade response (its session runs
    /// on as a task), or why it is refused.
    pub fn upgrade(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        if !hyper_tungstenite::is_upgrade_request(&request) {
            return Err(Refusal::new(
                StatusCode::UPGRADE_REQUIRED,
                ErrorCode::BadRequest,
                "this endpoint speaks WebSocket only",
            ));
        }
        let claims = match token_of(&request) {
            None => None,
            Some(Err(why)) => {
                warn!(%remote, reason = why, "upgrade refused: 401");
                return Err(Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, why));
            }
            Some(Ok(token)) => match self.verifier.verify(&token) {
                Ok(claims) => Some(claims),
                Err(e) => {
                    warn!(%remote, reason = %e, "upgrade refused: 401");
                    return Err(Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::for_auth(&e), e.to_string()));
                }
            },
        };
        let Some(slot) = ConnectionSlot::acquire(&self.metrics, self.max_connections) else {
            warn!(%remote, max = self.max_connections, "upgrade refused: 503, connection limit reached");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many connections; try again later",
            ));
        };
        let (response, websocket) = hyper_tungstenite::upgrade(&mut request, Some(websocket_config()))
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string()))?;
        let conn: ConnId = self.next_conn.fetch_add(1, Relaxed);
        let endpoint = Arc::clone(self);
        self.tasks.spawn(async move {
            let _slot = slot;
            match websocket.await {
                Ok(stream) => session::run(stream, endpoint, conn, claims, remote).await,
                Err(e) => info!(conn, %remote, error = %e, "websocket handshake did not complete"),
            }
        });
        Ok(response)
    }
}

/// An upgrade refused before the WebSocket opens: answered in HTTP, as
/// `{"error": code, "message": …}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into() }
    }
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
struct ConnectionSlot(Arc<Metrics>);

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
