//! Queries on the event log (`windflow_events`, see `sql/V2__events.sql`).

use tokio_postgres::{Client, Row};
use uuid::Uuid;

use crate::auth::Viewer;
use crate::event::{Event, EventKind};

use super::DbError;

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

/// Every event of a transaction that the marker `snapshot` did not show as
/// finished: after a listener outage, what may not have been delivered.
/// In id order, which is commit order within each deployment.
pub async fn unfinished_at(client: &Client, snapshot: &str) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM windflow_events
          WHERE xid >= pg_snapshot_xmin($1::text::pg_snapshot)
            AND NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
          ORDER BY id"
    );
    Ok(events_from_rows(&client.query(&sql, &[&snapshot]).await?))
}

/// Which events of the log a replay reads.
pub struct LogFilter<'a> {
    pub deployment: Option<Uuid>,
    pub kind: Option<EventKind>,
    /// Only events this viewer may see.
    pub viewer: Viewer,
    /// Only transactions this marker snapshot shows as finished...
    pub snapshot: &'a str,
    /// ...or these events.
    pub also: &'a [i64],
}

/// A page of the events after `after` (by id) that pass `filter`: at most
/// `rows` events, and no more than about `bytes` of event data (a page
/// always holds at least one event, however large). Visibility is decided
/// here, so a viewer who may see nothing pulls nothing.
pub async fn page_after(
    client: &Client,
    after: i64,
    filter: &LogFilter<'_>,
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

/// What the log says of a `since`: the writing transaction of event `id`
/// if it is there, and the highest id retention has deleted.
pub async fn look_up(client: &Client, id: i64) -> Result<(Option<u64>, i64), DbError> {
    let row = client
        .query_one(
            "SELECT (SELECT xid::text FROM windflow_events WHERE id = $1), (SELECT upto FROM windflow_events_pruned)",
            &[&id],
        )
        .await?;
    let xid: Option<String> = row.get(0);
    Ok((xid.and_then(|x| x.parse().ok()), row.get(1)))
}

/// The highest id retention has deleted.
pub async fn pruned_upto(client: &Client) -> Result<i64, DbError> {
    Ok(client.query_one("SELECT upto FROM windflow_events_pruned", &[]).await?.get(0))
}

/// Owner and organization of a deployment, if it exists.
pub async fn deployment_audience(client: &Client, id: Uuid) -> Result<Option<(Uuid, Option<Uuid>)>, DbError> {
    let row = client.query_opt("SELECT user_id, organization_id FROM deployments WHERE id = $1", &[&id]).await?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}
