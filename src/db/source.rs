//! Which event source a database uses, and whether it is ready for it.
//!
//! The choice is a property of the database, not of a server: it decides
//! whether the triggers NOTIFY (`windflow_event_source`, read by
//! `windflow_emit`), so every instance on one database must follow it.
//!
//! - `notify` (the default): needs nothing from the DBA; writers' commits
//!   are serialized by PostgreSQL's NOTIFY lock ([`super::listener`]).
//! - `logical`: triggers only write the event log; each instance streams
//!   its inserts over logical replication ([`super::replication`]). Needs
//!   `wal_level = logical`, a role with REPLICATION, and the publication.
//!
//! `windflow-notify event-source logical|notify` switches a database after
//! checking it is ready ([`switch`]). A running server notices a switch
//! within [`WATCH_EVERY`] and stops with an error naming it, so that its
//! supervisor starts it again in the new mode; its clients resume with
//! `since`, which the event log serves exactly.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{DbError, quote_identifier};

/// The publication the logical source streams: inserts into the event log.
pub const PUBLICATION: &str = "windflow_events";
/// How often a running server checks that the database's mode is still its own.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventSource {
    Notify,
    Logical,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Notify => "notify",
            EventSource::Logical => "logical",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "notify" => Some(EventSource::Notify),
            "logical" => Some(EventSource::Logical),
            _ => None,
        }
    }
}

impl fmt::Display for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a database cannot use the logical source yet: one line each, naming
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(
        "event source 'logical' needs wal_level = logical, but the server runs with '{0}': set wal_level = logical in postgresql.conf and restart PostgreSQL (or switch back: windflow-notify event-source notify)"
    )]
    WalLevel(String),
    #[error(
        "event source 'logical' needs a role with the REPLICATION attribute, and {0} has none: ALTER ROLE {0} WITH REPLICATION (on a managed database, grant its replication role, e.g. rds_replication)"
    )]
    NoReplicationPrivilege(String),
    #[error(
        "event source 'logical' needs the publication {PUBLICATION}, which does not exist: run windflow-notify event-source logical (it creates it), or CREATE PUBLICATION {PUBLICATION} FOR TABLE windflow_events WITH (publish = 'insert')"
    )]
    NoPublication,
    #[error("windflow_event_source holds '{0}', which is neither 'notify' nor 'logical'")]
    UnknownSource(String),
}

/// The database's event source.
pub async fn configured(client: &impl GenericClient) -> Result<EventSource, DbError> {
    let row = client.query_one("SELECT source FROM windflow_event_source", &[]).await?;
    let name: String = row.get(0);
    EventSource::parse(&name).ok_or_else(|| NotReady::UnknownSource(name).into())
}

/// The database's event source, refused when the database is not ready
/// for it.
pub async fn at_startup(config: &tokio_postgres::Config) -> Result<EventSource, DbError> {
    let client = super::connect(config).await?;
    let source = configured(&client).await?;
    if source == EventSource::Logical {
        check_logical_ready(&client).await?;
    }
    Ok(source)
}

/// What the database lacks for logical mode, without the publication check
/// ([`switch`] creates the publication).
async fn logical_prerequisites(client: &Client) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(NotReady::WalLevel(wal_level).into());
    }
    if !row.get::<_, Option<bool>>(2).unwrap_or(false) {
        return Err(NotReady::NoReplicationPrivilege(row.get(1)).into());
    }
    Ok(())
}

/// Everything the logical source needs from the database.
pub async fn check_logical_ready(client: &Client) -> Result<(), DbError> {
    logical_prerequisites(client).await?;
    let exists =
        client.query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&PUBLICATION]).await?;
    if !exists.get::<_, bool>(0) {
        return Err(NotReady::NoPublication.into());
    }
    Ok(())
}

/// Switch the database to `to`, refusing `logical` when the database is not
/// ready for it. The change takes effect for every transaction that commits
/// after it; running servers of the other mode stop (see the module docs).
pub async fn switch(client: &mut Client, to: EventSource) -> Result<EventSource, DbError> {
    if to == EventSource::Logical {
        logical_prerequisites(client).await?;
    }
    let transaction = client.transaction().await?;
    let from = configured(&transaction).await?;
    if to == EventSource::Logical {
        let exists = transaction
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&PUBLICATION])
            .await?;
        if !exists.get::<_, bool>(0) {
            transaction
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE windflow_events WITH (publish = 'insert')",
                    quote_identifier(PUBLICATION)
                ))
                .await?;
        }
    }
    transaction.execute("UPDATE windflow_event_source SET source = $1", &[&to.as_str()]).await?;
    transaction.commit().await?;
    Ok(from)
}

/// Watch the database's mode; when it is no longer `running`, cancel
/// `switched` and `shutdown` so the server stops and is started again in
/// the new mode.
pub async fn watch(pool: Pool, running: EventSource, switched: CancellationToken, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(WATCH_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = match pool.get().await {
            Ok(client) => configured(&**client).await,
            Err(e) => Err(e.into()),
        };
        match now {
            Ok(now) if now == running => {}
            Ok(now) => {
                error!(running = %running, database = %now,
                    "the database switched event source; stopping so that the server starts again in the new mode");
                switched.cancel();
                shutdown.cancel();
                return;
            }
            Err(e) => warn!(error = %e, "could not read the database's event source; will retry"),
        }
    }
}
