//! The accept loop and the HTTP routes: `/healthz`, `/metrics`, the
//! embedded assets; `/ws` goes to [`crate::ws::upgrade`] and `/events` to
//! [`crate::sse::open`].

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::session::Endpoint;
use crate::session::driver::CLOSE_TIMEOUT;
use crate::session::gate::Refusal;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long an HTTP connection may take to send the rest of a stream that
/// ended (a slow SSE consumer's last events), before it is dropped.
const STREAM_END_GRACE: Duration = Duration::from_secs(10);

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    response(status, "application/json", body.to_string())
}

/// What the HTTP side needs, built once in [`crate::serve`].
pub struct Server {
    pub sessions: Arc<Endpoint>,
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
/// are closed gracefully. Out of file descriptors, new connections are
/// answered 503 and closed (one descriptor is kept in reserve for that),
/// so they neither wait in the backlog nor make the loop spin, and the
/// connections already open are served as before.
pub async fn accept_loop(listener: TcpListener, server: Arc<Server>) {
    let mut exhaustion = Exhaustion::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = server.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_out_of_descriptors(&e) => {
                    exhaustion.refuse_one(&listener, &server.shutdown).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        exhaustion.over();
        serve_connection(stream, remote, &server);
    }
}

fn serve_connection(stream: TcpStream, remote: SocketAddr, server: &Arc<Server>) {
    let _ = stream.set_nodelay(true);
    // Linux autotunes a socket's send buffer up to tcp_wmem's maximum
    // (4 MiB) whatever the client reads: a client that stops reading
    // would absorb thousands of events into kernel memory, and the
    // server's CPU to write them, before its queue filled (measured in
    // BENCHMARKS.md, bench hostile). Capped (Linux doubles the value
    // for its bookkeeping), it is found out after a few hundred KiB.
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(server.send_buffer);
    let server = Arc::clone(server);
    let tasks = server.tasks.clone();
    tasks.spawn(async move {
        let shutdown = server.shutdown.clone();
        // Cancelled when a stream on this connection ends.
        let stream_ended = CancellationToken::new();
        let ended = stream_ended.clone();
        let service = service_fn(move |request| route(request, Arc::clone(&server), remote, ended.clone()));
        let connection = http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        let outcome = tokio::select! {
            outcome = connection.as_mut() => Some(outcome),
            _ = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(CLOSE_TIMEOUT, connection.as_mut()).await.ok()
            }
            // A client that does not read its stream's end is dropped.
            _ = stream_ended.cancelled() => tokio::select! {
                outcome = tokio::time::timeout(STREAM_END_GRACE, connection.as_mut()) => outcome.ok(),
                _ = shutdown.cancelled() => tokio::time::timeout(CLOSE_TIMEOUT, connection.as_mut()).await.ok(),
            },
        };
        match outcome {
            Some(Err(e)) => debug!(%remote, error = %e, "http connection ended with an error"),
            None => debug!(%remote, "http connection dropped: it did not finish in time"),
            Some(Ok(())) => {}
        }
    });
}

fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The accept loop out of file descriptors: one descriptor held in
/// reserve, given up to accept a connection only to answer it 503 and
/// close it; one log line when it starts, one every 10 s while it lasts,
/// one when it is over.
struct Exhaustion {
    reserve: Option<std::fs::File>,
    answer: Vec<u8>,
    refused: u64,
    since: Option<Instant>,
    last_line: Instant,
    /// While even the reserve is gone: the pause between tries.
    pause: Duration,
}

const EXHAUSTION_LINE_EVERY: Duration = Duration::from_secs(10);

/// The whole answer to a connection taken out of descriptors.
fn out_of_descriptors_answer() -> Vec<u8> {
    let body = r#"{"code":"unavailable","message":"the server is out of file descriptors; try again later"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body.as_bytes()].concat()
}

impl Exhaustion {
    fn new() -> Exhaustion {
        Exhaustion {
            reserve: std::fs::File::open("/dev/null").ok(),
            answer: out_of_descriptors_answer(),
            refused: 0,
            since: None,
            last_line: Instant::now(),
            pause: Duration::from_millis(10),
        }
    }

    async fn refuse_one(&mut self, listener: &TcpListener, shutdown: &CancellationToken) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.last_line = Instant::now();
            warn!(
                open_file_limit = open_file_limit().map(|(soft, _)| soft).unwrap_or_default(),
                "out of file descriptors: new connections are answered 503 until some close"
            );
        }
        // Give up the reserve to take the connection waiting in the backlog.
        let answered = match self.reserve.take() {
            Some(reserve) => {
                drop(reserve);
                // The connection that was waiting may have gone meanwhile:
                // do not wait for another one here.
                match tokio::time::timeout(Duration::from_millis(100), listener.accept()).await {
                    Ok(Ok((stream, _))) => {
                        answer_out_of_descriptors(stream, &self.answer);
                        true
                    }
                    Ok(Err(_)) | Err(_) => false,
                }
            }
            None => false,
        };
        self.reserve = std::fs::File::open("/dev/null").ok();
        if answered {
            self.refused += 1;
            self.pause = Duration::from_millis(10);
        } else {
            // Someone else took the descriptor: wait rather than spin.
            tokio::select! {
                _ = tokio::time::sleep(self.pause) => {}
                _ = shutdown.cancelled() => {}
            }
            self.pause = (self.pause * 2).min(Duration::from_secs(1));
        }
        if self.last_line.elapsed() >= EXHAUSTION_LINE_EVERY {
            self.last_line = Instant::now();
            warn!(refused = self.refused, "still out of file descriptors: connections answered 503 so far");
        }
    }

    /// A connection was accepted: if descriptors ran out before, say so once.
    fn over(&mut self) {
        if let Some(since) = self.since.take() {
            info!(refused = self.refused, lasted = ?since.elapsed(), "file descriptors available again; accepting");
            self.refused = 0;
        }
    }
}

/// Best effort, without waiting: the 503, what the client already sent
/// read (a close with unread data would be a reset), then the close.
fn answer_out_of_descriptors(stream: TcpStream, answer: &[u8]) {
    let _ = stream.try_write(answer);
    let mut buffer = [0u8; 4096];
    while matches!(stream.try_read(&mut buffer), Ok(n) if n > 0) {}
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
}

/// The open-file limit (soft, hard), when the system says.
fn open_file_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limit into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    ok.then_some((limit.rlim_cur, limit.rlim_max))
}

/// Descriptors the server needs besides its clients' sockets: the runtime,
/// the database pool and listener, the log, the reserve.
const OWN_DESCRIPTORS: libc::rlim_t = 64;

/// Raise the soft open-file limit to the hard one, and say in one line
/// when even that cannot hold `max_connections` (systemd's default soft
/// limit is 1024).
pub fn raise_open_file_limit(max_connections: usize) {
    let Some((soft, hard)) = open_file_limit() else { return };
    let mut limit = soft;
    if soft < hard {
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = hard;
        }
    }
    let needed = libc::rlim_t::try_from(max_connections).unwrap_or(libc::rlim_t::MAX).saturating_add(OWN_DESCRIPTORS);
    if limit < needed {
        warn!(
            open_file_limit = limit,
            hard_limit = hard,
            max_connections,
            "the open-file limit cannot hold WINDFLOW_MAX_CONNECTIONS: about {} connections fit; raise it (LimitNOFILE= under systemd, ulimit -n)",
            limit.saturating_sub(OWN_DESCRIPTORS)
        );
    }
}

async fn route(
    request: Request<Incoming>,
    server: Arc<Server>,
    remote: SocketAddr,
    ended: CancellationToken,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    Ok(match (request.method(), path) {
        (&Method::GET, "/ws") => match crate::ws::upgrade(&server.sessions, request, remote) {
            Ok(upgrade) => upgrade.map(BodyExt::boxed_unsync),
            Err(refusal) => refused(refusal),
        },
        (&Method::GET, "/events") => {
            let mut response = match crate::sse::open(&server.sessions, request, remote, ended).await {
                Ok(stream) => stream.map(BodyExt::boxed_unsync),
                Err(refusal) => refused(refusal),
            };
            allow_any_origin(&mut response);
            response
        }
        (&Method::OPTIONS, "/events") => {
            // The preflight of a cross-origin request with a bearer token.
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            allow_any_origin(&mut response);
            let headers = response.headers_mut();
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET"));
            let allowed = header::HeaderValue::from_static("authorization, last-event-id");
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
            response
        }
        (&Method::GET, "/healthz") => healthz(&server),
        (&Method::GET, "/metrics") => {
            response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", server.metrics.render())
        }
        (&Method::GET, "/" | "/index.html" | "/client.js" | "/dashboard.js" | "/dashboard.css") => asset(path),
        (_, "/ws" | "/events" | "/healthz" | "/metrics") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"code": "bad_request", "message": "method not allowed"}),
        ),
        _ => json_response(StatusCode::NOT_FOUND, serde_json::json!({"code": "bad_request", "message": "not found"})),
    })
}

/// Tokens travel in a header or the URL, never in cookies: any origin may read.
fn allow_any_origin(response: &mut Response<Body>) {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
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
    // An app on another origin imports /client.js (a module script: the
    // browser asks for CORS); the files hold nothing private.
    allow_any_origin(&mut response);
    response
}

fn refused(refusal: Refusal) -> Response<Body> {
    json_response(refusal.status, refusal.body())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_out_of_descriptors_answer_is_a_complete_response() {
        let answer = out_of_descriptors_answer();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "unavailable");
    }
}
