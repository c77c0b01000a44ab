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
//! marker is `<bound> <xid> <snapshot>`: `bound` is the newest event id
//! allocated when the marker was sent, read in a statement of its own;
//! `xid` is the transaction id the marker's own transaction takes, in a
//! later statement ([`MARKER_TEXT`]). The catch-up after marker `k` reads
//! ids above `bound(j)`, for the newest marker `j` with `xid(j)` below
//! `k`'s `xmin`. Why that loses nothing:
//!
//! - An event to read belongs to a transaction `T` that `k` did not show as
//!   finished, so `T.xid >= xmin(k) > xid(j)`. Transaction ids are handed
//!   out in increasing order, so `T` got its id after `j`'s transaction
//!   got its own, which was after `bound(j)` was read.
//! - Events are written by AFTER ROW triggers, so `T` had its xid before it
//!   allocated any event id (`windflow_emit` must keep being called that
//!   way), and the id sequence hands out increasing values across sessions
//!   (it is not cached: `CACHE 1`). So each of `T`'s ids is above `bound(j)`.
//!
//! A snapshot's `xmax` cannot stand in for `xid(j)`: it is one past the
//! newest *finished* transaction, and a transaction that got a larger xid
//! earlier may still be running (the test
//! `a_transaction_open_since_before_the_server_started_arrives_once_across_an_outage`
//! lost its event that way).
//!
//! Snapshots' `xmin` never decreases, so markers older than `j` are never
//! needed again and are dropped. With no such `j` (a transaction open since
//! before the first marker came back), the catch-up reads from the start of
//! the log: slower, just as exact.

use std::collections::VecDeque;

use tokio_postgres::Client;

use crate::db::{DbError, events};
use crate::event::Event;
use crate::history::Snapshot;

/// The newest event id allocated so far (0 before the first): a marker's
/// bound, read before the marker's transaction takes its xid.
const BOUND_SQL: &str =
    "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('windflow_events', 'id')::regclass), 0)";

/// What a marker statement appends to [`CatchUp::marker_prefix`]: the
/// marker transaction's own xid (taken now, after the bound was read) and
/// its snapshot.
pub const MARKER_TEXT: &str = "pg_current_xact_id()::text || ' ' || pg_current_snapshot()::text";

/// Markers kept for their bounds at most (one a second: a day), so a
/// transaction left open for days cannot grow this without end; past it,
/// the catch-up reads from the start of the log.
const MAX_BOUNDS: usize = 86_400;

/// The markers an event source saw come back, kept across its connections.
#[derive(Default)]
pub struct CatchUp {
    /// The last marker's snapshot, as text and parsed.
    last: Option<(String, Snapshot)>,
    /// `(xid, bound)` of markers that came back, oldest first.
    bounds: VecDeque<(u64, i64)>,
}

impl CatchUp {
    /// The start of the next marker's text, `"<bound> "`: the statement
    /// that sends the marker, which must come after this one, appends
    /// [`MARKER_TEXT`].
    pub async fn marker_prefix(client: &Client) -> Result<String, tokio_postgres::Error> {
        let bound: i64 = client.query_one(BOUND_SQL, &[]).await?.get(0);
        Ok(format!("{bound} "))
    }

    /// A marker of ours came back: remember it, and return the snapshot for
    /// the hub. `None` if the text is not `<bound> <xid> <snapshot>`.
    pub fn on_marker(&mut self, text: &str) -> Option<String> {
        let mut parts = text.splitn(3, ' ');
        let bound: i64 = parts.next()?.parse().ok()?;
        let xid: u64 = parts.next()?.parse().ok()?;
        let snapshot = parts.next()?;
        let parsed = Snapshot::parse(snapshot)?;
        self.bounds.push_back((xid, bound));
        if self.bounds.len() > MAX_BOUNDS {
            self.bounds.pop_front();
        }
        self.last = Some((snapshot.to_string(), parsed));
        // Keep the newest marker usable as a bound now, and what follows it.
        if let Some(newest) = self.usable() {
            self.bounds.drain(..newest);
        }
        Some(snapshot.to_string())
    }

    /// The newest marker whose transaction is older than every transaction
    /// the last marker did not show as finished.
    fn usable(&self) -> Option<usize> {
        let (_, last) = self.last.as_ref()?;
        self.bounds.iter().rposition(|(xid, _)| *xid < last.xmin())
    }

    /// Whether a marker came back yet: before one, there is nothing to
    /// catch up on, only an origin to report.
    pub fn started(&self) -> bool {
        self.last.is_some()
    }

    /// The id after which the catch-up reads: the bound of the newest
    /// usable marker (`usable`), or 0.
    pub fn read_after(&self) -> i64 {
        self.usable().map_or(0, |i| self.bounds[i].1)
    }

    /// The last marker's snapshot, if one came back.
    pub fn snapshot(&self) -> Option<&str> {
        self.last.as_ref().map(|(text, _)| text.as_str())
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

    fn seen(catch_up: &mut CatchUp, bound: i64, xid: u64, snapshot: &str) {
        assert_eq!(catch_up.on_marker(&format!("{bound} {xid} {snapshot}")).as_deref(), Some(snapshot));
    }

    #[test]
    fn reads_after_the_newest_marker_older_than_every_unfinished_transaction() {
        let mut catch_up = CatchUp::default();
        assert!(!catch_up.started());
        // Transaction 100 opens after the first marker and stays open.
        seen(&mut catch_up, 10, 99, "99:99:");
        assert_eq!(catch_up.read_after(), 0, "a marker never bounds its own catch-up");
        seen(&mut catch_up, 20, 104, "100:104:100,103");
        assert_eq!(catch_up.read_after(), 10);
        seen(&mut catch_up, 30, 109, "100:109:100");
        assert_eq!(catch_up.read_after(), 10, "only the first marker is older than 100");
        seen(&mut catch_up, 40, 112, "110:112:");
        assert_eq!(catch_up.read_after(), 30, "the third marker's transaction, 109, is older than 110");
        assert_eq!(catch_up.bounds.len(), 2, "markers older than the one in use are dropped");
    }

    #[test]
    fn a_running_transaction_above_xmax_is_not_taken_for_a_later_one() {
        let mut catch_up = CatchUp::default();
        // Transaction 50 runs, newer than every finished one: the snapshot's
        // xmax (50) does not exceed it, but the marker's own xid (51) does.
        seen(&mut catch_up, 7, 51, "50:50:");
        seen(&mut catch_up, 8, 53, "50:53:50");
        assert_eq!(catch_up.read_after(), 0, "no marker is older than transaction 50");
    }

    #[test]
    fn malformed_markers_are_refused_and_change_nothing() {
        let mut catch_up = CatchUp::default();
        for text in ["", "12", "12 5", "x 5 1:2:", "12 x 1:2:", "12 5 garbage", "12 5 1:2:x"] {
            assert_eq!(catch_up.on_marker(text), None, "{text:?}");
        }
        assert!(!catch_up.started());
    }
}
