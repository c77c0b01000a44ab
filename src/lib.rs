//! windflow-notify: PostgreSQL rows in, WebSocket (or Server-Sent Events) messages out.
//!
//! # How an event travels
//!
//! 1. A writer changes `deployments` or `deployment_logs` (`sql/`). A
//!    trigger records the event in `windflow_events` (`windflow_emit`)
//!    and, in the default `notify` mode, NOTIFYs it at commit.
//! 2. An event source hands the hub each committed event, in commit order,
//!    as an [`event::Event`] whose wire message is serialized there, once:
//!    [`db::listener`] (LISTEN) or, in `logical` mode ([`db::source`]),
//!    [`db::replication`] (the event log's inserts in the WAL). After a
//!    lost connection each reads what it missed from the event log.
//! 3. [`hub`] decides who receives it, by one rule
//!    ([`hub`]'s `Conn::receives`): the owner's connections, and the
//!    subscribers of the [`event::Topic`]s that carry it who may see it
//!    ([`auth::Viewer::can_see`]). It keeps recent events in commit order
//!    for `since` resumes ([`history`], bounded in events and bytes) and
//!    places each resume in that order, or before it in the event log.
//! 4. [`session`] takes it from the client's own bounded queue (so a slow
//!    client never holds up the others): its core ([`session::core`])
//!    puts it in order among the replies ([`protocol`]) and resumes, and
//!    the session's task ([`session::driver`]) writes it through the
//!    client's transport: [`ws`] (WebSocket) or [`sse`] (Server-Sent
//!    Events). Replays from the event log are paged under server-wide
//!    limits ([`session::replay`], [`db::events::EventLog`]).
//!
//! # Adding an event type
//!
//! 1. A migration, `sql/V<next>__<what>.sql`, whose trigger function calls
//!    `PERFORM windflow_emit('DEPLOYMENT_<WHAT>', <deployments row>,
//!    json_build_object(...))`, from an AFTER ROW trigger of a write (so
//!    the transaction has its xid before it takes an event id: the
//!    catch-up after an outage relies on it, see [`db::catchup`]). Replacing an existing trigger function
//!    (`CREATE OR REPLACE FUNCTION windflow_deployment_events()`) restates
//!    the whole body and `SECURITY DEFINER SET search_path FROM CURRENT`:
//!    `CREATE OR REPLACE` resets what it does not state, and without them
//!    writers lose the right to emit. Rebuild: migrations are embedded.
//! 2. In [`event`]: a variant of [`event::EventKind`], its row in
//!    `EventKind::row` (wire name, and the prefix of its per-deployment
//!    topic, or `None` when it is only on `deployment_events`), and its
//!    place in `EventKind::ALL`.
//! 3. Its data type in `clients/src/messages.ts` and its fields in
//!    `docs/events.md`.
//!
//! Nothing else changes: parsing, topics, routing, replays from the
//! history and the log, `tail` and both event sources go by the table. A
//! missing row does not compile; `ALL` out of order does not compile; a
//! type the triggers emit but `ALL` lacks, or that `messages.ts` lacks,
//! fails `event::tests::every_kind_has_one_row_and_the_triggers_emit_exactly_these`.

pub mod auth;
pub mod backoff;
pub mod config;
pub mod db;
pub mod demo;
pub mod event;
pub mod history;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod sse;
pub mod tail;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::config::ServerArgs;
use crate::db::DbError;
use crate::db::events::EventLog;
use crate::db::listener::{Listener, SourceLink};
use crate::db::replication::Replication;
use crate::db::source::EventSource;
use crate::http::Server;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::Endpoint;

/// How long shutdown waits for the server's tasks, so the process exits
/// within the 5 s a SIGTERM allows.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0} tasks were still running when shutdown's grace period ended")]
    Lingering(usize),
    #[error("the database's event source is no longer '{0}': start the server again to follow it")]
    SourceSwitched(EventSource),
}

/// Migrate, then serve on `listener` until `shutdown` is cancelled; returns
/// once every task it started has ended.
///
/// Clients are accepted once the LISTEN connection is up, so the first
/// resume already has a marker to replay against.
pub async fn serve(
    listener: TcpListener,
    database: &tokio_postgres::Config,
    settings: ServerArgs,
    verifier: Verifier,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    http::raise_open_file_limit(settings.max_connections.get());
    db::migrate(database).await?;
    let source = db::source::at_startup(database).await?;
    info!(event_source = %source, "event source of this database");
    let metrics = Arc::new(Metrics::default());
    let tasks = TaskTracker::new();
    let (hub, hub_handle, arrivals) =
        Hub::new(Arc::clone(&metrics), settings.history_size.get(), settings.history_bytes);
    let (up_tx, mut up) = watch::channel(false);
    tasks.spawn(hub.run(shutdown.clone()));
    let link = SourceLink::new(arrivals, Arc::clone(&metrics), up_tx, shutdown.clone());
    match source {
        EventSource::Notify => tasks.spawn(Listener::new(database, link).run()),
        EventSource::Logical => tasks.spawn(Replication::new(database, link).run()),
    };
    let pool = db::pool(database);
    let switched = CancellationToken::new();
    tasks.spawn(db::source::watch(pool.clone(), source, switched.clone(), shutdown.clone()));
    tasks.spawn(db::retention::run(pool.clone(), settings.event_retention, shutdown.clone()));

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = up.wait_for(|up| *up) => {}
    }
    let sessions = Endpoint::new(&settings, verifier, hub_handle, EventLog::new(pool), &metrics, &shutdown, &tasks);
    if !shutdown.is_cancelled() {
        if let Ok(address) = listener.local_addr() {
            info!(
                dashboard = %format!("http://{address}/"),
                websocket = %format!("ws://{address}/ws"),
                events = %format!("http://{address}/events"),
                "serving the dashboard at /, the WebSocket at /ws, Server-Sent Events at /events, /healthz and /metrics"
            );
        }
        let server = Server {
            sessions,
            metrics,
            source_up: up,
            send_buffer: settings.send_buffer,
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        http::accept_loop(listener, Arc::new(server)).await;
    }
    info!("shutting down: closing every client with 1001");
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        warn!(remaining = tasks.len(), "tasks still running at the end of the shutdown grace period");
        return Err(ServeError::Lingering(tasks.len()));
    }
    info!("all tasks stopped");
    if switched.is_cancelled() {
        return Err(ServeError::SourceSwitched(source));
    }
    Ok(())
}
