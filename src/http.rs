//! The accept loop and the plain HTTP endpoints: `/healthz`, `/metrics`.
//! `/ws` is handed to [`crate::ws::Endpoint::upgrade`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::ws::{Endpoint, Refusal};

pub type Body = Full<Bytes>;

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    response(status, "application/json", body.to_string())
}

/// What the HTTP side needs, built once in [`crate::serve`].
pub struct Server {
    pub websocket: Arc<Endpoint>,
    pub metrics: Arc<Metrics>,
    /// Whether the event source is connected, for `/healthz`.
    pub source_up: watch::Receiver<bool>,
    /// Each socket's send buffer (`WINDFLOW_SEND_BUFFER`).
    pub send_buffer: usize,
    pub shutdown: CancellationToken,
    /// Every HTTP connection is a task here, so shutdown can wait for it.
    pub tasks: TaskTracker,
}

/// Accept connections until shutdown. On shutdown, idle HTTP connections
/// are closed gracefully.
pub async fn accept_loop(listener: TcpListener, server: Arc<Server>) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = server.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, most often: wait instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Linux autotunes a socket's send buffer up to tcp_wmem's maximum
        // (4 MiB) whatever the client reads: a client that stops reading
        // would absorb thousands of events into kernel memory, and the
        // server's CPU to write them, before its queue filled (measured in
        // BENCHMARKS.md, bench hostile). Capped (Linux doubles the value
        // for its bookkeeping), it is found out after a few hundred KiB.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(server.send_buffer);
        let server = Arc::clone(&server);
        let tasks = server.tasks.clone();
        tasks.spawn(async move {
            let shutdown = server.shutdown.clone();
            let service = service_fn(move |request| route(request, Arc::clone(&server), remote));
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = outcome {
                debug!(%remote, error = %e, "http connection ended with an error");
            }
        });
    }
}

async fn route(
    request: Request<Incoming>,
    server: Arc<Server>,
    remote: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    Ok(match (request.method(), path) {
        (&Method::GET, "/ws") => server.websocket.upgrade(request, remote).unwrap_or_else(refused),
        (&Method::GET, "/healthz") => healthz(&server),
        (&Method::GET, "/metrics") => {
            response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", server.metrics.render())
        }
        (&Method::GET, "/" | "/index.html" | "/client.js" | "/dashboard.js" | "/dashboard.css") => asset(path),
        (_, "/ws" | "/healthz" | "/metrics") => {
            json_response(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"}))
        }
        _ => json_response(StatusCode::NOT_FOUND, serde_json::json!({"error": "not found"})),
    })
}

/// The dashboard and the browser client, embedded in the binary: no build
/// step, no CDN, nothing to deploy beside it.
fn asset(path: &str) -> Response<Body> {
    let (content_type, body): (&str, &'static [u8]) = match path {
        "/client.js" => ("text/javascript; charset=utf-8", include_bytes!("../assets/client.js")),
        "/dashboard.js" => ("text/javascript; charset=utf-8", include_bytes!("../assets/dashboard.js")),
        "/dashboard.css" => ("text/css; charset=utf-8", include_bytes!("../assets/dashboard.css")),
        _ => ("text/html; charset=utf-8", include_bytes!("../assets/index.html")),
    };
    let mut response = response(StatusCode::OK, content_type, Bytes::from_static(body));
    // The files change with the binary; never serve a stale client.
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    response
}

fn refused(refusal: Refusal) -> Response<Body> {
    json_response(refusal.status, serde_json::json!({"error": refusal.code, "message": refusal.message}))
}

fn healthz(server: &Server) -> Response<Body> {
    let up = *server.source_up.borrow();
    let connections = server.metrics.connections.load(std::sync::atomic::Ordering::Relaxed);
    if up {
        json_response(StatusCode::OK, serde_json::json!({"status": "ok", "listener": "up", "connections": connections}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "listener": "down", "connections": connections}),
        )
    }
}
