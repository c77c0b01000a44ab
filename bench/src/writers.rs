//! Writers (plain SQL, as WindFlow's API would write) and the bare LISTEN
//! client that is the latency floor for the same writes.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clients::{find_marker, marker};
use crate::harness::{connect, now_ns};
use windflow_notify::backoff::Backoff;

/// One committed write: its marker, the deployment (index into the
/// scenario's list) and when the commit returned to the writer.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub seq: u32,
    pub deployment: u32,
    pub commit_ns: u64,
}

#[derive(Clone, Debug)]
pub struct WritePlan {
    pub writers: usize,
    /// Writes per second over all writers; None: as fast as they can.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// The deployments to write to, split between the writers.
    pub deployments: Arc<Vec<Uuid>>,
    /// Out of 5 writes: how many are status changes and progress updates;
    /// the rest are log lines.
    pub status_in_5: u32,
    pub progress_in_5: u32,
    /// Log lines are padded to this many bytes.
    pub log_size: usize,
}

impl WritePlan {
    /// The S1/S2/S4 mix: 1 status change, 2 progress updates and 2 log
    /// lines in every 5 writes; `rate` None writes as fast as it can.
    pub fn mixed(writers: usize, rate: Option<f64>, duration: Duration, deployments: Arc<Vec<Uuid>>) -> Self {
        WritePlan { writers, rate, duration, deployments, status_in_5: 1, progress_in_5: 2, log_size: 0 }
    }
}

/// One writer's writes, failures, first error and reconnections.
#[derive(Default)]
struct WriterResult {
    written: Vec<Written>,
    failed: u64,
    first_error: Option<String>,
    reconnects: u64,
}

pub struct WriteOutcome {
    pub written: Vec<Written>,
    /// Writes that returned an error: whether they committed is unknown
    /// (a connection lost at commit), so only the event log can say.
    pub failed: u64,
    pub first_error: Option<String>,
    /// Times a writer found its connection closed and opened another.
    pub reconnects: u64,
    pub wall_s: f64,
}

/// Run the plan; every write is its own transaction (autocommit).
pub async fn run(config: &tokio_postgres::Config, plan: &WritePlan) -> Result<WriteOutcome> {
    run_until(config, plan, CancellationToken::new()).await
}

/// Run the plan until its duration ends or `stop` is cancelled. A writer
/// whose connection is lost (a database restart) reconnects and goes on
/// with its next write, catching up with the pace; the writes due while
/// it had no connection are made late, not skipped.
pub async fn run_until(
    config: &tokio_postgres::Config,
    plan: &WritePlan,
    stop: CancellationToken,
) -> Result<WriteOutcome> {
    let seq = Arc::new(AtomicU32::new(0));
    let start = now_ns() + 50_000_000;
    let mut tasks: Vec<JoinHandle<Result<WriterResult>>> = Vec::new();
    for writer in 0..plan.writers {
        let session = Session::open(config).await?;
        let (config, plan, seq, stop) = (config.clone(), plan.clone(), seq.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { write_loop(session, &config, writer, plan, seq, start, stop).await }));
    }
    let mut outcome = WriteOutcome { written: Vec::new(), failed: 0, first_error: None, reconnects: 0, wall_s: 0.0 };
    for task in tasks {
        let result = task.await.context("writer task")??;
        outcome.written.extend(result.written);
        outcome.failed += result.failed;
        outcome.first_error = outcome.first_error.or(result.first_error);
        outcome.reconnects += result.reconnects;
    }
    outcome.wall_s = (now_ns().saturating_sub(start)) as f64 / 1e9;
    outcome.written.sort_by_key(|w| w.seq);
    Ok(outcome)
}

/// A writer's connection and its prepared statements.
struct Session {
    client: tokio_postgres::Client,
    status: tokio_postgres::Statement,
    progress: tokio_postgres::Statement,
    log: tokio_postgres::Statement,
}

impl Session {
    async fn open(config: &tokio_postgres::Config) -> Result<Session> {
        let client = connect(config).await?;
        // The database toggles the status: a writer that lost a commit reply
        // cannot know the row's status, and a write that changed nothing
        // would make no event.
        let status = client
            .prepare(
                "UPDATE deployments SET status = CASE status WHEN 'running' THEN 'deploying' ELSE 'running' END,
                        error_message = $2
                  WHERE id = $1",
            )
            .await?;
        let progress = client.prepare("UPDATE deployments SET progress = $2, current_step = $3 WHERE id = $1").await?;
        let log = client.prepare("INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)").await?;
        Ok(Session { client, status, progress, log })
    }

    /// A new session once the database takes connections again; None if
    /// `until` (ns) passes or `stop` is cancelled first.
    async fn reopen(config: &tokio_postgres::Config, until: u64, stop: &CancellationToken) -> Option<Session> {
        let mut backoff = RECONNECT_BACKOFF;
        while now_ns() < until {
            if let Ok(session) = Session::open(config).await {
                return Some(session);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        None
    }
}

/// A writer's reconnect delays: a restarted database is back within seconds.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

async fn write_loop(
    mut session: Session,
    config: &tokio_postgres::Config,
    writer: usize,
    plan: WritePlan,
    seq: Arc<AtomicU32>,
    start: u64,
    stop: CancellationToken,
) -> Result<WriterResult> {
    // Each writer owns its share of deployments, so writers do not queue on
    // each other's row locks.
    let mine: Vec<u32> = (0..plan.deployments.len() as u32).filter(|d| *d as usize % plan.writers == writer).collect();
    let mut result = WriterResult::default();
    if mine.is_empty() {
        return Ok(result);
    }
    let end = start + plan.duration.as_nanos() as u64;
    let interval_ns = plan.rate.map(|r| (plan.writers as f64 / r * 1e9) as u64);
    let offset_ns = plan.rate.map(|r| (writer as f64 / r * 1e9) as u64).unwrap_or(0);
    let mut padding = String::new();
    for k in 0u64.. {
        let due = start + offset_ns + interval_ns.map(|i| i * k).unwrap_or(0);
        if due >= end || now_ns() >= end || stop.is_cancelled() {
            break;
        }
        let now = now_ns();
        if due > now {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_nanos(due - now)) => {}
            }
        }
        let n = seq.fetch_add(1, Relaxed);
        let slot = k as usize % mine.len();
        let deployment = mine[slot];
        let id = plan.deployments[deployment as usize];
        let mark = marker(n);
        let kind = n % 5;
        let client = &session.client;
        let outcome = if kind < plan.status_in_5 {
            client.execute(&session.status, &[&id, &mark]).await
        } else if kind < plan.status_in_5 + plan.progress_in_5 {
            client.execute(&session.progress, &[&id, &((n % 101) as i32), &mark]).await
        } else {
            let message = if plan.log_size > mark.len() {
                if padding.len() != plan.log_size - mark.len() {
                    padding = "x".repeat(plan.log_size - mark.len());
                }
                format!("{mark}{padding}")
            } else {
                mark
            };
            client.execute(&session.log, &[&id, &message]).await
        };
        match outcome {
            Ok(_) => result.written.push(Written { seq: n, deployment, commit_ns: now_ns() }),
            Err(e) => {
                result.failed += 1;
                result.first_error.get_or_insert_with(|| format!("{e:?}"));
                if session.client.is_closed() {
                    match Session::reopen(config, end, &stop).await {
                        Some(fresh) => session = fresh,
                        None => break,
                    }
                    result.reconnects += 1;
                }
            }
        }
    }
    Ok(result)
}

/// (seq, receive time) of each write a floor saw.
type Seen = Arc<std::sync::Mutex<Vec<(u32, u64)>>>;

/// A floor's task, which records what it sees until stopped.
pub struct Recorder {
    handle: JoinHandle<Result<()>>,
    seen: Seen,
    stop: CancellationToken,
}

impl Recorder {
    /// Spawn `task` with the stop token and the record it pushes to.
    fn spawn<Task>(task: impl FnOnce(CancellationToken, Seen) -> Task) -> Recorder
    where
        Task: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let seen = Seen::default();
        let handle = tokio::spawn(task(stop.clone(), seen.clone()));
        Recorder { handle, seen, stop }
    }

    /// Stop the task; what it recorded.
    pub async fn finish(self) -> Result<Vec<(u32, u64)>> {
        self.stop.cancel();
        self.handle.await.context("floor task")??;
        let seen = std::mem::take(&mut *self.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        Ok(seen)
    }
}

/// The latency floor: one bare tokio-postgres connection LISTENing on
/// `windflow_events`. Records (seq, receive time) per notification.
pub struct BareListener;

impl BareListener {
    pub async fn start(config: &tokio_postgres::Config) -> Result<Recorder> {
        let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
        let fetcher = connect(config).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, u64)>();
        let recorder = Recorder::spawn(|token, record| async move {
            let driver = async move {
                while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                    if let Ok(AsyncMessage::Notification(n)) = message
                        && tx.send((n.payload().to_string(), now_ns())).is_err()
                    {
                        break;
                    }
                }
            };
            let consume = async {
                client.batch_execute("LISTEN windflow_events").await?;
                while let Some((payload, at)) = rx.recv().await {
                    let found = match find_marker(payload.as_bytes()) {
                        Some((seq, _)) => Some((seq, at)),
                        None => {
                            // Over 8000 bytes: announced without data; read it as the server does.
                            let id = serde_json::from_str::<serde_json::Value>(&payload)
                                .ok()
                                .and_then(|v| v["event_id"].as_i64())
                                .context("bare listener: payload without event_id")?;
                            let row = fetcher
                                .query_one("SELECT data::text FROM windflow_events WHERE id = $1", &[&id])
                                .await?;
                            let data: String = row.get(0);
                            find_marker(data.as_bytes()).map(|(seq, _)| (seq, now_ns()))
                        }
                    };
                    if let Some(sample) = found {
                        record.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(sample);
                    }
                }
                anyhow::Ok(())
            };
            tokio::select! {
                _ = driver => Ok(()),
                outcome = consume => outcome,
                _ = token.cancelled() => Ok(()),
            }
        });
        // Make sure LISTEN has been executed before writes begin.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(recorder)
    }
}
