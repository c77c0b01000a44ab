//! One task per client: its socket, its queue, its subscriptions.
//!
//! The loop waits on the client's frames, the hub's queue for this
//! connection, the ping timer, the authentication or token expiry
//! deadline, and shutdown. What it writes keeps four promises:
//!
//! - Replies come in request order. `subscribed` travels through the hub
//!   (so that it keeps its place among events); any reply produced while a
//!   hub reply is outstanding waits behind it (`Reply`).
//! - Events of one deployment arrive in commit order, even around a
//!   resume. After registering, no event is written until the client
//!   answers a ping sent right after `authenticated`, so a `subscribe` with
//!   `since` it sent before seeing `authenticated` is read first; while
//!   such a subscribe is unanswered, events are held and then merged with
//!   its replay by commit order.
//! - A kicked slow consumer gets a gap-free prefix of what it was owed: a
//!   kick never interrupts a write, and what is queued is written before
//!   the 1013 only when it follows on from what was written (not after a
//!   replay cut short). A write abandoned half-way (shutdown, silence,
//!   token expiry, the slow consumer's 10 s) is followed by nothing but a
//!   close frame, so a fragmented message is never interleaved with
//!   another.
//! - Every close is a closing handshake: after its close frame the server
//!   reads (and drops) what the client still sends until the client's own
//!   close frame, so the kernel never answers with a reset.
//!
//! Replays from the event log go page by page (bounded in rows and bytes),
//! holding a pooled connection only for each page's query, under two
//! server-wide limits: concurrent queries and bytes held. Every wait and
//! write of a replay is raced against shutdown, the ping timeout, token
//! expiry and the slow consumer's deadline.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper_tungstenite::HyperWebsocketStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Endpoint;
use super::fragments::{FRAGMENT_SIZE, Fragments, fragments};
use super::protocol::{BadRequest, ClientMessage, ErrorCode, ServerMessage};
use crate::auth::Claims;
use crate::db::events::{Pages, Replayed};
use crate::event::{Event, Topic};
use crate::hub::{ConnId, HubStopped, LogReplay, LookUp, Outbound, Replay, Since, Subscribed};

/// Without a token on the upgrade, `auth` must come within this.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// A slow consumer's close must be written within this.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing handshake may take; on shutdown this must leave
/// time to exit within 5 s.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that does not answer the ping after `authenticated` gets its
/// events after this anyway.
const FENCE_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Queued messages written per flush.
const BATCH: usize = 64;
/// Replies waiting behind the hub's: past this, the client is not read
/// until the hub answers (TCP pushes back on a client that pipelines).
const MAX_HELD_REPLIES: usize = 256;

/// Why the session stops what it is doing.
#[derive(Debug)]
enum Interrupted {
    Socket(tungstenite::Error),
    Shutdown,
    /// Kicked as a slow consumer (between messages).
    Kicked,
    /// The slow consumer's close could not be written in time.
    SlowTimeout,
    /// Silent for two ping intervals.
    Silent,
    /// The authentication deadline or the token's expiry.
    Deadline,
}

impl From<HubStopped> for Interrupted {
    fn from(_: HubStopped) -> Interrupted {
        Interrupted::Shutdown
    }
}

/// What the loop does next.
enum Next {
    Continue,
    Close(CloseCode, &'static str),
    End(String),
}

type Step = Result<Next, Interrupted>;

enum Wake {
    Shutdown,
    Kicked,
    Frame(Option<Result<Message, tungstenite::Error>>),
    Outbound(Option<Outbound>),
    PingTick,
    Deadline,
    FenceTimeout,
}

/// A reply in request order.
enum Reply {
    /// The hub will answer a (un)subscribe; `since` marks a resume.
    Hub {
        since: bool,
    },
    Text(String),
}

struct Session {
    conn: ConnId,
    endpoint: Arc<Endpoint>,
    ws: HyperWebsocketStream,
    claims: Option<Claims>,
    /// Set once authenticated and registered with the hub.
    outbound: Option<mpsc::Receiver<Outbound>>,
    kicked: CancellationToken,
    /// When the slow consumer's close must be done by.
    slow_deadline: Option<Instant>,
    topics: HashSet<Topic>,
    last_heard: Instant,
    last_ping: Instant,
    deadline: Instant,
    /// Replies in request order, from the first one the hub owes.
    replies: VecDeque<Reply>,
    /// Subscribes with `since` the hub has not answered yet...
    resumes_pending: usize,
    /// ...and the events held meanwhile (with replays' recent events), to
    /// be written in commit order when the last one is answered.
    held: Vec<Arc<Event>>,
    /// How many of `held` came live from the queue.
    held_live: usize,
    /// The payload of the ping sent after `authenticated`, until answered.
    fence: Option<(u64, Instant)>,
    /// A write was abandoned half-way: only a close frame may follow.
    broken: bool,
    /// A replay was cut short by a kick: nothing queued after it may be
    /// written.
    cut: bool,
    /// Frames read between replay pages, handled after the replay.
    stashed: VecDeque<Message>,
    /// `deliver`'s batch, kept to reuse its allocation.
    batch: Vec<Arc<Event>>,
    /// What this connection's replays from the event log sent, so that a
    /// later one does not send it again (two resumes whose topics overlap).
    replayed: Vec<Replayed>,
}

pub async fn run(
    ws: HyperWebsocketStream,
    endpoint: Arc<Endpoint>,
    conn: ConnId,
    claims: Option<Claims>,
    remote: SocketAddr,
) {
    let now = Instant::now();
    let mut session = Session {
        conn,
        endpoint,
        ws,
        claims: None,
        outbound: None,
        kicked: CancellationToken::new(),
        slow_deadline: None,
        topics: HashSet::new(),
        last_heard: now,
        last_ping: now,
        deadline: now + AUTH_TIMEOUT,
        replies: VecDeque::new(),
        resumes_pending: 0,
        held: Vec::new(),
        held_live: 0,
        fence: None,
        broken: false,
        cut: false,
        stashed: VecDeque::new(),
        batch: Vec::new(),
        replayed: Vec::new(),
    };
    debug!(conn, %remote, authenticated = claims.is_some(), "websocket connected");
    let reason = session.serve(claims).await;
    if session.outbound.is_some() {
        // On shutdown the hub is gone already, and so is the registration.
        let _ = session.endpoint.hub.unregister(conn).await;
    }
    let user_id = session.claims.map(|c| c.viewer.user_id.to_string()).unwrap_or_default();
    info!(conn, %remote, user_id, reason, "websocket closed");
}

async fn next_outbound(outbound: &mut Option<mpsc::Receiver<Outbound>>) -> Option<Outbound> {
    match outbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await
}

/// What may interrupt the session's writes and waits.
struct Interrupts {
    shutdown: CancellationToken,
    kicked: CancellationToken,
    silent_at: Instant,
    deadline: Instant,
    slow_deadline: Option<Instant>,
}

impl Interrupts {
    /// The first interrupt to come. One timer, for the earliest deadline.
    async fn wait(self) -> Interrupted {
        let Interrupts { shutdown, kicked, silent_at, deadline, mut slow_deadline } = self;
        loop {
            let mut next = (silent_at, Interrupted::Silent);
            if deadline < next.0 {
                next = (deadline, Interrupted::Deadline);
            }
            if let Some(at) = slow_deadline.filter(|at| *at < next.0) {
                next = (at, Interrupted::SlowTimeout);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Interrupted::Shutdown,
                _ = sleep_until(next.0) => return next.1,
                _ = kicked.cancelled(), if slow_deadline.is_none() => {
                    slow_deadline = Some(Instant::now() + SLOW_CLOSE_TIMEOUT);
                }
            }
        }
    }
}

/// Run `work` unless one of `interrupts` comes first.
async fn guarded<T>(interrupts: Interrupts, work: impl Future<Output = T>) -> Result<T, Interrupted> {
    let interrupts = Box::pin(interrupts.wait());
    tokio::select! {
        biased;
        done = work => Ok(done),
        stop = interrupts => Err(stop),
    }
}

/// Fn items, not closures: a closure here trips the compiler's `Send`
/// inference for the session future.
fn event_frame(event: &Arc<Event>) -> Message {
    Message::Text(event.frame.clone())
}

fn event_messages(event: &Arc<Event>) -> Fragments {
    fragments(&event.frame)
}

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

fn reply_frame(message: &ServerMessage) -> Message {
    text(message.to_text())
}

impl Session {
    async fn serve(&mut self, claims: Option<Claims>) -> String {
        if let Some(claims) = claims
            && let Err(stop) = self.accept_token(claims).await
        {
            return Box::pin(self.interrupted(stop)).await;
        }
        let interval = self.endpoint.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let shutdown = self.endpoint.shutdown.clone();
        let kicked = self.kicked.clone();
        loop {
            let step = if let Some(message) = self.stashed.pop_front() {
                Box::pin(self.on_message(message)).await
            } else {
                let reading = self.replies.len() < MAX_HELD_REPLIES;
                let draining = self.fence.is_none();
                // One timer for the deadline and the fence, whichever is first.
                let (timer, fence_first) = match &self.fence {
                    Some((_, until)) if *until < self.deadline => (*until, true),
                    _ => (self.deadline, false),
                };
                // Biased: timers first, so a busy queue cannot starve them;
                // client frames before the queue, so a request already sent
                // is read before more events go out.
                let wake = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Wake::Shutdown,
                    _ = kicked.cancelled() => Wake::Kicked,
                    _ = sleep_until(timer) => if fence_first { Wake::FenceTimeout } else { Wake::Deadline },
                    _ = ping.tick() => Wake::PingTick,
                    frame = self.ws.next(), if reading => Wake::Frame(frame),
                    message = next_outbound(&mut self.outbound), if draining => Wake::Outbound(message),
                };
                match wake {
                    Wake::Shutdown => Err(Interrupted::Shutdown),
                    Wake::Kicked => Err(Interrupted::Kicked),
                    // The hub drops a queue's sender when it kicks the client,
                    // and when it stops for shutdown.
                    Wake::Outbound(None) if self.kicked.is_cancelled() => Err(Interrupted::Kicked),
                    Wake::Outbound(None) => Err(Interrupted::Shutdown),
                    // Boxed: client requests are rare next to events, and their
                    // futures (auth, permission queries) would otherwise be
                    // inlined into every idle session task.
                    Wake::Frame(frame) => Box::pin(self.on_frame(frame)).await,
                    Wake::Outbound(Some(message)) => self.deliver(message).await,
                    Wake::PingTick => self.on_ping_tick(interval).await,
                    Wake::Deadline => Box::pin(self.on_deadline()).await,
                    Wake::FenceTimeout => {
                        debug!(conn = self.conn, "no pong after authenticated; delivering anyway");
                        self.fence = None;
                        Ok(Next::Continue)
                    }
                }
            };
            match step {
                Ok(Next::Continue) => {}
                // Boxed: taken once per connection; inline, its timers would
                // size the future every idle session keeps.
                Ok(Next::Close(code, reason)) => return Box::pin(self.close(code, reason, CLOSE_TIMEOUT)).await,
                Ok(Next::End(reason)) => return reason,
                Err(stop) => return Box::pin(self.interrupted(stop)).await,
            }
        }
    }

    async fn interrupted(&mut self, stop: Interrupted) -> String {
        match stop {
            Interrupted::Socket(e) => format!("socket error: {e}"),
            Interrupted::Shutdown => self.close(CloseCode::Away, "server shutting down", CLOSE_TIMEOUT).await,
            Interrupted::Kicked => Box::pin(self.close_slow_consumer()).await,
            Interrupted::SlowTimeout => {
                warn!(conn = self.conn, "slow consumer did not take its close within 10s; dropping the connection");
                "slow consumer: dropped".into()
            }
            Interrupted::Silent => "silent for two ping intervals; dropped".into(),
            Interrupted::Deadline => match Box::pin(self.on_deadline()).await {
                Ok(Next::Close(code, reason)) => self.close(code, reason, CLOSE_TIMEOUT).await,
                _ => self.close(CloseCode::Policy, "token expired", CLOSE_TIMEOUT).await,
            },
        }
    }

    /// What may interrupt a write or a wait: shutdown, the ping timeout,
    /// the authentication or expiry deadline, and a kicked slow consumer's
    /// 10 s. Owns what it needs, so it can race a borrow of the socket.
    fn interrupts(&self) -> Interrupts {
        Interrupts {
            shutdown: self.endpoint.shutdown.clone(),
            kicked: self.kicked.clone(),
            silent_at: self.last_heard + self.endpoint.ping_interval * 2,
            deadline: self.deadline,
            slow_deadline: self.slow_deadline,
        }
    }

    /// Write messages and flush, unless an interrupt comes first; an
    /// interrupted write leaves the stream fit only for a close frame.
    async fn write(&mut self, messages: impl IntoIterator<Item = Message>) -> Result<(), Interrupted> {
        if self.broken {
            return Err(Interrupted::SlowTimeout);
        }
        let interrupts = self.interrupts();
        let ws = &mut self.ws;
        let write = async move {
            for message in messages {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        tokio::pin!(write);
        // Most writes complete at once; only one that has to wait is raced
        // against the interrupts, whose timers are boxed so that idle
        // sessions do not keep room for them.
        let outcome = match futures_util::poll!(&mut write) {
            std::task::Poll::Ready(written) => written.map_err(Interrupted::Socket),
            std::task::Poll::Pending => {
                let interrupts = Box::pin(interrupts.wait());
                tokio::select! {
                    biased;
                    written = &mut write => written.map_err(Interrupted::Socket),
                    stop = interrupts => Err(stop),
                }
            }
        };
        if outcome.is_err() {
            self.broken = true;
        }
        outcome
    }

    /// A reply to a request: written now, or after the hub's replies it
    /// must not overtake.
    async fn reply(&mut self, message: ServerMessage) -> Step {
        if self.replies.is_empty() {
            self.write([reply_frame(&message)]).await?;
        } else {
            self.replies.push_back(Reply::Text(message.to_text()));
        }
        Ok(Next::Continue)
    }

    async fn error(&mut self, code: ErrorCode, message: &str, topic: Option<&str>) -> Step {
        self.reply(ServerMessage::error(code, message, topic)).await
    }

    /// The hub answered the oldest outstanding request: write the replies
    /// that were waiting behind it, up to the next one the hub owes.
    async fn hub_answered(&mut self) -> Result<(), Interrupted> {
        if matches!(self.replies.front(), Some(Reply::Hub { .. })) {
            self.replies.pop_front();
        }
        let mut ready = Vec::new();
        while let Some(Reply::Text(_)) = self.replies.front() {
            if let Some(Reply::Text(message)) = self.replies.pop_front() {
                ready.push(text(message));
            }
        }
        if self.replies.is_empty() {
            // Most connections subscribe once or twice: keep no buffer.
            self.replies = VecDeque::new();
        }
        if ready.is_empty() { Ok(()) } else { self.write(ready).await }
    }

    /// Send the close frame, then read what the client still sends until
    /// its own close frame (or `within`), so the connection ends with a
    /// closing handshake rather than a reset.
    async fn close(&mut self, code: CloseCode, reason: &'static str, within: Duration) -> String {
        let until = Instant::now() + within;
        let frame = CloseFrame { code, reason: reason.into() };
        let sent = tokio::time::timeout_at(until.into(), self.ws.close(Some(frame))).await;
        if sent.is_err() {
            return format!("close {} not written within {within:?}; dropped", u16::from(code));
        }
        let mut dropped = 0usize;
        loop {
            match tokio::time::timeout_at(until.into(), self.ws.next()).await {
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => dropped += 1,
                Err(_) => {
                    debug!(conn = self.conn, "no close frame from the client within {within:?}");
                    break;
                }
            }
        }
        if dropped > 0 {
            debug!(conn = self.conn, dropped, "messages the client sent after the close were read and dropped");
        }
        format!("closed with {}: {reason}", u16::from(code))
    }

    /// Write what is already queued when it follows on from what was
    /// written, then close with 1013; drop the connection if that cannot
    /// be done within 10 s.
    async fn close_slow_consumer(&mut self) -> String {
        let until = *self.slow_deadline.get_or_insert_with(|| Instant::now() + SLOW_CLOSE_TIMEOUT);
        // After a replay cut short, or with events held for a resume, the
        // queue does not follow on from what the client has.
        if !self.cut && !self.broken && self.resumes_pending == 0 {
            match self.drain_queue().await {
                Ok(()) => {}
                Err(Interrupted::SlowTimeout) => {
                    warn!(conn = self.conn, "slow consumer did not take its queue within 10s; dropping the connection");
                    return "slow consumer: dropped".into();
                }
                Err(_) => return "slow consumer: dropped".into(),
            }
        }
        let within = until.saturating_duration_since(Instant::now());
        let outcome = self.close(CloseCode::Again, "slow consumer: queue full; resume with since", within).await;
        if outcome.starts_with("closed") { "slow consumer: closed with 1013".into() } else { outcome }
    }

    /// Write the queued messages, stopping at a replay (whose events are
    /// not queued) or a look-up.
    async fn drain_queue(&mut self) -> Result<(), Interrupted> {
        let mut batch = Vec::new();
        while let Some(message) = self.outbound.as_mut().and_then(|rx| rx.try_recv().ok()) {
            match message {
                Outbound::LookUp(_) => break,
                Outbound::Subscribed(reply) if reply.replay.is_some() => {
                    self.write_events(&mut batch, None).await?;
                    return self.on_subscribed(reply.topic, reply.cursor, None).await;
                }
                Outbound::Event(event) => self.take_event(event, &mut batch),
                reply => self.take_reply(reply, &mut batch).await?,
            }
        }
        self.write_events(&mut batch, None).await
    }

    async fn on_ping_tick(&mut self, interval: Duration) -> Step {
        if self.last_heard.elapsed() >= interval * 2 {
            return Ok(Next::End("silent for two ping intervals; dropped".into()));
        }
        self.last_ping = Instant::now();
        self.write([Message::Ping(Default::default())]).await.map(|()| Next::Continue)
    }

    async fn on_deadline(&mut self) -> Step {
        if self.claims.is_none() {
            return Ok(Next::Close(CloseCode::Policy, "authentication timeout"));
        }
        if !self.broken {
            let message =
                ServerMessage::error(ErrorCode::TokenExpired, "token expired; send a fresh auth before exp", None);
            // The close follows whether or not the error could be written.
            let _ = self.write([reply_frame(&message)]).await;
        }
        Ok(Next::Close(CloseCode::Policy, "token expired"))
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Step {
        match frame {
            None => Ok(Next::End("client went away".into())),
            Some(Err(tungstenite::Error::Capacity(e))) => {
                warn!(conn = self.conn, error = %e, "message too big; closing with 1009");
                Ok(Next::Close(CloseCode::Size, "message too big (64 KiB at most)"))
            }
            Some(Err(tungstenite::Error::Utf8(e))) => {
                warn!(conn = self.conn, error = %e, "text frame is not UTF-8; closing with 1007");
                Ok(Next::Close(CloseCode::Invalid, "text frames must be valid UTF-8"))
            }
            Some(Err(e)) => Ok(Next::End(format!("protocol error: {e}"))),
            Some(Ok(message)) => self.on_message(message).await,
        }
    }

    async fn on_message(&mut self, message: Message) -> Step {
        self.last_heard = Instant::now();
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                self.error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text", None).await
            }
            Message::Pong(payload) => {
                if self.fence.as_ref().is_some_and(|(expected, _)| payload.as_ref() == expected.to_be_bytes()) {
                    self.fence = None;
                }
                Ok(Next::Continue)
            }
            // tungstenite answers pings and close frames itself.
            Message::Ping(_) | Message::Close(_) | Message::Frame(_) => Ok(Next::Continue),
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        let message = match ClientMessage::parse(text) {
            Ok(message) => message,
            Err(BadRequest(why)) => {
                debug!(conn = self.conn, reason = %why, "bad request");
                return self.error(ErrorCode::BadRequest, &why, None).await;
            }
        };
        match message {
            ClientMessage::Ping => self.reply(ServerMessage::pong()).await,
            ClientMessage::Auth { token } => self.on_auth(&token).await,
            ClientMessage::Subscribe { topic, since } => self.on_subscribe(&topic, since).await,
            ClientMessage::Unsubscribe { topic } => self.on_unsubscribe(&topic).await,
        }
    }

    async fn on_auth(&mut self, token: &str) -> Step {
        match self.endpoint.verifier.verify(token) {
            Ok(claims) => self.accept_token(claims).await,
            Err(e) => {
                let code = ErrorCode::for_auth(&e);
                warn!(conn = self.conn, reason = %e, authenticated = self.claims.is_some(), "auth refused");
                self.error(code, &e.to_string(), None).await?;
                if self.claims.is_none() {
                    return Ok(Next::Close(CloseCode::Policy, "authentication failed"));
                }
                // A failed refresh leaves the current token in force until its exp.
                Ok(Next::Continue)
            }
        }
    }

    async fn accept_token(&mut self, claims: Claims) -> Step {
        let viewer = claims.viewer;
        let registering = match self.claims {
            Some(current) if current.viewer.user_id != viewer.user_id => {
                return self.error(ErrorCode::Forbidden, "a fresh token must be for the same user (sub)", None).await;
            }
            Some(current) => {
                if current.viewer != viewer {
                    self.endpoint.hub.update_viewer(self.conn, viewer).await?;
                    // What earlier log replays sent was what the old viewer
                    // could see: it says nothing of what this one is owed.
                    self.replayed.clear();
                }
                false
            }
            None => {
                let hub = &self.endpoint.hub;
                let queue = hub.register(self.conn, viewer, self.endpoint.client_queue, self.kicked.clone()).await?;
                self.outbound = Some(queue);
                true
            }
        };
        self.claims = Some(claims);
        let expires_in = claims.expires_at_time().duration_since(SystemTime::now()).unwrap_or_default();
        self.deadline = Instant::now() + expires_in;
        info!(conn = self.conn, user_id = %viewer.user_id, superuser = viewer.is_superuser, "authenticated");
        let authenticated = ServerMessage::authenticated(viewer.user_id, claims.expires_at_time());
        if !registering {
            return self.reply(authenticated).await;
        }
        // The fence: the client's pong to this ping comes after anything it
        // sent before it saw `authenticated`.
        self.fence = Some((self.conn, Instant::now() + FENCE_TIMEOUT));
        let ping = Message::Ping(bytes::Bytes::copy_from_slice(&self.conn.to_be_bytes()));
        self.write([reply_frame(&authenticated), ping]).await?;
        Ok(Next::Continue)
    }

    async fn on_subscribe(&mut self, name: &str, since: Option<i64>) -> Step {
        let Some(claims) = self.claims else {
            return self.error(ErrorCode::Unauthorized, "authenticate first", Some(name)).await;
        };
        let Some(topic) = Topic::parse(name) else {
            return self.error(ErrorCode::InvalidTopic, "unknown topic", Some(name)).await;
        };
        let topic_name = topic.to_string();
        if !self.topics.contains(&topic) && self.topics.len() >= MAX_SUBSCRIPTIONS {
            let message = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
            return self.error(ErrorCode::TooManySubscriptions, &message, Some(&topic_name)).await;
        }
        let log = &self.endpoint.log;
        match guarded(self.interrupts(), log.may_watch(claims.viewer, topic)).await? {
            Ok(true) => {}
            Ok(false) => {
                info!(conn = self.conn, user_id = %claims.viewer.user_id, topic = %topic_name, "subscription refused");
                let message = "no such deployment, or not yours to see";
                return self.error(ErrorCode::Forbidden, message, Some(&topic_name)).await;
            }
            Err(e) => {
                warn!(conn = self.conn, topic = %topic_name, error = %e, "permission check failed");
                let message = "cannot check permission now; try again";
                return self.error(ErrorCode::Unavailable, message, Some(&topic_name)).await;
            }
        }
        self.topics.insert(topic);
        self.replies.push_back(Reply::Hub { since: since.is_some() });
        if since.is_some() {
            self.resumes_pending += 1;
        }
        debug!(conn = self.conn, topic = %topic_name, ?since, "subscribing");
        self.endpoint.hub.subscribe(self.conn, topic, since.map(Since::Unchecked)).await?;
        Ok(Next::Continue)
    }

    async fn on_unsubscribe(&mut self, name: &str) -> Step {
        if self.claims.is_none() {
            return self.error(ErrorCode::Unauthorized, "authenticate first", Some(name)).await;
        }
        let Some(topic) = Topic::parse(name) else {
            return self.error(ErrorCode::InvalidTopic, "unknown topic", Some(name)).await;
        };
        self.topics.remove(&topic);
        self.replayed.retain(|r| r.topic != topic);
        self.replies.push_back(Reply::Hub { since: false });
        self.endpoint.hub.unsubscribe(self.conn, topic).await?;
        Ok(Next::Continue)
    }

    /// Write one message from the hub and whatever else is already queued,
    /// with one flush.
    async fn deliver(&mut self, first: Outbound) -> Step {
        // Reused across deliveries, so a wake-up does not allocate.
        let mut batch = std::mem::take(&mut self.batch);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(message) = next.take() {
            taken += 1;
            match message {
                Outbound::Event(event) => self.take_event(event, &mut batch),
                // Boxed: replies are rare next to events, and their futures
                // would otherwise size every idle session task.
                reply => Box::pin(self.take_reply(reply, &mut batch)).await?,
            }
            if taken < BATCH && !self.kicked.is_cancelled() {
                next = self.outbound.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
        self.write_events(&mut batch, None).await?;
        self.batch = batch;
        if self.held_live > self.endpoint.client_queue {
            // Events held behind a resume count against the queue too.
            warn!(
                conn = self.conn,
                held = self.held_live,
                "slow consumer: events held behind a resume; closing with 1013"
            );
            self.kicked.cancel();
        }
        Ok(Next::Continue)
    }

    /// A queued event joins `batch`, or waits behind a resume.
    fn take_event(&mut self, event: Arc<Event>, batch: &mut Vec<Arc<Event>>) {
        if self.resumes_pending > 0 {
            self.held.push(event);
            self.held_live += 1;
        } else {
            batch.push(event);
        }
    }

    /// A queued reply is written after `batch`, in its place among events.
    async fn take_reply(&mut self, message: Outbound, batch: &mut Vec<Arc<Event>>) -> Result<(), Interrupted> {
        match message {
            Outbound::Event(event) => self.take_event(event, batch),
            Outbound::Subscribed(reply) => {
                let Subscribed { topic, cursor, replay } = *reply;
                self.write_events(batch, None).await?;
                // Boxed: a replay's future (event log queries) is large
                // and rare; inline it would enlarge every session task.
                Box::pin(self.on_subscribed(topic, cursor, replay)).await?;
            }
            Outbound::LookUp(look_up) => {
                let LookUp { topic, since } = *look_up;
                self.write_events(batch, None).await?;
                Box::pin(self.look_up(topic, since)).await?;
            }
            Outbound::Unsubscribed { topic } => {
                self.write_events(batch, Some(ServerMessage::Unsubscribed { topic })).await?;
                self.hub_answered().await?;
            }
        }
        Ok(())
    }

    /// Write `events` (emptying it), then `after` if given, in one flush.
    async fn write_events(
        &mut self,
        events: &mut Vec<Arc<Event>>,
        after: Option<ServerMessage>,
    ) -> Result<(), Interrupted> {
        if events.is_empty() && after.is_none() {
            return Ok(());
        }
        let after = after.as_ref().map(reply_frame);
        // Fed straight from the shared frames: no allocation per recipient.
        if events.iter().any(|event| event.frame.len() > FRAGMENT_SIZE) {
            // Rare, and its iterator is larger: boxed, so it does not grow
            // the future every idle session keeps (measured: +0.5 KiB per
            // connection in bench S3 when inline).
            Box::pin(self.write(events.iter().flat_map(event_messages).chain(after))).await?;
        } else {
            self.write(events.iter().map(event_frame).chain(after)).await?;
        }
        let now = Instant::now();
        self.endpoint.metrics.observe_deliveries(events.drain(..).map(|event| now - event.received_at));
        Ok(())
    }

    /// The hub cannot place `since` in its history: ask the event log
    /// where it stands, and subscribe again with the answer.
    async fn look_up(&mut self, topic: Topic, since: i64) -> Result<(), Interrupted> {
        let Some(viewer) = self.claims.map(|c| c.viewer) else { return Ok(()) };
        let looked_up = guarded(self.interrupts(), self.endpoint.log.look_up(viewer, since)).await?;
        match looked_up {
            Ok(since) => Ok(self.endpoint.hub.subscribe(self.conn, topic, Some(since)).await?),
            Err(e) => {
                warn!(conn = self.conn, topic = %topic, since, error = %e, "cannot look up since in the event log");
                // The subscribe fails as a whole (the hub has not made it):
                // the client tries again, with the same `since`.
                self.topics.remove(&topic);
                let message = ServerMessage::error(
                    ErrorCode::Unavailable,
                    "cannot look up since in the event log now; subscribe again with since",
                    Some(&topic.to_string()),
                );
                self.answer_subscribe(vec![reply_frame(&message)], topic, None).await
            }
        }
    }

    async fn on_subscribed(&mut self, topic: Topic, cursor: i64, replay: Option<Replay>) -> Result<(), Interrupted> {
        let mut first = vec![reply_frame(&ServerMessage::Subscribed { topic, event_id: Some(cursor) })];
        if replay.as_ref().is_some_and(|r| r.resync) {
            first.push(reply_frame(&ServerMessage::Resync { topic }));
        }
        self.answer_subscribe(first, topic, replay).await
    }

    /// Answer the oldest outstanding subscribe with `first`, then the
    /// replay of `topic`; when no resume is outstanding any more, the
    /// events held meanwhile follow, merged by commit order.
    async fn answer_subscribe(
        &mut self,
        first: Vec<Message>,
        topic: Topic,
        replay: Option<Replay>,
    ) -> Result<(), Interrupted> {
        let resume = match self.replies.front() {
            Some(Reply::Hub { since }) => *since,
            _ => false,
        };
        self.write(first).await?;
        if let Some(replay) = replay {
            let Replay { resync, from_log, recent } = replay;
            if let Some(log) = from_log {
                self.replay_from_log(topic, log, resync).await?;
            }
            self.held.extend(recent);
        }
        if resume {
            self.resumes_pending = self.resumes_pending.saturating_sub(1);
        }
        if self.resumes_pending == 0 && !self.held.is_empty() {
            // Live events held while the resume was answered, and the
            // replay's recent events: one stream in commit order.
            let mut held = std::mem::take(&mut self.held);
            self.held_live = 0;
            held.sort_by_key(|event| event.seq);
            for chunk in held.chunks(BATCH) {
                self.stop_if_kicked()?;
                let mut chunk = chunk.to_vec();
                self.write_events(&mut chunk, None).await?;
            }
        }
        self.hub_answered().await
    }

    /// Between two parts of a replay: a kick cuts it short, and nothing
    /// queued after it may then be written.
    fn stop_if_kicked(&mut self) -> Result<(), Interrupted> {
        if self.kicked.is_cancelled() {
            self.cut = true;
            return Err(Interrupted::Kicked);
        }
        Ok(())
    }

    /// Page through the event log ([`crate::db::events::EventLog`]): each
    /// page is written before the next is read.
    async fn replay_from_log(&mut self, topic: Topic, log: LogReplay, resynced: bool) -> Result<(), Interrupted> {
        let Some(viewer) = self.claims.map(|c| c.viewer) else { return Ok(()) };
        let mut pages = Pages::new(topic, viewer, log, resynced, self.replayed.clone());
        let outcome = self.write_pages(topic, &mut pages).await;
        Replayed::remember(&mut self.replayed, pages.replayed());
        outcome
    }

    async fn write_pages(&mut self, topic: Topic, pages: &mut Pages) -> Result<(), Interrupted> {
        loop {
            self.stop_if_kicked()?;
            let endpoint = Arc::clone(&self.endpoint);
            let mut page = match guarded(self.interrupts(), endpoint.log.next_page(pages)).await? {
                Ok(Some(page)) => page,
                Ok(None) => return Ok(()),
                Err(e) => {
                    warn!(conn = self.conn, topic = %topic, error = %e, "replay from the event log failed");
                    let message = ServerMessage::error(
                        ErrorCode::Unavailable,
                        "replay from the event log failed; subscribe again with since",
                        Some(&topic.to_string()),
                    );
                    return self.write([reply_frame(&message)]).await;
                }
            };
            if page.pruned {
                self.write([reply_frame(&ServerMessage::Resync { topic })]).await?;
            }
            // The page's memory is held until it is written.
            self.write_events(&mut page.events, None).await?;
            drop(page);
            self.between_pages().await?;
        }
    }

    /// Between two replay pages: read what the client sent (so a reading
    /// client is not taken for a silent one; requests wait for the end of
    /// the replay), and ping when due.
    async fn between_pages(&mut self) -> Result<(), Interrupted> {
        while self.stashed.len() < MAX_HELD_REPLIES {
            match self.ws.next().now_or_never() {
                None => break,
                Some(Some(Ok(message))) => {
                    self.last_heard = Instant::now();
                    match message {
                        Message::Pong(_) | Message::Ping(_) => {}
                        other => self.stashed.push_back(other),
                    }
                }
                Some(Some(Err(e))) => return Err(Interrupted::Socket(e)),
                Some(None) => return Err(Interrupted::Socket(tungstenite::Error::ConnectionClosed)),
            }
        }
        if self.last_ping.elapsed() >= self.endpoint.ping_interval {
            self.last_ping = Instant::now();
            self.write([Message::Ping(Default::default())]).await?;
        }
        Ok(())
    }
}
