//! The state every connection shares, built once in [`crate::serve`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::ServerArgs;
use crate::hub::{ConnId, HubHandle};
use crate::metrics::Metrics;

pub struct App {
    pub settings: ServerArgs,
    pub verifier: Verifier,
    pub pool: Pool,
    pub hub: HubHandle,
    pub metrics: Arc<Metrics>,
    pub listener_up: watch::Receiver<bool>,
    /// Cancelled on SIGTERM/SIGINT (or by the embedder): stop accepting,
    /// close every client with 1001.
    pub shutdown: CancellationToken,
    /// Every task the server spawns, so shutdown can wait for all of them.
    pub tasks: TaskTracker,
    next_conn: AtomicU64,
}

impl App {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ServerArgs,
        verifier: Verifier,
        pool: Pool,
        hub: HubHandle,
        metrics: Arc<Metrics>,
        listener_up: watch::Receiver<bool>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(App {
            settings,
            verifier,
            pool,
            hub,
            metrics,
            listener_up,
            shutdown,
            tasks,
            next_conn: AtomicU64::new(1),
        })
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Relaxed)
    }
}
