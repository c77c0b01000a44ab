//! `windflow-notify tail`: a terminal client. It authenticates, subscribes,
//! and prints every server message as one JSON line on stdout, so it can be
//! piped into `jq` or `grep`. Its own diagnostics go to stderr.
//!
//! Failures are of two kinds. Transient ones (connection refused or reset,
//! HTTP 5xx or 429, close 1001, 1011 or 1013, `unavailable`) are retried
//! with backoff, and each reconnect resumes at connect: its topics and
//! `since` = the last `event_id` seen go in the URL (`?topic=…&since=N`), so
//! the owner feed and every topic come from there, merged in commit order,
//! and nothing is lost or printed twice across a server restart; a
//! replay that keeps failing (`unavailable`) is retried later and later. Permanent ones
//! (a URL that is not the WebSocket endpoint, a refused token or topic)
//! end `tail` with one line saying what to fix: retrying cannot help.
//!
//! A URL where nothing has answered yet is retried for `--wait` only: it
//! may be a server still starting, or no server at all (a typo, a server
//! never started). A port that answers with something other than HTTP is
//! not windflow-notify and ends `tail` at once. Once a server has answered,
//! losing it is a restart, retried for as long as it takes.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{defaults, parse_bind, parse_duration};
use crate::event::Topic;
use crate::protocol::{ErrorCode, ServerMessage};

/// Reconnect delays: up to 250 ms first, doubling to 10 s.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
/// How long a server that accepted the connection may take to answer the
/// upgrade before the attempt counts as failed (a port that never answers).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many recent event ids are remembered to drop duplicates.
const SEEN_CAPACITY: usize = 10_000;

#[derive(clap::Args, Debug, Clone)]
pub struct TailArgs {
    /// Topic to subscribe to (`deployment_events`, `deployment_status_{id}`,
    /// `deployment_logs_{id}`, `deployment_progress_{id}`); repeat for several.
    #[arg(long = "topic", value_name = "TOPIC", required = true)]
    pub topics: Vec<String>,
    /// Replay every event committed after this event id first (0: all the
    /// event log holds).
    #[arg(long)]
    pub since: Option<i64>,
    /// WebSocket URL of the server [default: ws://WINDFLOW_BIND/ws].
    #[arg(long)]
    pub url: Option<String>,
    /// The address `serve` listens on; makes the default --url.
    #[arg(long, env = "WINDFLOW_BIND", value_name = "WINDFLOW_BIND", value_parser = parse_bind)]
    pub bind: Option<SocketAddr>,
    /// The JWT to authenticate with (see the `token` command).
    #[arg(long, env = "WINDFLOW_TOKEN", value_name = "WINDFLOW_TOKEN", hide_env_values = true)]
    pub token: String,
    /// How long to keep trying a URL where no server has answered yet (a server once reached is retried for ever).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub wait: Duration,
}

impl TailArgs {
    /// The URL to connect to, and where it came from (for the first log line).
    pub fn target(&self) -> (String, &'static str) {
        if let Some(url) = &self.url {
            return (url.clone(), "--url");
        }
        match self.bind {
            Some(bind) => (url_for_bind(bind), "WINDFLOW_BIND"),
            None => (url_for_bind(defaults::BIND), "the default; set --url or WINDFLOW_BIND to change it"),
        }
    }
}

/// `ws://{bind}/ws`, with an unspecified address (`0.0.0.0`, `[::]`)
/// replaced by loopback: a server listening everywhere is reachable there.
pub fn url_for_bind(bind: SocketAddr) -> String {
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("ws://{}/ws", SocketAddr::new(ip, bind.port()))
}

/// Why `tail` stopped for good. Each says what to fix, in one line.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("--url {url}: {problem}; expected ws://HOST:PORT/ws")]
    Url { url: String, problem: String },
    #[error("--topic {topic}: not a topic; expected {}", Topic::forms())]
    Topic { topic: String },
    #[error(
        "{url}: {problem}: is that windflow-notify's port? `serve` logs its address at start (WINDFLOW_BIND); pass it with --url or WINDFLOW_BIND"
    )]
    NotHttp { url: String, problem: String },
    #[error(
        "{url}: nothing answered for {waited} ({reason}): is windflow-notify serve running, at this address? Start it, or pass its address with --url or WINDFLOW_BIND; --wait sets how long to wait for it"
    )]
    NoServer { url: String, waited: String, reason: String },
    #[error(
        "--url {url}: the server answered HTTP {status} instead of a WebSocket upgrade; is the path right? The endpoint is {suggestion}"
    )]
    NotTheEndpoint { url: String, status: String, suggestion: String },
    #[error(
        "--token: {url} refused the token (HTTP 401: {reason}); pass a valid one with --token or WINDFLOW_TOKEN (`windflow-notify token --sub UUID` signs one with the server's JWT_SECRET_KEY)"
    )]
    TokenRefused { url: String, reason: String },
    #[error("--token: {0}; pass a fresh one with --token or WINDFLOW_TOKEN")]
    TokenEnded(String),
    #[error("--topic {topic}: the server refused it: {code}: {message}")]
    TopicRefused { topic: String, code: String, message: String },
    #[error("{url} closed the connection with {code} ({reason}); not retrying")]
    Closed { url: String, code: u16, reason: String },
    #[error("cannot write to stdout: {0}")]
    Output(#[from] io::Error),
}

/// How one connection ended.
enum Ended {
    /// Shutdown was requested or stdout is gone: stop quietly.
    Stop,
    /// The connection was lost; try again.
    Lost(String),
    /// The server could not serve a replay (`unavailable`): try again with
    /// the same cursors, backing off further each time it fails.
    Unavailable(String),
}

/// When to try again: the backoff restarts once a connection
/// authenticates, unless the one before it ended because a replay failed
/// (the next may fail the same way, and must not be retried at once).
struct Retry {
    backoff: Backoff,
    replay_failed: bool,
}

impl Retry {
    fn new() -> Retry {
        Retry { backoff: RECONNECT_BACKOFF, replay_failed: false }
    }

    fn authenticated(&mut self) {
        if !self.replay_failed {
            self.backoff.reset();
        }
    }

    /// The delay before the next attempt, after a connection that ended so.
    fn after(&mut self, replay_failed: bool) -> Duration {
        self.replay_failed = replay_failed;
        self.backoff.next_delay()
    }
}

/// What survives reconnections: where the next connection resumes, and
/// the recent ids (to drop duplicates).
struct Resume {
    /// The last event id seen, from an event or from `subscribed`. A
    /// connection carries the owner feed and every topic merged in commit
    /// order, so the last one seen (not the largest) is where all of it
    /// resumes.
    cursor: Option<i64>,
    seen: HashSet<i64>,
    order: VecDeque<i64>,
}

impl Resume {
    fn new(since: Option<i64>) -> Self {
        Resume { cursor: since, seen: HashSet::new(), order: VecDeque::new() }
    }

    /// Where the next connection resumes.
    fn since(&self) -> Option<i64> {
        self.cursor
    }

    /// An event arrived; false when it was already printed. Otherwise it
    /// is the resume point.
    fn event(&mut self, id: i64) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.cursor = Some(id);
        true
    }

    /// A `subscribed` reply: its `event_id`, when it has one, is the
    /// resume point until an event comes.
    fn subscribed(&mut self, event_id: Option<i64>) {
        if let Some(id) = event_id {
            self.cursor = Some(id);
        }
    }
}

/// The upgrade request of a connection that resumes at connect: `base`
/// with `topic=…` for each topic and `since=N` added to its query.
fn resume_request(base: &Request, topics: &[Topic], since: Option<i64>) -> Request {
    let mut request = base.clone();
    let mut query: Vec<String> = topics.iter().map(|topic| format!("topic={topic}")).collect();
    if let Some(since) = since {
        query.push(format!("since={since}"));
    }
    if query.is_empty() {
        return request;
    }
    let uri = base.uri().to_string();
    let separator = if base.uri().query().is_some() { '&' } else { '?' };
    // Topic names and ids need no escaping: letters, digits, `_` and `-`.
    match format!("{uri}{separator}{}", query.join("&")).parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(e) => warn!(error = %e, "cannot add the resume to the URL; connecting without it"),
    }
    request
}

/// Run until `shutdown` is cancelled or the server refuses us for good
/// (wrong URL, bad token, bad topic); transient failures are retried forever.
pub async fn run(args: TailArgs, shutdown: CancellationToken) -> Result<(), TailError> {
    let (url, source) = args.target();
    let topics = args
        .topics
        .iter()
        .map(|name| Topic::parse(name).ok_or_else(|| TailError::Topic { topic: name.clone() }))
        .collect::<Result<Vec<_>, _>>()?;
    let url_error = |problem: String| TailError::Url { url: url.clone(), problem };
    let mut request = url.as_str().into_client_request().map_err(|e| url_error(e.to_string()))?;
    let bearer = format!("Bearer {}", args.token.trim()).parse().map_err(|_| {
        TailError::TokenEnded("the token is not a valid header value (a JWT is one line of ASCII)".into())
    })?;
    request.headers_mut().insert("authorization", bearer);
    info!(%url, from = source, "connecting");
    let mut resume = Resume::new(args.since);
    let mut retry = Retry::new();
    let started = Instant::now();
    // Whether a server ever answered at this URL: until one has, failures
    // count against --wait, and a port that is not HTTP ends tail.
    let mut answered = false;
    loop {
        let resuming = resume_request(&request, &topics, resume.since());
        debug!(uri = %resuming.uri(), "connecting, resuming at connect");
        let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(resuming));
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = attempt => connected,
        };
        if let Ok(Err(tungstenite::Error::Http(_))) = &connected {
            // A server answered (503 when full): it is there, just busy.
            answered = true;
        }
        let patience = Patience { answered, since: started, wait: args.wait };
        let delay = match connected {
            Ok(Ok((socket, _))) => {
                answered = true;
                match session(socket, &url, &mut resume, &mut retry, &shutdown).await? {
                    Ended::Stop => return Ok(()),
                    Ended::Lost(reason) => {
                        let delay = retry.after(false);
                        warn!(%url, %reason, retry_in = ?delay, "disconnected; will reconnect and resume");
                        delay
                    }
                    Ended::Unavailable(reason) => {
                        let delay = retry.after(true);
                        warn!(%url, %reason, retry_in = ?delay, "a replay failed; will reconnect and resume from the same cursors");
                        delay
                    }
                }
            }
            Ok(Err(e)) => patience.retry(transient_or_fail(e, &url, &request, answered)?, &url, &mut retry)?,
            Err(_) => {
                patience.retry(format!("no answer to the upgrade within {HANDSHAKE_TIMEOUT:?}"), &url, &mut retry)?
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long a failed attempt may be retried.
struct Patience {
    /// A server answered at this URL before: retry for ever.
    answered: bool,
    since: Instant,
    /// Until one has, give up this long after `since` (`--wait`).
    wait: Duration,
}

impl Patience {
    /// The delay before the next attempt after `failure`, or the error to stop with.
    fn retry(&self, failure: String, url: &str, retry: &mut Retry) -> Result<Duration, TailError> {
        if self.answered {
            let delay = retry.after(retry.replay_failed);
            warn!(%url, reason = %failure, retry_in = ?delay, "cannot connect; will retry");
            return Ok(delay);
        }
        let left = self.wait.saturating_sub(self.since.elapsed());
        if left.is_zero() {
            let waited = humantime::format_duration(self.wait).to_string();
            return Err(TailError::NoServer { url: url.into(), waited, reason: failure });
        }
        let delay = retry.after(retry.replay_failed).min(left);
        warn!(%url, reason = %failure, retry_in = ?delay, hint = "is windflow-notify serve running at this URL?",
            "cannot connect; will retry");
        Ok(delay)
    }
}

/// A failed connection attempt: the reason when retrying may help (the
/// server is down, restarting or full), else the error to stop with.
/// `answered`: a server answered at this URL before.
fn transient_or_fail(
    error: tungstenite::Error,
    url: &str,
    request: &Request,
    answered: bool,
) -> Result<String, TailError> {
    let not_http = |problem: String| TailError::NotHttp { url: url.into(), problem };
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            // Down, restarting, full, or this user's connections are all taken.
            if status.is_server_error() || status == tungstenite::http::StatusCode::TOO_MANY_REQUESTS {
                return Ok(format!("HTTP {status}"));
            }
            if status.as_u16() == 401 {
                let reason = response
                    .body()
                    .as_deref()
                    .and_then(|body| serde_json::from_slice::<Value>(body).ok())
                    .and_then(|body| body["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "no reason given".into());
                return Err(TailError::TokenRefused { url: url.into(), reason });
            }
            let authority = request.uri().authority().map_or("HOST:PORT", |a| a.as_str());
            Err(TailError::NotTheEndpoint {
                url: url.into(),
                status: status.to_string(),
                suggestion: format!("ws://{authority}/ws"),
            })
        }
        tungstenite::Error::Url(e) => Err(TailError::Url { url: url.into(), problem: e.to_string() }),
        tungstenite::Error::HttpFormat(e) => Err(TailError::Url { url: url.into(), problem: e.to_string() }),
        tungstenite::Error::Protocol(ProtocolError::HttparseError(e)) => {
            Err(not_http(format!("the server there does not speak HTTP ({e})")))
        }
        // Accepted, then closed without a word (PostgreSQL's port does this
        // with an HTTP request). A server once reached may just be stopping.
        tungstenite::Error::Protocol(ProtocolError::HandshakeIncomplete) if !answered => {
            Err(not_http("the server there closed the connection without an HTTP answer".into()))
        }
        // Refused, reset, timed out, a handshake cut short: the server is
        // down or restarting.
        other => Ok(other.to_string()),
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection, its topics and cursor already in its URL.
async fn session(
    mut socket: Socket,
    url: &str,
    resume: &mut Resume,
    retry: &mut Retry,
    shutdown: &CancellationToken,
) -> Result<Ended, TailError> {
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(Ended::Stop);
            }
            frame = socket.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let Some(frame) = frame else { return Ok(Ended::Lost("closed without a code".into())) };
                let (code, reason) = (u16::from(frame.code), frame.reason.to_string());
                return match frame.code {
                    // The token is invalid or expired; retrying cannot help.
                    CloseCode::Policy => Err(TailError::TokenEnded(format!(
                        "{url} closed the connection with 1008 ({reason}): the token is invalid or expired"
                    ))),
                    // What we sent was refused as malformed: sending it again cannot help.
                    CloseCode::Protocol | CloseCode::Unsupported | CloseCode::Invalid | CloseCode::Size => {
                        Err(TailError::Closed { url: url.into(), code, reason })
                    }
                    // 1001 going away, 1013 too slow, 1011/1012 server trouble, ...
                    _ => Ok(Ended::Lost(format!("closed with {code} {reason}"))),
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Ok(Ended::Lost(e.to_string())),
            None => return Ok(Ended::Lost("connection ended".into())),
        };
        let message = match serde_json::from_str::<ServerMessage>(text.as_str()) {
            Ok(message) => Some(message),
            Err(_) => {
                if let Ok(event) = serde_json::from_str::<EventHeader>(text.as_str())
                    && !resume.event(event.event_id)
                {
                    continue;
                }
                None
            }
        };
        if !print_line(text.as_str())? {
            return Ok(Ended::Stop);
        }
        match message {
            Some(ServerMessage::Authenticated { .. }) => {
                retry.authenticated();
                debug!("authenticated");
            }
            Some(ServerMessage::Subscribed { event_id, .. }) => resume.subscribed(event_id),
            Some(ServerMessage::Error { code, message, topic }) => match code {
                // The database could not answer: ask again on a fresh
                // connection. Nothing of a failed replay came after this,
                // so each topic's cursor is where it resumes.
                ErrorCode::Unavailable => return Ok(Ended::Unavailable(format!("unavailable: {message}"))),
                ErrorCode::TooManyConnections => return Ok(Ended::Lost(format!("too many connections: {message}"))),
                ErrorCode::TokenExpired => return Err(TailError::TokenEnded(format!("the token expired ({message})"))),
                _ => {
                    let code = serde_json::to_value(code).ok().and_then(|c| c.as_str().map(str::to_string));
                    return Err(TailError::TopicRefused {
                        topic: topic.unwrap_or_else(|| "(none)".into()),
                        code: code.unwrap_or_default(),
                        message,
                    });
                }
            },
            _ => {}
        }
    }
}

/// What `tail` reads of an event message: enough to resume after it.
#[derive(Deserialize)]
struct EventHeader {
    event_id: i64,
}

/// Print one line and flush it; false when stdout is closed (`| head`).
fn print_line(line: &str) -> Result<bool, TailError> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{}", line.trim_end()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::event::EventKind;

    #[test]
    fn duplicates_are_dropped_and_the_resume_point_follows() {
        let mut resume = Resume::new(Some(3));
        assert!(resume.event(7));
        assert!(!resume.event(7));
        assert!(resume.event(5));
        assert_eq!(resume.since(), Some(5), "commit order, not the largest id");
    }

    #[test]
    fn subscribed_event_id_is_the_resume_point_before_any_event() {
        let mut resume = Resume::new(None);
        assert_eq!(resume.since(), None, "live only until it has a cursor");
        resume.subscribed(Some(40));
        assert_eq!(resume.since(), Some(40), "a reconnect before any event loses nothing");
        resume.subscribed(None);
        assert_eq!(resume.since(), Some(40));
        resume.event(41);
        assert_eq!(resume.since(), Some(41));
    }

    #[test]
    fn a_reconnect_names_its_topics_and_cursor_in_the_url() {
        let base = "ws://127.0.0.1:8000/ws".into_client_request().unwrap();
        let d = Uuid::nil();
        let topics = [Topic::DeploymentEvents, Topic::Deployment { kind: EventKind::LogsUpdate, deployment: d }];
        let request = resume_request(&base, &topics, Some(42));
        assert_eq!(
            request.uri().to_string(),
            format!("ws://127.0.0.1:8000/ws?topic=deployment_events&topic=deployment_logs_{d}&since=42")
        );
        let with_query = "ws://h:1/ws?x=1".into_client_request().unwrap();
        assert_eq!(resume_request(&with_query, &[], Some(7)).uri().to_string(), "ws://h:1/ws?x=1&since=7");
        assert_eq!(resume_request(&base, &[], None).uri(), base.uri(), "nothing to resume: the URL as given");
    }

    #[test]
    fn a_replay_that_keeps_failing_is_retried_later_and_later() {
        let mut retry = Retry::new();
        let mut delays = Vec::new();
        for _ in 0..4 {
            retry.authenticated();
            delays.push(retry.after(true));
        }
        assert!(delays[3] >= Duration::from_secs(1), "backed off: {delays:?}");
        // A connection that ends otherwise lets the next one start over.
        retry.authenticated();
        retry.after(false);
        retry.authenticated();
        assert!(retry.after(false) <= Duration::from_millis(250));
    }

    #[test]
    fn default_url_follows_windflow_bind() {
        let args = |url: Option<&str>, bind: Option<&str>| TailArgs {
            topics: vec!["deployment_events".into()],
            since: None,
            url: url.map(str::to_string),
            bind: bind.map(|b| b.parse().unwrap_or_else(|e| panic!("{b}: {e}"))),
            token: "t".into(),
            wait: Duration::from_secs(30),
        };
        assert_eq!(args(None, None).target().0, "ws://127.0.0.1:8000/ws");
        assert_eq!(args(None, Some("127.0.0.1:18600")).target(), ("ws://127.0.0.1:18600/ws".into(), "WINDFLOW_BIND"));
        assert_eq!(args(None, Some("0.0.0.0:9000")).target().0, "ws://127.0.0.1:9000/ws");
        assert_eq!(args(None, Some("[::]:9000")).target().0, "ws://[::1]:9000/ws");
        assert_eq!(args(Some("ws://h:1/ws"), Some("127.0.0.1:2")).target(), ("ws://h:1/ws".into(), "--url"));
    }
}
