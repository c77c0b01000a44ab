//! Where a `since` falls: the history of recent events, in the order they
//! were fed (the log's id order, which is commit order), and the replay
//! plan of each resume.
//!
//! The feed hands events over in id order, and only once every smaller id
//! has been handed over or can no longer commit (`db::feed`). So "every
//! event after N" is, for any instance, the events with larger ids: what
//! the history holds after N, and before the history, the event log.

use std::sync::Arc;

use super::routing::{Conn, on_topic};
use super::{ConnId, LogReplay, Replay, Since};
use crate::event::{Event, Topic};
use crate::history::History;
use uuid::Uuid;

/// A subscribe, or a resume at connect, whose `since` the feed has not
/// reached yet (this instance lags the one the client came from).
pub(super) struct Deferred {
    pub conn: ConnId,
    pub what: Deferral,
    pub id: i64,
}

pub(super) enum Deferral {
    Subscribe(Topic),
    Resume(Vec<Topic>),
}

/// What a subscribe gets.
pub(super) enum Plan {
    /// `subscribed` with `cursor` and `replay`; the subscription delivers
    /// live events from seq `from` on.
    Ready { cursor: i64, replay: Option<Replay>, from: u64 },
    /// `since` is newer than anything fed here: the session asks the log
    /// whether such an id was ever given out.
    LookUp(i64),
    /// `since` (this id) was given out but not fed here yet: wait for it.
    Wait(i64),
}

/// Where a `since` falls in the feed.
pub(super) enum Place {
    At(Placed),
    LookUp(i64),
    Wait(i64),
}

pub(super) struct Placed {
    /// The resume cursor.
    pub cursor: i64,
    /// What follows `since` is delivered from this seq on...
    pub from: u64,
    /// ...and, with a `since`, replayed: `resync` first, then the log part
    /// (before the history), then the history from `from`.
    pub replay: Option<(bool, Option<LogReplay>)>,
}

/// How far past a `since` the history holds no event (ids that never
/// committed) it is looked for, before the log is asked instead.
const MAX_PROBE: i64 = 1024;

pub(super) struct Timeline {
    history: History,
    /// Every id up to this one was fed, or can no longer commit.
    through: i64,
    deferred: Vec<Deferred>,
}

impl Timeline {
    pub fn new(history: History) -> Timeline {
        Timeline { history, through: 0, deferred: Vec::new() }
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.history.next_seq()
    }

    pub fn history_bytes(&self) -> usize {
        self.history.bytes()
    }

    /// The resume cursor of a subscription made now: everything up to it
    /// was fed.
    pub fn cursor(&self) -> i64 {
        self.through
    }

    /// Give the event its place in the order; `None` when it was already
    /// fed.
    pub fn admit(&mut self, mut event: Event) -> Option<Arc<Event>> {
        if self.history.seq_of(event.id).is_some() {
            return None;
        }
        self.through = self.through.max(event.id);
        event.seq = self.history.next_seq();
        let event = Arc::new(event);
        self.history.push(Arc::clone(&event));
        Some(event)
    }

    /// The feed went past ids that will never commit: the lagging resumes
    /// it lets through.
    pub fn advance(&mut self, through: i64) -> Vec<Deferred> {
        self.through = self.through.max(through);
        self.ready()
    }

    /// The ids started again below what was fed: what the history holds
    /// says nothing of the new ids, so it is dropped, and a resume from an
    /// older id is looked up (and gets `resync`).
    pub fn restart(&mut self, through: i64, history: History) {
        self.history = history;
        self.through = through;
    }

    /// The lagging resumes the feed has now reached.
    pub fn ready(&mut self) -> Vec<Deferred> {
        let through = self.through;
        if !self.deferred.iter().any(|d| d.id <= through) {
            return Vec::new();
        }
        self.deferred.extract_if(.., |d| d.id <= through).collect()
    }

    /// A subscribe of `conn` to `topic` still waiting for its `since`.
    pub fn cancel_wait(&mut self, conn: ConnId, topic: Topic) -> Option<Deferred> {
        let i = self
            .deferred
            .iter()
            .position(|d| d.conn == conn && matches!(d.what, Deferral::Subscribe(t) if t == topic))?;
        Some(self.deferred.swap_remove(i))
    }

    pub fn defer(&mut self, deferred: Deferred) {
        self.deferred.push(deferred);
    }

    pub fn forget(&mut self, conn: ConnId) {
        self.deferred.retain(|d| d.conn != conn);
    }

    /// Where a subscribe of `conn` to `topic` starts.
    pub fn plan(&self, conn: &Conn, topic: Topic, since: Option<Since>) -> Plan {
        match self.place(since) {
            Place::LookUp(id) => Plan::LookUp(id),
            Place::Wait(id) => Plan::Wait(id),
            Place::At(Placed { cursor, from, replay }) => {
                let replay = replay.map(|(resync, from_log)| {
                    // Without a log part, the history from `from` is all
                    // there is; with one, the whole history follows it.
                    Replay { resync, from_log, recent: self.recent(conn, topic, from) }
                });
                Plan::Ready { cursor, replay, from }
            }
        }
    }

    /// Where what follows `since` starts: in the history, before it (the
    /// log first), or not here yet.
    pub fn place(&self, since: Option<Since>) -> Place {
        let now = Placed { cursor: self.cursor(), from: self.next_seq(), replay: None };
        let Some(since) = since else { return Place::At(now) };
        let id = since.id();
        if id > self.through {
            return match since {
                Since::Unchecked(_) => Place::LookUp(id),
                Since::Checked { newest, .. } if id <= newest => Place::Wait(id),
                // An id the log never gave out (or gave out before its ids
                // started again): nothing can be placed after it.
                Since::Checked { .. } => Place::At(Placed { replay: Some((true, None)), ..now }),
            };
        }
        // In the history, or between two of its events (an id that never
        // committed): replay what follows it there.
        if let Some(seq) = self.placed_in_history(id) {
            return Place::At(Placed { cursor: id, from: seq, replay: Some((false, None)) });
        }
        // Older than the history: the log up to it, then all of it.
        let before = self.history.first_id().unwrap_or(self.through + 1);
        let from = self.history.first_seq();
        let log = LogReplay { since: id, before, skip: self.history.late_below(before) };
        Place::At(Placed { cursor: id, from, replay: Some((false, Some(log))) })
    }

    /// The history's events from `seq` on that `conn` receives, by the
    /// delivery rule as it stands (a resume at connect, placed at `seq`,
    /// with nothing sent before): its own and its topics', each once, in
    /// commit order, visiting only the candidates.
    pub fn owed_from(&self, conn: &Conn, seq: u64) -> Vec<Arc<Event>> {
        let viewer = conn.viewer;
        let owed = |event: &&Arc<Event>| conn.receives(event.seq, event);
        if viewer.is_superuser && conn.subscriptions.contains(Topic::DeploymentEvents) {
            return self.history.all_from(seq).filter(owed).cloned().collect();
        }
        let organization = viewer.organization_id.filter(|_| conn.subscriptions.contains(Topic::DeploymentEvents));
        let mut seqs: Vec<u64> = self.history.of_owner_or_organization(viewer.user_id, organization, seq).collect();
        let mut deployments: Vec<Uuid> = conn.subscriptions.topics().filter_map(Topic::deployment).collect();
        deployments.sort_unstable();
        deployments.dedup();
        for deployment in deployments {
            seqs.extend(self.history.of_deployment(deployment, seq));
        }
        seqs.sort_unstable();
        seqs.dedup();
        seqs.into_iter().filter_map(|s| self.history.get(s)).filter(owed).cloned().collect()
    }

    /// The seq from which the history holds what follows `id`, when it
    /// covers `id`: right after `id` itself, or at the first event of a
    /// larger id when `id` never committed.
    fn placed_in_history(&self, id: i64) -> Option<u64> {
        if let Some(seq) = self.history.seq_of(id) {
            return Some(seq + 1);
        }
        let first = self.history.first_id()?;
        if id < first {
            return None;
        }
        let probed = (id + 1..=self.through.min(id + MAX_PROBE)).find_map(|next| self.history.seq_of(next));
        Some(probed.unwrap_or_else(|| {
            // Past the probe: the first event of a larger id, if any.
            let after = self.history.all_from(self.history.first_seq()).find(|event| event.id > id);
            after.map_or(self.history.next_seq(), |event| event.seq)
        }))
    }

    /// The history's events of `topic` from `seq` on that this connection
    /// may see and was not already sent, visiting only the candidates.
    fn recent(&self, conn: &Conn, topic: Topic, seq: u64) -> Vec<Arc<Event>> {
        let viewer = conn.viewer;
        let owed = |event: &&Arc<Event>| on_topic(topic, viewer, event) && !conn.receives(event.seq, event);
        let by_seq = |seqs: &mut dyn Iterator<Item = u64>| -> Vec<Arc<Event>> {
            seqs.filter_map(|s| self.history.get(s)).filter(owed).cloned().collect()
        };
        match topic.deployment() {
            Some(deployment) => by_seq(&mut self.history.of_deployment(deployment, seq)),
            None if viewer.is_superuser => self.history.all_from(seq).filter(owed).cloned().collect(),
            None => by_seq(&mut self.history.of_owner_or_organization(viewer.user_id, viewer.organization_id, seq)),
        }
    }
}
