//! The state every connection shares, built once in [`crate::serve`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use deadpool_postgres::Pool;
use tokio::sync::{Semaphore, watch};
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
    /// Replays from the event log share these: at most this many queries
    /// at once (of the pool's 16 connections, so permission checks and
    /// retention always find one)...
    pub replay_queries: Semaphore,
    /// ...and this many KiB of pages in memory at once.
    pub replay_memory: Semaphore,
    next_conn: AtomicU64,
}

/// Concurrent replay queries; see [`App::replay_queries`].
pub const REPLAY_QUERIES: usize = 4;
/// KiB of replay pages held at once across the server (64 MiB).
pub const REPLAY_MEMORY_KIB: usize = 64 * 1024;

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
            replay_queries: Semaphore::new(REPLAY_QUERIES),
            replay_memory: Semaphore::new(REPLAY_MEMORY_KIB),
            next_conn: AtomicU64::new(1),
        })
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Relaxed)
    }
}
