//! One task per client: its socket, its queue, its subscriptions.
//!
//! The loop waits on five things at once: the client's frames, the hub's
//! queue for this connection, the ping timer, the authentication or token
//! expiry deadline, and shutdown. Writes to the socket are raced against
//! shutdown and the slow-consumer signal, so a client that stops reading
//! can never hold the task (or the server's shutdown) hostage.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::HyperWebsocketStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::auth::Claims;
use crate::db::events;
use crate::event::Event;
use crate::hub::{Command, ConnId, LogReplay, Outbound, Replay};
use crate::ws::fragments::{FRAGMENT_SIZE, Fragments, fragments};
use crate::ws::protocol::{self, BadRequest, ClientMessage, ErrorCode, Topic};

/// SPEC §6: without a token on the upgrade, `auth` must come within this.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// SPEC §6: a slow consumer's close must be written within this.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close frame may take to write; on shutdown this must leave
/// time to exit within 5 s.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Queued messages written per flush.
const BATCH: usize = 64;
/// Event log rows read per query during a replay.
const REPLAY_PAGE: i64 = 500;

/// Why a write did not happen.
enum Interrupted {
    Socket(tungstenite::Error),
    Kicked,
    Shutdown,
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
}

struct Session {
    conn: ConnId,
    app: Arc<App>,
    ws: HyperWebsocketStream,
    claims: Option<Claims>,
    /// Set once authenticated and registered with the hub.
    outbound: Option<mpsc::Receiver<Outbound>>,
    kicked: CancellationToken,
    topics: HashSet<Topic>,
    last_heard: Instant,
    deadline: Instant,
    /// `deliver`'s batch, kept to reuse its allocation.
    pending: Vec<Arc<Event>>,
}

pub async fn run(ws: HyperWebsocketStream, app: Arc<App>, conn: ConnId, claims: Option<Claims>, remote: SocketAddr) {
    let now = Instant::now();
    let mut session = Session {
        conn,
        app,
        ws,
        claims: None,
        outbound: None,
        kicked: CancellationToken::new(),
        topics: HashSet::new(),
        last_heard: now,
        deadline: now + AUTH_TIMEOUT,
        pending: Vec::new(),
    };
    debug!(conn, %remote, authenticated = claims.is_some(), "websocket connected");
    let reason = session.serve(claims).await;
    if session.outbound.is_some() {
        session.app.hub.send(Command::Unregister { conn }).await;
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

impl Session {
    async fn serve(&mut self, claims: Option<Claims>) -> String {
        if let Some(claims) = claims
            && let Err(stop) = self.accept_token(claims).await
        {
            return self.interrupted(stop).await;
        }
        let interval = self.app.settings.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let shutdown = self.app.shutdown.clone();
        let kicked = self.kicked.clone();
        loop {
            let wake = tokio::select! {
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = kicked.cancelled() => Wake::Kicked,
                frame = self.ws.next() => Wake::Frame(frame),
                message = next_outbound(&mut self.outbound) => Wake::Outbound(message),
                _ = ping.tick() => Wake::PingTick,
                _ = tokio::time::sleep_until(self.deadline.into()) => Wake::Deadline,
            };
            let step = match wake {
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
                Wake::Deadline => self.on_deadline().await,
            };
            match step {
                Ok(Next::Continue) => {}
                Ok(Next::Close(code, reason)) => return self.close(code, reason, CLOSE_TIMEOUT).await,
                Ok(Next::End(reason)) => return reason,
                Err(stop) => return self.interrupted(stop).await,
            }
        }
    }

    async fn interrupted(&mut self, stop: Interrupted) -> String {
        match stop {
            Interrupted::Socket(e) => format!("socket error: {e}"),
            Interrupted::Shutdown => self.close(CloseCode::Away, "server shutting down", CLOSE_TIMEOUT).await,
            Interrupted::Kicked => self.close_slow_consumer().await,
        }
    }

    /// Write messages and flush, unless shutdown or a kick comes first.
    async fn write(&mut self, messages: impl IntoIterator<Item = Message>) -> Result<(), Interrupted> {
        let shutdown = self.app.shutdown.clone();
        let kicked = self.kicked.clone();
        let ws = &mut self.ws;
        let write = async move {
            for message in messages {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        tokio::select! {
            written = write => written.map_err(Interrupted::Socket),
            _ = shutdown.cancelled() => Err(Interrupted::Shutdown),
            _ = kicked.cancelled() => Err(Interrupted::Kicked),
        }
    }

    async fn reply(&mut self, message: String) -> Step {
        self.write([text(message)]).await.map(|()| Next::Continue)
    }

    async fn error(&mut self, code: ErrorCode, message: &str, topic: Option<&str>) -> Step {
        self.reply(protocol::error(code, message, topic)).await
    }

    async fn close(&mut self, code: CloseCode, reason: &'static str, within: Duration) -> String {
        let frame = CloseFrame { code, reason: reason.into() };
        match tokio::time::timeout(within, self.ws.close(Some(frame))).await {
            Ok(_) => format!("closed with {}: {reason}", u16::from(code)),
            Err(_) => format!("close {} not written within {within:?}; dropped", u16::from(code)),
        }
    }

    /// SPEC §6: write what is already queued, then close with 1013; drop
    /// the connection if that cannot be done within 10 s.
    async fn close_slow_consumer(&mut self) -> String {
        let conn = self.conn;
        // Boxed: a path taken once per slow consumer should not size the
        // future of every session.
        let drain = Box::pin(async {
            if let Some(rx) = self.outbound.as_mut() {
                while let Ok(message) = rx.try_recv() {
                    match message {
                        Outbound::Event(event) => {
                            for fragment in event_messages(&event) {
                                self.ws.feed(fragment).await?;
                            }
                        }
                        Outbound::Subscribed { topic, .. } => {
                            self.ws.feed(text(protocol::topic_reply("subscribed", topic))).await?
                        }
                        Outbound::Unsubscribed { topic } => {
                            self.ws.feed(text(protocol::topic_reply("unsubscribed", topic))).await?
                        }
                    }
                }
            }
            let frame =
                CloseFrame { code: CloseCode::Again, reason: "slow consumer: queue full; resume with since".into() };
            self.ws.close(Some(frame)).await
        });
        match tokio::time::timeout(SLOW_CLOSE_TIMEOUT, drain).await {
            Ok(_) => "slow consumer: closed with 1013".into(),
            Err(_) => {
                warn!(conn, "slow consumer did not take its close within 10s; dropping the connection");
                "slow consumer: dropped".into()
            }
        }
    }

    async fn on_ping_tick(&mut self, interval: Duration) -> Step {
        if self.last_heard.elapsed() >= interval * 2 {
            return Ok(Next::End("silent for two ping intervals; dropped".into()));
        }
        self.write([Message::Ping(Default::default())]).await.map(|()| Next::Continue)
    }

    async fn on_deadline(&mut self) -> Step {
        if self.claims.is_none() {
            return Ok(Next::Close(CloseCode::Policy, "authentication timeout"));
        }
        self.error(ErrorCode::TokenExpired, "token expired; send a fresh auth before exp", None).await?;
        Ok(Next::Close(CloseCode::Policy, "token expired"))
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Step {
        let message = match frame {
            None => return Ok(Next::End("client went away".into())),
            Some(Err(tungstenite::Error::Capacity(e))) => {
                warn!(conn = self.conn, error = %e, "message too big; closing with 1009");
                return Ok(Next::Close(CloseCode::Size, "message too big (64 KiB at most)"));
            }
            Some(Err(e)) => return Ok(Next::End(format!("protocol error: {e}"))),
            Some(Ok(message)) => message,
        };
        self.last_heard = Instant::now();
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                self.error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text", None).await
            }
            // tungstenite answers pings and close frames itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => Ok(Next::Continue),
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
            ClientMessage::Ping => self.reply(protocol::pong()).await,
            ClientMessage::Auth { token } => self.on_auth(&token).await,
            ClientMessage::Subscribe { topic, since } => self.on_subscribe(&topic, since).await,
            ClientMessage::Unsubscribe { topic } => self.on_unsubscribe(&topic).await,
        }
    }

    async fn on_auth(&mut self, token: &str) -> Step {
        match self.app.verifier.verify(token) {
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
        match self.claims {
            Some(current) if current.viewer.user_id != viewer.user_id => {
                return self.error(ErrorCode::Forbidden, "a fresh token must be for the same user (sub)", None).await;
            }
            Some(current) => {
                if current.viewer != viewer
                    && !self.app.hub.send(Command::UpdateViewer { conn: self.conn, viewer }).await
                {
                    return Err(Interrupted::Shutdown);
                }
            }
            None => {
                let (tx, rx) = mpsc::channel(self.app.settings.client_queue);
                let register = Command::Register { conn: self.conn, viewer, outbound: tx, kicked: self.kicked.clone() };
                if !self.app.hub.send(register).await {
                    return Err(Interrupted::Shutdown);
                }
                self.outbound = Some(rx);
            }
        }
        self.claims = Some(claims);
        let expires_in = claims.expires_at_time().duration_since(SystemTime::now()).unwrap_or_default();
        self.deadline = Instant::now() + expires_in;
        info!(conn = self.conn, user_id = %viewer.user_id, superuser = viewer.is_superuser, "authenticated");
        self.reply(protocol::authenticated(viewer.user_id, claims.expires_at_time())).await
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
        if let Some(deployment) = topic.deployment()
            && !claims.viewer.is_superuser
        {
            let audience = match self.app.pool.get().await {
                Ok(client) => events::deployment_audience(&client, deployment).await,
                Err(e) => Err(e.into()),
            };
            match audience {
                Ok(Some((owner, org))) if claims.viewer.can_see(owner, org) => {}
                Ok(_) => {
                    info!(conn = self.conn, user_id = %claims.viewer.user_id, deployment_id = %deployment, "subscription refused");
                    return self
                        .error(ErrorCode::Forbidden, "no such deployment, or not yours to see", Some(&topic_name))
                        .await;
                }
                Err(e) => {
                    warn!(conn = self.conn, error = %e, "permission check failed");
                    return self
                        .error(ErrorCode::Unavailable, "cannot check permission now; try again", Some(&topic_name))
                        .await;
                }
            }
        }
        self.topics.insert(topic);
        if !self.app.hub.send(Command::Subscribe { conn: self.conn, topic, since }).await {
            return Err(Interrupted::Shutdown);
        }
        debug!(conn = self.conn, topic = %topic_name, ?since, "subscribed");
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
        if !self.app.hub.send(Command::Unsubscribe { conn: self.conn, topic }).await {
            return Err(Interrupted::Shutdown);
        }
        Ok(Next::Continue)
    }

    /// Write one message from the hub and whatever else is already queued,
    /// with one flush.
    async fn deliver(&mut self, first: Outbound) -> Step {
        // Reused across deliveries, so a wake-up does not allocate.
        let mut pending = std::mem::take(&mut self.pending);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(message) = next.take() {
            taken += 1;
            match message {
                Outbound::Event(event) => pending.push(event),
                Outbound::Subscribed { topic, replay } => {
                    self.write_events(&mut pending, Some(protocol::topic_reply("subscribed", topic))).await?;
                    if let Some(replay) = replay {
                        // Boxed: a replay's future (event log queries) is large
                        // and rare; inline it would enlarge every session task.
                        Box::pin(self.replay(topic, *replay)).await?;
                    }
                }
                Outbound::Unsubscribed { topic } => {
                    self.write_events(&mut pending, Some(protocol::topic_reply("unsubscribed", topic))).await?;
                }
            }
            if taken < BATCH {
                next = self.outbound.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
        self.write_events(&mut pending, None).await?;
        self.pending = pending;
        Ok(Next::Continue)
    }

    /// Write `events` (emptying it), then `after` if given, in one flush.
    async fn write_events(&mut self, events: &mut Vec<Arc<Event>>, after: Option<String>) -> Result<(), Interrupted> {
        if events.is_empty() && after.is_none() {
            return Ok(());
        }
        // Fed straight from the shared frames: no allocation per recipient.
        if events.iter().any(|event| event.frame.len() > FRAGMENT_SIZE) {
            // Rare, and its iterator is larger: boxed, so it does not grow
            // the future every idle session keeps (measured: +0.5 KiB per
            // connection in bench S3 when inline).
            Box::pin(self.write(events.iter().flat_map(event_messages).chain(after.map(text)))).await?;
        } else {
            self.write(events.iter().map(event_frame).chain(after.map(text))).await?;
        }
        let now = Instant::now();
        self.app.metrics.observe_deliveries(events.drain(..).map(|event| now - event.received_at));
        Ok(())
    }

    async fn replay(&mut self, topic: Topic, replay: Replay) -> Result<(), Interrupted> {
        if let Some(log) = replay.from_log
            && let Err(e) = self.replay_from_log(topic, log).await
        {
            match e {
                ReplayError::Interrupted(stop) => return Err(stop),
                ReplayError::Db(e) => {
                    warn!(conn = self.conn, topic = %topic, error = %e, "replay from the event log failed");
                    let message = protocol::error(
                        ErrorCode::Unavailable,
                        "replay from the event log failed; subscribe again with since",
                        Some(&topic.to_string()),
                    );
                    self.write([text(message)]).await?;
                }
            }
        }
        let mut recent = replay.recent;
        self.write_events(&mut recent, None).await
    }

    async fn replay_from_log(&mut self, topic: Topic, log: LogReplay) -> Result<(), ReplayError> {
        let Some(viewer) = self.claims.map(|c| c.viewer) else { return Ok(()) };
        let client = self.app.pool.get().await.map_err(crate::db::DbError::from)?;
        if events::pruned_upto(&client).await? > log.since {
            self.write([text(protocol::topic_reply("resync", topic))]).await?;
        }
        let filter = events::LogFilter {
            deployment: topic.deployment(),
            kind: topic.kind(),
            snapshot: log.snapshot.as_deref(),
            also: &log.evicted,
        };
        let mut after = log.since;
        loop {
            let page = events::page_after(&client, after, &filter, REPLAY_PAGE).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.id;
            let mut owed: Vec<Arc<Event>> = page
                .into_iter()
                .filter(|e| !log.skip.contains(&e.id) && viewer.can_see(e.owner, e.organization_id))
                .map(Arc::new)
                .collect();
            self.write_events(&mut owed, None).await?;
        }
    }
}

enum ReplayError {
    Interrupted(Interrupted),
    Db(crate::db::DbError),
}

impl From<Interrupted> for ReplayError {
    fn from(stop: Interrupted) -> Self {
        ReplayError::Interrupted(stop)
    }
}

impl From<crate::db::DbError> for ReplayError {
    fn from(e: crate::db::DbError) -> Self {
        ReplayError::Db(e)
    }
}
