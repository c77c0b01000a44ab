//! Catch-up after an outage: which events of the log an event source reads
//! again when its connection comes back, and from which id.
//!
//! Both sources send themselves a *marker* once a second (a NOTIFY, or a
//! logical message) and see it come back in commit order: every
//! transaction its snapshot shows as finished has been delivered by then.
//! After a reconnect the source reads every event of a transaction the last
//! marker did not show as finished; the hub drops the ones it already had.
//!
//! # Reading by id, not by transaction
//!
//! The log has no index on `xid` (each index is work in every writer's
//! commit), so the catch-up must say where in the id order to start. A
//! marker is `<bound> <snapshot>`: `bound` is the newest event id
//! allocated when the marker was sent, read in a statement of its own
//! *before* the statement that takes the snapshot. The catch-up after
//! marker `k` reads ids above `bound(j)`, for the newest marker `j` whose
//! snapshot's `xmax` is at most `k`'s `xmin`. Why that loses nothing:
//!
//! - An event to read belongs to a transaction `T` that `k` did not show as
//!   finished, so `T.xid >= xmin(k) >= xmax(j)`: `T` got its xid after
//!   `j`'s snapshot was taken, so after `bound(j)` was read.
//! - Events are written by AFTER ROW triggers, so `T` had its xid before it
//!   allocated any event id (`windflow_emit` must keep being called that
//!   way), and the id sequence hands out increasing values across sessions
//!   (it is not cached: `CACHE 1`). So each of `T`'s ids is above `bound(j)`.
//!
//! Snapshots' `xmin` never decreases, so older markers than `j` are never
//! needed again and are dropped. With no such `j` (a transaction open since
//! before the first marker came back), the catch-up reads from the start of
//! the log: slower, just as exact.

use std::collections::VecDeque;

use tokio_postgres::Client;

use crate::db::{DbError, events};
use crate::event::Event;
use crate::history::Snapshot;

/// The newest event id allocated so far (0 before the first): a marker's
/// bound, read before its snapshot is taken.
const BOUND_SQL: &str =
    "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('windflow_events', 'id')::regclass), 0)";

/// Markers kept for their bounds at most (one a second: a day), so a
/// transaction left open for days cannot grow this without end; past it,
/// the catch-up reads from the start of the log.
const MAX_BOUNDS: usize = 86_400;

/// The markers an event source saw come back, kept across its connections.
#[derive(Default)]
pub struct CatchUp {
    /// The last marker's snapshot, as text and parsed.
    last: Option<(String, Snapshot)>,
    /// `(xmax, bound)` of markers that came back, oldest first.
    bounds: VecDeque<(u64, i64)>,
}

impl CatchUp {
    /// The start of the next marker's text, `"<bound> "`: the snapshot is
    /// appended by the statement that sends it, which must come after this
    /// one (a new statement takes a new snapshot).
    pub async fn marker_prefix(client: &Client) -> Result<String, tokio_postgres::Error> {
        let bound: i64 = client.query_one(BOUND_SQL, &[]).await?.get(0);
        Ok(format!("{bound} "))
    }

    /// A marker of ours came back: remember it, and return the snapshot for
    /// the hub. `None` if the text is not `<bound> <snapshot>`.
    pub fn on_marker(&mut self, text: &str) -> Option<String> {
        let (bound, snapshot) = text.split_once(' ')?;
        let bound: i64 = bound.parse().ok()?;
        let parsed = Snapshot::parse(snapshot)?;
        self.bounds.push_back((parsed.xmax(), bound));
        if self.bounds.len() > MAX_BOUNDS {
            self.bounds.pop_front();
        }
        // Keep the newest marker usable as a bound now, and what follows it.
        if let Some(newest) = self.bounds.iter().rposition(|(xmax, _)| *xmax <= parsed.xmin()) {
            self.bounds.drain(..newest);
        }
        self.last = Some((snapshot.to_string(), parsed));
        Some(snapshot.to_string())
    }

    /// Whether a marker came back yet: before one, there is nothing to
    /// catch up on, only an origin to report.
    pub fn started(&self) -> bool {
        self.last.is_some()
    }

    /// The id after which the catch-up reads: the bound of the newest
    /// marker whose snapshot started after the last marker's oldest
    /// unfinished transaction, or 0.
    fn read_after(&self) -> i64 {
        let Some((_, last)) = &self.last else { return 0 };
        self.bounds.iter().rev().find(|(xmax, _)| *xmax <= last.xmin()).map_or(0, |(_, bound)| *bound)
    }

    /// Every event of a transaction the last marker did not show as
    /// finished, in id order (empty before the first marker).
    pub async fn missed(&self, client: &Client) -> Result<Vec<Event>, DbError> {
        let Some((snapshot, _)) = &self.last else { return Ok(Vec::new()) };
        events::unfinished_at(client, snapshot, self.read_after()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(catch_up: &mut CatchUp, bound: i64, snapshot: &str) {
        assert_eq!(catch_up.on_marker(&format!("{bound} {snapshot}")).as_deref(), Some(snapshot));
    }

    #[test]
    fn reads_after_the_newest_marker_taken_before_the_oldest_unfinished_transaction() {
        let mut catch_up = CatchUp::default();
        assert!(!catch_up.started());
        // Transaction 100 stays open across markers; others come and go.
        seen(&mut catch_up, 10, "100:100:");
        assert_eq!(catch_up.read_after(), 10, "nothing was running: this marker's own bound");
        seen(&mut catch_up, 20, "100:105:100,103");
        seen(&mut catch_up, 30, "100:110:100");
        assert_eq!(catch_up.read_after(), 10, "100 started after the first marker, before the second");
        seen(&mut catch_up, 40, "110:112:");
        assert_eq!(catch_up.read_after(), 30, "the third marker's xmax is 110");
        assert_eq!(catch_up.bounds.len(), 2, "markers older than the one in use are dropped");
    }

    #[test]
    fn a_transaction_older_than_every_marker_reads_from_the_start() {
        let mut catch_up = CatchUp::default();
        seen(&mut catch_up, 50, "7:9:7");
        seen(&mut catch_up, 60, "7:12:7,10");
        assert!(catch_up.started());
        assert_eq!(catch_up.read_after(), 0);
    }

    #[test]
    fn malformed_markers_are_refused_and_change_nothing() {
        let mut catch_up = CatchUp::default();
        for text in ["", "12", "x 1:2:", "12 garbage", "12 1:2:x"] {
            assert_eq!(catch_up.on_marker(text), None, "{text:?}");
        }
        assert!(!catch_up.started());
    }
}
