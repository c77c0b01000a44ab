//! Where a `since` falls: the history of recent events in commit order,
//! the marker snapshots that tie it to the event log, and the replay plan
//! of each resume.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tracing::warn;

use super::routing::{Conn, on_topic};
use super::{ConnId, LogReplay, Replay, Since};
use crate::event::{Event, Topic};
use crate::history::{History, Snapshot};

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
pub(super) struct Deferred {
    pub conn: ConnId,
    pub topic: Topic,
    pub id: i64,
    pub xid: u64,
}

impl Deferred {
    pub fn since(&self) -> Since {
        Since::Committed { id: self.id, xid: self.xid }
    }
}

/// What a subscribe gets.
pub(super) enum Plan {
    /// `subscribed` with `cursor` and `replay`; the subscription delivers
    /// live events from seq `from` on.
    Ready { cursor: i64, replay: Option<Replay>, from: u64 },
    /// The history does not hold `since`: the session looks it up.
    LookUp(i64),
    /// `since` committed but was not fed here yet: wait for it.
    Wait,
}

pub(super) struct Timeline {
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
    pub origin: i64,
    deferred: Vec<Deferred>,
}

impl Timeline {
    pub fn new(history: History) -> Timeline {
        Timeline {
            history,
            markers: VecDeque::new(),
            fed_since_marker: HashSet::new(),
            fed_before_marker: HashSet::new(),
            evicted_since_marker: Vec::new(),
            origin: 0,
            deferred: Vec::new(),
        }
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.history.next_seq()
    }

    pub fn history_bytes(&self) -> usize {
        self.history.bytes()
    }

    /// The resume cursor of a subscription made now: the newest event fed.
    pub fn cursor(&self) -> i64 {
        self.history.last_id().unwrap_or(self.origin)
    }

    /// Give the event its place in commit order; `None` when it was
    /// already fed (a source's catch-up after a reconnect may overlap).
    pub fn admit(&mut self, mut event: Event) -> Option<Arc<Event>> {
        if self.history.seq_of(event.id).is_some()
            || self.fed_since_marker.contains(&event.id)
            || self.fed_before_marker.contains(&event.id)
        {
            return None;
        }
        self.fed_since_marker.insert(event.id);
        event.seq = self.history.next_seq();
        let event = Arc::new(event);
        self.history.push(Arc::clone(&event), &mut self.evicted_since_marker);
        self.prune_markers();
        Some(event)
    }

    /// A marker came: returns the lagging resumes it lets through.
    pub fn on_marker(&mut self, snapshot: String) -> Vec<Deferred> {
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
        match self.markers.back().and_then(|m| m.parsed.as_ref()) {
            Some(latest) => {
                let (ready, waiting) =
                    std::mem::take(&mut self.deferred).into_iter().partition(|d| latest.finished(d.xid));
                self.deferred = waiting;
                ready
            }
            None => Vec::new(),
        }
    }

    /// The lagging resumes waiting for event `id`, which was just fed.
    pub fn waiting_for(&mut self, id: i64) -> Vec<Deferred> {
        match self.deferred.iter().position(|d| d.id == id) {
            Some(i) => self.deferred.extract_if(i.., |d| d.id == id).collect(),
            None => Vec::new(),
        }
    }

    /// A subscribe of `conn` to `topic` still waiting for its `since`.
    pub fn cancel_wait(&mut self, conn: ConnId, topic: Topic) -> Option<Deferred> {
        let i = self.deferred.iter().position(|d| d.conn == conn && d.topic == topic)?;
        Some(self.deferred.swap_remove(i))
    }

    pub fn forget(&mut self, conn: ConnId) {
        self.deferred.retain(|d| d.conn != conn);
    }

    /// Drop markers from before the history's first event, but keep the
    /// newest: the oldest one left is the floor a log replay reads up to.
    fn prune_markers(&mut self) {
        let first = self.history.first_seq();
        while self.markers.len() > 1 && self.markers.front().is_some_and(|m| m.seq < first) {
            self.markers.pop_front();
        }
    }

    /// Where a subscribe of `conn` (registered as `conn_id`) to `topic` starts.
    pub fn plan(&mut self, conn_id: ConnId, conn: &Conn, topic: Topic, since: Option<Since>) -> Plan {
        let Some(since) = since else {
            return Plan::Ready { cursor: self.cursor(), replay: None, from: self.next_seq() };
        };
        if let Some(seq) = self.history.seq_of(since.id()) {
            let recent = self.recent(conn, topic, seq + 1);
            return Plan::Ready {
                cursor: since.id(),
                replay: Some(Replay { recent, ..Replay::default() }),
                from: seq + 1,
            };
        }
        let resync = match since {
            Since::Unchecked(id) => return Plan::LookUp(id),
            Since::Committed { id, xid } => {
                let finished = self.markers.back().and_then(|m| m.parsed.as_ref()).is_some_and(|s| s.finished(xid));
                if !finished {
                    self.deferred.push(Deferred { conn: conn_id, topic, id, xid });
                    return Plan::Wait;
                }
                false
            }
            Since::Missing { id, pruned } if pruned || id == 0 => pruned,
            // No such event: nothing can be placed after it.
            Since::Missing { .. } => {
                let replay = Replay { resync: true, ..Replay::default() };
                return Plan::Ready { cursor: self.cursor(), replay: Some(replay), from: self.next_seq() };
            }
        };
        let (from_log, from) = self.before_history(conn, since.id());
        let recent = self.recent(conn, topic, from);
        Plan::Ready { cursor: since.id(), replay: Some(Replay { resync, from_log, recent }), from }
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
            .filter(|event| conn.receives(event.seq, event))
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

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::event::EventKind;

    #[test]
    fn markers_without_events_between_them_are_kept_once() {
        let mut timeline = Timeline::new(History::new(100, usize::MAX));
        for xmin in 10..1000 {
            timeline.on_marker(format!("{xmin}:{xmin}:"));
        }
        assert_eq!(timeline.markers.len(), 1, "an idle server keeps one marker");
        assert_eq!(timeline.markers[0].snapshot, "999:999:");
        let event = Event::new(1, EventKind::Progress, Uuid::new_v4(), Uuid::new_v4(), None, "{}");
        assert!(timeline.admit(event).is_some());
        timeline.on_marker("1000:1000:".into());
        timeline.on_marker("1001:1001:".into());
        assert_eq!(timeline.markers.len(), 2);
        assert_eq!(timeline.markers[1].fed_before, vec![1]);
    }
}
