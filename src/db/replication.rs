//! The logical event source: committed inserts of the event log, read from
//! the WAL. Used when the database's event source is `logical`
//! ([`super::source`]); it hands the hub exactly what [`super::listener`]
//! does, so nothing past this module knows which source runs.
//!
//! Each session holds two connections: a replication connection
//! (`application_name` `windflow-notify-replication`, `pgoutput` over the
//! publication `windflow_events`, which publishes inserts only) and an
//! ordinary one for markers and catch-up. Triggers in this mode do not
//! NOTIFY, so writers' commits are not serialized by PostgreSQL's NOTIFY
//! lock and every event arrives with its data, whatever its size.
//!
//! # Order
//!
//! pgoutput sends each transaction whole, at its commit record, in WAL
//! order: commit order, as NOTIFY's queue gives. Every instance reads the
//! same WAL, so every instance sees one order and a client may resume on any.
//!
//! # Markers
//!
//! Once a second the source runs, on its ordinary connection,
//! `pg_logical_emit_message(true, <prefix>, <bound> <xid> pg_current_snapshot())`
//! ([`CatchUp`] says what the bound is for): a
//! transactional message, so it is decoded at its transaction's commit,
//! after every transaction that committed before it, among them every
//! transaction its snapshot shows as finished. When it comes back it is a
//! marker with the listener's meaning ([`Arrival::Marker`]). The prefix holds
//! a random id per process, so other instances' markers (the stream carries
//! every logical message, whatever the publication) and forged ones are
//! ignored. A marker not back within ten seconds means the stream is dead.
//!
//! # Slots: temporary, so a server that is down holds no WAL
//!
//! Each session creates a TEMPORARY slot, which PostgreSQL drops when the
//! replication connection ends, however it ends: a server that is down,
//! killed or partitioned away makes PostgreSQL keep no WAL at all, and its
//! writers never wait or fail because of it. While the session runs, each
//! commit and keepalive position is acknowledged as soon as it is read (the
//! session never resumes from its slot), so the slot holds back only what
//! the server has not yet read.
//!
//! What a temporary slot cannot give, a resume across sessions, the event
//! log gives: a new slot streams every transaction that commits after its
//! consistent point; after creating it, the source reads from the log every
//! event of a transaction the last marker did not show as finished, exactly
//! as the listener does after a re-LISTEN ([`CatchUp`]), and the hub drops the ones it
//! already had (those that committed after the consistent point come in
//! the stream too). A permanent slot would spare that query, but a server
//! that stays down would then make PostgreSQL keep WAL until
//! `max_slot_wal_keep_size` invalidates the slot, after which it must fall
//! back to the log anyway; the log is retained by time and pruned by us.
//!
//! Creating a logical slot waits until every transaction running at that
//! moment has finished: a reconnect waits for the longest open write
//! transaction (writers are not blocked by it), and catch-up delivers what
//! committed meanwhile.

use std::time::{Duration, Instant};

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

use crate::db::catchup::{CatchUp, MARKER_TEXT};
use crate::db::listener::{EventStream, HubGone, SourceLink, keep_connected, named};
use crate::db::pgoutput::{DecodeError, Decoded, Decoder};
use crate::db::source::{PUBLICATION, check_logical_ready};
use crate::db::{DbError, quote_identifier, refuse_standby};
use crate::hub::Arrival;

pub const APPLICATION_NAME: &str = "windflow-notify-replication";

/// How often a marker is sent.
const MARKER_EVERY: Duration = Duration::from_secs(1);
/// A marker not back within this long means the stream is dead even if TCP
/// has not noticed (the replication client sets no keepalives).
const MARKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the read position is reported, releasing WAL.
const STATUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicationError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{}", crate::db::source_failure(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("replication connection: {0}")]
    Stream(#[from] PgWireError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("DATABASE_URL has no {0} for the replication connection")]
    Incomplete(&'static str),
    #[error("replication stream closed by the server")]
    Closed,
    #[error("no marker came back within {MARKER_TIMEOUT:?}; stream presumed dead")]
    Stalled,
    #[error(transparent)]
    HubGone(#[from] HubGone),
}

pub struct Replication {
    config: tokio_postgres::Config,
    link: SourceLink,
}

/// The replication client, aborted (its connection closed, its temporary
/// slot dropped by PostgreSQL) however the session ends.
struct Stream(ReplicationClient);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Replication {
    pub fn new(config: &tokio_postgres::Config, link: SourceLink) -> Self {
        Replication { config: named(config, APPLICATION_NAME), link }
    }

    pub async fn run(self) {
        keep_connected(&self, &self.link, "replication stream").await
    }

    /// One session: both connections, until either fails (or shutdown,
    /// which [`keep_connected`] races against it).
    async fn session(&self, catch_up: &mut CatchUp, became_up: &mut bool) -> Result<(), ReplicationError> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::select! {
            outcome = connection => Err(outcome.err().map_or(ReplicationError::Closed, ReplicationError::Postgres)),
            outcome = self.stream(&client, catch_up, became_up) => outcome,
        }
    }

    fn replication_config(&self, slot: &str) -> Result<ReplicationConfig, ReplicationError> {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => return Err(ReplicationError::Incomplete("host")),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().ok_or(ReplicationError::Incomplete("user"))?;
        let password = self.config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let database = self.config.get_dbname().unwrap_or(user);
        Ok(ReplicationConfig::new(host, user, password, database, slot, PUBLICATION)
            .with_port(port)
            .with_tls(TlsConfig::disabled())
            .with_application_name(APPLICATION_NAME)
            .with_status_interval(STATUS_EVERY))
    }

    async fn stream(
        &self,
        client: &Client,
        catch_up: &mut CatchUp,
        became_up: &mut bool,
    ) -> Result<(), ReplicationError> {
        refuse_standby(client).await?;
        check_logical_ready(client).await?;
        let slot = format!("windflow_{}", uuid::Uuid::new_v4().simple());
        let mut stream = Stream(ReplicationClient::connect_gated(self.replication_config(&slot)?).await?);
        stream
            .0
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_identifier(&slot)
            ))
            .await?;
        stream.0.start().await?;
        stream.0.wait_started().await?;
        self.link.catch_up::<ReplicationError>(client, catch_up, "replication stream back").await?;

        let mut decoder = Decoder::default();
        let mut tick = tokio::time::interval(MARKER_EVERY);
        let mut marker_sent: Option<Instant> = None;
        loop {
            tokio::select! {
                event = stream.0.recv() => match event?.ok_or(ReplicationError::Closed)? {
                    ReplicationEvent::XLogData { data, .. } => match decoder.decode(&data) {
                        Ok(Decoded::Event(event)) => self.hand_over(Arrival::Event(event)).await?,
                        Ok(Decoded::UnknownKind(id)) => warn!(event_id = id, "ignoring an event of unknown type"),
                        Ok(Decoded::Nothing) => {}
                        // A row the schema's constraints should have refused:
                        // reconnecting would read it again.
                        Err(e @ DecodeError::BadValue { .. }) => warn!(error = %e, "ignoring an event log row"),
                        Err(e) => return Err(e.into()),
                    },
                    ReplicationEvent::Message { prefix, content, .. } if prefix == self.link.marker_name => {
                        let Some(snapshot) = catch_up.on_marker(&String::from_utf8_lossy(&content)) else {
                            warn!(prefix = %prefix, "ignoring a malformed marker message");
                            continue;
                        };
                        marker_sent = None;
                        self.hand_over(Arrival::Marker(snapshot)).await?;
                        if !*became_up {
                            *became_up = true;
                            self.link.set_up(true);
                            info!(application_name = APPLICATION_NAME, slot = %slot, "replication stream up");
                        }
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => stream.0.update_applied_lsn(end_lsn),
                    ReplicationEvent::KeepAlive { wal_end, .. } => stream.0.update_applied_lsn(wal_end),
                    ReplicationEvent::StoppedAt { .. } => return Err(ReplicationError::Closed),
                    ReplicationEvent::Begin { .. } | ReplicationEvent::Message { .. } => {}
                },
                _ = tick.tick() => {
                    if let Some(sent) = marker_sent {
                        if sent.elapsed() > MARKER_TIMEOUT {
                            return Err(ReplicationError::Stalled);
                        }
                        continue;
                    }
                    let bound = CatchUp::marker_prefix(client).await?;
                    client
                        .execute(
                            &format!("SELECT pg_logical_emit_message(true, $1, $2 || {MARKER_TEXT})"),
                            &[&self.link.marker_name, &bound],
                        )
                        .await?;
                    marker_sent = Some(Instant::now());
                }
            }
        }
    }

    async fn hand_over(&self, arrival: Arrival) -> Result<(), ReplicationError> {
        Ok(self.link.hand_over(arrival).await?)
    }
}

impl EventStream for Replication {
    type Error = ReplicationError;

    fn hub_gone(error: &ReplicationError) -> bool {
        matches!(error, ReplicationError::HubGone(_))
    }

    fn connection(
        &self,
        catch_up: &mut CatchUp,
        became_up: &mut bool,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send {
        self.session(catch_up, became_up)
    }
}
