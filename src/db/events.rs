//! Queries on the event log (`windflow_events`, see `sql/V2__events.sql`),
//! and [`EventLog`]: what sessions read from the database, under
//! server-wide limits.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use super::DbError;
use crate::auth::Viewer;
use crate::event::{Event, EventKind, Topic};
use crate::hub::{LogReplay, Since};

/// Concurrent queries of `since` look-ups and replays, of the pool's 16
/// connections: permission checks and retention always find one.
pub const REPLAY_QUERIES: usize = 4;
/// Bytes of replay pages held at once across the server.
pub const REPLAY_MEMORY: usize = 64 * 1024 * 1024;
/// Event log rows, and bytes of event data (about), read per replay query.
const PAGE_ROWS: i64 = 256;
const PAGE_BYTES: usize = 256 * 1024;
const PAGE_KIB: u32 = (PAGE_BYTES / 1024) as u32;

/// What sessions read from the database: permission checks, `since`
/// look-ups and replay pages. Replays share two limits: concurrent
/// queries, and bytes of pages held (a replay waits its turn rather than
/// failing anyone). Each query holds a pooled connection only while it runs.
pub struct EventLog {
    pool: Pool,
    queries: Arc<Semaphore>,
    /// In KiB.
    memory: Arc<Semaphore>,
}

/// One page of a replay; holds its share of the memory limit until dropped.
pub struct Page {
    /// Retention deleted events after the replay's `since`: `resync` first.
    pub pruned: bool,
    pub events: Vec<Arc<Event>>,
    _memory: OwnedSemaphorePermit,
}

/// A replay from the event log, read page by page in id order.
pub struct Pages {
    topic: Topic,
    filter: Filter,
    since: i64,
    after: i64,
    /// Ask retention on the first page, unless the client got `resync` already.
    check_pruned: bool,
    /// Ids the connection already received from the history.
    skip: Vec<i64>,
    /// What earlier replays from the log sent the connection.
    replayed: Vec<Replayed>,
    done: bool,
}

/// What one replay from the log sent a connection: the events of `topic`
/// with ids in `since..=upto` (those the log had before its marker).
#[derive(Clone, Copy, Debug)]
pub struct Replayed {
    pub topic: Topic,
    pub since: i64,
    pub upto: i64,
}

/// How many replays a connection remembers; past this the oldest is
/// forgotten (a later replay may then send some of its events again).
const MAX_REPLAYED: usize = 256;

impl Replayed {
    /// Remember `new` in `all`: merged with a replay of the same topic whose
    /// range it overlaps or touches, so that a client resuming one topic
    /// again and again keeps one entry, and at most `MAX_REPLAYED` (256) in all.
    pub fn remember(all: &mut Vec<Replayed>, new: Replayed) {
        let mut merged = new;
        all.retain(|old| {
            let joins = old.topic == merged.topic && old.since <= merged.upto && merged.since <= old.upto;
            if joins {
                merged.since = merged.since.min(old.since);
                merged.upto = merged.upto.max(old.upto);
            }
            !joins
        });
        if all.len() >= MAX_REPLAYED {
            all.remove(0);
        }
        all.push(merged);
    }

    /// Whether this replay sent `event` (given it is one of the log's
    /// events before a marker no older than this replay's: the events of
    /// `topic` after that marker reached the connection live).
    fn sent(&self, event: &Event) -> bool {
        event.id > self.since && event.id <= self.upto && self.topic.carries(event.kind, event.deployment_id)
    }
}

impl Pages {
    /// The replay `log` of a subscription of `viewer` to `topic`, leaving
    /// out what the connection's earlier log replays (`replayed`) sent.
    pub fn new(topic: Topic, viewer: Viewer, log: LogReplay, resynced: bool, replayed: Vec<Replayed>) -> Pages {
        let LogReplay { since, snapshot, also, skip } = log;
        let filter = Filter { deployment: topic.deployment(), kind: topic.kind(), viewer, snapshot, also };
        Pages { topic, filter, since, after: since, check_pruned: !resynced, skip, replayed, done: false }
    }

    /// What this replay has sent so far, assuming every page read was written.
    pub fn replayed(&self) -> Replayed {
        Replayed { topic: self.topic, since: self.since, upto: if self.done { i64::MAX } else { self.after } }
    }
}

impl EventLog {
    pub fn new(pool: Pool) -> EventLog {
        let memory = Arc::new(Semaphore::new(REPLAY_MEMORY / 1024));
        EventLog { pool, queries: Arc::new(Semaphore::new(REPLAY_QUERIES)), memory }
    }

    /// Whether `viewer` may subscribe to `topic`: a per-deployment topic
    /// needs the deployment to exist and be the viewer's to see
    /// ([`Viewer::can_see`], the rule the hub delivers by).
    pub async fn may_watch(&self, viewer: Viewer, topic: Topic) -> Result<bool, DbError> {
        let Some(deployment) = topic.deployment() else { return Ok(true) };
        if viewer.is_superuser {
            return Ok(true);
        }
        let client = self.pool.get().await?;
        let row =
            client.query_opt("SELECT user_id, organization_id FROM deployments WHERE id = $1", &[&deployment]).await?;
        Ok(row.is_some_and(|row| viewer.can_see(row.get(0), row.get(1))))
    }

    /// What the log says of a `since` the history does not hold.
    pub async fn look_up(&self, since: i64) -> Result<Since, DbError> {
        let _slot = self.queries.acquire().await;
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT (SELECT xid::text FROM windflow_events WHERE id = $1), (SELECT upto FROM windflow_events_pruned)",
                &[&since],
            )
            .await?;
        let xid: Option<String> = row.get(0);
        let pruned_upto: i64 = row.get(1);
        Ok(match xid.and_then(|x| x.parse().ok()) {
            Some(xid) => Since::Committed { id: since, xid },
            None => Since::Missing { id: since, pruned: pruned_upto > 0 && pruned_upto >= since },
        })
    }

    /// The next page of `pages`, `None` once it is read to the end. Waits
    /// for its share of memory first, then for a query slot.
    pub async fn next_page(&self, pages: &mut Pages) -> Result<Option<Page>, DbError> {
        if pages.done {
            return Ok(None);
        }
        let memory = Arc::clone(&self.memory).acquire_many_owned(PAGE_KIB).await;
        let memory = memory.map_err(|_| DbError::Closed)?;
        let slot = self.queries.acquire().await;
        let client = self.pool.get().await?;
        let pruned = pages.check_pruned && pruned_upto(&client).await? > pages.since;
        pages.check_pruned = false;
        let page = page_after(&client, pages.after, &pages.filter, PAGE_ROWS, PAGE_BYTES as i64).await?;
        drop((client, slot));
        let Some(last) = page.last() else {
            pages.done = true;
            return Ok(pruned.then(|| Page { pruned, events: Vec::new(), _memory: memory }));
        };
        pages.after = last.id;
        let (skip, replayed) = (&pages.skip, &pages.replayed);
        let events = page
            .into_iter()
            .filter(|e| skip.binary_search(&e.id).is_err() && !replayed.iter().any(|r| r.sent(e)))
            .map(Arc::new)
            .collect();
        Ok(Some(Page { pruned, events, _memory: memory }))
    }
}

const COLUMNS: &str = "id, type, deployment_id, user_id, organization_id, data::text";

fn event_from_row(row: &Row) -> Option<Event> {
    let kind = EventKind::parse(row.get(1))?;
    Some(Event::new(row.get(0), kind, row.get(2), row.get(3), row.get(4), row.get(5)))
}

fn events_from_rows(rows: &[Row]) -> Vec<Event> {
    rows.iter().filter_map(event_from_row).collect()
}

/// One event, for announcements too large to carry it.
pub async fn fetch(client: &Client, id: i64) -> Result<Option<Event>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM windflow_events WHERE id = $1");
    Ok(client.query_opt(&sql, &[&id]).await?.as_ref().and_then(event_from_row))
}

/// Every event after id `after` of a transaction that the marker
/// `snapshot` did not show as finished: after a source outage, what may not
/// have been delivered ([`super::catchup`] says why `after` misses none).
/// In id order, which is commit order within each deployment.
pub async fn unfinished_at(client: &Client, snapshot: &str, after: i64) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM windflow_events
          WHERE id > $2
            AND xid >= pg_snapshot_xmin($1::text::pg_snapshot)
            AND NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
          ORDER BY id"
    );
    Ok(events_from_rows(&client.query(&sql, &[&snapshot, &after]).await?))
}

/// Which events of the log a replay reads.
struct Filter {
    deployment: Option<Uuid>,
    kind: Option<EventKind>,
    /// Only events this viewer may see.
    viewer: Viewer,
    /// Only transactions this marker snapshot shows as finished...
    snapshot: String,
    /// ...or these events.
    also: Vec<i64>,
}

/// A page of the events after `after` (by id) that pass `filter`: at most
/// `rows` events, and no more than about `bytes` of event data (a page
/// always holds at least one event, however large). Visibility is decided
/// here, so a viewer who may see nothing pulls nothing.
async fn page_after(
    client: &Client,
    after: i64,
    filter: &Filter,
    rows: i64,
    bytes: i64,
) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM (
            SELECT id, type, deployment_id, user_id, organization_id, data,
                   sum(size) OVER (ORDER BY id) - size AS before
              FROM windflow_events
             WHERE id > $1
               AND ($2::uuid IS NULL OR deployment_id = $2)
               AND ($3::text IS NULL OR type = $3)
               AND (pg_visible_in_snapshot(xid, $4::text::pg_snapshot) OR id = ANY($5))
               AND ($6 OR user_id = $7 OR (organization_id IS NOT NULL AND organization_id = $8))
             ORDER BY id
             LIMIT $9) page
          WHERE before < $10
          ORDER BY id"
    );
    let kind = filter.kind.map(EventKind::as_str);
    let viewer = filter.viewer;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &after,
        &filter.deployment,
        &kind,
        &filter.snapshot,
        &filter.also,
        &viewer.is_superuser,
        &viewer.user_id,
        &viewer.organization_id,
        &rows,
        &bytes,
    ];
    Ok(events_from_rows(&client.query(&sql, &params).await?))
}

/// The highest id retention has deleted.
async fn pruned_upto(client: &Client) -> Result<i64, DbError> {
    Ok(client.query_one("SELECT upto FROM windflow_events_pruned", &[]).await?.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(topic: Topic, since: i64, upto: i64) -> Replayed {
        Replayed { topic, since, upto }
    }

    #[test]
    fn replays_of_one_topic_merge_and_the_list_stays_bounded() {
        let events = Topic::DeploymentEvents;
        let logs = Topic::Deployment { kind: EventKind::LogsUpdate, deployment: Uuid::nil() };
        let mut all = Vec::new();
        for _ in 0..10_000 {
            Replayed::remember(&mut all, replayed(events, 0, i64::MAX));
        }
        assert_eq!(all.len(), 1, "the same resume again and again keeps one entry");
        Replayed::remember(&mut all, replayed(logs, 5, 9));
        Replayed::remember(&mut all, replayed(logs, 20, 30));
        Replayed::remember(&mut all, replayed(logs, 9, 20));
        let logs_ranges: Vec<(i64, i64)> = all.iter().filter(|r| r.topic == logs).map(|r| (r.since, r.upto)).collect();
        assert_eq!(logs_ranges, [(5, 30)], "touching ranges of one topic merge");
        for i in 0..1000 {
            let deployment = Uuid::from_u128(i);
            Replayed::remember(&mut all, replayed(Topic::Deployment { kind: EventKind::Progress, deployment }, 0, 1));
        }
        assert_eq!(all.len(), MAX_REPLAYED);
        let last = Topic::Deployment { kind: EventKind::Progress, deployment: Uuid::from_u128(999) };
        assert_eq!(all.last().map(|r| r.topic), Some(last), "the newest is kept");
    }
}
