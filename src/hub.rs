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
    Subscribe {
        conn: ConnId,
        topic: Topic,
        since: Option<i64>,
    },
    Unsubscribe {
        conn: ConnId,
        topic: Topic,
    },
    Unregister {
        conn: ConnId,
    },
}

/// What a session's queue carries. Replies to (un)subscribe travel in the
/// same queue as events, so they keep their place among them.
#[derive(Debug)]
pub enum Outbound {
    Event(Arc<Event>),
    /// The replay is boxed: every queue slot is the size of this enum,
    /// and a subscription's replay is rare.
    Subscribed {
        topic: Topic,
        replay: Option<Box<Replay>>,
    },
    Unsubscribed {
        topic: Topic,
    },
}

/// The events a `subscribe` with `since` owes the client, oldest first.
#[derive(Debug, Default)]
pub struct Replay {
    /// First, when `since` is older than the history: events to read from
    /// the event log.
    pub from_log: Option<LogReplay>,
    /// Then these, from the history, in commit order.
    pub recent: Vec<Arc<Event>>,
}

#[derive(Debug)]
pub struct LogReplay {
    /// Read events with an id above this one...
    pub since: i64,
    /// ...whose transactions this marker snapshot shows as finished (later
    /// ones reach the client live)...
    pub snapshot: Option<String>,
    /// ...except these, which the history holds...
    pub skip: HashSet<i64>,
    /// ...plus these, fed since the marker but already gone from the
    /// history.
    pub evicted: Vec<i64>,
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

/// Events in commit order, the last `capacity` of them, each with a
/// sequence number that counts commits seen by this process.
struct History {
    events: VecDeque<Arc<Event>>,
    first_seq: u64,
    positions: HashMap<i64, u64>,
    capacity: usize,
}

impl History {
    fn new(capacity: usize) -> Self {
        History { events: VecDeque::new(), first_seq: 1, positions: HashMap::new(), capacity }
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    fn push(&mut self, event: Arc<Event>) -> u64 {
        if self.events.len() == self.capacity {
            if let Some(oldest) = self.events.pop_front() {
                self.positions.remove(&oldest.id);
            }
            self.first_seq += 1;
        }
        let seq = self.next_seq();
        self.positions.insert(event.id, seq);
        self.events.push_back(event);
        seq
    }

    fn seq_of(&self, id: i64) -> Option<u64> {
        self.positions.get(&id).copied()
    }

    fn from(&self, seq: u64) -> impl Iterator<Item = (u64, &Arc<Event>)> {
        let skip = seq.saturating_sub(self.first_seq) as usize;
        self.events.iter().enumerate().skip(skip).map(move |(i, e)| (self.first_seq + i as u64, e))
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
    fn received(&self, seq: u64, event: &Event) -> bool {
        (seq >= self.registered_seq && event.owner == self.viewer.user_id)
            || self.subscriptions.iter().any(|(topic, from)| {
                seq >= *from
                    && topic.carries(event.kind, event.deployment_id)
                    && self.viewer.can_see(event.owner, event.organization_id)
            })
    }
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
    last_marker: Option<String>,
    /// Ids fed since the last marker, and between the two before it. A
    /// transaction the marker shows as unfinished may have been fed just
    /// before the marker: two generations cover it (the listener sends a
    /// marker only after the previous one came back).
    fed_since_marker: HashSet<i64>,
    fed_before_marker: HashSet<i64>,
    max_event_id: i64,
    recipients: Vec<ConnId>,
}

/// Capacity of the listener → hub channel. When the hub falls behind, the
/// listener waits here and PostgreSQL's notification queue holds the rest.
const FEED_CAPACITY: usize = 4096;
/// Sessions wait here only for the hub to take their commands.
const COMMAND_CAPACITY: usize = 1024;

impl Hub {
    pub fn new(metrics: Arc<Metrics>, history_size: usize) -> (Hub, HubHandle, mpsc::Sender<Feed>) {
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
            history: History::new(history_size),
            last_marker: None,
            fed_since_marker: HashSet::new(),
            fed_before_marker: HashSet::new(),
            max_event_id: 0,
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
                },
                Some(command) = self.commands.recv() => self.handle(command),
                else => break,
            }
        }
    }

    fn on_marker(&mut self, snapshot: String) {
        self.last_marker = Some(snapshot);
        self.fed_before_marker = std::mem::take(&mut self.fed_since_marker);
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

    fn subscribe(&mut self, conn: ConnId, topic: Topic, since: Option<i64>) {
        let Some(entry) = self.conns.get(&conn) else { return };
        let next_seq = self.history.next_seq();
        let (replay, covered_from) = match since {
            Some(since) => self.replay(entry, topic, since),
            None => (None, next_seq),
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
        self.queue(conn, Outbound::Subscribed { topic, replay: replay.map(Box::new) });
    }

    /// What `subscribe` with `since` owes: the history after `since`'s
    /// place in commit order, or, when `since` is older than the history,
    /// the event log first and then the whole history. Events this
    /// connection was already sent are left out.
    fn replay(&self, conn: &Conn, topic: Topic, since: i64) -> (Option<Replay>, u64) {
        let (start_seq, mut from_log) = match self.history.seq_of(since) {
            Some(seq) => (seq + 1, None),
            // Newer than anything this process has seen: nothing to replay.
            None if self.max_event_id > 0 && since > self.max_event_id => (self.history.next_seq(), None),
            None => {
                let evicted = self
                    .fed_since_marker
                    .iter()
                    .chain(&self.fed_before_marker)
                    .filter(|id| **id > since && self.history.seq_of(**id).is_none())
                    .copied()
                    .collect();
                (0, Some(LogReplay { since, snapshot: self.last_marker.clone(), skip: HashSet::new(), evicted }))
            }
        };
        let mut recent = Vec::new();
        for (seq, event) in self.history.from(start_seq) {
            if !topic.carries(event.kind, event.deployment_id)
                || !conn.viewer.can_see(event.owner, event.organization_id)
            {
                continue;
            }
            if let Some(log) = from_log.as_mut() {
                log.skip.insert(event.id);
            }
            if !conn.received(seq, event) {
                recent.push(Arc::clone(event));
            }
        }
        (Some(Replay { from_log, recent }), start_seq)
    }

    fn publish(&mut self, event: Event) {
        // The listener's catch-up after a reconnect may overlap what it
        // already fed; each event enters once.
        if self.history.seq_of(event.id).is_some() || self.fed_recently(event.id) {
            debug!(event_id = event.id, "event already delivered; skipped");
            return;
        }
        self.fed_since_marker.insert(event.id);
        self.metrics.events_total.fetch_add(1, Relaxed);
        self.max_event_id = self.max_event_id.max(event.id);
        let event = Arc::new(event);
        let seq = self.history.push(Arc::clone(&event));

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
                    Outbound::Subscribed { replay: Some(replay), .. } => ids.extend(replay.recent.iter().map(|e| e.id)),
                    _ => {}
                }
            }
            ids
        }
    }

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::default()), 100).0
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
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: Some(3) });
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
        hub.handle(Command::Subscribe { conn: 1, topic: Topic::DeploymentEvents, since: Some(1) });
        assert_eq!(client.events(), Vec::<i64>::new());
    }

    #[test]
    fn replay_older_than_history_asks_the_log_and_skips_what_history_holds() {
        let mut hub = Hub::new(Arc::new(Metrics::default()), 2).0;
        let owner = Uuid::new_v4();
        let deployment = Uuid::new_v4();
        for id in 1..=3 {
            hub.publish(event(id, EventKind::Progress, deployment, owner, None));
        }
        let (tx, mut rx) = mpsc::channel(8);
        hub.handle(Command::Register {
            conn: 9,
            viewer: Viewer { is_superuser: true, ..viewer(Uuid::new_v4()) },
            outbound: tx,
            kicked: CancellationToken::new(),
        });
        hub.handle(Command::Subscribe { conn: 9, topic: Topic::Progress(deployment), since: Some(1) });
        let Ok(Outbound::Subscribed { replay: Some(replay), .. }) = rx.try_recv() else { panic!("no reply") };
        let log = replay.from_log.expect("since 1 is older than the history");
        assert_eq!(log.since, 1);
        assert_eq!(log.skip, HashSet::from([2, 3]));
        assert_eq!(replay.recent.iter().map(|e| e.id).collect::<Vec<_>>(), vec![2, 3]);
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
