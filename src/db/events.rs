//! Queries on the event log (`windflow_events`, `sql/`): what the feed
//! reads ([`READ_AFTER`]), and [`EventLog`], what sessions read, under
//! server-wide limits that no one user can take for themselves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_postgres::Row;
use uuid::Uuid;

use super::DbError;
use crate::auth::Viewer;
use crate::event::{Event, EventKind, Topic};
use crate::hub::{LogReplay, Since};

/// Concurrent queries of `since` look-ups and replays, of the pool's 16
/// connections: permission checks and retention always find one.
pub const REPLAY_QUERIES: usize = 4;
/// Bytes of replay pages held at once across the server...
pub const REPLAY_MEMORY: usize = 64 * 1024 * 1024;
/// ...and by the replays of one user: a user whose many connections replay
/// and never read holds this much at most, and leaves the rest to others.
pub const USER_REPLAY_MEMORY: usize = 8 * 1024 * 1024;
/// Event log rows, and bytes of event data (about), read per replay query.
const PAGE_ROWS: i64 = 256;
const PAGE_BYTES: usize = 256 * 1024;
const PAGE_KIB: u32 = (PAGE_BYTES / 1024) as u32;

const COLUMNS: &str = "id, type, deployment_id, user_id, organization_id, data::text";

/// The feed's read: the events after id `$1` up to id `$2`, at most `$3`, in id order.
pub const READ_AFTER: &str = "SELECT id, type, deployment_id, user_id, organization_id, data::text
       FROM windflow_events WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3";
/// The events of the ids `$1`, in id order.
pub const READ_IDS: &str = "SELECT id, type, deployment_id, user_id, organization_id, data::text
       FROM windflow_events WHERE id = ANY($1) ORDER BY id";

/// What sessions read from the database: permission checks, `since`
/// look-ups and replay pages. Replays share two limits: concurrent queries,
/// taken in turns by the users waiting ([`FairSlots`]), and bytes of pages
/// held, of which one user holds [`USER_REPLAY_MEMORY`] at most. A replay
/// waits its turn rather than failing anyone; each query holds a pooled
/// connection only while it runs.
pub struct EventLog {
    pool: Pool,
    queries: FairSlots,
    /// In KiB.
    memory: Arc<Semaphore>,
    /// In KiB, per user; entries nobody holds are dropped now and then.
    user_memory: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
}

/// One page of a replay; holds its share of the memory limits until dropped.
pub struct Page {
    /// Retention deleted events after the replay's `since`: `resync` first.
    pub pruned: bool,
    pub events: Vec<Arc<Event>>,
    _memory: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A replay from the event log, read page by page in id order: the events
/// of a topic after `since` and before the history took over.
pub struct Pages {
    topic: Topic,
    filter: Filter,
    since: i64,
    after: i64,
    /// Ask retention on the first page, unless the client got `resync` already.
    check_pruned: bool,
    /// What earlier replays from the log sent the connection.
    replayed: Vec<Replayed>,
    done: bool,
}

/// What one replay from the log sent a connection: the events of `topic`
/// with ids in `since..=upto`.
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

    /// Whether this replay sent `event`.
    fn sent(&self, event: &Event) -> bool {
        event.id > self.since && event.id <= self.upto && self.topic.carries(event.kind, event.deployment_id)
    }
}

impl Pages {
    /// The replay `log` of a subscription of `viewer` to `topic`, leaving
    /// out what the connection's earlier log replays (`replayed`) sent.
    pub fn new(topic: Topic, viewer: Viewer, log: LogReplay, resynced: bool, replayed: Vec<Replayed>) -> Pages {
        let LogReplay { since, before, skip } = log;
        let filter = Filter { deployment: topic.deployment(), kind: topic.kind(), viewer, before, skip };
        Pages { topic, filter, since, after: since, check_pruned: !resynced, replayed, done: false }
    }

    /// What this replay has sent so far, assuming every page read was written.
    pub fn replayed(&self) -> Replayed {
        Replayed { topic: self.topic, since: self.since, upto: if self.done { i64::MAX } else { self.after } }
    }
}

impl EventLog {
    pub fn new(pool: Pool) -> EventLog {
        EventLog {
            pool,
            queries: FairSlots::new(REPLAY_QUERIES),
            memory: Arc::new(Semaphore::new(REPLAY_MEMORY / 1024)),
            user_memory: Mutex::new(HashMap::new()),
        }
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

    /// What the log says of a `since` newer than anything this process
    /// has: whether the database ever gave out that id.
    pub async fn look_up(&self, viewer: Viewer, since: i64) -> Result<Since, DbError> {
        let _slot = self.queries.acquire(viewer.user_id).await;
        let client = self.pool.get().await?;
        let row =
            client.query_one("SELECT coalesce(pg_sequence_last_value('windflow_event_ids'::regclass), 0)", &[]).await?;
        Ok(Since::Checked { id: since, newest: row.get(0) })
    }

    /// The next page of `pages`, `None` once it is read to the end. Waits
    /// for its share of memory first (the user's, then the server's), then
    /// for a query slot.
    pub async fn next_page(&self, pages: &mut Pages) -> Result<Option<Page>, DbError> {
        if pages.done {
            return Ok(None);
        }
        let user = pages.filter.viewer.user_id;
        let user_memory = self.user_memory(user).acquire_many_owned(PAGE_KIB).await.map_err(|_| DbError::Closed)?;
        let memory = Arc::clone(&self.memory).acquire_many_owned(PAGE_KIB).await.map_err(|_| DbError::Closed)?;
        let memory = (user_memory, memory);
        let slot = self.queries.acquire(user).await;
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
        let replayed = &pages.replayed;
        let events = page.into_iter().filter(|e| !replayed.iter().any(|r| r.sent(e))).map(Arc::new).collect();
        Ok(Some(Page { pruned, events, _memory: memory }))
    }

    /// The memory limit of `user`'s replays.
    fn user_memory(&self, user: Uuid) -> Arc<Semaphore> {
        let mut limits = self.user_memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if limits.len() > 1024 {
            // Limits nobody holds or waits on: their users replay nothing now.
            limits.retain(|_, limit| Arc::strong_count(limit) > 1);
        }
        Arc::clone(limits.entry(user).or_insert_with(|| Arc::new(Semaphore::new(USER_REPLAY_MEMORY / 1024))))
    }
}

/// Query slots taken in turns: each user's requests wait behind that
/// user's own, and the users waiting take one slot each in turn, so one
/// user's hundred replays delay another user's one by one query at most
/// per user ahead of it, not by a hundred.
struct FairSlots {
    state: Arc<Mutex<Turns>>,
}

struct Turns {
    free: usize,
    waiting: HashMap<Uuid, VecDeque<oneshot::Sender<Slot>>>,
    /// Users with someone waiting, in the order they get the next slot.
    order: VecDeque<Uuid>,
}

/// A query slot, handed on when dropped.
pub(crate) struct Slot {
    state: Arc<Mutex<Turns>>,
}

impl FairSlots {
    fn new(slots: usize) -> FairSlots {
        FairSlots {
            state: Arc::new(Mutex::new(Turns { free: slots, waiting: HashMap::new(), order: VecDeque::new() })),
        }
    }

    async fn acquire(&self, user: Uuid) -> Slot {
        let waiter = {
            let mut turns = lock(&self.state);
            if turns.free > 0 && turns.order.is_empty() {
                turns.free -= 1;
                return Slot { state: Arc::clone(&self.state) };
            }
            let (tx, rx) = oneshot::channel();
            let queue = turns.waiting.entry(user).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                turns.order.push_back(user);
            }
            rx
        };
        match waiter.await {
            Ok(slot) => slot,
            // The sender is only dropped with the slots, which live as long
            // as the server: never, but a slot of our own is as good.
            Err(_) => Slot { state: Arc::clone(&self.state) },
        }
    }
}

fn lock(state: &Mutex<Turns>) -> std::sync::MutexGuard<'_, Turns> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut turns = lock(&self.state);
        // The next user in turn, skipping waiters that gave up.
        while let Some(user) = turns.order.pop_front() {
            let Some(queue) = turns.waiting.get_mut(&user) else { continue };
            let mut granted = false;
            while let Some(waiter) = queue.pop_front() {
                if waiter.send(Slot { state: Arc::clone(&self.state) }).is_ok() {
                    granted = true;
                    break;
                }
            }
            if queue.is_empty() {
                turns.waiting.remove(&user);
            } else {
                turns.order.push_back(user);
            }
            if granted {
                return;
            }
        }
        turns.free += 1;
    }
}

pub(crate) fn event_from_row(row: &Row) -> Option<Event> {
    let kind = EventKind::parse(row.get(1))?;
    Some(Event::new(row.get(0), kind, row.get(2), row.get(3), row.get(4), row.get(5)))
}

fn events_from_rows(rows: &[Row]) -> Vec<Event> {
    rows.iter().filter_map(event_from_row).collect()
}

/// Which events of the log a replay reads.
struct Filter {
    deployment: Option<Uuid>,
    kind: Option<EventKind>,
    /// Only events this viewer may see.
    viewer: Viewer,
    /// Only ids below this one (the history has the rest)...
    before: i64,
    /// ...except these, which the history has too.
    skip: Vec<i64>,
}

/// The candidates of a page: `$1` after, `$2` before, `$3` skip, `$4` rows,
/// `$5` user, `$6` organization, `$7` deployment, `$8` type, `$9` superuser.
/// Each form reads by an index that holds only what the viewer may see, or
/// only the deployment's events, so a viewer who may see nothing reads
/// nothing, however large the log.
fn candidates(filter: &Filter) -> &'static str {
    match (filter.deployment, filter.viewer.is_superuser) {
        // Everything: the primary key.
        (None, true) => {
            "SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
              WHERE id > $1 AND id < $2 AND NOT id = ANY($3)
              ORDER BY id LIMIT $4"
        }
        // The viewer's own, and their organization's: two indexes, merged.
        (None, false) => {
            "(SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
               WHERE user_id = $5 AND id > $1 AND id < $2 AND NOT id = ANY($3)
               ORDER BY id LIMIT $4)
             UNION ALL
             (SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
               WHERE organization_id = $6 AND user_id <> $5 AND id > $1 AND id < $2 AND NOT id = ANY($3)
               ORDER BY id LIMIT $4)"
        }
        // One deployment's events of one type, those the viewer may see.
        (Some(_), _) => {
            "SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
              WHERE deployment_id = $7 AND type = $8 AND id > $1 AND id < $2 AND NOT id = ANY($3)
                AND ($9 OR user_id = $5 OR organization_id = $6)
              ORDER BY id LIMIT $4"
        }
    }
}

/// A page of the events after `after` (by id) that pass `filter`: at most
/// `rows` events, and no more than about `bytes` of event data (a page
/// always holds at least one event, however large).
async fn page_after(
    client: &deadpool_postgres::Client,
    after: i64,
    filter: &Filter,
    rows: i64,
    bytes: i64,
) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM (
            SELECT *, sum(size) OVER (ORDER BY id) - size AS bytes_before
              FROM ({}) candidates
             ORDER BY id LIMIT $4) page
          WHERE bytes_before < $10
          ORDER BY id",
        candidates(filter)
    );
    let kind = filter.kind.map(EventKind::as_str);
    let viewer = filter.viewer;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &after,
        &filter.before,
        &filter.skip,
        &rows,
        &viewer.user_id,
        &viewer.organization_id,
        &filter.deployment,
        &kind,
        &viewer.is_superuser,
        &bytes,
    ];
    // Typed: each form of `candidates` leaves some parameters unused, whose
    // types PostgreSQL could not infer.
    use tokio_postgres::types::Type;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8_ARRAY,
        Type::INT8,
        Type::UUID,
        Type::UUID,
        Type::UUID,
        Type::TEXT,
        Type::BOOL,
        Type::INT8,
    ];
    let statement = client.prepare_typed_cached(&sql, &types).await?;
    Ok(events_from_rows(&client.query(&statement, &params).await?))
}

/// The highest id retention (or a TRUNCATE) has deleted.
async fn pruned_upto(client: &deadpool_postgres::Client) -> Result<i64, DbError> {
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
