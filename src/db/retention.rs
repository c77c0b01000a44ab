//! Retention: delete events older than `WINDFLOW_EVENT_RETENTION`, and
//! remember the highest id deleted so resumes from before it get `resync`.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::DbError;

/// Pruning runs this often at the most (the promise: at least once a minute).
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Rows deleted per statement, so one prune never holds long locks.
const BATCH: i64 = 10_000;

pub async fn run(pool: Pool, retention: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(PRUNE_EVERY.min(retention));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match prune(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => info!(deleted, retention = %humantime::format_duration(retention), "event log pruned"),
            Err(e) => warn!(error = %e, "event log pruning failed; will retry"),
        }
    }
}

/// Delete events older than `retention`; returns how many.
///
/// Retention walks the log in id order (the primary key) to the first
/// event newer than `retention` and deletes every event before it, so no
/// index on `created_at` taxes writers. Ids follow commit order and
/// `created_at` the row's insert, so the two orders differ where a
/// transaction committed well after its insert: every event before the
/// cut is older than the retention (the cut is the first id that is not),
/// and an old event behind it is kept a round or more, never one within
/// the retention deleted early.
pub async fn prune(pool: &Pool, retention: Duration) -> Result<u64, DbError> {
    let client = pool.get().await?;
    let seconds = retention.as_secs_f64();
    let cut: Option<i64> = client
        .query_one(
            "SELECT coalesce(
                (SELECT id FROM windflow_events
                  WHERE created_at >= now() - make_interval(secs => $1)
                  ORDER BY id LIMIT 1),
                (SELECT max(id) + 1 FROM windflow_events))",
            &[&seconds],
        )
        .await?
        .get(0);
    let Some(cut) = cut else { return Ok(0) };
    let mut total = 0;
    loop {
        let row = client
            .query_one(
                "WITH gone AS (
                    DELETE FROM windflow_events WHERE id IN (
                        SELECT id FROM windflow_events WHERE id < $1 ORDER BY id LIMIT $2)
                    RETURNING id),
                 mark AS (
                    UPDATE windflow_events_pruned SET upto = GREATEST(upto, (SELECT max(id) FROM gone))
                     WHERE EXISTS (SELECT 1 FROM gone))
                 SELECT count(*) FROM gone",
                &[&cut, &BATCH],
            )
            .await?;
        let deleted = row.get::<_, i64>(0) as u64;
        total += deleted;
        if deleted < BATCH as u64 {
            return Ok(total);
        }
    }
}
