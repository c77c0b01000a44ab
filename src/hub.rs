//! Routing and fan-out: who receives which event. Knows nothing about
//! sockets: each connection is a bounded queue of [`Outbound`] messages.
//!
//! The hub is one task that owns all routing state. Events (from the
//! listener) and commands (from sessions) arrive on two channels and are
//! handled one at a time, so a subscription and the events around it are
//! always seen in one order: that is what makes `since` replay gap-free.
//!
//! The hub never waits on a client. A connection whose queue is full is a
//! slow consumer: it is dropped from routing and its session is told to
//! close with 1013 after what is already queued.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::auth::Viewer;
use crate::event::Event;
use crate::history::{History, Snapshot};
use crate::metrics::Metrics;
use crate::ws::protocol::Topic;

pub type ConnId = u64;

/// What the listener hands the hub, in commit order.
#[derive(Debug)]
pub enum Feed {
    Event(Event),
    /// A marker snapshot (`pg_current_snapshot()` as text): every
    /// transaction it shows as finished has already been fed to the hub.
    Marker(String),
    /// Once, before the first marker: the newest event id committed when
    /// this process started, the resume cursor while nothing was fed yet.
    Origin(i64),
}

/// What sessions ask of the hub.
#[derive(Debug)]
pub enum Command {
    /// An authenticated connection: from now on it receives its owner feed.
    Register {
        conn: ConnId,
        viewer: Viewer,
        outbound: mpsc::Sender<Outbound>,
        kicked: CancellationToken,
    },
    /// A re-authentication changed the viewer's organization or role.
    UpdateViewer {
        conn: ConnId,
        viewer: Viewer,
    },
    /// Answered with exactly one `Subscribed` (or first a `LookUp`, after
    /// which the session sends the same subscribe again, looked up).
    Subscribe {
        conn: ConnId,
        topic: Topic,
        since: Option<Since>,
    },
    Unsubscribe {
        conn: ConnId,
        topic: Topic,
    },
    Unregister {
        conn: ConnId,
    },
}

/// A `since` and what the event log says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Not looked up: fine when the history holds it.
    Unchecked(i64),
    /// In the event log, written by transaction `xid`.
    Committed { id: i64, xid: u64 },
    /// Not in the event log. `pruned`: retention deleted it, or events
    /// after it (or it is 0 and retention deleted anything).
    Missing { id: i64, pruned: bool },
}

impl Since {
    pub fn id(self) -> i64 {
        match self {
            Since::Unchecked(id) | Since::Committed { id, .. } | Since::Missing { id, .. } => id,
        }
    }
}

/// What a session's queue carries. Replies to (un)subscribe travel in the
/// same queue as events, so they keep their place among them. Every queue
/// slot is the size of this enum, and a connection's queue allocates slots
/// 32 at a time: the rare replies are boxed so that a slot stays 24 bytes.
#[derive(Debug)]
pub enum Outbound {
    Event(Arc<Event>),
    Subscribed(Box<Subscribed>),
    /// The history does not hold `since`: look it up in the event log and
    /// send the subscribe again.
    LookUp(Box<LookUp>),
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

/// Events of the log fed to this process before a marker (or before it
/// started), after `since` by id. Events fed after the marker come from
/// the history, in commit order.
#[derive(Debug)]
pub struct LogReplay {
    pub since: i64,
    /// Events whose transactions this marker snapshot shows as finished...
    pub snapshot: String,
    /// ...or these, fed just before it or since evicted from the history...
    pub also: Vec<i64>,
    /// ...except these (sorted), which the connection already received.
    pub skip: Vec<i64>,
}

#[derive(Clone, Debug)]
pub struct HubHandle {
    commands: mpsc::Sender<Command>,
}

impl HubHandle {
    /// Returns false once the hub has stopped (shutdown).
    pub async fn send(&self, command: Command) -> bool {
        self.commands.send(command).await.is_ok()
    }
}

struct Conn {
    viewer: Viewer,
    outbound: mpsc::Sender<Outbound>,
    kicked: CancellationToken,
    /// Each subscription with the first history seq it has delivered from.
    subscriptions: HashMap<Topic, u64>,
    registered_seq: u64,
    /// Seq of the last event queued for this connection: at most once each.
    last_seq: u64,
}

impl Conn {
    /// Whether this connection was already sent the event at `seq`.
    fn already_sent(&self, seq: u64, event: &Event) -> bool {
        (seq >= self.registered_seq && event.owner == self.viewer.user_id)
            || self.subscriptions.iter().any(|(topic, from)| {
                seq >= *from
                    && topic.carries(event.kind, event.deployment_id)
                    && self.viewer.can_see(event.owner, event.organization_id)
            })
    }
}

/// A marker as the hub keeps it: where it fell among the events.
struct Marker {
    /// The seq the next event fed after it got.
    seq: u64,
    snapshot: String,
    parsed: Option<Snapshot>,
    /// Events fed between the previous marker and this one: some may have
    /// committed after this snapshot was taken.
    fed_before: Vec<i64>,
}

/// A subscribe whose `since` committed but has not reached this process
/// yet (this instance lags the one the client came from).
struct Deferred {
    conn: ConnId,
    topic: Topic,
    id: i64,
    xid: u64,
}

pub struct Hub {
    metrics: Arc<Metrics>,
    feed: mpsc::Receiver<Feed>,
    commands: mpsc::Receiver<Command>,
    conns: HashMap<ConnId, Conn>,
    /// Every connection by user: the owner feed.
    owners: HashMap<Uuid, Vec<ConnId>>,
    /// `deployment_events` subscribers who see everything.
    feed_superusers: HashSet<ConnId>,
    /// `deployment_events` subscribers by their organization.
    feed_by_org: HashMap<Uuid, HashSet<ConnId>>,
    /// Per-deployment topic subscribers.
    topic_subscribers: HashMap<Topic, HashSet<ConnId>>,
    subscription_count: i64,
    history: History,
    /// Markers from the oldest one at or after the history's first event
    /// (or the newest, if none is) to the newest.
    markers: VecDeque<Marker>,
    /// Ids fed since the last marker, and between the two before it. A
    /// transaction the marker shows as unfinished may have been fed just
    /// before the marker: two generations cover it (the listener sends a
    /// marker only after the previous one came back).
    fed_since_marker: HashSet<i64>,
    fed_before_marker: HashSet<i64>,
    /// Ids evicted from the history since the newest marker.
    evicted_since_marker: Vec<i64>,
    /// The newest event id committed when this process started.
    origin: i64,
    deferred: Vec<Deferred>,
    recipients: Vec<ConnId>,
}

/// Capacity of the listener → hub channel. When the hub falls behind, the
/// listener waits here and PostgreSQL's notification queue holds the rest.
const FEED_CAPACITY: usize = 4096;
/// Sessions wait here only for the hub to take their commands.
const COMMAND_CAPACITY: usize = 1024;

impl Hub {
    pub fn new(
        metrics: Arc<Metrics>,
        history_size: usize,
        history_bytes: usize,
    ) -> (Hub, HubHandle, mpsc::Sender<Feed>) {
        let (feed_tx, feed) = mpsc::channel(FEED_CAPACITY);
        let (commands_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
        let hub = Hub {
            metrics,
            feed,
            commands,
            conns: HashMap::new(),
            owners: HashMap::new(),
            feed_superusers: HashSet::new(),
            feed_by_org: HashMap::new(),
            topic_subscribers: HashMap::new(),
            subscription_count: 0,
            history: History::new(history_size, history_bytes),
            markers: VecDeque::new(),
            fed_since_marker: HashSet::new(),
            fed_before_marker: HashSet::new(),
            evicted_since_marker: Vec::new(),
            origin: 0,
            deferred: Vec::new(),
            recipients: Vec::new(),
        };
        (hub, HubHandle { commands: commands_tx }, feed_tx)
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(feed) = self.feed.recv() => match feed {
                    Feed::Event(event) => self.publish(event),
                    Feed::Marker(snapshot) => self.on_marker(snapshot),
                    Feed::Origin(id) => self.origin = id,
                },
                Some(command) = self.commands.recv() => self.handle(command),
                else => break,
            }
        }
    }

    fn on_marker(&mut self, snapshot: String) {
        let fed_before: Vec<i64> = self.fed_since_marker.iter().copied().collect();
        self.fed_before_marker = std::mem::take(&mut self.fed_since_marker);
        self.evicted_since_marker.clear();
        let parsed = Snapshot::parse(&snapshot);
        if parsed.is_none() {
            warn!(snapshot = %snapshot, "marker is not a pg_snapshot; lagging resumes wait for the next one");
        }
        let seq = self.history.next_seq();
        match self.markers.back_mut() {
            // Nothing fed since the last marker: this one says the same of
            // the events, with more transactions finished. Keeping both
            // would grow by one marker a second on an idle server.
            Some(last) if last.seq == seq => {
                last.snapshot = snapshot;
                last.parsed = parsed;
                last.fed_before.extend(fed_before);
            }
            _ => self.markers.push_back(Marker { seq, snapshot, parsed, fed_before }),
        }
        self.prune_markers();
        // Lagging resumes whose `since` this marker shows as finished can
        // now be placed: in the history, or before it.
        let ready: Vec<Deferred> = match self.markers.back().and_then(|m| m.parsed.as_ref()) {
            Some(latest) => {
                let (ready, waiting) =
                    std::mem::take(&mut self.deferred).into_iter().partition(|d| latest.finished(d.xid));
                self.deferred = waiting;
                ready
            }
            None => Vec::new(),
        };
        for d in ready {
            self.subscribe(d.conn, d.topic, Some(Since::Committed { id: d.id, xid: d.xid }));
        }
    }

    /// Drop markers from before the history's first event, but keep the
    /// newest: the oldest one left is the floor a log replay reads up to.
    fn prune_markers(&mut self) {
        let first = self.history.first_seq();
        while self.markers.len() > 1 && self.markers.front().is_some_and(|m| m.seq < first) {
            self.markers.pop_front();
        }
    }

    fn fed_recently(&self, id: i64) -> bool {
        self.fed_since_marker.contains(&id) || self.fed_before_marker.contains(&id)
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Register { conn, viewer, outbound, kicked } => {
                self.owners.entry(viewer.user_id).or_default().push(conn);
                let registered_seq = self.history.next_seq();
                self.conns.insert(
                    conn,
                    Conn { viewer, outbound, kicked, subscriptions: HashMap::new(), registered_seq, last_seq: 0 },
                );
            }
            Command::UpdateViewer { conn, viewer } => {
                let Some(entry) = self.conns.get(&conn) else { return };
                let on_feed = entry.subscriptions.contains_key(&Topic::DeploymentEvents);
                let old = entry.viewer;
                if on_feed {
                    self.unindex_feed(conn, old);
                }
                if let Some(entry) = self.conns.get_mut(&conn) {
                    entry.viewer = viewer;
                }
                if on_feed {
                    self.index_feed(conn, viewer);
                }
            }
            Command::Subscribe { conn, topic, since } => self.subscribe(conn, topic, since),
            Command::Unsubscribe { conn, topic } => {
                // A subscribe still waiting for its `since` is answered first.
                if let Some(i) = self.deferred.iter().position(|d| d.conn == conn && d.topic == topic) {
                    let d = self.deferred.swap_remove(i);
                    self.queue(conn, Outbound::Subscribed(Box::new(Subscribed { topic, cursor: d.id, replay: None })));
                }
                let Some(entry) = self.conns.get_mut(&conn) else { return };
                let viewer = entry.viewer;
                if entry.subscriptions.remove(&topic).is_some() {
                    self.unindex(conn, topic, viewer);
                    self.count_subscriptions(-1);
                }
                self.queue(conn, Outbound::Unsubscribed { topic });
            }
            Command::Unregister { conn } => self.remove(conn),
        }
    }

    /// The resume cursor of a subscription made now: the newest event fed.
    fn cursor(&self) -> i64 {
        self.history.last_id().unwrap_or(self.origin)
    }

    fn subscribe(&mut self, conn: ConnId, topic: Topic, since: Option<Since>) {
        let Some(entry) = self.conns.get(&conn) else { return };
        let next_seq = self.history.next_seq();
        let (cursor, replay, covered_from) = match since {
            None => (self.cursor(), None, next_seq),
            Some(since) => match self.history.seq_of(since.id()) {
                Some(seq) => {
                    let recent = self.recent(entry, topic, seq + 1);
                    (since.id(), Some(Replay { recent, ..Replay::default() }), seq + 1)
                }
                None => match since {
                    Since::Unchecked(id) => {
                        self.queue(conn, Outbound::LookUp(Box::new(LookUp { topic, since: id })));
                        return;
                    }
                    Since::Committed { id, xid } => {
                        let finished =
                            self.markers.back().and_then(|m| m.parsed.as_ref()).is_some_and(|s| s.finished(xid));
                        if !finished {
                            debug!(conn, topic = %topic, since = id, "since has not reached this instance yet; waiting");
                            self.deferred.push(Deferred { conn, topic, id, xid });
                            return;
                        }
                        let (log, from) = self.before_history(entry, id);
                        (
                            id,
                            Some(Replay { resync: false, from_log: log, recent: self.recent(entry, topic, from) }),
                            from,
                        )
                    }
                    Since::Missing { id, pruned } if pruned || id == 0 => {
                        let (log, from) = self.before_history(entry, id);
                        (
                            id,
                            Some(Replay { resync: pruned, from_log: log, recent: self.recent(entry, topic, from) }),
                            from,
                        )
                    }
                    // No such event: nothing can be placed after it.
                    Since::Missing { .. } => {
                        (self.cursor(), Some(Replay { resync: true, ..Replay::default() }), next_seq)
                    }
                },
            },
        };
        let Some(entry) = self.conns.get_mut(&conn) else { return };
        let viewer = entry.viewer;
        match entry.subscriptions.entry(topic) {
            Entry::Occupied(mut existing) => {
                let from = existing.get_mut();
                *from = (*from).min(covered_from);
            }
            Entry::Vacant(vacant) => {
                vacant.insert(covered_from);
                self.index(conn, topic, viewer);
                self.count_subscriptions(1);
            }
        }
        self.queue(conn, Outbound::Subscribed(Box::new(Subscribed { topic, cursor, replay })));
    }

    /// For a `since` older than the history: what to read from the log
    /// (events fed before the oldest kept marker), and the seq the history
    /// takes over from.
    fn before_history(&self, conn: &Conn, since: i64) -> (Option<LogReplay>, u64) {
        let Some(floor) = self.markers.front() else {
            // No marker yet (clients are accepted only after the first).
            return (None, self.history.first_seq());
        };
        let mut also = floor.fed_before.clone();
        if floor.seq < self.history.first_seq() {
            also.extend(&self.evicted_since_marker);
        }
        // Events fed before the floor that are still in the history, and
        // that this connection already received, are not sent again.
        let mut skip: Vec<i64> = (self.history.first_seq()..floor.seq)
            .filter_map(|seq| self.history.get(seq))
            .filter(|event| conn.already_sent(event.seq, event))
            .map(|event| event.id)
            .collect();
        skip.sort_unstable();
        let log = LogReplay { since, snapshot: floor.snapshot.clone(), also, skip };
        (Some(log), floor.seq.max(self.history.first_seq()))
    }

    /// The history's events of `topic` from `seq` on that this connection
    /// may see and was not already sent, visiting only the candidates.
    fn recent(&self, conn: &Conn, topic: Topic, seq: u64) -> Vec<Arc<Event>> {
        let viewer = conn.viewer;
        let wanted = |event: &&Arc<Event>| {
            topic.carries(event.kind, event.deployment_id)
                && viewer.can_see(event.owner, event.organization_id)
                && !conn.already_sent(event.seq, event)
        };
        let by_seq = |seqs: &mut dyn Iterator<Item = u64>| -> Vec<Arc<Event>> {
            seqs.filter_map(|s| self.history.get(s)).filter(wanted).cloned().collect()
        };
        match topic.deployment() {
            Some(deployment) => by_seq(&mut self.history.of_deployment(deployment, seq)),
            None if viewer.is_superuser => self.history.all_from(seq).filter(wanted).cloned().collect(),
            None => by_seq(&mut self.history.of_owner_or_organization(viewer.user_id, viewer.organization_id, seq)),
        }
    }

    fn publish(&mut self, mut event: Event) {
        // The listener's catch-up after a reconnect may overlap what it
        // already fed; each event enters once.
        if self.history.seq_of(event.id).is_some() || self.fed_recently(event.id) {
            debug!(event_id = event.id, "event already delivered; skipped");
            return;
        }
        self.fed_since_marker.insert(event.id);
        self.metrics.events_total.fetch_add(1, Relaxed);
        let seq = self.history.next_seq();
        event.seq = seq;
        let event = Arc::new(event);
        self.history.push(Arc::clone(&event), &mut self.evicted_since_marker);
        self.prune_markers();
        self.metrics.history_bytes.store(self.history.bytes() as i64, Relaxed);

        let mut recipients = std::mem::take(&mut self.recipients);
        recipients.clear();
        if let Some(conns) = self.owners.get(&event.owner) {
            recipients.extend(conns);
        }
        recipients.extend(&self.feed_superusers);
        if let Some(members) = event.organization_id.and_then(|org| self.feed_by_org.get(&org)) {
            recipients.extend(members);
        }
        let topic = Topic::of_event(event.kind, event.deployment_id);
        if let Some(subscribers) = topic.and_then(|topic| self.topic_subscribers.get(&topic)) {
            for conn in subscribers {
                if self.conns.get(conn).is_some_and(|c| c.viewer.can_see(event.owner, event.organization_id)) {
                    recipients.push(*conn);
                }
            }
        }
        for &conn in &recipients {
            let Some(entry) = self.conns.get_mut(&conn) else { continue };
            if entry.last_seq == seq {
                continue;
            }
            entry.last_seq = seq;
            self.queue(conn, Outbound::Event(Arc::clone(&event)));
        }
        self.recipients = recipients;

        // A lagging resume waiting for this very event can now be placed.
        if let Some(i) = self.deferred.iter().position(|d| d.id == event.id) {
            let waiting: Vec<Deferred> = self.deferred.extract_if(i.., |d| d.id == event.id).collect();
            for d in waiting {
                self.subscribe(d.conn, d.topic, Some(Since::Committed { id: d.id, xid: d.xid }));
            }
        }
    }
    /// Queue a message for a connection without waiting; a full queue makes
    /// it a slow consumer.
    fn queue(&mut self, conn: ConnId, message: Outbound) {
        let Some(entry) = self.conns.get(&conn) else { return };
        match entry.outbound.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(conn, user_id = %entry.viewer.user_id, "slow consumer: queue full, closing with 1013");
                self.metrics.slow_consumer_disconnects_total.fetch_add(1, Relaxed);
                entry.kicked.cancel();
                self.remove(conn);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.remove(conn),
        }
    }

    fn remove(&mut self, conn: ConnId) {
        let Some(entry) = self.conns.remove(&conn) else { return };
        self.deferred.retain(|d| d.conn != conn);
        if let Some(conns) = self.owners.get_mut(&entry.viewer.user_id) {
            conns.retain(|c| *c != conn);
            if conns.is_empty() {
                self.owners.remove(&entry.viewer.user_id);
            }
        }
        for topic in entry.subscriptions.keys() {
            self.unindex(conn, *topic, entry.viewer);
        }
        self.count_subscriptions(-(entry.subscriptions.len() as i64));
    }

    fn index(&mut self, conn: ConnId, topic: Topic, viewer: Viewer) {
        match topic {
            Topic::DeploymentEvents => self.index_feed(conn, viewer),
            _ => {
                self.topic_subscribers.entry(topic).or_default().insert(conn);
            }
        }
    }

    fn unindex(&mut self, conn: ConnId, topic: Topic, viewer: Viewer) {
        match topic {
            Topic::DeploymentEvents => self.unindex_feed(conn, viewer),
            _ => {
                if let Some(subscribers) = self.topic_subscribers.get_mut(&topic) {
                    subscribers.remove(&conn);
                    if subscribers.is_empty() {
                        self.topic_subscribers.remove(&topic);
                    }
                }
            }
        }
    }

    /// `deployment_events` for an owner's own deployments comes through the
    /// owner feed; only superusers and organization members need an index.
    fn index_feed(&mut self, conn: ConnId, viewer: Viewer) {
        if viewer.is_superuser {
            self.feed_superusers.insert(conn);
        } else if let Some(org) = viewer.organization_id {
            self.feed_by_org.entry(org).or_default().insert(conn);
        }
    }

    fn unindex_feed(&mut self, conn: ConnId, viewer: Viewer) {
        self.feed_superusers.remove(&conn);
        if let Some(org) = viewer.organization_id
            && let Some(members) = self.feed_by_org.get_mut(&org)
        {
            members.remove(&conn);
            if members.is_empty() {
                self.feed_by_org.remove(&org);
            }
        }
    }

    fn count_subscriptions(&mut self, delta: i64) {
        self.subscription_count += delta;
        self.metrics.subscriptions.store(self.subscription_count, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn viewer(user: Uuid) -> Viewer {
        Viewer { user_id: user, organization_id: None, is_superuser: false }
    }

    fn event(id: i64, kind: EventKind, deployment: Uuid, owner: Uuid, org: Option<Uuid>) -> Event {
        Event::new(id, kind, deployment, owner, org, "{}")
    }

    struct Client {
        conn: ConnId,
        rx: mpsc::Receiver<Outbound>,
        kicked: CancellationToken,
    }

    impl Client {
        fn events(&mut self) -> Vec<i64> {
            let mut ids = Vec::new();
            while let Ok(message) = self.rx.try_recv() {
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
        let (tx, rx) = mpsc::channel(queue);
        let kicked = CancellationToken::new();
        hub.handle(Command::Register { conn, viewer, outbound: tx, kicked: kicked.clone() });
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
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::Logs(deployment), since: None });
        hub.publish(event(1, EventKind::LogsUpdate, deployment, alice, None));
        assert_eq!(a.events(), vec![1]);
    }

    #[test]
    fn organization_members_see_feed_events_of_their_organization_only() {
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
        assert!(!hub.conns.contains_key(&slow.conn));
        assert_eq!(hub.metrics.slow_consumer_disconnects_total.load(Relaxed), 1);
    }

    #[test]
    fn replay_from_history_follows_commit_order_not_id_order() {
        let mut hub = hub();
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        // Commit order 5, 3, 7, 4: resuming after 3 owes 7 and 4.
        for id in [5, 3, 7, 4] {
            hub.publish(event(id, EventKind::StatusChanged, deployment, owner, None));
        }
        let mut client = connect(&mut hub, 1, watcher, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: Some(Since::Unchecked(3)) });
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

    #[test]
    fn replay_older_than_history_is_looked_up_then_read_from_the_log_before_the_oldest_marker() {
        let mut hub = Hub::new(Arc::new(Metrics::default()), 2, usize::MAX).0;
        let owner = Uuid::new_v4();
        let deployment = Uuid::new_v4();
        hub.on_marker("10:10:".into());
        for id in 1..=3 {
            hub.publish(event(id, EventKind::Progress, deployment, owner, None));
        }
        hub.on_marker("20:20:".into());
        let (tx, mut rx) = mpsc::channel(8);
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        hub.handle(Command::Register { conn: 9, viewer: watcher, outbound: tx, kicked: CancellationToken::new() });
        let topic = Topic::Progress(deployment);
        hub.handle(Command::Subscribe { conn: 9, topic, since: Some(Since::Unchecked(1)) });
        let Ok(Outbound::LookUp(look_up)) = rx.try_recv() else { panic!("the hub asks for a look-up") };
        assert_eq!(look_up.since, 1);
        hub.handle(Command::Subscribe { conn: 9, topic, since: Some(Since::Committed { id: 1, xid: 5 }) });
        let Ok(Outbound::Subscribed(reply)) = rx.try_recv() else { panic!("no reply") };
        let Subscribed { cursor: 1, replay: Some(replay), .. } = *reply else { panic!("no reply") };
        let log = replay.from_log.expect("since 1 is older than the history");
        // The oldest marker at or after the history's start is the second:
        // events fed before it come from the log, the rest from the history.
        assert_eq!((log.since, log.snapshot.as_str()), (1, "20:20:"));
        assert_eq!(log.also.iter().copied().collect::<HashSet<_>>(), HashSet::from([1, 2, 3]));
        assert!(replay.recent.is_empty());
    }

    #[test]
    fn markers_without_events_between_them_are_kept_once() {
        let mut hub = hub();
        for xmin in 10..1000 {
            hub.on_marker(format!("{xmin}:{xmin}:"));
        }
        assert_eq!(hub.markers.len(), 1, "an idle server keeps one marker");
        assert_eq!(hub.markers[0].snapshot, "999:999:");
        hub.publish(event(1, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        hub.on_marker("1000:1000:".into());
        hub.on_marker("1001:1001:".into());
        assert_eq!(hub.markers.len(), 2);
        assert_eq!(hub.markers[1].fed_before, vec![1]);
    }

    #[test]
    fn a_lagging_resume_waits_for_its_since_then_replays_from_its_place() {
        let mut hub = hub();
        let (owner, deployment) = (Uuid::new_v4(), Uuid::new_v4());
        hub.on_marker("100:100:".into());
        let watcher = Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) };
        let mut client = connect(&mut hub, 1, watcher, 16);
        let topic = Topic::Logs(deployment);
        hub.handle(Command::Subscribe { conn: 1, topic, since: Some(Since::Committed { id: 7, xid: 150 }) });
        assert!(client.rx.try_recv().is_err(), "no reply before since arrives");
        for id in [7, 8] {
            hub.publish(event(id, EventKind::LogsUpdate, deployment, owner, None));
        }
        assert_eq!(client.events(), vec![8], "exactly what followed since");
        hub.publish(event(9, EventKind::LogsUpdate, deployment, owner, None));
        assert_eq!(client.events(), vec![9]);
    }

    #[test]
    fn subscribed_carries_the_newest_event_as_cursor() {
        let mut hub = hub();
        hub.handle(Command::Register {
            conn: 1,
            viewer: viewer(Uuid::new_v4()),
            outbound: mpsc::channel(8).0,
            kicked: CancellationToken::new(),
        });
        hub.origin = 41;
        assert_eq!(hub.cursor(), 41, "before any event, the origin");
        hub.publish(event(44, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        hub.publish(event(43, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None));
        assert_eq!(hub.cursor(), 43, "the last in commit order, not the largest id");
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
    fn topic_subscriber_who_loses_visibility_stops_receiving() {
        let mut hub = hub();
        let (org, deployment, owner) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut member = connect(&mut hub, 1, Viewer { organization_id: Some(org), ..viewer(Uuid::new_v4()) }, 16);
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::Logs(deployment), since: None });
        hub.publish(event(1, EventKind::LogsUpdate, deployment, owner, Some(org)));
        // The deployment moved to another organization.
        hub.publish(event(2, EventKind::LogsUpdate, deployment, owner, Some(Uuid::new_v4())));
        assert_eq!(member.events(), vec![1]);
    }
}
