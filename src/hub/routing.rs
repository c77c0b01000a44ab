//! Who receives what: the delivery rule, written once ([`Conn::receives`]),
//! and the indexes that find its candidates without visiting every
//! connection. The indexes only narrow: the rule decides.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{ConnId, QueueSender};
use crate::auth::Viewer;
use crate::event::{Event, Topic};

/// A registered connection, as the hub sees it.
pub(super) struct Conn {
    pub viewer: Viewer,
    pub outbound: QueueSender,
    pub kicked: CancellationToken,
    pub subscriptions: Subscriptions,
    /// The first seq of the viewer's own events it receives.
    pub registered_seq: u64,
    /// The first seq delivered under `viewer` (0 until a token changed it).
    viewer_from: u64,
    /// The viewer before the last change, and the first seq delivered
    /// under it. What came before that is not known, so not counted as
    /// received.
    previous: Option<Box<(Viewer, u64)>>,
    /// Seq of the last event queued for it: each event at most once.
    pub last_seq: u64,
}

impl Conn {
    pub fn new(viewer: Viewer, outbound: QueueSender, kicked: CancellationToken, seq: u64) -> Conn {
        Conn {
            viewer,
            outbound,
            kicked,
            subscriptions: Subscriptions::default(),
            registered_seq: seq,
            viewer_from: 0,
            previous: None,
            last_seq: 0,
        }
    }

    /// The delivery rule: whether this connection receives the event fed at
    /// `seq`. Its viewer's own events since it registered, and the events
    /// of each topic it subscribes to that its viewer may see, since the
    /// subscription took effect. Live fan-out, replays from the history
    /// and the "already sent" check of a resume all ask this. "Its viewer"
    /// is the one in force when the event was fed: a fresh token can change
    /// the organization or the role, and what the old viewer could not see
    /// was not sent.
    pub fn receives(&self, seq: u64, event: &Event) -> bool {
        let Some(viewer) = self.viewer_at(seq) else { return false };
        let own = seq >= self.registered_seq && event.owner == viewer.user_id;
        // The only topics that can carry an event: every subscription is
        // one of these or does not carry it.
        let topics = [Some(Topic::DeploymentEvents), Topic::of_event(event.kind, event.deployment_id)];
        own || topics.into_iter().flatten().any(|topic| {
            self.subscriptions.from(topic).is_some_and(|from| seq >= from && on_topic(topic, viewer, event))
        })
    }

    /// The viewer in force when the event at `seq` was fed, if known.
    fn viewer_at(&self, seq: u64) -> Option<Viewer> {
        if seq >= self.viewer_from {
            return Some(self.viewer);
        }
        self.previous.as_deref().filter(|(_, from)| seq >= *from).map(|(viewer, _)| *viewer)
    }

    /// A fresh token changed the viewer: events from `seq` on are
    /// delivered under the new one.
    fn change_viewer(&mut self, viewer: Viewer, seq: u64) -> Viewer {
        let old = std::mem::replace(&mut self.viewer, viewer);
        self.previous = Some(Box::new((old, std::mem::replace(&mut self.viewer_from, seq))));
        old
    }
}

/// A connection's subscriptions, each with the first seq it delivers from.
/// `deployment_events` is kept apart: fan-out asks for it once per
/// recipient per event, and a field costs no hashing.
#[derive(Default)]
pub(super) struct Subscriptions {
    deployment_events: Option<u64>,
    per_deployment: HashMap<Topic, u64>,
}

impl Subscriptions {
    pub fn from(&self, topic: Topic) -> Option<u64> {
        match topic {
            Topic::DeploymentEvents => self.deployment_events,
            Topic::Deployment { .. } => self.per_deployment.get(&topic).copied(),
        }
    }

    pub fn contains(&self, topic: Topic) -> bool {
        self.from(topic).is_some()
    }

    /// Deliver `topic` from `seq` on (or from the earlier of the two, when
    /// subscribed already); true when the subscription is new.
    fn insert(&mut self, topic: Topic, seq: u64) -> bool {
        let (new, from) = match topic {
            Topic::DeploymentEvents => (self.deployment_events.is_none(), self.deployment_events.get_or_insert(seq)),
            Topic::Deployment { .. } => match self.per_deployment.entry(topic) {
                Entry::Vacant(vacant) => (true, vacant.insert(seq)),
                Entry::Occupied(occupied) => (false, occupied.into_mut()),
            },
        };
        *from = (*from).min(seq);
        new
    }

    fn remove(&mut self, topic: Topic) -> bool {
        match topic {
            Topic::DeploymentEvents => self.deployment_events.take().is_some(),
            Topic::Deployment { .. } => self.per_deployment.remove(&topic).is_some(),
        }
    }

    pub fn topics(&self) -> impl Iterator<Item = Topic> + '_ {
        self.deployment_events.map(|_| Topic::DeploymentEvents).into_iter().chain(self.per_deployment.keys().copied())
    }
}

/// Whether a subscription of `viewer` to `topic` carries `event`: the
/// topic's events, of deployments the viewer may see.
pub(super) fn on_topic(topic: Topic, viewer: Viewer, event: &Event) -> bool {
    topic.carries(event.kind, event.deployment_id) && viewer.can_see(event.owner, event.organization_id)
}

/// Hashes a [`ConnId`] with one multiplication. Connection ids are handed
/// out in sequence by this process, not chosen by clients, so SipHash's
/// defence against chosen keys buys nothing; fan-out hashes one per
/// recipient per event, and SipHash cost more than the rest of the lookup.
#[derive(Default)]
pub(super) struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the low bits (the bucket) and the high bits
        // (hashbrown's tag) both vary with every bit of the id.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ConnIds = BuildHasherDefault<ConnIdHasher>;
type ConnSet = HashSet<ConnId, ConnIds>;

/// The registered connections and their indexes.
#[derive(Default)]
pub(super) struct Routes {
    conns: HashMap<ConnId, Conn, ConnIds>,
    /// Every connection, by user: their own events.
    owners: HashMap<Uuid, Vec<ConnId>>,
    /// `deployment_events` subscribers who see every deployment.
    everything: ConnSet,
    /// `deployment_events` subscribers, by their organization.
    by_organization: HashMap<Uuid, ConnSet>,
    /// Per-deployment topic subscribers.
    by_topic: HashMap<Topic, ConnSet>,
    subscriptions: usize,
}

impl Routes {
    pub fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn)
    }

    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn)
    }

    /// How many subscriptions all connections hold.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    pub fn register(&mut self, id: ConnId, conn: Conn) {
        self.owners.entry(conn.viewer.user_id).or_default().push(id);
        self.conns.insert(id, conn);
    }

    /// A re-authentication changed the viewer's organization or role, for
    /// the events fed from `seq` on.
    pub fn set_viewer(&mut self, id: ConnId, viewer: Viewer, seq: u64) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if conn.viewer == viewer {
            return;
        }
        let old = conn.change_viewer(viewer, seq);
        if conn.subscriptions.contains(Topic::DeploymentEvents) {
            self.unindex(id, Topic::DeploymentEvents, old);
            self.index(id, Topic::DeploymentEvents, viewer);
        }
    }

    /// Subscribe `id` to `topic` from `seq` on (or, when it already is,
    /// from the earlier of the two).
    pub fn subscribe(&mut self, id: ConnId, topic: Topic, seq: u64) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let viewer = conn.viewer;
        if conn.subscriptions.insert(topic, seq) {
            self.index(id, topic, viewer);
            self.subscriptions += 1;
        }
    }

    /// A connection registered to resume gets its own events from `seq` on.
    pub fn start_owner_feed(&mut self, id: ConnId, seq: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.registered_seq = conn.registered_seq.min(seq);
        }
    }

    pub fn unsubscribe(&mut self, id: ConnId, topic: Topic) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let viewer = conn.viewer;
        if conn.subscriptions.remove(topic) {
            self.unindex(id, topic, viewer);
            self.subscriptions -= 1;
        }
    }

    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        if let Some(ids) = self.owners.get_mut(&conn.viewer.user_id) {
            ids.retain(|c| *c != id);
            if ids.is_empty() {
                self.owners.remove(&conn.viewer.user_id);
            }
        }
        for topic in conn.subscriptions.topics() {
            self.unindex(id, topic, conn.viewer);
            self.subscriptions -= 1;
        }
        Some(conn)
    }

    /// Every connection that may receive `event`, some more than once, and
    /// perhaps some that do not ([`Conn::receives`] decides).
    pub fn candidates(&self, event: &Event, out: &mut Vec<ConnId>) {
        if let Some(ids) = self.owners.get(&event.owner) {
            out.extend(ids);
        }
        out.extend(&self.everything);
        if let Some(ids) = event.organization_id.and_then(|org| self.by_organization.get(&org)) {
            out.extend(ids);
        }
        if let Some(ids) = Topic::of_event(event.kind, event.deployment_id).and_then(|t| self.by_topic.get(&t)) {
            out.extend(ids);
        }
        #[cfg(debug_assertions)]
        self.check_candidates(event, out);
    }

    /// The indexes may only narrow: nobody the rule delivers to is missed.
    #[cfg(debug_assertions)]
    fn check_candidates(&self, event: &Event, candidates: &[ConnId]) {
        let candidates: HashSet<&ConnId> = candidates.iter().collect();
        for (id, conn) in &self.conns {
            debug_assert!(
                candidates.contains(id) || !conn.receives(event.seq, event),
                "conn {id} receives event {} but no index names it",
                event.id
            );
        }
    }

    /// `deployment_events` for a viewer's own deployments comes through
    /// `owners`; only superusers and organization members need an index.
    fn index(&mut self, id: ConnId, topic: Topic, viewer: Viewer) {
        match topic {
            Topic::DeploymentEvents if viewer.is_superuser => {
                self.everything.insert(id);
            }
            Topic::DeploymentEvents => {
                if let Some(org) = viewer.organization_id {
                    self.by_organization.entry(org).or_default().insert(id);
                }
            }
            Topic::Deployment { .. } => {
                self.by_topic.entry(topic).or_default().insert(id);
            }
        }
    }

    fn unindex(&mut self, id: ConnId, topic: Topic, viewer: Viewer) {
        match topic {
            Topic::DeploymentEvents => {
                self.everything.remove(&id);
                if let Some(org) = viewer.organization_id {
                    remove_from(&mut self.by_organization, org, id);
                }
            }
            Topic::Deployment { .. } => remove_from(&mut self.by_topic, topic, id),
        }
    }
}

fn remove_from<K: Hash + Eq>(index: &mut HashMap<K, ConnSet>, key: K, id: ConnId) {
    if let Some(ids) = index.get_mut(&key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn what_a_connection_received_is_judged_with_the_viewer_of_the_time() {
        let (org_a, org_b, org_c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let viewer = |org| Viewer { user_id: Uuid::nil(), organization_id: Some(org), is_superuser: false };
        let of = |org| Event::new(1, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), Some(org), "{}");
        let (tx, _rx) = super::super::queue(1);
        let mut conn = Conn::new(viewer(org_a), tx, CancellationToken::new(), 0);
        conn.subscriptions.insert(Topic::DeploymentEvents, 0);
        assert!(conn.receives(5, &of(org_a)) && !conn.receives(5, &of(org_b)));
        // A token for org B from seq 10 on, then one for org C from seq 20.
        conn.change_viewer(viewer(org_b), 10);
        assert!(conn.receives(5, &of(org_a)), "sent under A before the change");
        assert!(!conn.receives(5, &of(org_b)), "B's early events were not sent: a resume owes them");
        assert!(conn.receives(15, &of(org_b)) && !conn.receives(15, &of(org_a)));
        conn.change_viewer(viewer(org_c), 20);
        assert!(conn.receives(15, &of(org_b)) && conn.receives(25, &of(org_c)));
        assert!(!conn.receives(5, &of(org_a)), "before the viewer kept: not counted as sent (a repeat, never a loss)");
    }
}
