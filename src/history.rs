//! Recent events in the order they were fed (the log's id order), for
//! `since` resumes.
//!
//! The history is bounded in events (`WINDFLOW_HISTORY_SIZE`) and in bytes
//! of messages (`WINDFLOW_HISTORY_BYTES`): the oldest events leave first, so
//! a burst of 1 MiB log lines costs its bytes only until newer events push
//! it out. Three indexes (by deployment, by owner, by organization) let a
//! replay visit only the events its topic and viewer may receive, so a
//! `since` costs work in proportion to what it replays, not to the
//! history's size.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use uuid::Uuid;

use crate::event::Event;

pub struct History {
    events: VecDeque<Arc<Event>>,
    /// Seq of `events[0]`; seqs count events fed to this process, from 1.
    first_seq: u64,
    positions: HashMap<i64, u64>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    by_deployment: HashMap<Uuid, VecDeque<u64>>,
    by_owner: HashMap<Uuid, VecDeque<u64>>,
    by_organization: HashMap<Uuid, VecDeque<u64>>,
    /// Ids fed after a larger one (an event the feed delivered late): the
    /// only ids of the history below its first event's.
    late: BTreeSet<i64>,
    /// The largest id fed so far.
    largest: i64,
}

impl History {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        History {
            events: VecDeque::new(),
            first_seq: 1,
            positions: HashMap::new(),
            capacity: capacity.max(1),
            max_bytes,
            bytes: 0,
            by_deployment: HashMap::new(),
            by_owner: HashMap::new(),
            by_organization: HashMap::new(),
            late: BTreeSet::new(),
            largest: 0,
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The id of the newest event.
    pub fn last_id(&self) -> Option<i64> {
        self.events.back().map(|e| e.id)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Append an event (its `seq` already set to [`History::next_seq`]),
    /// evicting the oldest until it fits. The
    /// newest event always stays, however large.
    pub fn push(&mut self, event: Arc<Event>) {
        let size = event.frame.len();
        while !self.events.is_empty() && (self.events.len() >= self.capacity || self.bytes + size > self.max_bytes) {
            self.evict_oldest();
        }
        let seq = self.next_seq();
        debug_assert_eq!(event.seq, seq);
        self.positions.insert(event.id, seq);
        if event.id < self.largest {
            self.late.insert(event.id);
        }
        self.largest = self.largest.max(event.id);
        self.by_deployment.entry(event.deployment_id).or_default().push_back(seq);
        self.by_owner.entry(event.owner).or_default().push_back(seq);
        if let Some(org) = event.organization_id {
            self.by_organization.entry(org).or_default().push_back(seq);
        }
        self.bytes += size;
        self.events.push_back(event);
    }

    fn evict_oldest(&mut self) {
        let Some(oldest) = self.events.pop_front() else { return };
        let seq = self.first_seq;
        self.first_seq += 1;
        self.bytes -= oldest.frame.len();
        self.positions.remove(&oldest.id);
        self.late.remove(&oldest.id);
        pop_index(&mut self.by_deployment, oldest.deployment_id, seq);
        pop_index(&mut self.by_owner, oldest.owner, seq);
        if let Some(org) = oldest.organization_id {
            pop_index(&mut self.by_organization, org, seq);
        }
    }

    /// The id of the oldest event.
    pub fn first_id(&self) -> Option<i64> {
        self.events.front().map(|e| e.id)
    }

    /// The ids below `id` that the history holds anyway, fed late.
    pub fn late_below(&self, id: i64) -> Vec<i64> {
        self.late.range(..id).copied().collect()
    }

    pub fn seq_of(&self, id: i64) -> Option<u64> {
        self.positions.get(&id).copied()
    }

    pub fn get(&self, seq: u64) -> Option<&Arc<Event>> {
        let index = seq.checked_sub(self.first_seq)?;
        self.events.get(usize::try_from(index).ok()?)
    }

    /// Every event from `seq` on, in commit order.
    pub fn all_from(&self, seq: u64) -> impl Iterator<Item = &Arc<Event>> {
        let skip = seq.saturating_sub(self.first_seq) as usize;
        self.events.iter().skip(skip)
    }

    /// The seqs, from `seq` on and in commit order, of the events of one
    /// deployment.
    pub fn of_deployment(&self, deployment: Uuid, seq: u64) -> impl Iterator<Item = u64> + '_ {
        index_from(&self.by_deployment, deployment, seq)
    }

    /// The seqs, from `seq` on and in commit order, of the events of
    /// deployments `owner` owns or `organization` holds.
    pub fn of_owner_or_organization(
        &self,
        owner: Uuid,
        organization: Option<Uuid>,
        seq: u64,
    ) -> impl Iterator<Item = u64> + '_ {
        let mut owned = index_from(&self.by_owner, owner, seq).peekable();
        let mut shared =
            organization.map(|org| index_from(&self.by_organization, org, seq)).into_iter().flatten().peekable();
        std::iter::from_fn(move || match (owned.peek().copied(), shared.peek().copied()) {
            (Some(a), Some(b)) if a == b => {
                shared.next();
                owned.next()
            }
            (Some(a), Some(b)) if b < a => shared.next(),
            (Some(_), _) => owned.next(),
            (None, _) => shared.next(),
        })
    }
}

fn pop_index(index: &mut HashMap<Uuid, VecDeque<u64>>, key: Uuid, seq: u64) {
    if let Some(seqs) = index.get_mut(&key) {
        debug_assert_eq!(seqs.front(), Some(&seq));
        seqs.pop_front();
        if seqs.is_empty() {
            index.remove(&key);
        }
    }
}

fn index_from(index: &HashMap<Uuid, VecDeque<u64>>, key: Uuid, seq: u64) -> impl Iterator<Item = u64> + '_ {
    let seqs = index.get(&key);
    let start = seqs.map_or(0, |seqs| seqs.partition_point(|s| *s < seq));
    seqs.into_iter().flat_map(move |seqs| seqs.range(start..).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn event(id: i64, seq: u64, deployment: Uuid, owner: Uuid, org: Option<Uuid>, size: usize) -> Arc<Event> {
        let mut event =
            Event::new(id, EventKind::LogsUpdate, deployment, owner, org, &format!("\"{}\"", "x".repeat(size)));
        event.seq = seq;
        Arc::new(event)
    }

    #[test]
    fn bounded_in_bytes_as_well_as_events_keeping_the_newest() {
        let mut history = History::new(100, 10_000);
        let (d, o) = (Uuid::new_v4(), Uuid::new_v4());
        for id in 1..=5 {
            history.push(event(id, id as u64, d, o, None, 3_000));
        }
        assert_eq!(history.len(), 3);
        assert!(history.bytes() <= 10_000);
        assert_eq!(history.first_id(), Some(3), "1 and 2 left first");
        history.push(event(6, 6, d, o, None, 50_000));
        assert_eq!(history.len(), 1, "an event larger than the bound still stays, alone");
        assert_eq!(history.last_id(), Some(6));
        assert_eq!(history.of_deployment(d, 0).collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn owner_and_organization_indexes_merge_in_commit_order_without_repeats() {
        let mut history = History::new(100, usize::MAX);
        let (me, org, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let rows = [(me, None), (other, Some(org)), (other, None), (me, Some(org)), (other, Some(org))];
        for (i, (owner, org)) in rows.into_iter().enumerate() {
            history.push(event(i as i64 + 1, i as u64 + 1, Uuid::new_v4(), owner, org, 1));
        }
        let seqs: Vec<u64> = history.of_owner_or_organization(me, Some(org), 2).collect();
        assert_eq!(seqs, vec![2, 4, 5]);
        assert_eq!(history.of_owner_or_organization(me, None, 1).collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn ids_fed_late_are_known_until_they_leave() {
        let mut history = History::new(3, usize::MAX);
        let (d, o) = (Uuid::new_v4(), Uuid::new_v4());
        for (seq, id) in [(1, 10), (2, 12), (3, 11)] {
            history.push(event(id, seq, d, o, None, 1));
        }
        assert_eq!(history.late_below(12), vec![11]);
        assert_eq!(history.late_below(11), Vec::<i64>::new());
        for (seq, id) in [(4, 13), (5, 14), (6, 15)] {
            history.push(event(id, seq, d, o, None, 1));
        }
        assert_eq!(history.late_below(i64::MAX), Vec::<i64>::new(), "gone with its event");
    }
}
