//! One client's session, whatever carries it: a WebSocket ([`crate::ws`])
//! or a stream of Server-Sent Events ([`crate::sse`]).
//!
//! - [`core`]: what the client asked for and what it is owed (requests and
//!   authentication, reply order, resumes, held events and their merge).
//!   No socket, no database: it is told what arrived and says what to write.
//! - [`replay`]: a replay from the event log, page by page, under the
//!   server-wide limits of [`crate::db::events::EventLog`].
//! - [`driver`]: the task that runs one session: it waits on the client,
//!   the hub's queue for this connection, the timers and shutdown, does the
//!   hub and database work the core asks for, and writes through a
//!   [`Transport`].
//! - [`gate`]: what is checked before a session starts (the token, the
//!   connection limits), for both transports.
//!
//! An event goes hub → driver → core → driver → transport; nothing here
//! knows which transport it writes to.

pub mod core;
pub mod driver;
pub mod gate;
pub mod replay;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::core::Out;
use self::gate::UserConnections;
use crate::auth::{Claims, Verifier};
use crate::config::ServerArgs;
use crate::db::events::EventLog;
use crate::hub::HubHandle;
use crate::metrics::Metrics;

/// What carries a session's messages: bytes in and out, pings, and the
/// close. Its futures run inside the session task, so what is large and
/// rare (a close handshake, fragmenting a large event) is boxed inside the
/// implementation ([`driver`] says why).
pub trait Transport: Send {
    /// Names the transport in log lines.
    const NAME: &'static str;
    /// Whether the client talks back (requests, pongs): WebSocket does,
    /// SSE does not. A one-way client is never taken for silent, and is
    /// not pinged for a fence.
    const TWO_WAY: bool;

    /// The next thing the client sent. Cancel-safe: it is raced against
    /// everything else the session waits for.
    fn recv(&mut self) -> impl Future<Output = Incoming> + Send;

    /// Write these, in order, and flush.
    fn send(&mut self, items: &[Out]) -> impl Future<Output = Result<Flow, TransportError>> + Send;

    /// A keep-alive; a two-way client answers it with `Incoming::Pong(payload)`.
    fn ping(&mut self, payload: Option<u64>) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// End the connection as `close` says, within `within`; returns how it
    /// ended, for the log.
    fn close(&mut self, close: Close, within: Duration) -> impl Future<Output = String> + Send;
}

/// What a client sent.
#[derive(Debug)]
pub enum Incoming {
    /// A request.
    Text(String),
    Binary,
    /// The answer to a ping, with the ping's payload when it had one.
    Pong(Option<u64>),
    /// Anything else that shows the client is there (a ping of its own).
    Alive,
    /// Something that ends the connection with a close frame.
    Refused(Close),
    /// The client is gone, or broke the protocol: the connection ends.
    Gone(String),
}

/// After a write: go on, or end the connection (a one-way transport
/// cannot carry an error that leaves the client something to do).
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    End(&'static str),
}

/// A write that failed: the connection is broken.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// How a connection is closed (WebSocket close codes; SSE ends the stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

impl Close {
    pub const SHUTDOWN: Close = Close { code: 1001, reason: "server shutting down" };
    pub const SILENT: Close = Close { code: 1001, reason: "no pong within two ping intervals" };
    pub const PROTOCOL: Close = Close { code: 1002, reason: "protocol error" };
    pub const NOT_UTF8: Close = Close { code: 1007, reason: "text frames must be valid UTF-8" };
    pub const AUTH_TIMEOUT: Close = Close { code: 1008, reason: "authentication timeout" };
    pub const AUTH_FAILED: Close = Close { code: 1008, reason: "authentication failed" };
    pub const TOKEN_EXPIRED: Close = Close { code: 1008, reason: "token expired" };
    pub const TOO_BIG: Close = Close { code: 1009, reason: "message too big (64 KiB at most)" };
    pub const RESUME_FAILED: Close = Close { code: 1011, reason: "resume failed; reconnect with since" };
    pub const SLOW_CONSUMER: Close = Close { code: 1013, reason: "slow consumer: queue full; resume with since" };
    pub const TOO_MANY: Close = Close { code: 1013, reason: "too many connections for this user" };
}

/// How a session starts: its token when the request carried one, and the
/// resume at connect its request names (`?topic=…&since=…`).
#[derive(Debug, Default)]
pub struct Opening {
    pub claims: Option<Claims>,
    pub resume: ResumeAsk,
}

/// A resume at connect as the client asked for it: in the request's URL
/// (both transports) or in its first `auth` message (WebSocket). The owner
/// feed and `topics` are placed at one point of the feed, after `since`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeAsk {
    /// Topic names, in the order the client gave them.
    pub topics: Vec<String>,
    pub since: Option<i64>,
    /// Why `since` could not be read: answered with `bad_request`, and
    /// nothing is resumed.
    pub bad_since: Option<String>,
    /// The topics were checked already (SSE's gate answers in HTTP).
    pub checked: bool,
}

impl ResumeAsk {
    /// Whether the request asked for anything.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty() && self.since.is_none() && self.bad_since.is_none()
    }

    /// The topics and `since` of a first `auth` message join what the URL
    /// named; its `since` wins.
    pub fn join(&mut self, topics: Vec<String>, since: Option<i64>) {
        self.topics.extend(topics);
        if since.is_some() {
            self.since = since;
            self.bad_since = None;
        }
    }

    /// The `since` of a URL: absent, or a non-negative event id.
    pub fn since_from(&mut self, value: Option<&str>) {
        let Some(value) = value else { return };
        match value.trim().parse::<i64>() {
            Ok(id) if id >= 0 => self.since = Some(id),
            _ => {
                let shown: String = value.chars().take(40).collect();
                self.bad_since = Some(format!("since must be a non-negative event id, not {shown:?}"));
            }
        }
    }
}

/// What every session shares, built once in [`crate::serve`].
pub struct Endpoint {
    pub(crate) verifier: Verifier,
    pub(crate) hub: HubHandle,
    pub(crate) log: EventLog,
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM/SIGINT (or by the embedder): every session
    /// closes with 1001.
    pub(crate) shutdown: CancellationToken,
    /// Sessions are spawned here, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    pub(crate) ping_interval: Duration,
    pub(crate) client_queue: usize,
    pub(crate) max_connections: usize,
    pub(crate) users: Arc<UserConnections>,
    pub(crate) next_conn: AtomicU64,
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
            users: Arc::new(UserConnections::new(settings.max_connections_per_user.get())),
            next_conn: AtomicU64::new(1),
        })
    }
}
