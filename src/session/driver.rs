//! The task that runs one session: it waits on the client, the hub's queue
//! for this connection, the ping timer, the authentication or expiry
//! deadline and shutdown; does the hub and database work the
//! [`Subscriber`] asks for; and writes what it says through the
//! [`Transport`]. What it writes keeps these promises, besides the core's:
//!
//! - Before the first event, a two-way client answers a ping sent right
//!   after `authenticated` (the fence), so a `subscribe` with `since` it
//!   sent before seeing `authenticated` is read first.
//! - While it waits for the database (a permission check, a `since`
//!   look-up, a replay's slot or page), it keeps reading the client: pongs
//!   and pings keep it alive, pings go out when due, a close ends it, and an
//!   unsubscribe of the topic waited for gives the wait up. Other requests
//!   wait, so their replies keep request order.
//! - A kicked slow consumer gets a gap-free prefix of what it was owed: a
//!   kick never interrupts a write, and what is queued is written before
//!   the close only when it follows on from what was written (not after a
//!   replay cut short). A write abandoned half-way (shutdown, silence,
//!   token expiry, the slow consumer's 10 s) is followed by nothing but a
//!   close, so a fragmented message is never interleaved with another.
//! - Every wait and write is raced against shutdown, the ping timeout,
//!   token expiry and the slow consumer's deadline.
//!
//! Why some awaits are boxed (`Box::pin`): a session task is idle almost
//! all of its life, and its future keeps room for the largest state of
//! everything it awaits inline. What is rare and large (handling a
//! request, a replay, database work, a close, the interrupt timers of a
//! write that has to wait) is boxed, so that it is allocated only while it
//! runs; an idle connection then costs what the loop itself holds (S3 in
//! BENCHMARKS.md measures it).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::core::{HubCall, Out, Step, Subscriber, Work};
use super::gate::{UserConnections, UserSlot};
use super::replay::Replaying;
use super::{Close, Endpoint, Flow, Incoming, Opening, ResumeAsk, Transport, TransportError};
use crate::auth::Claims;
use crate::db::events::Pages;
use crate::event::{Event, Topic};
use crate::hub::{ConnId, HubStopped, Outbound, QueueReceiver};
use crate::protocol::ClientMessage;

/// Without a token on the request, `auth` must come within this.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// A slow consumer's close must be written within this.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing handshake may take; on shutdown this must leave
/// time to exit within 5 s.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that does not answer the ping after `authenticated` gets its
/// events after this anyway.
const FENCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Queued messages taken per flush.
const BATCH: usize = 64;
/// Messages taken between two looks for a kick.
const KICK_CHECK: usize = 16;
/// Items written per flush: a batch and the replies among it in one; a
/// long merge of held events in several, with a kick checked between them.
const WRITE_CHUNK: usize = 2 * BATCH;
/// Requests waiting behind the hub's answers or a replay: past this, the
/// client is not read (TCP pushes back on a client that pipelines).
const MAX_HELD_REPLIES: usize = 256;
/// A deadline that never comes (tokio's own "far future").
const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Why a session stops what it is doing.
#[derive(Debug)]
enum Stop {
    /// Close with this (a handshake).
    Close(Close),
    /// The client went away, or broke the protocol.
    Gone(String),
    /// A write failed.
    Broken(TransportError),
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

impl From<HubStopped> for Stop {
    fn from(_: HubStopped) -> Stop {
        Stop::Shutdown
    }
}

enum Wake {
    Shutdown,
    Kicked,
    Incoming(Incoming),
    Outbound(Option<Outbound>),
    PingTick,
    Deadline,
    FenceTimeout,
}

/// What a wait for the database came to.
enum Waited<T> {
    Done(T),
    /// The client unsubscribed from the topic waited for.
    GivenUp,
}

/// One session, to spawn: it runs until the connection ends, then says how
/// in one log line.
pub fn run<T: Transport>(
    transport: T,
    endpoint: Arc<Endpoint>,
    conn: ConnId,
    opening: Opening,
    user: Option<UserSlot>,
    remote: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let now = Instant::now();
    let interrupts = Interrupts {
        shutdown: endpoint.shutdown.clone(),
        kicked: CancellationToken::new(),
        silent_at: now + silence(T::TWO_WAY, endpoint.ping_interval),
        deadline: now + AUTH_TIMEOUT,
        slow_deadline: None,
    };
    let mut driver = Driver {
        conn,
        remote,
        endpoint,
        transport,
        core: Subscriber::new(conn),
        outbound: None,
        interrupts,
        user,
        last_ping: now,
        fence: None,
        broken: false,
        cut: false,
        stashed: VecDeque::new(),
    };
    // Built here, not in an `async fn` taking these as arguments, and run
    // by reference: an async fn keeps its arguments beside what it makes
    // of them, and the task would hold two of each.
    let opening = Box::new(opening);
    async move { driver.run(opening).await }
}

/// How long a client may stay silent: two ping intervals, or for ever for
/// one that cannot answer pings.
fn silence(two_way: bool, ping_interval: Duration) -> Duration {
    if two_way { ping_interval * 2 } else { NEVER }
}

struct Driver<T> {
    conn: ConnId,
    remote: SocketAddr,
    endpoint: Arc<Endpoint>,
    transport: T,
    core: Subscriber,
    /// Set once authenticated and registered with the hub.
    outbound: Option<QueueReceiver>,
    /// Shutdown, the kick, silence and the deadlines: kept current here,
    /// raced against every write and wait.
    interrupts: Interrupts,
    /// This connection, counted against its user's.
    user: Option<UserSlot>,
    last_ping: Instant,
    /// Until when events wait for the pong to the ping after `authenticated`.
    fence: Option<Instant>,
    /// A write was abandoned half-way: only a close may follow.
    broken: bool,
    /// A replay was cut short by a kick: nothing queued after it may be
    /// written.
    cut: bool,
    /// What the client sent while a wait for the database went on, handled
    /// after it.
    stashed: VecDeque<Incoming>,
}

async fn next_outbound(outbound: &mut Option<QueueReceiver>) -> Option<Outbound> {
    match outbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await
}

/// What may interrupt the session's writes and waits.
#[derive(Clone)]
struct Interrupts {
    shutdown: CancellationToken,
    /// Cancelled by the hub when the client's queue is full (or by the
    /// session, for events held behind a resume).
    kicked: CancellationToken,
    /// Silent since two ping intervals.
    silent_at: Instant,
    /// The authentication deadline, then the token's expiry.
    deadline: Instant,
    /// When the slow consumer's close must be done by.
    slow_deadline: Option<Instant>,
}

impl Interrupts {
    /// The first interrupt to come. One timer, for the earliest deadline.
    async fn wait(self) -> Stop {
        let Interrupts { shutdown, kicked, silent_at, deadline, mut slow_deadline } = self;
        loop {
            let mut next = (silent_at, Stop::Silent);
            if deadline < next.0 {
                next = (deadline, Stop::Deadline);
            }
            if let Some(at) = slow_deadline.filter(|at| *at < next.0) {
                next = (at, Stop::SlowTimeout);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Stop::Shutdown,
                _ = sleep_until(next.0) => return next.1,
                _ = kicked.cancelled(), if slow_deadline.is_none() => {
                    slow_deadline = Some(Instant::now() + SLOW_CLOSE_TIMEOUT);
                }
            }
        }
    }
}

/// Futures polled only after one of them woke the task: they are polled
/// with a waker of the gate's own, which notes the wake-up and wakes the
/// task. What wakes a session is nearly always its queue or its client;
/// its shutdown, kick and timers are then not polled at all.
struct Gate {
    wakes: Arc<GateWaker>,
    /// `wakes`, as a waker: made once.
    waker: Waker,
    /// The task's waker as last registered in `wakes.task`: it stays there
    /// until a wake-up takes it, and a wake-up also sets `woken`.
    registered: Option<Waker>,
}

struct GateWaker {
    /// Woken since last polled (or not polled yet).
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Gate {
        let wakes = Arc::new(GateWaker { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Gate { waker: Waker::from(Arc::clone(&wakes)), wakes, registered: None }
    }
}

impl Gate {
    /// Poll them at the next poll (something changed that they must see).
    fn open(&self) {
        self.wakes.woken.store(true, SeqCst);
    }

    /// `poll` them if they woke the task since they were last polled.
    fn poll<T>(&mut self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        if !self.wakes.woken.swap(false, SeqCst) {
            // No wake-up took the waker registered last: registered again
            // only if the task's waker changed (an atomic swap saved on
            // nearly every poll). A wake-up after the flag was read finds
            // a waker there.
            if !self.registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                self.wakes.task.register(cx.waker());
                self.registered = Some(cx.waker().clone());
                // A wake-up before this registration found none: look again.
                if self.wakes.woken.swap(false, SeqCst) {
                    return self.poll_now(poll);
                }
            }
            return Poll::Pending;
        }
        // Woken: that wake-up took the waker; registered before the
        // futures are polled, so one that fires meanwhile wakes the task.
        self.wakes.task.register(cx.waker());
        if !self.registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            self.registered = Some(cx.waker().clone());
        }
        self.poll_now(poll)
    }

    fn poll_now<T>(&self, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let outcome = poll(&mut Context::from_waker(&self.waker));
        if outcome.is_ready() {
            // Only the first ready one was taken: the others are looked at
            // again next time.
            self.open();
        }
        outcome
    }
}

/// Run `work` unless one of `interrupts` comes first. Most work is done at
/// once; only work that has to wait gets the interrupts' timers (boxed).
async fn race<F: Future>(mut work: Pin<&mut F>, interrupts: &Interrupts) -> Result<F::Output, Stop> {
    if let Poll::Ready(done) = futures_util::poll!(work.as_mut()) {
        return Ok(done);
    }
    let interrupts = Box::pin(interrupts.clone().wait());
    tokio::select! {
        biased;
        done = work => Ok(done),
        stop = interrupts => Err(stop),
    }
}

/// The expiry of `claims` as a deadline.
fn expiry(claims: Claims) -> Instant {
    let left = claims.expires_at_time().duration_since(SystemTime::now()).unwrap_or_default();
    Instant::now() + left.min(NEVER)
}

/// Whether `text` unsubscribes from `topic`.
fn unsubscribes(text: &str, topic: Topic) -> bool {
    matches!(ClientMessage::parse(text), Ok(ClientMessage::Unsubscribe { topic: name }) if Topic::parse(&name) == Some(topic))
}

impl<T: Transport> Driver<T> {
    async fn run(&mut self, opening: Box<Opening>) {
        let (conn, remote) = (self.conn, self.remote);
        debug!(conn, %remote, transport = T::NAME, authenticated = opening.claims.is_some(), "connected");
        let reason = match Box::pin(self.open(*opening)).await {
            Ok(()) => self.serve().await,
            Err(stop) => Box::pin(self.finish(stop)).await,
        };
        if self.outbound.is_some() {
            // On shutdown the hub is gone already, and so is the registration.
            let _ = self.endpoint.hub.unregister(conn).await;
        }
        let user_id = self.core.claims().map(|c| c.viewer.user_id.to_string()).unwrap_or_default();
        info!(conn, %remote, transport = T::NAME, user_id, reason, "connection closed");
    }

    async fn serve(&mut self) -> String {
        let interval = self.endpoint.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let shutdown = self.endpoint.shutdown.clone();
        let kicked = self.interrupts.kicked.clone();
        // Made once and kept across wake-ups: a fresh `cancelled()` joins
        // the token's waiter list and a fresh sleep registers with the
        // timer wheel, each a lock, undone (another lock) when dropped.
        let mut shutdown_wait = std::pin::pin!(shutdown.cancelled());
        let mut kicked_wait = std::pin::pin!(kicked.cancelled());
        let mut timer_at = self.interrupts.deadline;
        let mut timer_wait = std::pin::pin!(tokio::time::sleep_until(timer_at.into()));
        // And polled only when one of them woke the task: a token's poll
        // locks the token (the shutdown token is shared by every session),
        // and a session wakes for every event.
        let mut gate = Gate::default();
        loop {
            // Requests wait behind a resume at connect: the hub answers it first.
            let resuming = self.core.resuming();
            let step = if !resuming && let Some(incoming) = self.stashed.pop_front() {
                Box::pin(self.on_incoming(incoming)).await
            } else {
                let reading = self.core.replies_owed() < MAX_HELD_REPLIES && self.stashed.len() < MAX_HELD_REPLIES;
                let draining = self.fence.is_none();
                // One timer for the deadline and the fence, whichever is first.
                let (timer, fence_first) = match self.fence {
                    Some(until) if until < self.interrupts.deadline => (until, true),
                    _ => (self.interrupts.deadline, false),
                };
                if timer != timer_at {
                    timer_at = timer;
                    timer_wait.as_mut().reset(timer.into());
                    gate.open();
                }
                let interrupts = std::future::poll_fn(|cx| {
                    gate.poll(cx, |cx| {
                        if shutdown_wait.as_mut().poll(cx).is_ready() {
                            Poll::Ready(Wake::Shutdown)
                        } else if kicked_wait.as_mut().poll(cx).is_ready() {
                            Poll::Ready(Wake::Kicked)
                        } else if timer_wait.as_mut().poll(cx).is_ready() {
                            Poll::Ready(if fence_first { Wake::FenceTimeout } else { Wake::Deadline })
                        } else if ping.poll_tick(cx).is_ready() {
                            Poll::Ready(Wake::PingTick)
                        } else {
                            Poll::Pending
                        }
                    })
                });
                // Biased: timers first, so a busy queue cannot starve them;
                // the client before the queue, so a request already sent
                // is read before more events go out.
                let wake = tokio::select! {
                    biased;
                    wake = interrupts => wake,
                    incoming = self.transport.recv(), if reading => Wake::Incoming(incoming),
                    message = next_outbound(&mut self.outbound), if draining => Wake::Outbound(message),
                };
                match wake {
                    Wake::Shutdown => Err(Stop::Shutdown),
                    Wake::Kicked => Err(Stop::Kicked),
                    // The hub drops a queue's sender when it kicks the client,
                    // and when it stops for shutdown.
                    Wake::Outbound(None) if self.interrupts.kicked.is_cancelled() => Err(Stop::Kicked),
                    Wake::Outbound(None) => Err(Stop::Shutdown),
                    Wake::Incoming(incoming) if resuming => self.stash(incoming),
                    Wake::Incoming(incoming) => Box::pin(self.on_incoming(incoming)).await,
                    Wake::Outbound(Some(message)) => self.deliver(message).await,
                    Wake::PingTick => self.on_ping_tick().await,
                    Wake::Deadline => Err(Stop::Deadline),
                    Wake::FenceTimeout => {
                        debug!(conn = self.conn, "no pong after authenticated; delivering anyway");
                        self.fence = None;
                        Ok(())
                    }
                }
            };
            if let Err(stop) = step {
                return Box::pin(self.finish(stop)).await;
            }
        }
    }

    /// A session that starts authenticated registers at once (and makes
    /// the resume its request names); one that sends `auth` later makes it
    /// then.
    async fn open(&mut self, opening: Opening) -> Result<(), Stop> {
        self.core.ask_resume(opening.resume);
        let Some(claims) = opening.claims else { return Ok(()) };
        self.register(claims).await
    }

    /// What the client sent while a resume at connect waits: control
    /// frames count, requests wait their turn.
    fn stash(&mut self, incoming: Incoming) -> Result<(), Stop> {
        if let Some(request) = self.control(incoming)? {
            self.stashed.push_back(request);
        }
        Ok(())
    }

    /// How the session ends, for the log line; closes as it should.
    async fn finish(&mut self, stop: Stop) -> String {
        match stop {
            Stop::Close(close) => self.close(close, CLOSE_TIMEOUT).await,
            Stop::Gone(reason) => reason,
            Stop::Broken(e) => format!("write failed: {e}"),
            Stop::Shutdown => self.close(Close::SHUTDOWN, CLOSE_TIMEOUT).await,
            Stop::Kicked => self.close_slow_consumer().await,
            Stop::SlowTimeout => {
                warn!(conn = self.conn, "slow consumer did not take its close within 10s; dropping the connection");
                "slow consumer: dropped".into()
            }
            Stop::Silent => {
                let outcome = self.close(Close::SILENT, CLOSE_TIMEOUT).await;
                format!("silent for two ping intervals: {outcome}")
            }
            Stop::Deadline if self.core.claims().is_none() => self.close(Close::AUTH_TIMEOUT, CLOSE_TIMEOUT).await,
            Stop::Deadline => {
                if !self.broken {
                    self.core.token_expired();
                    // The close follows whether or not the error could be written.
                    let _ = self.flush_out().await;
                }
                self.close(Close::TOKEN_EXPIRED, CLOSE_TIMEOUT).await
            }
        }
    }

    async fn close(&mut self, close: Close, within: Duration) -> String {
        self.transport.close(close, within).await
    }

    /// Write what is already queued when it follows on from what was
    /// written, then close with 1013; drop the connection if that cannot
    /// be done within 10 s.
    async fn close_slow_consumer(&mut self) -> String {
        let until = *self.interrupts.slow_deadline.get_or_insert_with(|| Instant::now() + SLOW_CLOSE_TIMEOUT);
        // After a replay cut short, or with events held for a resume, the
        // queue does not follow on from what the client has.
        if !self.cut && !self.broken && !self.core.holds_events() {
            match self.drain_queue().await {
                Ok(()) => {}
                Err(Stop::SlowTimeout) => {
                    warn!(conn = self.conn, "slow consumer did not take its queue within 10s; dropping the connection");
                    return "slow consumer: dropped".into();
                }
                Err(_) => return "slow consumer: dropped".into(),
            }
        }
        let within = until.saturating_duration_since(Instant::now());
        let outcome = self.close(Close::SLOW_CONSUMER, within).await;
        if outcome.starts_with("closed") { "slow consumer: closed with 1013".into() } else { outcome }
    }

    /// Write the queued messages, stopping at one whose answer needs the
    /// database (its replay or look-up would not follow on).
    async fn drain_queue(&mut self) -> Result<(), Stop> {
        while let Some(message) = self.outbound.as_mut().and_then(|rx| rx.try_recv()) {
            if self.core.outbound(message).is_some() {
                break;
            }
        }
        self.flush_out().await
    }

    async fn on_ping_tick(&mut self) -> Result<(), Stop> {
        if Instant::now() >= self.interrupts.silent_at {
            return Err(Stop::Silent);
        }
        self.ping(None).await
    }

    async fn on_incoming(&mut self, incoming: Incoming) -> Result<(), Stop> {
        match self.control(incoming)? {
            Some(Incoming::Text(text)) => {
                let step = self.core.request(&text, &self.endpoint.verifier);
                self.step(step).await
            }
            Some(_) => {
                self.core.binary_frame();
                self.flush_out().await
            }
            None => Ok(()),
        }
    }

    /// What the client sent says it is there; control frames are handled
    /// here, requests come back.
    fn control(&mut self, incoming: Incoming) -> Result<Option<Incoming>, Stop> {
        match incoming {
            Incoming::Refused(close) => {
                warn!(conn = self.conn, code = close.code, reason = close.reason, "closing on what the client sent");
                return Err(Stop::Close(close));
            }
            Incoming::Gone(reason) => return Err(Stop::Gone(reason)),
            _ => self.interrupts.silent_at = Instant::now() + silence(T::TWO_WAY, self.endpoint.ping_interval),
        }
        match incoming {
            Incoming::Pong(payload) => {
                if payload == Some(self.conn) {
                    self.fence = None;
                }
                Ok(None)
            }
            Incoming::Alive => Ok(None),
            request => Ok(Some(request)),
        }
    }

    /// Do what a request needs, then write its answer.
    async fn step(&mut self, step: Step) -> Result<(), Stop> {
        match step {
            Step::Done => {}
            Step::AuthenticationFailed => {
                self.flush_out().await?;
                return Err(Stop::Close(Close::AUTH_FAILED));
            }
            Step::Register(claims) => return self.register(claims).await,
            Step::Reauthenticate(claims) => {
                if self.core.claims().is_some_and(|current| current.viewer != claims.viewer) {
                    self.endpoint.hub.update_viewer(self.conn, claims.viewer).await?;
                }
                self.core.authenticated(claims);
                self.interrupts.deadline = expiry(claims);
            }
            Step::CheckPermission { topic, since } => {
                let (Some(claims), endpoint) = (self.core.claims(), Arc::clone(&self.endpoint)) else {
                    return Ok(());
                };
                let Waited::Done(answer) =
                    self.wait_reading(endpoint.log.may_watch(claims.viewer, topic), None).await?
                else {
                    return Ok(());
                };
                if let Some(call) = self.core.permitted(topic, since, answer) {
                    self.call_hub(call).await?;
                }
            }
            Step::Hub(call) => self.call_hub(call).await?,
        }
        self.flush_out().await
    }

    /// A first token: count the connection against its user's, register
    /// with the hub, answer `authenticated`, and ping for the fence.
    async fn register(&mut self, claims: Claims) -> Result<(), Stop> {
        if self.user.is_none() {
            match UserConnections::acquire(&self.endpoint.users, claims.viewer.user_id) {
                Some(user) => self.user = Some(user),
                None => {
                    let max = self.endpoint.users.max();
                    warn!(conn = self.conn, user_id = %claims.viewer.user_id, max, "auth refused: the user's connection limit reached");
                    self.core.too_many_connections(max);
                    self.flush_out().await?;
                    return Err(Stop::Close(Close::TOO_MANY));
                }
            }
        }
        let ask = self.core.take_resume();
        // A resume places the owner feed too: nothing of it is queued before.
        let resuming = ask.as_ref().is_some_and(|ask| ask.bad_since.is_none());
        let hub = &self.endpoint.hub;
        let (capacity, kicked) = (self.endpoint.client_queue, self.interrupts.kicked.clone());
        let queue = hub.register(self.conn, claims.viewer, capacity, kicked, resuming).await?;
        self.outbound = Some(queue);
        self.core.authenticated(claims);
        self.interrupts.deadline = expiry(claims);
        self.flush_out().await?;
        if let Some(ask) = ask {
            Box::pin(self.resume(claims, ask)).await?;
        }
        if T::TWO_WAY {
            // The fence: the client's pong to this ping comes after
            // anything it sent before it saw `authenticated`.
            self.fence = Some(Instant::now() + FENCE_TIMEOUT);
            self.ping(Some(self.conn)).await?;
        }
        Ok(())
    }

    /// A resume at connect: its topics read and checked, then placed by
    /// the hub; its answer comes through the queue.
    async fn resume(&mut self, claims: Claims, ask: ResumeAsk) -> Result<(), Stop> {
        let Some(mut resuming) = self.core.start_resume(ask) else { return self.flush_out().await };
        let endpoint = Arc::clone(&self.endpoint);
        for topic in resuming.to_check() {
            if let Waited::Done(answer) = self.wait_reading(endpoint.log.may_watch(claims.viewer, topic), None).await? {
                resuming.permit(self.conn, topic, answer);
            }
        }
        let call = self.core.resume(resuming);
        self.call_hub(call).await
    }

    async fn call_hub(&mut self, call: HubCall) -> Result<(), Stop> {
        let hub = &self.endpoint.hub;
        match call {
            HubCall::Subscribe(topic, since) => hub.subscribe(self.conn, topic, since).await?,
            HubCall::Unsubscribe(topic) => hub.unsubscribe(self.conn, topic).await?,
            HubCall::Resume(topics, since) => hub.resume(self.conn, topics, since).await?,
        }
        Ok(())
    }

    /// Take one message from the hub and whatever else is already queued,
    /// and write them with one flush.
    async fn deliver(&mut self, first: Outbound) -> Result<(), Stop> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(message) = next.take() {
            taken += 1;
            if let Some(work) = self.core.outbound(message) {
                self.flush_out().await?;
                Box::pin(self.work(work)).await?;
            }
            // A kick is looked for every few messages (a token's check is
            // a lock): what is taken after it was queued before it, so it
            // is still part of the gap-free prefix the kick lets through.
            if taken < BATCH && (taken % KICK_CHECK != 0 || !self.interrupts.kicked.is_cancelled()) {
                next = self.outbound.as_mut().and_then(|rx| rx.try_recv());
            }
        }
        self.flush_out().await?;
        if self.core.held_live() > self.endpoint.client_queue {
            // Events held behind a resume count against the queue too.
            warn!(
                conn = self.conn,
                held = self.core.held_live(),
                "slow consumer: events held behind a resume; closing with 1013"
            );
            self.interrupts.kicked.cancel();
        }
        Ok(())
    }

    /// The database work an answer of the hub needs, then what follows it.
    async fn work(&mut self, work: Work) -> Result<(), Stop> {
        let endpoint = Arc::clone(&self.endpoint);
        match work {
            Work::LookUp { topic, since } => {
                // Looked up only once authenticated (the hub answers registered connections).
                let Some(viewer) = self.core.claims().map(|c| c.viewer) else { return self.flush_out().await };
                match self.wait_reading(endpoint.log.look_up(viewer, since), Some(topic)).await? {
                    Waited::Done(answer) => {
                        if let Some(call) = self.core.looked_up(topic, since, answer) {
                            self.call_hub(call).await?;
                        }
                    }
                    Waited::GivenUp => self.core.look_up_abandoned(topic, since),
                }
            }
            Work::Replay { topic, pages, recent } => {
                let mut replaying = Replaying::new(pages);
                let write = |core: &mut Subscriber, pruned, events: &mut _| core.replay_page(topic, pruned, events);
                let written = self.write_pages(replaying.pages(), Some(topic), &endpoint, write).await?;
                let outcome = if written { Ok(replaying.sent()) } else { Err(replaying.sent()) };
                if let Some(call) = self.core.replayed(topic, recent, outcome) {
                    self.call_hub(call).await?;
                }
            }
            Work::LookUpResume { since } => {
                let Some(viewer) = self.core.claims().map(|c| c.viewer) else { return self.flush_out().await };
                if let Waited::Done(answer) = self.wait_reading(endpoint.log.look_up(viewer, since), None).await? {
                    match self.core.resume_looked_up(since, answer) {
                        Some(call) => self.call_hub(call).await?,
                        None => {
                            self.flush_out().await?;
                            return Err(Stop::Close(Close::RESUME_FAILED));
                        }
                    }
                }
            }
            Work::ResumeReplay { topics, mut pages, recent } => {
                let write = |core: &mut Subscriber, pruned, events: &mut _| core.resume_page(&topics, pruned, events);
                let written = self.write_pages(&mut pages, None, &endpoint, write).await?;
                let outcome = if written { Ok(pages.replayed_topics()) } else { Err(()) };
                if !self.core.resume_replayed(recent, outcome) {
                    self.flush_out().await?;
                    return Err(Stop::Close(Close::RESUME_FAILED));
                }
            }
        }
        self.flush_out().await
    }

    /// Write the pages of a replay from the event log as they come, each
    /// through `write` before the next is read: a topic's replay, or a
    /// resume at connect's (`watched` is then `None`: an unsubscribe of a
    /// topic gives up only that topic's wait). `Ok(false)`: the log failed
    /// part-way.
    async fn write_pages(
        &mut self,
        pages: &mut Pages,
        watched: Option<Topic>,
        endpoint: &Endpoint,
        write: impl Fn(&mut Subscriber, bool, &mut Vec<Arc<Event>>),
    ) -> Result<bool, Stop> {
        loop {
            self.stop_if_kicked()?;
            let mut page = match self.wait_reading(endpoint.log.next_page(pages), watched).await? {
                Waited::GivenUp | Waited::Done(Ok(None)) => return Ok(true),
                Waited::Done(Err(e)) => {
                    let replay = watched.map_or_else(|| "resume at connect".to_string(), |topic| topic.to_string());
                    warn!(conn = self.conn, replay, error = %e, "replay from the event log failed");
                    return Ok(false);
                }
                Waited::Done(Ok(Some(page))) => page,
            };
            write(&mut self.core, page.pruned, &mut page.events);
            self.flush_out().await?;
            // The page's share of the memory limit is held until it is written.
            drop(page);
        }
    }

    /// Between two parts of a replay: a kick cuts it short, and nothing
    /// queued after it may then be written.
    fn stop_if_kicked(&mut self) -> Result<(), Stop> {
        if self.interrupts.kicked.is_cancelled() {
            self.cut = true;
            return Err(Stop::Kicked);
        }
        Ok(())
    }

    /// Wait for `work` (a database query) while reading the client: pongs
    /// and pings keep it alive and pings go out when due; a close ends the
    /// session; an unsubscribe of `topic` gives the wait up. Requests wait
    /// in `stashed`, to keep their replies in order.
    async fn wait_reading<F: Future>(&mut self, work: F, topic: Option<Topic>) -> Result<Waited<F::Output>, Stop> {
        let mut work = std::pin::pin!(work);
        if let Poll::Ready(done) = futures_util::poll!(&mut work) {
            return Ok(Waited::Done(done));
        }
        loop {
            let interrupts = Box::pin(self.interrupts.clone().wait());
            let ping_at = self.last_ping + self.endpoint.ping_interval;
            let reading = self.stashed.len() < MAX_HELD_REPLIES;
            let incoming = tokio::select! {
                biased;
                done = &mut work => return Ok(Waited::Done(done)),
                stop = interrupts => return Err(stop),
                _ = sleep_until(ping_at) => None,
                incoming = self.transport.recv(), if reading => Some(incoming),
            };
            let Some(incoming) = incoming else {
                self.ping(None).await?;
                continue;
            };
            if let Some(request) = self.control(incoming)? {
                let gives_up =
                    matches!((&request, topic), (Incoming::Text(text), Some(topic)) if unsubscribes(text, topic));
                self.stashed.push_back(request);
                if gives_up {
                    return Ok(Waited::GivenUp);
                }
            }
        }
    }

    async fn ping(&mut self, payload: Option<u64>) -> Result<(), Stop> {
        self.last_ping = Instant::now();
        if self.broken {
            return Err(Stop::SlowTimeout);
        }
        let outcome = {
            let ping = std::pin::pin!(self.transport.ping(payload));
            race(ping, &self.interrupts).await
        };
        self.written(outcome.map(|sent| sent.map(|()| Flow::Continue)))
    }

    /// Write `core.out` (emptying it), in chunks when it is long.
    async fn flush_out(&mut self) -> Result<(), Stop> {
        let len = self.core.out.len();
        let mut start = 0;
        let mut outcome = Ok(());
        while start < len && outcome.is_ok() {
            // A kick cuts a long write (a merge of held events) between
            // chunks, unless this is the slow consumer's own last drain.
            if start > 0 && self.interrupts.kicked.is_cancelled() && self.interrupts.slow_deadline.is_none() {
                outcome = self.stop_if_kicked();
                break;
            }
            let end = len.min(start + WRITE_CHUNK);
            outcome = self.write(start..end).await;
            if outcome.is_ok() {
                let now = Instant::now();
                let events = self.core.out[start..end].iter().filter_map(|out| match out {
                    Out::Event(event) => Some(now - event.received_at),
                    Out::Reply(_) => None,
                });
                self.endpoint.metrics.observe_deliveries(events);
            }
            start = end;
        }
        self.core.out.clear();
        outcome
    }

    /// Write these items and flush, unless an interrupt comes first; an
    /// interrupted write leaves the connection fit only for a close.
    async fn write(&mut self, range: Range<usize>) -> Result<(), Stop> {
        if self.broken {
            return Err(Stop::SlowTimeout);
        }
        let outcome = {
            let send = std::pin::pin!(self.transport.send(&self.core.out[range]));
            race(send, &self.interrupts).await
        };
        self.written(outcome)
    }

    fn written(&mut self, outcome: Result<Result<Flow, TransportError>, Stop>) -> Result<(), Stop> {
        let result = match outcome {
            Ok(Ok(Flow::Continue)) => return Ok(()),
            Ok(Ok(Flow::End(reason))) => return Err(Stop::Close(Close { code: 1011, reason })),
            Ok(Err(e)) => Err(Stop::Broken(e)),
            Err(stop) => Err(stop),
        };
        self.broken = true;
        result
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    /// What the serve loop does: its interrupts, polled through the gate,
    /// raced with something that wakes the task far more often.
    #[tokio::test(start_paused = true)]
    async fn the_gate_sees_each_interrupt_however_often_the_task_wakes_for_other_things() {
        let token = CancellationToken::new();
        let mut cancelled = std::pin::pin!(token.cancelled());
        let start = tokio::time::Instant::now();
        let mut timer = std::pin::pin!(tokio::time::sleep_until(start + Duration::from_millis(50)));
        let mut gate = Gate::default();
        let mut seen = Vec::new();
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(120)).await;
                token.cancel();
            })
        };
        for _ in 0..1_000 {
            let interrupts = poll_fn(|cx| {
                gate.poll(cx, |cx| {
                    if cancelled.as_mut().poll(cx).is_ready() {
                        Poll::Ready("cancelled")
                    } else if timer.as_mut().poll(cx).is_ready() {
                        Poll::Ready("timer")
                    } else {
                        Poll::Pending
                    }
                })
            });
            let woke = tokio::select! {
                biased;
                what = interrupts => what,
                _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
            };
            seen.push((woke, start.elapsed().as_millis()));
            if woke == "timer" {
                // Moved out of the way, as the serve loop does after a fence.
                timer.as_mut().reset(start + Duration::from_secs(3600));
                gate.open();
            } else {
                break;
            }
        }
        assert_eq!(seen, vec![("timer", 50), ("cancelled", 120)], "each seen once, when it fired");
        canceller.await.unwrap();
    }

    #[test]
    fn the_gate_polls_nothing_until_something_it_polled_wakes() {
        let mut gate = Gate::default();
        let polled = std::cell::Cell::new(0);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut poll = || {
            gate.poll(&mut cx, |cx| {
                polled.set(polled.get() + 1);
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            })
        };
        assert!(poll().is_pending());
        assert_eq!(polled.get(), 1, "polled at first");
        // The inner future woke the gate's waker while polled: polled again.
        assert!(poll().is_pending());
        assert_eq!(polled.get(), 2);
        let mut quiet = Gate::default();
        let mut count = 0;
        for _ in 0..3 {
            let _ = quiet.poll(&mut cx, |_| {
                count += 1;
                Poll::<()>::Pending
            });
        }
        assert_eq!(count, 1, "nothing woke it: polled once");
        quiet.open();
        let _ = quiet.poll(&mut cx, |_| {
            count += 1;
            Poll::<()>::Pending
        });
        assert_eq!(count, 2, "opened: polled again");
    }
}
