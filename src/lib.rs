//! windflow-notify: PostgreSQL rows in, WebSocket (or Server-Sent Events) messages out.
//!
//! # How an event travels
//!
//! 1. A writer changes `deployments` or `deployment_logs` (`sql/`). At
//!    commit, a deferred trigger records the event in `windflow_events`
//!    (`windflow_record`), taking its id then, so ids follow commit order,
//!    and NOTIFYs `windflow_events` unless another commit's wake-up covers it.
//! 2. The feed ([`db::feed`]) reads the log in id order, each id only once
//!    every smaller one has committed or never will, and hands the hub each
//!    committed event as an [`event::Event`] whose wire message is
//!    serialized there, once. After a lost connection it reads on from
//!    where it was.
//! 3. [`hub`] decides who receives it, by one rule
//!    ([`hub`]'s `Conn::receives`): the owner's connections, and the
//!    subscribers of the [`event::Topic`]s that carry it who may see it
//!    ([`auth::Viewer::can_see`]). It keeps recent events for `since`
//!    resumes ([`history`], bounded in events and bytes); an older `since`
//!    is replayed from the event log, which has the same order. A client
//!    that reconnects names its topics and `since` in its connect request:
//!    the hub places its owner feed and those topics at one point of the
//!    feed and answers with one replay of their union (resume at connect).
//! 4. [`session`] takes it from the client's own bounded queue (so a slow
//!    client never holds up the others): its core ([`session::core`])
//!    puts it in order among the replies ([`protocol`]) and resumes, and
//!    the session's task ([`session::driver`]) writes it through the
//!    client's transport: [`ws`] (WebSocket) or [`sse`] (Server-Sent
//!    Events). Replays from the event log are paged under server-wide
//!    limits that no user can take for themselves ([`session::replay`],
//!    [`db::events::EventLog`]).
//!
//! # Adding an event type
//!
//! 1. A migration, `sql/V<next>__<what>.sql`, that restates the trigger
//!    function that writes it (`sql/schema.sql` shows today's) with a
//!    `PERFORM windflow_record('DEPLOYMENT_<WHAT>', <deployment id>, <owner>,
//!    <organization>, json_build_object(...))`. `CREATE OR REPLACE
//!    FUNCTION` resets what it does not state: restate `SECURITY DEFINER`
//!    and the pinned `search_path` (`pg_catalog, <schema>, pg_temp`), or
//!    writers lose the right to emit and a temp table could stand in for
//!    ours. Rebuild: migrations are embedded; regenerate `sql/schema.sql`
//!    (`scripts/schema.sh`).
//! 2. In [`event`]: a variant of [`event::EventKind`], its row in
//!    `EventKind::row` (wire name, and the prefix of its per-deployment
//!    topic, or `None` when it is only on `deployment_events`), and its
//!    place in `EventKind::ALL`.
//! 3. Its data type in `clients/src/messages.ts` and its fields in
//!    `docs/events.md`.
//!
//! Nothing else changes: parsing, topics, routing, replays from the
//! history and the log and `tail` go by the table. A missing row does not
//! compile; `ALL` out of order does not compile; a type the triggers emit
//! but `ALL` lacks, or that `messages.ts` lacks, fails
//! `event::tests::every_kind_has_one_row_and_the_triggers_emit_exactly_these`.

pub mod auth;
pub mod backoff;
pub mod check;
pub mod config;
pub mod db;
pub mod demo;
pub mod event;
pub mod history;
pub mod http;
pub mod hub;
pub mod logging;
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
use crate::db::feed::Feed;
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
}

/// Migrate, then serve on `listener` until `shutdown` is cancelled; returns
/// once every task it started has ended.
///
/// Clients are accepted once the feed has read the log, so the first
/// subscription already has a cursor.
pub async fn serve(
    listener: TcpListener,
    database: &tokio_postgres::Config,
    settings: ServerArgs,
    verifier: Verifier,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    http::raise_open_file_limit(settings.max_connections.get());
    db::migrate(database).await?;
    let metrics = Arc::new(Metrics::default());
    let tasks = TaskTracker::new();
    let (hub, hub_handle, arrivals) =
        Hub::new(Arc::clone(&metrics), settings.history_size.get(), settings.history_bytes);
    let (up_tx, mut up) = watch::channel(false);
    tasks.spawn(hub.run(shutdown.clone()));
    tasks.spawn(Feed::new(database, arrivals, Arc::clone(&metrics), up_tx, shutdown.clone()).run());
    let pool = db::pool(database);
    tasks.spawn(db::retention::run(pool.clone(), settings.event_retention, shutdown.clone()));

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = up.wait_for(|up| *up) => {}
    }
    let sessions = Endpoint::new(
        &settings,
        verifier,
        hub_handle,
        EventLog::new(pool, Arc::clone(&metrics)),
        &metrics,
        &shutdown,
        &tasks,
    );
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
    Ok(())
}
