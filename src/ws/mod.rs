//! The WebSocket endpoint: the upgrade (after [`crate::session::gate`]),
//! then one session task per client over a [`socket::WebSocket`].

pub mod fragments;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::info;

use crate::protocol::ErrorCode;
use crate::session::gate::{Admitted, Refusal, query_values};
use crate::session::{Endpoint, Opening, ResumeAsk, driver};

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

/// Answer a request for `/ws`: the upgrade response (its session runs on
/// as a task), or why it is refused.
pub fn upgrade<B>(
    endpoint: &Arc<Endpoint>,
    mut request: Request<B>,
    remote: SocketAddr,
) -> Result<Response<Full<Bytes>>, Refusal> {
    if !hyper_tungstenite::is_upgrade_request(&request) {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            "this endpoint speaks WebSocket only",
        ));
    }
    let Admitted { conn, claims, slot, user } = endpoint.admit(&request, remote, false)?;
    // A resume at connect: `?topic=A&topic=B&since=N`, answered once
    // authenticated (a bad topic or since gets its error there).
    let mut resume = ResumeAsk { topics: query_values(&request, "topic").collect(), ..ResumeAsk::default() };
    resume.since_from(query_values(&request, "since").next().as_deref());
    let (response, websocket) = hyper_tungstenite::upgrade(&mut request, Some(websocket_config()))
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string()))?;
    let session_endpoint = Arc::clone(endpoint);
    endpoint.tasks.spawn(async move {
        let _slot = slot;
        match websocket.await {
            Ok(stream) => {
                let opening = Opening { claims, resume };
                driver::run(socket::WebSocket::new(stream, conn), session_endpoint, conn, opening, user, remote).await
            }
            Err(e) => info!(conn, %remote, error = %e, "websocket handshake did not complete"),
        }
    });
    Ok(response)
}
