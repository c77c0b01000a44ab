//! The event feed: where every event enters the process.
//!
//! The triggers write each event into the log (`windflow_events`) while its
//! transaction commits, taking its id then, so ids follow commit order
//! (`sql/V8__events_in_commit_order.sql`). The feed reads the log in id
//! order and hands the hub each event once. One id can still be taken
//! before a smaller one becomes visible: two commits overlap, and the one
//! that took the smaller id finishes last. So an id is handed over only
//! once every smaller id has been: the feed stops at a missing id (a
//! *gap*) until its transaction commits, or until no transaction that could
//! hold it is still running (it rolled back, or failed at commit). That
//! makes the order of the log the order of delivery on every instance, and
//! a resume "every event after id N", exact.
//!
//! # Learning of new rows
//!
//! A committing transaction NOTIFYs `windflow_events` unless another one is
//! committing events at that very moment, whose wake-up covers it. The feed
//! LISTENs on one plain tokio-postgres connection (`application_name`
//! `windflow-notify-listener`), driven by `poll_message` because the
//! ordinary `Connection` future drops notifications, and reads the log on
//! every wake-up; after a read that found events it reads again a few times
//! over the next 64 ms (a commit that relied on another's wake-up may become
//! visible a moment after it), and it reads every [`POLL_FLOOR`] in any
//! case. The payload is never trusted: whatever anyone NOTIFYs, only rows of
//! the log are events. A payload that claims an event the log does not have
//! is counted as forged and logged.
//!
//! # What is lost when the connection dies: nothing
//!
//! The feed's position (every id up to `through` handed over) outlives the
//! connection: after a reconnect it reads on from there, so what committed
//! meanwhile arrives once, in order, before anything newer. Reconnects back
//! off exponentially ([`Backoff`]), so a database that is down is not
//! stormed.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::db::{DbError, describe, events, refuse_standby};
use crate::event::EventKind;
use crate::hub::Arrival;
use crate::metrics::Metrics;

pub const EVENTS_CHANNEL: &str = "windflow_events";
pub const APPLICATION_NAME: &str = "windflow-notify-listener";

/// Rows read per query.
const READ_ROWS: i64 = 1000;
/// Reads again this long after a read that found events, one after the
/// other: a commit that relied on another one's wake-up becomes visible a
/// flush later.
const READ_AGAIN: [Duration; 7] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
];
/// The longest an event waits when no wake-up came for it.
pub const POLL_FLOOR: Duration = Duration::from_millis(100);
/// A gap younger than this is a commit still under way: read again.
const GAP_PATIENCE: Duration = Duration::from_millis(5);
/// How often a gap is checked against the running transactions.
const GAP_CHECK_EVERY: Duration = Duration::from_millis(20);
/// A transaction that holds a gap this long took its ids before committing
/// (`SET CONSTRAINTS ... IMMEDIATE`) and sits idle: the feed goes on without
/// it, and hands its events over late if they come.
const GAP_LIMIT: Duration = Duration::from_secs(10);
/// Ids skipped that way, kept to be looked for.
const MAX_SKIPPED: usize = 10_000;
/// A query not answered in this long means the connection is dead even if
/// TCP has not noticed yet.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the notification queue and the id sequence are looked at.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Reconnect delays: up to 100 ms first, doubling to 5 s.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Wake-up payloads kept for checking, and event ids remembered to check them against.
const MAX_CLAIMS: usize = 1024;
const RECENT_IDS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FeedError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{}", crate::db::source_failure(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// PostgreSQL answered the `LISTEN` statement with an error (the
    /// connection itself still worked).
    #[error("LISTEN refused: {}", describe(.0))]
    ListenRefused(tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("a query got no answer within {QUERY_TIMEOUT:?}; connection presumed dead")]
    Stalled,
    #[error("hub stopped")]
    HubGone,
}

/// The feed's task: owns the connection, reconnecting until shutdown.
pub struct Feed {
    config: tokio_postgres::Config,
    arrivals: mpsc::Sender<Arrival>,
    up: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Feed {
    /// `up` turns true once the feed has read the log, and false whenever
    /// its connection is lost (`/healthz`, `windflow_listener_up`).
    pub fn new(
        config: &tokio_postgres::Config,
        arrivals: mpsc::Sender<Arrival>,
        metrics: Arc<Metrics>,
        up: watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> Feed {
        let mut config = config.clone();
        config.application_name(APPLICATION_NAME);
        Feed { config, arrivals, up, metrics, shutdown }
    }

    pub async fn run(self) {
        let mut position = Position::default();
        let mut backoff = RECONNECT_BACKOFF;
        loop {
            let mut became_up = false;
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => Ok(()),
                outcome = self.connection(&mut position, &mut became_up) => outcome,
            };
            self.set_up(false);
            let error = match outcome {
                Ok(()) | Err(FeedError::HubGone) => return,
                Err(e) => e,
            };
            if became_up {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(error = %error, through = position.through, retry_in = ?delay, "event feed lost; reconnecting");
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
        self.metrics.listener_up.store(i64::from(up), Relaxed);
    }

    async fn hand_over(&self, arrival: Arrival) -> Result<(), FeedError> {
        self.arrivals.send(arrival).await.map_err(|_| FeedError::HubGone)
    }

    /// One connection's life, until it fails.
    async fn connection(&self, position: &mut Position, became_up: &mut bool) -> Result<(), FeedError> {
        let (client, mut connection) =
            self.config.connect(NoTls).await.map_err(|e| crate::db::connect_error(&self.config, e))?;
        let (tx, mut wakeups) = mpsc::unbounded_channel();
        let driver = async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => debug!(notice = %notice, "feed notice"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(FeedError::Postgres(e)),
                    None => return Err(FeedError::Closed),
                }
            }
        };
        let reader = Reader { feed: self, client: &client };
        tokio::select! {
            outcome = driver => outcome,
            outcome = reader.follow(position, &mut wakeups, became_up) => outcome,
        }
    }
}

/// Where the feed is in the log; kept across connections.
#[derive(Default)]
struct Position {
    /// Every id up to this one was handed over, or can no longer commit.
    /// `None` until the first connection placed it.
    through: Option<i64>,
    /// The missing id the feed waits at, if any.
    gap: Option<Gap>,
    /// Ids given up on after [`GAP_LIMIT`], looked for on every read.
    skipped: VecDeque<i64>,
    /// Wake-up payloads not yet checked against the log.
    claims: Vec<Claim>,
    /// Ids recently handed over, with their type, to check claims against.
    recent: HashMap<i64, EventKind>,
    recent_order: VecDeque<i64>,
    /// Forged payloads counted since the last warning (one line per
    /// [`SAMPLE_EVERY`] at most).
    forged_unreported: u64,
    /// Connections that came up: from the second on, each is a reconnect.
    connections: u64,
}

/// Ids `from..to` are missing while `to` is visible.
#[derive(Debug, Clone)]
struct Gap {
    from: i64,
    to: i64,
    since: Instant,
    /// The transactions that may hold one of the ids, once looked up: those
    /// with an xid older than the moment the gap was seen that still have
    /// the log open for writing (virtual transaction ids, from `pg_locks`).
    holders: Option<Vec<String>>,
    last_check: Option<Instant>,
}

/// What a wake-up payload says it announces.
#[derive(Debug, Deserialize)]
struct Claim {
    event_id: i64,
    #[serde(rename = "type")]
    kind: String,
}

/// What one connection does: read the log whenever there may be something
/// new.
struct Reader<'a> {
    feed: &'a Feed,
    client: &'a Client,
}

/// When the reader reads next.
enum Next {
    /// On a wake-up, or after the floor.
    Idle,
    /// After this long (a read that found events, or a gap).
    After(Duration),
}

impl Reader<'_> {
    async fn follow(
        &self,
        position: &mut Position,
        wakeups: &mut mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        became_up: &mut bool,
    ) -> Result<(), FeedError> {
        refuse_standby(self.client).await?;
        self.client.batch_execute(&format!("LISTEN {EVENTS_CHANNEL}")).await.map_err(|e| match e.as_db_error() {
            Some(_) => FeedError::ListenRefused(e),
            None => FeedError::Postgres(e),
        })?;
        if position.through.is_none() {
            let origin = self.origin().await?;
            position.through = Some(origin);
            self.feed.hand_over(Arrival::Through(origin)).await?;
        }
        let mut again = 0usize;
        let mut sample = tokio::time::interval(SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let read = self.read(position).await?;
            if !*became_up {
                *became_up = true;
                self.feed.set_up(true);
                position.connections += 1;
                if position.connections > 1 {
                    self.feed.metrics.listener_reconnects_total.fetch_add(1, Relaxed);
                }
                info!(application_name = APPLICATION_NAME, through = position.through, "event feed up");
            }
            if let Read::Found = read {
                // Busy: the next wake-up is read at once, and every wake-up
                // that came meanwhile with it; with none, a read a
                // millisecond on finds what committed on another's wake-up.
                again = 0;
                tokio::select! {
                    _ = self.feed.shutdown.cancelled() => return Ok(()),
                    wakeup = wakeups.recv() => {
                        let Some(wakeup) = wakeup else { return Err(FeedError::Closed) };
                        self.claim(position, wakeup.payload());
                    }
                    _ = tokio::time::sleep(READ_AGAIN[0]) => {}
                }
                while let Ok(wakeup) = wakeups.try_recv() {
                    self.claim(position, wakeup.payload());
                }
                // The once-a-second sample, when due, busy or not.
                tokio::select! {
                    biased;
                    _ = sample.tick() => self.sample(position).await?,
                    _ = std::future::ready(()) => {}
                }
                continue;
            }
            let next = match read {
                Read::Gap(wait) => Next::After(wait),
                Read::Found => Next::After(READ_AGAIN[0]),
                Read::Nothing if again + 1 < READ_AGAIN.len() => {
                    again += 1;
                    Next::After(READ_AGAIN[again])
                }
                Read::Nothing => Next::Idle,
            };
            let delay = match next {
                Next::Idle => POLL_FLOOR,
                Next::After(delay) => delay,
            };
            tokio::select! {
                _ = self.feed.shutdown.cancelled() => return Ok(()),
                wakeup = wakeups.recv() => {
                    let Some(wakeup) = wakeup else { return Err(FeedError::Closed) };
                    self.claim(position, wakeup.payload());
                    // Every wake-up queued now is answered by one read.
                    while let Ok(wakeup) = wakeups.try_recv() {
                        self.claim(position, wakeup.payload());
                    }
                    if matches!(next, Next::Idle) {
                        again = 0;
                    }
                }
                _ = tokio::time::sleep(delay) => {}
                _ = sample.tick() => self.sample(position).await?,
            }
        }
    }

    /// A query, presumed lost past [`QUERY_TIMEOUT`].
    async fn query<T>(&self, work: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, FeedError> {
        match tokio::time::timeout(QUERY_TIMEOUT, work).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(FeedError::Stalled),
        }
    }

    /// Where a feed that never ran starts: after every id taken so far,
    /// once none of them can still commit; if some can (a transaction took
    /// its ids early and stays open), before the first of them.
    async fn origin(&self) -> Result<i64, FeedError> {
        let last = self.last_id().await?;
        let now = self.current_xid().await?;
        let suspects = self.holders(Some(now)).await?;
        let started = Instant::now();
        loop {
            let open = self.holders(None).await?;
            if !suspects.iter().any(|s| open.contains(s)) {
                return Ok(last);
            }
            if started.elapsed() > Duration::from_secs(1) {
                // The first id up to `last` not in the log: the gap logic
                // takes over from there.
                let row = self
                    .query(self.client.query_one(
                        "SELECT coalesce(min(g) - 1, $1)
                           FROM generate_series(greatest($1 - 10000, 0) + 1, $1) g
                          WHERE NOT EXISTS (SELECT FROM windflow_events WHERE id = g)",
                        &[&last],
                    ))
                    .await?;
                return Ok(row.get(0));
            }
            tokio::time::sleep(GAP_CHECK_EVERY).await;
        }
    }

    /// This connection's transaction id, 32 bits as `pg_locks` shows xids:
    /// every transaction with an older xid began writing before now.
    async fn current_xid(&self) -> Result<i64, FeedError> {
        let row =
            self.query(self.client.query_one("SELECT pg_current_xact_id()::text::bigint % 4294967296", &[])).await?;
        Ok(row.get(0))
    }

    /// The last id the sequence handed out (0 before the first).
    async fn last_id(&self) -> Result<i64, FeedError> {
        let row = self
            .query(
                self.client
                    .query_one("SELECT coalesce(pg_sequence_last_value('windflow_event_ids'::regclass), 0)", &[]),
            )
            .await?;
        Ok(row.get(0))
    }

    /// Transactions that have the log open for writing (they are inserting
    /// events, or committing them): their virtual transaction ids. With
    /// `older_than`, only those whose xid is older than it.
    async fn holders(&self, older_than: Option<i64>) -> Result<Vec<String>, FeedError> {
        let rows = self
            .query(self.client.query(
                "SELECT w.virtualtransaction
                   FROM pg_locks w
                   LEFT JOIN pg_locks x ON x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock'
                                       AND x.granted AND x.virtualtransaction = w.virtualtransaction
                  WHERE w.locktype = 'relation' AND w.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND w.relation = 'windflow_events'::regclass AND w.mode = 'RowExclusiveLock'
                    AND w.granted AND w.pid <> pg_backend_pid()
                    AND ($1::bigint IS NULL OR x.transactionid IS NULL
                         -- xid is 32 bits and wraps: older means behind by less than 2^31.
                         OR (($1 - x.transactionid::text::bigint) % 4294967296 + 4294967296) % 4294967296
                            BETWEEN 1 AND 2147483647)",
                &[&older_than],
            ))
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Hand over what the log has after `through`, in order, up to a gap.
    async fn read(&self, position: &mut Position) -> Result<Read, FeedError> {
        self.feed.metrics.log_reads_total.fetch_add(1, Relaxed);
        let mut found = false;
        if !position.skipped.is_empty() {
            found |= self.read_late(position).await?;
        }
        loop {
            let Some(through) = position.through else { return Ok(Read::Nothing) };
            // While waiting at a gap, read only up to its end.
            let upto = position.gap.as_ref().map_or(i64::MAX, |gap| gap.to);
            let rows = self.query(self.client.query(events::READ_AFTER, &[&through, &upto, &READ_ROWS])).await?;
            let count = rows.len();
            let mut next = through + 1;
            let mut stopped_at = None;
            for row in &rows {
                let id: i64 = row.get(0);
                if id != next {
                    stopped_at = Some(id);
                    break;
                }
                self.hand_over_row(position, row).await?;
                next += 1;
                found = true;
            }
            position.through = Some(next - 1);
            match stopped_at {
                Some(to) => {
                    let gap = match position.gap.take() {
                        Some(gap) if gap.from == next => Gap { to: gap.to.min(to), ..gap },
                        _ => Gap { from: next, to, since: Instant::now(), holders: None, last_check: None },
                    };
                    match self.resolve(gap, position).await? {
                        Some(wait) => {
                            self.check_claims(position);
                            return Ok(Read::Gap(wait));
                        }
                        // The gap can no longer fill: read on past it.
                        None => continue,
                    }
                }
                // Up to the gap's end with nothing missing: the gap filled;
                // read on past it.
                None if upto != i64::MAX => {
                    position.gap = None;
                    continue;
                }
                None => {}
            }
            if (count as i64) < READ_ROWS {
                self.check_claims(position);
                return Ok(if found { Read::Found } else { Read::Nothing });
            }
        }
    }

    /// Decide about a gap: `None` once it can no longer fill (then
    /// `through` is past it), or how long to wait before reading again.
    async fn resolve(&self, mut gap: Gap, position: &mut Position) -> Result<Option<Duration>, FeedError> {
        let age = gap.since.elapsed();
        if age < GAP_PATIENCE {
            position.gap = Some(gap);
            return Ok(Some(GAP_PATIENCE.saturating_sub(age).max(Duration::from_millis(1))));
        }
        if gap.last_check.is_some_and(|at| at.elapsed() < GAP_CHECK_EVERY) {
            position.gap = Some(gap);
            return Ok(Some(GAP_CHECK_EVERY));
        }
        gap.last_check = Some(Instant::now());
        let holders = match &gap.holders {
            // The first check: who could hold the missing ids? Only
            // transactions with an xid older than now (ids are taken after
            // a transaction's first write, and the gap's ids before now).
            None => {
                let now = self.current_xid().await?;
                self.holders(Some(now)).await?
            }
            // Later: which of those still has the log open.
            Some(suspects) => {
                let open = self.holders(None).await?;
                suspects.iter().filter(|s| open.contains(s)).cloned().collect()
            }
        };
        if holders.is_empty() {
            // Every id of the gap is now committed or never will be.
            let missing = self.settle(&gap, position).await?;
            debug!(
                from = gap.from,
                to = gap.to,
                missing = missing.len(),
                "ids that will never commit; reading past them"
            );
            return Ok(None);
        }
        if age > GAP_LIMIT {
            warn!(
                from = gap.from,
                to = gap.to,
                holders = ?holders,
                "a transaction took event ids before committing (SET CONSTRAINTS ... IMMEDIATE?) and stays open; \
                 delivering past its ids, and its events late if it commits"
            );
            let missing = self.settle(&gap, position).await?;
            position.skipped.extend(missing);
            while position.skipped.len() > MAX_SKIPPED {
                position.skipped.pop_front();
            }
            return Ok(None);
        }
        gap.holders = Some(holders);
        position.gap = Some(gap);
        Ok(Some(GAP_CHECK_EVERY))
    }

    /// Hand over, in order, the events of the gap's ids visible now, and
    /// move past the gap; returns the ids still missing.
    async fn settle(&self, gap: &Gap, position: &mut Position) -> Result<Vec<i64>, FeedError> {
        let (after, upto, rows) = (gap.from - 1, gap.to - 1, gap.to - gap.from);
        let found = self.query(self.client.query(events::READ_AFTER, &[&after, &upto, &rows])).await?;
        let mut missing = Vec::new();
        let mut next = gap.from;
        for row in &found {
            let id: i64 = row.get(0);
            missing.extend(next..id);
            self.hand_over_row(position, row).await?;
            next = id + 1;
        }
        missing.extend(next..gap.to);
        position.through = Some(upto);
        self.feed.hand_over(Arrival::Through(upto)).await?;
        Ok(missing)
    }

    /// Events of ids given up on that committed after all.
    async fn read_late(&self, position: &mut Position) -> Result<bool, FeedError> {
        let ids: Vec<i64> = position.skipped.iter().copied().collect();
        let rows = self.query(self.client.query(events::READ_IDS, &[&ids])).await?;
        for row in &rows {
            let id: i64 = row.get(0);
            position.skipped.retain(|skipped| *skipped != id);
            self.feed.metrics.late_events_total.fetch_add(1, Relaxed);
            warn!(event_id = id, "an event committed after the feed went past its id; delivered late");
            self.hand_over_row(position, row).await?;
        }
        Ok(!rows.is_empty())
    }

    async fn hand_over_row(&self, position: &mut Position, row: &Row) -> Result<(), FeedError> {
        let Some(event) = events::event_from_row(row) else {
            let id: i64 = row.get(0);
            warn!(event_id = id, "ignoring an event of unknown type");
            return Ok(());
        };
        position.remember(event.id, event.kind);
        self.feed.hand_over(Arrival::Event(event)).await
    }

    /// Once a second: the notification queue's usage (a listener that stops
    /// reading fills it, and then writers' commits fail), and whether the
    /// ids started again below the feed's position.
    async fn sample(&self, position: &mut Position) -> Result<(), FeedError> {
        let row = self
            .query(self.client.query_one(
                "SELECT pg_notification_queue_usage(),
                        coalesce(pg_sequence_last_value('windflow_event_ids'::regclass), 0)",
                &[],
            ))
            .await?;
        self.feed.metrics.set_notification_queue_usage(row.get(0));
        let last: i64 = row.get(1);
        // An id the log had not given out by now cannot have been announced
        // by a wake-up that came before now.
        let (future, pending) = std::mem::take(&mut position.claims).into_iter().partition(|c| c.event_id > last);
        position.claims = pending;
        for claim in future {
            self.forged(position, Some(&claim));
        }
        if let Some(through) = position.through
            && last < through
        {
            warn!(through, last, "event ids started again below what was delivered; resumes from before get resync");
            position.through = Some(last);
            position.gap = None;
            position.skipped.clear();
            self.feed.hand_over(Arrival::Restarted(last)).await?;
        }
        if position.forged_unreported > 0 {
            warn!(
                count = position.forged_unreported,
                "notifications on windflow_events announced events the log does not have; ignored"
            );
            position.forged_unreported = 0;
        }
        Ok(())
    }

    /// Remember what a wake-up payload announces, to check it once the log
    /// is read that far. A payload that is not an announcement is forged.
    fn claim(&self, position: &mut Position, payload: &str) {
        match serde_json::from_str::<Claim>(payload) {
            Ok(claim) if position.claims.len() < MAX_CLAIMS => position.claims.push(claim),
            Ok(_) => {}
            Err(_) => self.forged(position, None),
        }
    }

    fn forged(&self, position: &mut Position, claim: Option<&Claim>) {
        self.feed.metrics.forged_notifications_total.fetch_add(1, Relaxed);
        position.forged_unreported += 1;
        if position.forged_unreported == 1 {
            warn!(
                event_id = claim.map(|c| c.event_id),
                kind = claim.map(|c| c.kind.as_str()),
                "a notification on windflow_events announced an event the log does not have; ignored"
            );
        }
    }

    /// Count as forged every claim the log has answered otherwise.
    fn check_claims(&self, position: &mut Position) {
        let Some(through) = position.through else { return };
        let oldest = position.recent_order.front().copied().unwrap_or(i64::MAX);
        let claims = std::mem::take(&mut position.claims);
        for claim in claims {
            if claim.event_id > through {
                position.claims.push(claim);
                continue;
            }
            let genuine = match position.recent.get(&claim.event_id) {
                Some(kind) => kind.as_str() == claim.kind,
                // Older than what is remembered, or given up on: cannot tell.
                None => claim.event_id < oldest || position.skipped.contains(&claim.event_id),
            };
            if !genuine {
                self.forged(position, Some(&claim));
            }
        }
    }
}

/// What a read found.
enum Read {
    Found,
    Nothing,
    /// Stopped at a gap: read again after this long.
    Gap(Duration),
}

impl Position {
    fn remember(&mut self, id: i64, kind: EventKind) {
        self.recent.insert(id, kind);
        self.recent_order.push_back(id);
        if self.recent_order.len() > RECENT_IDS
            && let Some(old) = self.recent_order.pop_front()
        {
            self.recent.remove(&old);
        }
    }
}
