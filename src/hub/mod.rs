//! Routing and fan-out: who receives which event. Knows nothing about
//! sockets: each connection is a bounded queue of [`Outbound`] messages.
//!
//! The hub is one task that owns all routing state. Events (from the event
//! source) and requests (from sessions, through [`HubHandle`]) arrive on
//! two channels and are handled one at a time, so a subscription and the
//! events around it are always seen in one order: that is what makes
//! `since` replay gap-free.
//!
//! - `routing`: the delivery rule and the subscriber indexes;
//! - `resume`: the history and where each `since` falls, for a `subscribe`
//!   and for a resume at connect (the owner feed and every topic placed at
//!   one point, [`HubHandle::resume`]).
//!
//! The hub never waits on a client. A connection whose queue is full is a
//! slow consumer: it is dropped from routing and its session is told to
//! close with 1013 after what is already queued.

mod queue;
mod resume;
mod routing;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::queue::{QueueReceiver, QueueSender, Refusal, queue};
use self::resume::{Deferral, Deferred, Place, Plan, Timeline};
use self::routing::{Conn, Routes};
use crate::auth::Viewer;
use crate::event::{Event, Topic};
use crate::history::History;
use crate::metrics::Metrics;

pub type ConnId = u64;

/// What the feed hands the hub, in the log's id order (commit order).
#[derive(Debug)]
pub enum Arrival {
    Event(Event),
    /// Every id up to this one has been handed over or can no longer
    /// commit: first when the feed starts (the resume cursor while nothing
    /// came yet), then whenever it goes past ids that will never commit.
    Through(i64),
    /// The log's ids started again, below what was handed over: the
    /// history is dropped, and this is the new `Through`.
    Restarted(i64),
}

/// What sessions ask of the hub, through [`HubHandle`]'s methods.
#[derive(Debug)]
enum Command {
    Register { conn: ConnId, viewer: Viewer, outbound: QueueSender, kicked: CancellationToken, resuming: bool },
    UpdateViewer { conn: ConnId, viewer: Viewer },
    Subscribe { conn: ConnId, topic: Topic, since: Option<Since> },
    Resume { conn: ConnId, topics: Vec<Topic>, since: Option<Since> },
    Unsubscribe { conn: ConnId, topic: Topic },
    Unregister { conn: ConnId },
}

/// A `since` and what the event log says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Not looked up: all the hub needs unless it is newer than what was fed.
    Unchecked(i64),
    /// Looked up: `newest` is the last id the log gave out.
    Checked { id: i64, newest: i64 },
}

impl Since {
    pub fn id(self) -> i64 {
        match self {
            Since::Unchecked(id) | Since::Checked { id, .. } => id,
        }
    }
}

/// What a session's queue carries. Replies to (un)subscribe travel in the
/// same queue as events, so they keep their place among them. Every queue
/// slot is the size of this enum, and a connection's ring keeps room for
/// its backlog ([`queue`]): the rare replies are boxed so that a slot stays
/// 24 bytes.
#[derive(Debug)]
pub enum Outbound {
    Event(Arc<Event>),
    Subscribed(Box<Subscribed>),
    /// `since` is newer than anything fed here: look it up in the event
    /// log and subscribe again with the answer.
    LookUp(Box<LookUp>),
    /// The answer to a resume at connect ([`HubHandle::resume`]).
    Resumed(Box<Resumed>),
    /// The `since` of a resume at connect is newer than anything fed here:
    /// look it up and resume again with the answer.
    ResumeLookUp(i64),
    Unsubscribed {
        topic: Topic,
    },
}

#[derive(Debug)]
pub struct Subscribed {
    pub topic: Topic,
    /// The subscription's resume cursor (the `event_id` of `subscribed`).
    pub cursor: i64,
    pub replay: Option<Replay>,
}

/// A resume at connect placed: the owner feed and `topics` deliver from
/// one point of the feed, `cursor`, and `replay` is what the union of them
/// owes after `since`, once each, in commit order.
#[derive(Debug)]
pub struct Resumed {
    pub topics: Vec<Topic>,
    pub cursor: i64,
    pub replay: Option<Replay>,
}

#[derive(Debug)]
pub struct LookUp {
    pub topic: Topic,
    pub since: i64,
}

/// The events a `subscribe` with `since` owes the client, oldest first.
#[derive(Debug, Default)]
pub struct Replay {
    /// `resync` comes first: events after `since` may be gone.
    pub resync: bool,
    /// Then, when `since` is older than the history: events to read from
    /// the event log.
    pub from_log: Option<LogReplay>,
    /// Then these, from the history, in commit order.
    pub recent: Vec<Arc<Event>>,
}

/// The events of the log after `since` and before `before` (by id, which
/// is commit order): what precedes the history. The history has the rest.
#[derive(Debug)]
pub struct LogReplay {
    pub since: i64,
    pub before: i64,
    /// Ids below `before` that the history holds too (fed late): not read twice.
    pub skip: Vec<i64>,
}

/// The hub has stopped: the server is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("the hub has stopped")]
pub struct HubStopped;

/// How sessions talk to the hub. Each request is answered, when it is, in
/// the connection's queue.
#[derive(Clone, Debug)]
pub struct HubHandle {
    commands: mpsc::Sender<Command>,
}

impl HubHandle {
    async fn send(&self, command: Command) -> Result<(), HubStopped> {
        self.commands.send(command).await.map_err(|_| HubStopped)
    }

    /// An authenticated connection: from now on its queue (of `capacity`
    /// messages) receives its viewer's own events. A full queue cancels
    /// `kicked`. `resuming`: its own events wait for [`HubHandle::resume`],
    /// which places them.
    pub async fn register(
        &self,
        conn: ConnId,
        viewer: Viewer,
        capacity: usize,
        kicked: CancellationToken,
        resuming: bool,
    ) -> Result<QueueReceiver, HubStopped> {
        let (outbound, queue) = queue(capacity);
        self.send(Command::Register { conn, viewer, outbound, kicked, resuming }).await?;
        Ok(queue)
    }

    /// A resume at connect, for a connection registered `resuming` and
    /// nothing else yet: the owner feed and every topic start at one point
    /// of the feed, after `since` (or now). Answered with one
    /// [`Outbound::Resumed`], or first with [`Outbound::ResumeLookUp`],
    /// after which the session resumes again with the `since` looked up.
    pub async fn resume(&self, conn: ConnId, topics: Vec<Topic>, since: Option<Since>) -> Result<(), HubStopped> {
        self.send(Command::Resume { conn, topics, since }).await
    }

    /// A re-authentication changed the viewer's organization or role.
    pub async fn update_viewer(&self, conn: ConnId, viewer: Viewer) -> Result<(), HubStopped> {
        self.send(Command::UpdateViewer { conn, viewer }).await
    }

    /// Answered with exactly one [`Outbound::Subscribed`], or first with an
    /// [`Outbound::LookUp`], after which the session subscribes again with
    /// the `since` looked up ([`Since::Checked`]).
    pub async fn subscribe(&self, conn: ConnId, topic: Topic, since: Option<Since>) -> Result<(), HubStopped> {
        self.send(Command::Subscribe { conn, topic, since }).await
    }

    /// Answered with [`Outbound::Unsubscribed`] (after the `subscribed` of
    /// a resume of the topic still waiting for its `since`).
    pub async fn unsubscribe(&self, conn: ConnId, topic: Topic) -> Result<(), HubStopped> {
        self.send(Command::Unsubscribe { conn, topic }).await
    }

    pub async fn unregister(&self, conn: ConnId) -> Result<(), HubStopped> {
        self.send(Command::Unregister { conn }).await
    }
}

pub struct Hub {
    metrics: Arc<Metrics>,
    arrivals: mpsc::Receiver<Arrival>,
    commands: mpsc::Receiver<Command>,
    routes: Routes,
    timeline: Timeline,
    /// `publish`'s candidates, kept to reuse the allocation.
    recipients: Vec<ConnId>,
    /// The history's bounds, to start a new one after the ids restarted.
    history_size: usize,
    history_bytes: usize,
}

/// Capacity of the source → hub channel. When the hub falls behind, the
/// source waits here and PostgreSQL holds the rest.
const ARRIVALS_CAPACITY: usize = 4096;
/// Sessions wait here only for the hub to take their requests.
const COMMAND_CAPACITY: usize = 1024;

impl Hub {
    pub fn new(
        metrics: Arc<Metrics>,
        history_size: usize,
        history_bytes: usize,
    ) -> (Hub, HubHandle, mpsc::Sender<Arrival>) {
        let (arrivals_tx, arrivals) = mpsc::channel(ARRIVALS_CAPACITY);
        let (commands_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
        let hub = Hub {
            metrics,
            arrivals,
            commands,
            routes: Routes::default(),
            timeline: Timeline::new(History::new(history_size, history_bytes)),
            recipients: Vec::new(),
            history_size,
            history_bytes,
        };
        (hub, HubHandle { commands: commands_tx }, arrivals_tx)
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(arrival) = self.arrivals.recv() => self.handle_arrival(arrival),
                Some(command) = self.commands.recv() => self.handle(command),
                else => break,
            }
        }
    }

    fn handle_arrival(&mut self, arrival: Arrival) {
        match arrival {
            Arrival::Event(event) => self.publish(event),
            Arrival::Through(id) => {
                let ready = self.timeline.advance(id);
                self.place_deferred(ready);
            }
            Arrival::Restarted(id) => {
                let history = History::new(self.history_size, self.history_bytes);
                self.timeline.restart(id, history);
                self.metrics.history_bytes.store(0, Relaxed);
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Register { conn, viewer, outbound, kicked, resuming } => {
                // A resuming connection's own events start where its resume is placed.
                let seq = if resuming { u64::MAX } else { self.timeline.next_seq() };
                self.routes.register(conn, Conn::new(viewer, outbound, kicked, seq));
            }
            Command::UpdateViewer { conn, viewer } => {
                self.routes.set_viewer(conn, viewer, self.timeline.next_seq());
            }
            Command::Subscribe { conn, topic, since } => self.subscribe(conn, topic, since),
            Command::Resume { conn, topics, since } => self.resume(conn, topics, since),
            Command::Unsubscribe { conn, topic } => {
                // A subscribe still waiting for its `since` is answered first.
                if let Some(d) = self.timeline.cancel_wait(conn, topic) {
                    self.queue(conn, Outbound::Subscribed(Box::new(Subscribed { topic, cursor: d.id, replay: None })));
                }
                self.routes.unsubscribe(conn, topic);
                self.count_subscriptions();
                self.queue(conn, Outbound::Unsubscribed { topic });
            }
            Command::Unregister { conn } => self.remove(conn),
        }
    }

    fn subscribe(&mut self, conn: ConnId, topic: Topic, since: Option<Since>) {
        let Some(entry) = self.routes.get(conn) else { return };
        let (cursor, replay, from) = match self.timeline.plan(entry, topic, since) {
            Plan::Ready { cursor, replay, from } => (cursor, replay, from),
            Plan::LookUp(since) => {
                self.queue(conn, Outbound::LookUp(Box::new(LookUp { topic, since })));
                return;
            }
            Plan::Wait(id) => {
                debug!(conn, topic = %topic, ?since, "since has not reached this instance yet; waiting");
                self.timeline.defer(Deferred { conn, what: Deferral::Subscribe(topic), id });
                return;
            }
        };
        self.routes.subscribe(conn, topic, from);
        self.count_subscriptions();
        self.queue(conn, Outbound::Subscribed(Box::new(Subscribed { topic, cursor, replay })));
    }

    fn publish(&mut self, event: Event) {
        let event_id = event.id;
        let Some(event) = self.timeline.admit(event) else {
            debug!(event_id, "event already delivered; skipped");
            return;
        };
        self.metrics.events_total.fetch_add(1, Relaxed);
        self.metrics.history_bytes.store(self.timeline.history_bytes() as i64, Relaxed);

        let mut recipients = std::mem::take(&mut self.recipients);
        recipients.clear();
        self.routes.candidates(&event, &mut recipients);
        for &conn in &recipients {
            let Some(entry) = self.routes.get_mut(conn) else { continue };
            if entry.last_seq == event.seq || !entry.receives(event.seq, &event) {
                continue;
            }
            entry.last_seq = event.seq;
            // Sent on the entry already found: one lookup per recipient.
            if let Err(refusal) = entry.outbound.try_send(Outbound::Event(Arc::clone(&event))) {
                self.refused(conn, refusal);
            }
        }
        self.recipients = recipients;

        // Lagging resumes the feed has now reached can be placed.
        let ready = self.timeline.ready();
        self.place_deferred(ready);
    }

    fn place_deferred(&mut self, ready: Vec<Deferred>) {
        for d in ready {
            let since = Some(Since::Unchecked(d.id));
            match d.what {
                Deferral::Subscribe(topic) => self.subscribe(d.conn, topic, since),
                Deferral::Resume(topics) => self.resume(d.conn, topics, since),
            }
        }
    }

    /// Place a resume at connect: one point of the feed for the owner feed
    /// and every topic, one replay for their union.
    fn resume(&mut self, conn: ConnId, topics: Vec<Topic>, since: Option<Since>) {
        if self.routes.get(conn).is_none() {
            return;
        }
        let placed = match self.timeline.place(since) {
            Place::At(placed) => placed,
            Place::LookUp(id) => {
                self.queue(conn, Outbound::ResumeLookUp(id));
                return;
            }
            Place::Wait(id) => {
                debug!(conn, ?since, "resume: since has not reached this instance yet; waiting");
                self.timeline.defer(Deferred { conn, what: Deferral::Resume(topics), id });
                return;
            }
        };
        self.routes.start_owner_feed(conn, placed.from);
        for &topic in &topics {
            self.routes.subscribe(conn, topic, placed.from);
        }
        self.count_subscriptions();
        let Some(entry) = self.routes.get(conn) else { return };
        let replay = placed.replay.map(|(resync, from_log)| Replay {
            resync,
            from_log,
            recent: self.timeline.owed_from(entry, placed.from),
        });
        debug!(conn, topics = topics.len(), cursor = placed.cursor, ?since, "resumed at connect");
        self.queue(conn, Outbound::Resumed(Box::new(Resumed { topics, cursor: placed.cursor, replay })));
    }

    /// Queue a message for a connection without waiting; a full queue makes
    /// it a slow consumer.
    fn queue(&mut self, conn: ConnId, message: Outbound) {
        let Some(entry) = self.routes.get(conn) else { return };
        if let Err(refusal) = entry.outbound.try_send(message) {
            self.refused(conn, refusal);
        }
    }

    /// A connection's queue refused a message: full, it is a slow consumer
    /// (its session closes with 1013); closed, its session has ended.
    fn refused(&mut self, conn: ConnId, refusal: Refusal) {
        let Some(entry) = self.routes.get(conn) else { return };
        if refusal == Refusal::Full {
            warn!(conn, user_id = %entry.viewer.user_id, "slow consumer: queue full, closing with 1013");
            self.metrics.slow_consumer_disconnects_total.fetch_add(1, Relaxed);
            entry.kicked.cancel();
        }
        self.remove(conn);
    }

    fn remove(&mut self, conn: ConnId) {
        self.timeline.forget(conn);
        self.routes.remove(conn);
        self.count_subscriptions();
    }

    fn count_subscriptions(&self) {
        self.metrics.subscriptions.store(self.routes.subscriptions() as i64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::event::EventKind;

    fn logs(deployment: Uuid) -> Topic {
        Topic::Deployment { kind: EventKind::LogsUpdate, deployment }
    }

    fn progress(deployment: Uuid) -> Topic {
        Topic::Deployment { kind: EventKind::Progress, deployment }
    }

    fn viewer(user: Uuid) -> Viewer {
        Viewer { user_id: user, organization_id: None, is_superuser: false }
    }

    fn event(id: i64, kind: EventKind, deployment: Uuid, owner: Uuid, org: Option<Uuid>) -> Event {
        Event::new(id, kind, deployment, owner, org, "{}")
    }

    struct Client {
        conn: ConnId,
        rx: QueueReceiver,
        kicked: CancellationToken,
    }

    impl Client {
        fn events(&mut self) -> Vec<i64> {
            let mut ids = Vec::new();
            while let Some(message) = self.rx.try_recv() {
                match message {
                    Outbound::Event(e) => ids.push(e.id),
                    Outbound::Subscribed(reply) => {
                        if let Some(replay) = &reply.replay {
                            ids.extend(replay.recent.iter().map(|e| e.id))
                        }
                    }
                    _ => {}
                }
            }
            ids
        }
    }

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::default()), 100, usize::MAX).0
    }

    fn connect(hub: &mut Hub, conn: ConnId, viewer: Viewer, queue: usize) -> Client {
        let (tx, rx) = super::queue(queue);
        let kicked = CancellationToken::new();
        hub.handle(Command::Register { conn, viewer, outbound: tx, kicked: kicked.clone(), resuming: false });
        Client { conn, rx, kicked }
    }

    #[test]
    fn owner_gets_own_events_without_subscribing() {
        let mut hub = hub();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let mut a = connect(&mut hub, 1, viewer(alice), 16);
        let mut b = connect(&mut hub, 2, viewer(bob), 16);
        hub.publish(event(1, EventKind::StatusChanged, Uuid::new_v4(), alice, None));
        assert_eq!(a.events(), vec![1]);
        assert_eq!(b.events(), Vec::<i64>::new());
    }

    #[test]
    fn one_event_once_per_connection_however_many_subscriptions_match() {
        let mut hub = hub();
        let (alice, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        let mut a = connect(&mut hub, 1, Viewer { is_superuser: true, ..viewer(alice) }, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: None });
        hub.handle(Command::Subscribe { conn: 1, topic: logs(deployment), since: None });
        hub.publish(event(1, EventKind::LogsUpdate, deployment, alice, None));
        assert_eq!(a.events(), vec![1]);
    }

    #[test]
    fn organization_members_see_deployment_events_of_their_organization_only() {
        let mut hub = hub();
        let (org, other_org) = (Uuid::new_v4(), Uuid::new_v4());
        let mut member = connect(&mut hub, 1, Viewer { organization_id: Some(org), ..viewer(Uuid::new_v4()) }, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: None });
        hub.publish(event(1, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), Some(org)));
        hub.publish(event(2, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), Some(other_org)));
        hub.publish(event(3, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        assert_eq!(member.events(), vec![1]);
    }

    #[test]
    fn full_queue_kicks_only_the_slow_consumer() {
        let mut hub = hub();
        let owner = Uuid::new_v4();
        let mut slow = connect(&mut hub, 1, viewer(owner), 2);
        let mut fast = connect(&mut hub, 2, viewer(owner), 64);
        for id in 1..=5 {
            hub.publish(event(id, EventKind::LogsUpdate, Uuid::new_v4(), owner, None));
            fast.events();
        }
        assert!(slow.kicked.is_cancelled());
        assert!(!fast.kicked.is_cancelled());
        assert_eq!(slow.events(), vec![1, 2], "what was queued before the kick stays queued");
        assert!(hub.routes.get(slow.conn).is_none());
        assert_eq!(hub.metrics.slow_consumer_disconnects_total.load(Relaxed), 1);
    }

    #[test]
    fn replay_from_history_follows_the_order_events_were_fed() {
        let mut hub = hub();
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        // 4 came late (the feed went past it, then it committed).
        for id in [3, 5, 7, 4] {
            hub.publish(event(id, EventKind::StatusChanged, deployment, owner, None));
        }
        let mut client = connect(&mut hub, 1, watcher, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: Some(Since::Unchecked(5)) });
        assert_eq!(client.events(), vec![7, 4]);
    }

    #[test]
    fn replay_skips_what_the_connection_already_received() {
        let mut hub = hub();
        let owner = Uuid::new_v4();
        let mut client = connect(&mut hub, 1, viewer(owner), 16);
        hub.publish(event(1, EventKind::StatusChanged, Uuid::new_v4(), owner, None));
        hub.publish(event(2, EventKind::StatusChanged, Uuid::new_v4(), owner, None));
        assert_eq!(client.events(), vec![1, 2]);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: Some(Since::Unchecked(1)) });
        assert_eq!(client.events(), Vec::<i64>::new());
    }

    fn reply(rx: &mut QueueReceiver) -> Subscribed {
        match rx.try_recv() {
            Some(Outbound::Subscribed(reply)) => *reply,
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    #[test]
    fn replay_older_than_history_reads_the_log_up_to_the_history() {
        let mut hub = Hub::new(Arc::new(Metrics::default()), 2, usize::MAX).0;
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        for id in 1..=3 {
            hub.publish(event(id, EventKind::Progress, deployment, owner, None));
        }
        let (tx, mut rx) = super::queue(8);
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        hub.handle(Command::Register {
            conn: 9,
            viewer: watcher,
            outbound: tx,
            kicked: CancellationToken::new(),
            resuming: false,
        });
        hub.handle(Command::Subscribe { conn: 9, topic: progress(deployment), since: Some(Since::Unchecked(0)) });
        let Subscribed { cursor: 0, replay: Some(replay), .. } = reply(&mut rx) else { panic!("a replay") };
        let log = replay.from_log.expect("since 0 is older than the history");
        assert_eq!((log.since, log.before), (0, 2), "the log up to the history's first event");
        assert_eq!(replay.recent.iter().map(|e| e.id).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn a_since_that_never_committed_replays_what_follows_it() {
        let mut hub = hub();
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [1, 2, 5, 6] {
            hub.publish(event(id, EventKind::LogsUpdate, deployment, owner, None));
        }
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        let mut client = connect(&mut hub, 1, watcher, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: logs(deployment), since: Some(Since::Unchecked(3)) });
        assert_eq!(client.events(), vec![5, 6]);
    }

    #[test]
    fn a_lagging_resume_is_looked_up_then_waits_for_its_since() {
        let mut hub = hub();
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        hub.handle_arrival(Arrival::Through(6));
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        let mut client = connect(&mut hub, 1, watcher, 16);
        let topic = logs(deployment);
        hub.handle(Command::Subscribe { conn: 1, topic, since: Some(Since::Unchecked(7)) });
        let Some(Outbound::LookUp(look_up)) = client.rx.try_recv() else { panic!("newer than the feed: a look-up") };
        assert_eq!(look_up.since, 7);
        hub.handle(Command::Subscribe { conn: 1, topic, since: Some(Since::Checked { id: 7, newest: 9 }) });
        assert!(client.rx.try_recv().is_none(), "no reply before since arrives");
        for id in [7, 8] {
            hub.publish(event(id, EventKind::LogsUpdate, deployment, owner, None));
        }
        assert_eq!(client.events(), vec![8], "exactly what followed since");
        hub.publish(event(9, EventKind::LogsUpdate, deployment, owner, None));
        assert_eq!(client.events(), vec![9]);
    }

    #[test]
    fn a_since_the_log_never_gave_out_gets_resync() {
        let mut hub = hub();
        hub.handle_arrival(Arrival::Through(6));
        let (tx, mut rx) = super::queue(8);
        hub.handle(Command::Register {
            conn: 1,
            viewer: viewer(Uuid::new_v4()),
            outbound: tx,
            kicked: CancellationToken::new(),
            resuming: false,
        });
        let since = Some(Since::Checked { id: 500, newest: 6 });
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since });
        let Subscribed { cursor, replay: Some(replay), .. } = reply(&mut rx) else { panic!("a replay") };
        assert!(replay.resync);
        assert_eq!(cursor, 6, "a cursor that loses nothing from now on");
    }

    #[test]
    fn ids_that_start_again_are_not_taken_for_repeats() {
        let mut hub = hub();
        let owner = Uuid::new_v4();
        let mut client = connect(&mut hub, 1, viewer(owner), 16);
        for id in 1..=3 {
            hub.publish(event(id, EventKind::Progress, Uuid::new_v4(), owner, None));
        }
        hub.handle_arrival(Arrival::Restarted(0));
        for id in 1..=2 {
            hub.publish(event(id, EventKind::Progress, Uuid::new_v4(), owner, None));
        }
        assert_eq!(client.events(), vec![1, 2, 3, 1, 2]);
        assert_eq!(hub.timeline.cursor(), 2);
    }

    #[test]
    fn subscribed_carries_the_feeds_position_as_cursor() {
        let mut hub = hub();
        hub.handle(Command::Register {
            conn: 1,
            viewer: viewer(Uuid::new_v4()),
            outbound: super::queue(8).0,
            kicked: CancellationToken::new(),
            resuming: false,
        });
        hub.handle_arrival(Arrival::Through(41));
        assert_eq!(hub.timeline.cursor(), 41, "before any event, where the feed started");
        hub.publish(event(42, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        hub.publish(event(40, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        assert_eq!(hub.timeline.cursor(), 42, "a late event does not move it back");
    }

    #[test]
    fn duplicate_event_from_catch_up_is_published_once() {
        let mut hub = hub();
        let owner = Uuid::new_v4();
        let mut client = connect(&mut hub, 1, viewer(owner), 16);
        hub.publish(event(1, EventKind::StatusChanged, Uuid::new_v4(), owner, None));
        hub.publish(event(1, EventKind::StatusChanged, Uuid::new_v4(), owner, None));
        assert_eq!(client.events(), vec![1]);
    }

    #[test]
    fn a_resume_at_connect_places_the_owner_feed_and_topics_at_since_each_event_once() {
        let mut hub = hub();
        let (owner, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (own, watched) = (Uuid::new_v4(), Uuid::new_v4());
        let org = Uuid::new_v4();
        let me = Viewer { organization_id: Some(org), ..viewer(owner) };
        for (id, deployment, by) in [(1, own, owner), (2, watched, other), (3, own, owner), (4, watched, other)] {
            hub.publish(event(id, EventKind::LogsUpdate, deployment, by, Some(org)));
        }
        let (tx, mut rx) = super::queue(16);
        hub.handle(Command::Register {
            conn: 1,
            viewer: me,
            outbound: tx,
            kicked: CancellationToken::new(),
            resuming: true,
        });
        hub.publish(event(5, EventKind::LogsUpdate, own, owner, Some(org)));
        assert!(rx.try_recv().is_none(), "nothing of the owner feed before the resume is placed");
        let topics = vec![logs(watched), logs(watched)];
        hub.handle(Command::Resume { conn: 1, topics, since: Some(Since::Unchecked(1)) });
        let Some(Outbound::Resumed(resumed)) = rx.try_recv() else { panic!("the resume's answer") };
        assert_eq!(resumed.cursor, 1);
        let replay = resumed.replay.expect("a replay");
        let ids: Vec<i64> = replay.recent.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![2, 3, 4, 5], "the owner feed and the topic after since, once, in commit order");
        hub.publish(event(6, EventKind::LogsUpdate, own, owner, Some(org)));
        hub.publish(event(7, EventKind::Progress, watched, other, Some(org)));
        hub.publish(event(8, EventKind::LogsUpdate, watched, other, Some(org)));
        let live: Vec<i64> = std::iter::from_fn(|| match rx.try_recv() {
            Some(Outbound::Event(e)) => Some(e.id),
            _ => None,
        })
        .collect();
        assert_eq!(live, vec![6, 8], "then live: not the watched deployment's progress");
    }

    #[test]
    fn a_resume_newer_than_the_feed_is_looked_up_then_waits_for_its_since() {
        let mut hub = hub();
        let owner = Uuid::new_v4();
        let (tx, mut rx) = super::queue(16);
        hub.handle_arrival(Arrival::Through(6));
        let kicked = CancellationToken::new();
        hub.handle(Command::Register { conn: 1, viewer: viewer(owner), outbound: tx, kicked, resuming: true });
        hub.handle(Command::Resume { conn: 1, topics: Vec::new(), since: Some(Since::Unchecked(8)) });
        assert!(matches!(rx.try_recv(), Some(Outbound::ResumeLookUp(8))));
        let since = Some(Since::Checked { id: 8, newest: 9 });
        hub.handle(Command::Resume { conn: 1, topics: Vec::new(), since });
        for id in [7, 8] {
            hub.publish(event(id, EventKind::Progress, Uuid::new_v4(), owner, None));
        }
        let Some(Outbound::Resumed(resumed)) = rx.try_recv() else { panic!("placed once the feed reached since") };
        assert_eq!((resumed.cursor, resumed.replay.map(|r| r.recent.len())), (8, Some(0)));
        hub.publish(event(9, EventKind::Progress, Uuid::new_v4(), owner, None));
        assert!(matches!(rx.try_recv(), Some(Outbound::Event(e)) if e.id == 9), "nothing up to since, then live");
    }

    #[test]
    fn topic_subscriber_who_loses_visibility_stops_receiving() {
        let mut hub = hub();
        let (org, deployment, owner) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut member = connect(&mut hub, 1, Viewer { organization_id: Some(org), ..viewer(Uuid::new_v4()) }, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: logs(deployment), since: None });
        hub.publish(event(1, EventKind::LogsUpdate, deployment, owner, Some(org)));
        // The deployment moved to another organization.
        hub.publish(event(2, EventKind::LogsUpdate, deployment, owner, Some(Uuid::new_v4())));
        assert_eq!(member.events(), vec![1]);
    }
}
