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
use crate::metrics::Metrics;

/// Concurrent queries of `since` look-ups and replays, of the pool's 16
/// connections: permission checks and retention always find one.
pub const REPLAY_QUERIES: usize = 4;
/// Bytes of replay pages held at once across the server...
pub const REPLAY_MEMORY: usize = 64 * 1024 * 1024;
/// ...and by the replays of one user: a user whose many connections replay
/// and never read holds this much at most, and leaves the rest to others.
pub const USER_REPLAY_MEMORY: usize = 8 * 1024 * 1024;
/// Replay queries one user may start per second, on average (a burst of
/// [`USER_REPLAY_BURST`] first): a user's connections pipelining resumes
/// from far back then wait behind each other, not load the database every
/// writer and every other user needs. 100 pages a second is 25,600 events a
/// second for one user's resumes from the log.
pub const USER_REPLAY_QUERIES_PER_S: f64 = 100.0;
pub const USER_REPLAY_BURST: f64 = 200.0;
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
    /// Per user: replay memory and query rate; entries nobody holds are
    /// dropped now and then.
    users: Mutex<HashMap<Uuid, Arc<UserLimits>>>,
}

/// One user's share of the replay limits.
struct UserLimits {
    /// Replay pages held, in KiB ([`USER_REPLAY_MEMORY`]).
    memory: Arc<Semaphore>,
    /// Queries started ([`USER_REPLAY_QUERIES_PER_S`]); the user's waiters
    /// queue on this lock, in turn.
    budget: tokio::sync::Mutex<Budget>,
}

/// A token bucket.
struct Budget {
    tokens: f64,
    at: tokio::time::Instant,
}

impl UserLimits {
    fn new() -> UserLimits {
        UserLimits {
            memory: Arc::new(Semaphore::new(USER_REPLAY_MEMORY / 1024)),
            budget: tokio::sync::Mutex::new(Budget { tokens: USER_REPLAY_BURST, at: tokio::time::Instant::now() }),
        }
    }

    /// Wait for the user's next query to be due.
    async fn pace(&self) {
        let mut budget = self.budget.lock().await;
        let now = tokio::time::Instant::now();
        let refilled = budget.tokens + now.duration_since(budget.at).as_secs_f64() * USER_REPLAY_QUERIES_PER_S;
        budget.tokens = refilled.min(USER_REPLAY_BURST);
        budget.at = now;
        if budget.tokens < 1.0 {
            let wait = (1.0 - budget.tokens) / USER_REPLAY_QUERIES_PER_S;
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
            budget.tokens = 1.0;
            budget.at = tokio::time::Instant::now();
        }
        budget.tokens -= 1.0;
    }
}

/// One page of a replay; holds its share of the memory limits until dropped.
pub struct Page {
    /// Retention deleted events after the replay's `since`: `resync` first.
    pub pruned: bool,
    pub events: Vec<Arc<Event>>,
    _memory: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A replay from the event log, read page by page in id order: the events
/// of a topic (or of a resume at connect's owner feed and topics) after
/// `since` and before the history took over.
pub struct Pages {
    topic: Topic,
    /// A resume at connect: its topics (the owner feed is always in it).
    resume: Option<Vec<Topic>>,
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
        let (deployment, kind) = (topic.deployment(), topic.kind());
        let filter = Filter { deployment, kind, viewer, before, skip, resume: None };
        Pages { topic, resume: None, filter, since, after: since, check_pruned: !resynced, replayed, done: false }
    }

    /// The replay `log` of a resume at connect of `viewer`: its own
    /// events and those of `topics`, each once, in id order.
    pub fn resume(topics: Vec<Topic>, viewer: Viewer, log: LogReplay, resynced: bool) -> Pages {
        let LogReplay { since, before, skip } = log;
        let filter = Filter { deployment: None, kind: None, viewer, before, skip, resume: Some(topics.clone()) };
        let topic = Topic::DeploymentEvents;
        Pages {
            topic,
            resume: Some(topics),
            filter,
            since,
            after: since,
            check_pruned: !resynced,
            replayed: Vec::new(),
            done: false,
        }
    }

    /// What this replay has sent so far, assuming every page read was written.
    pub fn replayed(&self) -> Replayed {
        Replayed { topic: self.topic, since: self.since, upto: if self.done { i64::MAX } else { self.after } }
    }

    /// What a resume at connect's replay sent, per topic: what a later
    /// replay of one of them need not send again. (Its owner feed's
    /// events are not remembered: a later replay may repeat them, never
    /// lose them.)
    pub fn replayed_topics(&self) -> Vec<Replayed> {
        let upto = if self.done { i64::MAX } else { self.after };
        let topics = self.resume.as_deref().unwrap_or_default();
        topics.iter().map(|&topic| Replayed { topic, since: self.since, upto }).collect()
    }
}

impl EventLog {
    /// `metrics` shows how many replay queries wait for a slot.
    pub fn new(pool: Pool, metrics: Arc<Metrics>) -> EventLog {
        EventLog {
            pool,
            queries: FairSlots::new(REPLAY_QUERIES, Some(metrics)),
            memory: Arc::new(Semaphore::new(REPLAY_MEMORY / 1024)),
            users: Mutex::new(HashMap::new()),
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
        self.user(viewer.user_id).pace().await;
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
        let limits = self.user(user);
        let user_memory = Arc::clone(&limits.memory).acquire_many_owned(PAGE_KIB).await.map_err(|_| DbError::Closed)?;
        let memory = Arc::clone(&self.memory).acquire_many_owned(PAGE_KIB).await.map_err(|_| DbError::Closed)?;
        let memory = (user_memory, memory);
        limits.pace().await;
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

    /// `user`'s share of the replay limits.
    fn user(&self, user: Uuid) -> Arc<UserLimits> {
        let mut users = self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if users.len() > 1024 {
            // Limits nobody holds or waits on: their users replay nothing now.
            users.retain(|_, limits| Arc::strong_count(limits) > 1 || Arc::strong_count(&limits.memory) > 1);
        }
        Arc::clone(users.entry(user).or_insert_with(|| Arc::new(UserLimits::new())))
    }
}

/// Query slots taken in turns: each user's requests wait behind that
/// user's own, and the users waiting take one slot each in turn, so one
/// user's hundred replays delay another user's one by one query at most
/// per user ahead of it, not by a hundred.
struct FairSlots {
    state: Arc<Mutex<Turns>>,
    /// `windflow_replays_waiting`.
    metrics: Option<Arc<Metrics>>,
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
    fn new(slots: usize, metrics: Option<Arc<Metrics>>) -> FairSlots {
        FairSlots {
            state: Arc::new(Mutex::new(Turns { free: slots, waiting: HashMap::new(), order: VecDeque::new() })),
            metrics,
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
        let _waiting = self.metrics.as_deref().map(Waiting::new);
        match waiter.await {
            Ok(slot) => slot,
            // The sender is only dropped with the slots, which live as long
            // as the server: never, but a slot of our own is as good.
            Err(_) => Slot { state: Arc::clone(&self.state) },
        }
    }
}

/// One replay query waiting, counted while it lives.
struct Waiting<'a>(&'a Metrics);

impl<'a> Waiting<'a> {
    fn new(metrics: &'a Metrics) -> Waiting<'a> {
        metrics.replays_waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(metrics)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.replays_waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn lock(state: &Mutex<Turns>) -> std::sync::MutexGuard<'_, Turns> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Turns {
    /// The waiter whose turn it is: the first of the next user in turn,
    /// skipping waiters that gave up. That user goes to the back of the
    /// line if it still has some waiting.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Slot>> {
        while let Some(user) = self.order.pop_front() {
            let Some(queue) = self.waiting.get_mut(&user) else { continue };
            let next = std::iter::from_fn(|| queue.pop_front()).find(|waiter| !waiter.is_closed());
            if queue.is_empty() {
                self.waiting.remove(&user);
            } else {
                self.order.push_back(user);
            }
            if next.is_some() {
                return next;
            }
        }
        None
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let next = {
            let mut turns = lock(&self.state);
            match turns.next_waiter() {
                Some(next) => next,
                None => {
                    turns.free += 1;
                    return;
                }
            }
        };
        // Outside the lock: a waiter that gave up just now drops the slot,
        // which comes back here for the next one.
        let _ = next.send(Slot { state: Arc::clone(&self.state) });
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
    /// A resume at connect: the viewer's own events and these topics'
    /// (`deployment` and `kind` are then unset).
    resume: Option<Vec<Topic>>,
}

/// The candidates of a page: `$1` after, `$2` before, `$3` skip, `$4` rows,
/// `$5` user, `$6` organization, `$7` deployment, `$8` type, `$9` superuser,
/// `$11` and `$12` the deployments and types of a resume's topics.
/// Each form reads by an index that holds only what the viewer may see, or
/// only the deployment's events, so a viewer who may see nothing reads
/// nothing, however large the log.
fn candidates(filter: &Filter) -> &'static str {
    if let Some(topics) = &filter.resume {
        // `deployment_events` holds the owner feed and every topic the
        // viewer may see; without it, the owner's own events and, topic by
        // topic, each deployment's events of one type (by its index).
        if topics.contains(&Topic::DeploymentEvents) {
            return candidates(&Filter { resume: None, skip: Vec::new(), ..*filter });
        }
        return "SELECT DISTINCT ON (id) * FROM (
            (SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
              WHERE user_id = $5 AND id > $1 AND id < $2 AND NOT id = ANY($3)
              ORDER BY id LIMIT $4)
            UNION ALL
            SELECT e.* FROM unnest($11::uuid[], $12::text[]) AS wanted(deployment_id, type)
             CROSS JOIN LATERAL (
              SELECT id, type, deployment_id, user_id, organization_id, data, size FROM windflow_events
               WHERE deployment_id = wanted.deployment_id AND type = wanted.type
                 AND id > $1 AND id < $2 AND NOT id = ANY($3)
                 AND ($9 OR user_id = $5 OR organization_id = $6)
               ORDER BY id LIMIT $4) e
          ) resumed ORDER BY id";
    }
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
    let statement = client.prepare_typed_cached(&page_sql(filter), &PAGE_TYPES).await?;
    let kind = filter.kind.map(EventKind::as_str);
    let wanted = wanted(filter);
    let params = page_params(&after, filter, &kind, &rows, &bytes, &wanted);
    Ok(events_from_rows(&client.query(&statement, &params).await?))
}

/// The statement of a page: at most `$4` candidates, cut at `$10` bytes.
fn page_sql(filter: &Filter) -> String {
    format!(
        "SELECT {COLUMNS} FROM (
            SELECT *, sum(size) OVER (ORDER BY id) - size AS bytes_before
              FROM ({}) candidates
             ORDER BY id LIMIT $4) page
          WHERE bytes_before < $10
          ORDER BY id",
        candidates(filter)
    )
}

/// The parameters' types, given: each form of `candidates` leaves some
/// unused, whose types PostgreSQL could not infer.
const PAGE_TYPES: [tokio_postgres::types::Type; 12] = {
    use tokio_postgres::types::Type;
    [
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
        Type::UUID_ARRAY,
        Type::TEXT_ARRAY,
    ]
};

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

fn page_params<'a>(
    after: &'a i64,
    filter: &'a Filter,
    kind: &'a Option<&'static str>,
    rows: &'a i64,
    bytes: &'a i64,
    wanted: &'a (Vec<Uuid>, Vec<&'static str>),
) -> [Param<'a>; 12] {
    let viewer = &filter.viewer;
    [
        after,
        &filter.before,
        &filter.skip,
        rows,
        &viewer.user_id,
        &viewer.organization_id,
        &filter.deployment,
        kind,
        &viewer.is_superuser,
        bytes,
        &wanted.0,
        &wanted.1,
    ]
}

/// The deployments and types of a resume's per-deployment topics.
fn wanted(filter: &Filter) -> (Vec<Uuid>, Vec<&'static str>) {
    let topics = filter.resume.as_deref().unwrap_or_default();
    topics.iter().filter_map(|t| Some((t.deployment()?, t.kind()?.as_str()))).unzip()
}

/// The highest id retention (or a TRUNCATE) has deleted.
async fn pruned_upto(client: &deadpool_postgres::Client) -> Result<i64, DbError> {
    Ok(client.query_one("SELECT upto FROM windflow_events_pruned", &[]).await?.get(0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn query_slots_go_to_each_waiting_user_in_turn() {
        let slots = Arc::new(FairSlots::new(1, None));
        let (hog, other) = (Uuid::new_v4(), Uuid::new_v4());
        let held = slots.acquire(hog).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (name, user) in [("hog 1", hog), ("hog 2", hog), ("hog 3", hog), ("other", other)] {
            let (waiting, tx) = (Arc::clone(&slots), tx.clone());
            waiters.push(tokio::spawn(async move {
                let _slot = waiting.acquire(user).await;
                let _ = tx.send(name);
            }));
            // Queued in this order.
            while lock(&slots.state).waiting.values().map(VecDeque::len).sum::<usize>() < waiters.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, ["hog 1", "other", "hog 2", "hog 3"], "the other user waits for one of the hog's, not three");
        assert_eq!(lock(&slots.state).free, 1, "the slot is back");
    }

    #[tokio::test(start_paused = true)]
    async fn one_users_replay_queries_are_paced_after_a_burst() {
        let limits = UserLimits::new();
        let started = tokio::time::Instant::now();
        for _ in 0..USER_REPLAY_BURST as usize {
            limits.pace().await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "the burst goes at once");
        for _ in 0..100 {
            limits.pace().await;
        }
        let paced = started.elapsed().as_secs_f64();
        assert!((0.99..=1.01).contains(&paced), "100 more take a second at 100 a second: {paced}");
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_passes_its_turn_on() {
        let slots = Arc::new(FairSlots::new(1, None));
        let held = slots.acquire(Uuid::new_v4()).await;
        let quitter = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.acquire(Uuid::new_v4()).await })
        };
        while lock(&slots.state).order.is_empty() {
            tokio::task::yield_now().await;
        }
        quitter.abort();
        let _ = quitter.await;
        let patient = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { drop(slots.acquire(Uuid::new_v4()).await) })
        };
        while lock(&slots.state).order.len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(held);
        patient.await.unwrap();
        assert_eq!(lock(&slots.state).free, 1);
    }

    /// Buffers a replay page touches, from `EXPLAIN (ANALYZE, BUFFERS)`.
    async fn buffers(client: &tokio_postgres::Client, filter: &Filter) -> (u64, usize) {
        let statement = client
            .prepare_typed(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", page_sql(filter)), &PAGE_TYPES)
            .await
            .unwrap();
        let kind = filter.kind.map(EventKind::as_str);
        let (after, rows, bytes) = (0i64, PAGE_ROWS, PAGE_BYTES as i64);
        let wanted = wanted(filter);
        let params = page_params(&after, filter, &kind, &rows, &bytes, &wanted);
        let plan: serde_json::Value = client.query_one(&statement, &params).await.unwrap().get(0);
        let top = &plan[0]["Plan"];
        let touched = ["Shared Hit Blocks", "Shared Read Blocks"].iter().filter_map(|k| top[k].as_u64()).sum();
        (touched, top["Actual Rows"].as_u64().unwrap_or(0) as usize)
    }

    /// A replay's work follows what it returns: a viewer who may see
    /// nothing reads nothing of a large log, and one who may see a few
    /// events reads about those.
    #[tokio::test]
    async fn a_replay_reads_by_index_what_its_viewer_may_see() {
        let admin = windflow_testkit::admin_url("TEST_DATABASE_URL");
        let db = windflow_testkit::Database::create_at(&admin, "wf_test").await.unwrap();
        crate::db::migrate(&db.config).await.unwrap();
        let client = db.client().await.unwrap();
        let (me, org) = (Uuid::new_v4(), Uuid::new_v4());
        client
            .batch_execute(&format!(
                "INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
                 SELECT 'DEPLOYMENT_PROGRESS', gen_random_uuid(), gen_random_uuid(),
                        CASE WHEN g % 2 = 0 THEN gen_random_uuid() END, '{{\"progress\": 1}}'
                   FROM generate_series(1, 50000) g;
                 INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
                 SELECT 'DEPLOYMENT_PROGRESS', gen_random_uuid(), CASE WHEN g <= 5 THEN '{me}'::uuid ELSE gen_random_uuid() END,
                        CASE WHEN g > 5 THEN '{org}'::uuid END, '{{\"progress\": 1}}'
                   FROM generate_series(1, 10) g;
                 INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
                 SELECT 'DEPLOYMENT_PROGRESS', gen_random_uuid(), gen_random_uuid(), NULL, '{{\"progress\": 1}}'
                   FROM generate_series(1, 50000) g;
                 ANALYZE windflow_events"
            ))
            .await
            .unwrap();
        let filter =
            |viewer| Filter { deployment: None, kind: None, viewer, before: i64::MAX, skip: Vec::new(), resume: None };
        let nobody = Viewer { user_id: Uuid::new_v4(), organization_id: Some(Uuid::new_v4()), is_superuser: false };
        let (touched, rows) = buffers(&client, &filter(nobody)).await;
        assert_eq!(rows, 0);
        assert!(touched < 20, "a viewer who may see nothing touched {touched} buffers of a 100,000-event log");
        let member = Viewer { user_id: me, organization_id: Some(org), is_superuser: false };
        let (touched, rows) = buffers(&client, &filter(member)).await;
        assert_eq!(rows, 10, "five of its own and five of its organization's");
        assert!(touched < 60, "a viewer of 10 events touched {touched} buffers of a 100,000-event log");
        db.drop_now().await.unwrap();
    }

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
