//! `bench faults`: what clients lose when the event source, the database or
//! the server fails under writes (README, "Faults"). Nothing, it must say.
//!
//! On a PostgreSQL cluster of the bench's own: the run restarts it, and the
//! machine's shared cluster must never be restarted. Writers write a steady mixed load
//! (S1's writes) throughout; superusers on `deployment_events` and owners
//! (each on `deployment_events` and its deployment's logs topic) resume
//! with `since` whenever a connection ends ([`crate::resuming`]). Phases:
//!
//! 1. before the faults: writes only;
//! 2. the feed's backend killed (`pg_terminate_backend` on the LISTEN
//!    connection) three times, each once the server reconnected and writes
//!    flowed again;
//! 3. PostgreSQL restarted (`pg_ctl stop -m fast`, then start): writers
//!    reconnect and go on;
//! 4. the server stopped (SIGTERM, or SIGKILL with `--kill-server`) for
//!    30 s while writers write, then started again on the same address:
//!    clients reconnect and resume;
//! 5. after the faults: writes only.
//!
//! What each client was owed comes from the event log, not from the
//! writers (a write whose commit reply was lost in a restart may still
//! have committed): every event written after the clients subscribed that
//! the client may see (superusers: all; owners: their deployment's). Each
//! event is placed in the phase during which the event log row was written
//! (`created_at` against the database's clock at each phase's start).
//!
//! Each phase starts with a fence (one log line per deployment, in one
//! transaction), and the next fault waits until every client received it:
//! a client's topics deliver in commit order, so it then has everything the
//! last phase wrote, and no event is still on its way when the server is
//! stopped (its delay would be the next fault's, counted in the wrong
//! phase). The last fence, once the writers stopped, says every client has
//! all it is owed, duplicates included. Any event lost, duplicated or
//! delivered to a client not owed it fails the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use windflow_notify::auth::Viewer;
use windflow_notify::db::feed;
use windflow_testkit::Cluster;

use crate::clients::{find_marker, source_ip};
use crate::harness::{self, Database, Process, SideRuntime, metric, now_ns};
use crate::report::round;
use crate::resuming::{self, FENCE};
use crate::writers::{self, WriteOutcome, WritePlan};
use crate::{SOURCE, create_deployments, token, user, with_database_at, write_json};

/// How long the server may take to reconnect its source, or to come back.
const RECOVER_WITHIN: Duration = Duration::from_secs(60);
/// How long the clients may take to pass a fence (after the server was
/// down: to reconnect and catch up).
const FENCE_WITHIN: Duration = Duration::from_secs(120);
/// Between reads of a metric while waiting for it to change.
const POLL_EVERY: Duration = Duration::from_millis(50);

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Writes per second, over all writers.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Owners, each with one deployment, on `deployment_events` and its logs topic.
    #[arg(long, default_value_t = 50)]
    pub owners: usize,
    /// Superusers on `deployment_events`.
    #[arg(long, default_value_t = 5)]
    pub superusers: usize,
    /// Times the event source's backend is killed.
    #[arg(long, default_value_t = 3)]
    pub kills: u32,
    /// Seconds of writes before the first fault, after each one, and after the last.
    #[arg(long, default_value_t = 3)]
    pub settle: u64,
    /// Seconds the server stays stopped.
    #[arg(long, default_value_t = 30)]
    pub server_down: u64,
    /// Stop the server with SIGKILL (a crash) instead of SIGTERM.
    #[arg(long)]
    pub kill_server: bool,
}

pub async fn run(args: &Args) -> Result<Value> {
    if args.owners == 0 || args.writers == 0 || args.writers > args.owners {
        bail!("--owners must be at least 1 and at least --writers (each writer writes its own deployments)");
    }
    if !(args.rate > 0.0 && args.rate <= 100_000.0) || args.server_down > 600 || args.settle > 600 {
        bail!("--rate is 0..=100,000 writes/s; --settle and --server-down at most 600 s");
    }
    let cluster =
        Arc::new(tokio::task::spawn_blocking(harness::own_cluster).await?.context("a PostgreSQL cluster of our own")?);
    eprintln!("bench: faults restart PostgreSQL: running on a cluster of our own (port {})", cluster.port);
    let mut result = faults(args, &cluster).await?;
    result["cluster"] = json!("own");
    Ok(result)
}

/// Which clients a run has: the kind decides what each is owed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Superuser,
    /// The owner of deployment i.
    Owner(usize),
}

/// The phases, in order; the event log places each event in one.
fn phase_names(args: &Args) -> Vec<String> {
    let backend = "LISTEN backend";
    let signal = if args.kill_server { "SIGKILL" } else { "SIGTERM" };
    vec![
        "before the faults".into(),
        format!("{backend} killed {}x", args.kills),
        "PostgreSQL restarted".into(),
        format!("server stopped {} s ({signal})", args.server_down),
        "after the faults".into(),
    ]
}

async fn faults(args: &Args, cluster: &Arc<Cluster>) -> Result<Value> {
    with_database_at(&cluster.url("postgres"), |db| async move {
        let owners: Vec<Uuid> = (0..args.owners).map(|_| Uuid::new_v4()).collect();
        let deployments = create_deployments(&db, &owners, None).await?;
        let server = Process::server(&db, &format!("/tmp/{}-server0.log", db.name)).await?;
        let addr = server.addr;

        let mut kinds = Vec::new();
        let mut specs = Vec::new();
        for (i, (owner, deployment)) in owners.iter().zip(&deployments).enumerate() {
            let topics = vec!["deployment_events".to_string(), format!("deployment_logs_{deployment}")];
            specs.push(resuming::Spec { target: addr, source: source_ip(i), token: token(user(*owner))?, topics });
            kinds.push(Kind::Owner(i));
        }
        for i in 0..args.superusers {
            let viewer = Viewer { is_superuser: true, ..user(Uuid::new_v4()) };
            let topics = vec!["deployment_events".to_string()];
            let from = source_ip(owners.len() + i);
            specs.push(resuming::Spec { target: addr, source: from, token: token(viewer)?, topics });
            kinds.push(Kind::Superuser);
        }
        let fleet = resuming::Fleet::connect(specs).await?;
        eprintln!("bench: faults: {} clients subscribed; writing", kinds.len());
        let mut run = Run {
            args,
            cluster,
            db: &db,
            deployments: &deployments,
            addr,
            server: Some(server),
            fleet,
            clock: Clock::default(),
        };

        // Writers on a thread of their own, until the faults are over.
        run.clock.mark(&db).await?;
        let side = SideRuntime::new("writers")?;
        let stop_writes = CancellationToken::new();
        let plan = WritePlan::mixed(
            args.writers,
            Some(args.rate),
            Duration::from_secs(24 * 3600),
            Arc::new(deployments.clone()),
        );
        let writes = {
            let (config, stop) = (db.config.clone(), stop_writes.clone());
            side.handle.spawn(async move { writers::run_until(&config, &plan, stop).await })
        };
        let faults = run.faults().await;
        stop_writes.cancel();
        let outcome = writes.await.context("writers")??;
        faults?;
        // The last fence: every client has what it is owed, duplicates included.
        run.next_phase().await?;
        if let Some(error) = &outcome.first_error {
            eprintln!(
                "bench: {} writes failed (outcome unknown: the event log decides); first: {error}",
                outcome.failed
            );
        }
        let Run { fleet, server, clock, .. } = run;
        let logs = fleet.finish().await;
        if let Some(server) = server {
            server.stop().await?;
        }

        let owner_of: HashMap<Uuid, usize> = deployments.iter().enumerate().map(|(i, d)| (*d, i)).collect();
        let events = read_event_log(&db, &clock.db_us, &owner_of).await?;
        let clients: Vec<(Kind, &resuming::Log)> = kinds.iter().copied().zip(&logs).collect();
        let names = phase_names(args);
        let accounting = account(&events, names.len(), &clients, &outcome);
        let seconds = clock.seconds();
        accounting.print(
            &format!(
                "faults: {} writers, {} writes/s mixed; {} owners (deployment_events + their logs topic), \
                 {} superusers (deployment_events); every client resumes with since",
                args.writers, args.rate, args.owners, args.superusers
            ),
            &names,
            &seconds,
        );
        let resumed = Resumed::of(&logs, clock.behind);
        resumed.print();
        let writes_per_s = outcome.written.len() as f64 / outcome.wall_s;
        println!(
            "writes: {} acknowledged in {:.1} s ({writes_per_s:.0}/s), {} failed (outcome unknown), \
             {} writer reconnects; {} acknowledged writes missing from the event log",
            outcome.written.len(),
            outcome.wall_s,
            outcome.failed,
            outcome.reconnects,
            accounting.missing_writes
        );
        let ok = accounting.clean() && resumed.clean();
        let mut writes = write_json(&outcome);
        writes["reconnects"] = json!(outcome.reconnects);
        writes["missing_from_event_log"] = json!(accounting.missing_writes);
        Ok(json!({
            "scenario": "faults", "source": SOURCE, "writers": args.writers, "rate": args.rate,
            "owners": args.owners, "superusers": args.superusers, "kills": args.kills, "settle_s": args.settle,
            "server_down_s": args.server_down, "server_stop": if args.kill_server { "SIGKILL" } else { "SIGTERM" },
            "writes": writes,
            "phases": names.iter().zip(&accounting.phases).zip(&seconds)
                .map(|((name, t), s)| t.json(name, Some(*s))).collect::<Vec<_>>(),
            "total": accounting.total().json("total", Some(seconds.iter().sum())),
            "superusers_tally": accounting.superusers.json("superusers", None),
            "owners_tally": accounting.owners.json("owners", None),
            "unexpected": accounting.unexpected,
            "duplicated_on_one_connection": accounting.duplicated_on_one_connection,
            "clients": resumed.json(logs.len()),
            "ok": ok,
        }))
    })
    .await
}

/// One mode's run: the server, its clients, and the phases so far.
struct Run<'a> {
    args: &'a Args,
    cluster: &'a Arc<Cluster>,
    db: &'a Database,
    deployments: &'a [Uuid],
    addr: SocketAddr,
    server: Option<Process>,
    fleet: resuming::Fleet,
    clock: Clock,
}

impl Run<'_> {
    /// The faults, in order, under the writes, each in a phase of its own.
    async fn faults(&mut self) -> Result<()> {
        let (args, addr) = (self.args, self.addr);
        let settle = Duration::from_secs(args.settle);
        tokio::time::sleep(settle).await;

        self.next_phase().await?;
        for _ in 0..args.kills {
            wait_for(addr, "windflow_listener_up", "the event source up", |up| up == 1.0).await?;
            let before = metric(addr, "windflow_listener_reconnects_total").await?;
            let killed = kill_feed(self.db).await?;
            if killed != 1 {
                bail!("expected one feed backend to kill, terminated {killed}");
            }
            wait_for(addr, "windflow_listener_reconnects_total", "the event source reconnected", |n| n > before)
                .await?;
            tokio::time::sleep(settle).await;
        }

        self.next_phase().await?;
        let before = metric(addr, "windflow_listener_reconnects_total").await?;
        let cluster = Arc::clone(self.cluster);
        tokio::task::spawn_blocking(move || cluster.stop().and_then(|()| cluster.start()))
            .await?
            .context("restart PostgreSQL")?;
        wait_for(addr, "windflow_listener_reconnects_total", "the event source back after the restart", |n| n > before)
            .await?;
        tokio::time::sleep(settle).await;

        self.next_phase().await?;
        let stopped = self.server.take().context("no server to stop")?;
        if args.kill_server {
            stopped.kill().await?;
        } else {
            let how = stopped.stop().await?;
            if !how.status.is_some_and(|s| s.success()) {
                bail!("the server did not exit cleanly on SIGTERM: {:?}", how.status);
            }
        }
        tokio::time::sleep(Duration::from_secs(args.server_down)).await;
        let log = format!("/tmp/{}-server1.log", self.db.name);
        self.server = Some(Process::server_at(self.db, &log, addr, &[]).await?);
        tokio::time::sleep(settle).await;

        self.next_phase().await?;
        tokio::time::sleep(settle).await;
        Ok(())
    }

    /// Start the next phase: mark it, then write a fence and wait until
    /// every client passed it, so that no event of the last phase is still
    /// on its way when the next fault hits (its delay would be counted in
    /// the wrong phase).
    async fn next_phase(&mut self) -> Result<()> {
        self.clock.mark(self.db).await?;
        self.clock.fences += 1;
        let fence = format!("{FENCE}{}", self.clock.fences);
        harness::connect(&self.db.config)
            .await?
            .execute(
                "INSERT INTO deployment_logs (deployment_id, message) SELECT d, $2 FROM unnest($1::uuid[]) AS d",
                &[&self.deployments, &fence],
            )
            .await
            .context("write a fence")?;
        let behind = self.fleet.behind_fence(self.clock.fences, FENCE_WITHIN).await;
        if behind > 0 {
            eprintln!("bench: {behind} clients had not received {fence:?} within {FENCE_WITHIN:?}");
        }
        self.clock.behind = self.clock.behind.max(behind);
        Ok(())
    }
}

/// Phase starts: the database's clock (µs since the epoch, to compare
/// with the event log's `created_at`) and ours (for durations).
#[derive(Default)]
struct Clock {
    db_us: Vec<i64>,
    ns: Vec<u64>,
    /// Fences written so far.
    fences: u64,
    /// The most clients that missed a fence.
    behind: usize,
}

impl Clock {
    async fn mark(&mut self, db: &Database) -> Result<()> {
        let row = harness::connect(&db.config)
            .await?
            .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint", &[])
            .await
            .context("read the database's clock")?;
        self.db_us.push(row.get(0));
        self.ns.push(now_ns());
        Ok(())
    }

    /// Each phase's length, in seconds.
    fn seconds(&self) -> Vec<f64> {
        self.ns.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e9).collect()
    }
}

/// Poll `name` on the server's /metrics until `ok` holds.
async fn wait_for(addr: SocketAddr, name: &str, what: &str, ok: impl Fn(f64) -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + RECOVER_WITHIN;
    loop {
        if let Ok(value) = metric(addr, name).await
            && ok(value)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {RECOVER_WITHIN:?} ({name} on {addr})");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Terminate the feed's backend of this database; how many were.
async fn kill_feed(db: &Database) -> Result<i64> {
    let (application, backend) = (feed::APPLICATION_NAME, "client backend");
    let row = harness::connect(&db.config)
        .await?
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = $1 AND backend_type = $2 AND datname = $3",
            &[&application, &backend, &db.name],
        )
        .await
        .context("pg_terminate_backend")?;
    Ok(row.get(0))
}

/// One row of the event log, as the accounting needs it.
#[derive(Clone, Copy, Debug)]
struct LogEvent {
    id: i64,
    /// The owner (index) of its deployment; None for a deployment no client owns.
    owner: Option<usize>,
    /// 0: before the clients subscribed; 1..=n: the phases; n + 1: after
    /// the writers stopped (the last fence).
    phase: usize,
    /// The writer's marker.
    seq: Option<u32>,
    /// A fence: the run's own, owed to no one.
    fence: bool,
}

async fn read_event_log(db: &Database, starts: &[i64], owner_of: &HashMap<Uuid, usize>) -> Result<Vec<LogEvent>> {
    let rows = harness::connect(&db.config)
        .await?
        .query(
            "SELECT id, deployment_id, data::text,
                    width_bucket((extract(epoch FROM created_at) * 1000000)::bigint, $1::bigint[])
               FROM windflow_events ORDER BY id",
            &[&starts],
        )
        .await
        .context("read the event log")?;
    Ok(rows
        .iter()
        .map(|row| LogEvent {
            id: row.get(0),
            owner: owner_of.get(&row.get::<_, Uuid>(1)).copied(),
            phase: usize::try_from(row.get::<_, i32>(3)).unwrap_or(0),
            seq: find_marker(row.get::<_, &str>(2).as_bytes()).map(|(seq, _)| seq),
            fence: row.get::<_, &str>(2).contains(FENCE),
        })
        .collect())
}

/// Lost, duplicated and owed deliveries, and the longest commit-to-client delay.
#[derive(Clone, Debug, Default, PartialEq)]
struct Tally {
    /// Events the log holds (phases only; 0 in per-kind tallies).
    events: u64,
    owed: u64,
    lost: u64,
    duplicated: u64,
    max_gap_ns: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.events += other.events;
        self.owed += other.owed;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.max_gap_ns = self.max_gap_ns.max(other.max_gap_ns);
    }

    fn json(&self, name: &str, seconds: Option<f64>) -> Value {
        json!({
            "phase": name, "seconds": seconds.map(round), "events": self.events, "owed_deliveries": self.owed,
            "lost": self.lost, "duplicated": self.duplicated, "max_gap_ms": round(self.max_gap_ns as f64 / 1e6),
        })
    }
}

struct Accounting {
    phases: Vec<Tally>,
    superusers: Tally,
    owners: Tally,
    /// Events a client received that it was not owed (another owner's,
    /// from before it subscribed, or not in the log).
    unexpected: u64,
    /// Of the duplicates, those that came again on the same connection:
    /// the server's doing whatever the client's cursors were.
    duplicated_on_one_connection: u64,
    /// Writes whose commit was acknowledged but that the log lacks.
    missing_writes: u64,
}

impl Accounting {
    fn total(&self) -> Tally {
        let mut total = Tally::default();
        for phase in &self.phases {
            total.add(phase);
        }
        total
    }

    fn clean(&self) -> bool {
        let total = self.total();
        total.lost == 0 && total.duplicated == 0 && self.unexpected == 0 && self.missing_writes == 0
    }

    fn print(&self, title: &str, names: &[String], seconds: &[f64]) {
        println!("\n{title}");
        println!(
            "| {:<32} | {:>6} | {:>14} | {:>15} | {:>5} | {:>10} | {:>21} |",
            "phase", "s", "events written", "owed deliveries", "lost", "duplicated", "max commit-to-client"
        );
        println!("|{}|", ["-"; 7].map(|_| "---").join("|"));
        let total = self.total();
        let rows = names.iter().map(String::as_str).zip(&self.phases).zip(seconds.iter().copied());
        for ((name, t), s) in rows.chain(std::iter::once((("total", &total), seconds.iter().sum()))) {
            println!(
                "| {name:<32} | {s:>6.1} | {:>14} | {:>15} | {:>5} | {:>10} | {:>18.0} ms |",
                t.events,
                t.owed,
                t.lost,
                t.duplicated,
                t.max_gap_ns as f64 / 1e6
            );
        }
        for (kind, t) in [("superusers", &self.superusers), ("owners", &self.owners)] {
            println!("{kind}: {} deliveries owed, {} lost, {} duplicated", t.owed, t.lost, t.duplicated);
        }
        println!(
            "of the duplicates, sent again on the same connection: {}; events received that were not owed: {}",
            self.duplicated_on_one_connection, self.unexpected
        );
    }
}

/// Compare what each client received with what the event log says it was
/// owed: every event of phases 1..=`phases` it may see, fences aside.
/// Events of phase 0 (before the clients subscribed) are owed to no one.
fn account(
    events: &[LogEvent],
    phases: usize,
    clients: &[(Kind, &resuming::Log)],
    writes: &WriteOutcome,
) -> Accounting {
    let commits: HashMap<u32, u64> = writes.written.iter().map(|w| (w.seq, w.commit_ns)).collect();
    let by_id: HashMap<i64, &LogEvent> = events.iter().map(|e| (e.id, e)).collect();
    let mut accounting = Accounting {
        phases: vec![Tally::default(); phases],
        superusers: Tally::default(),
        owners: Tally::default(),
        unexpected: 0,
        duplicated_on_one_connection: 0,
        missing_writes: 0,
    };
    let counted = |e: &&LogEvent| (1..=phases).contains(&e.phase) && !e.fence;
    for event in events.iter().filter(counted) {
        accounting.phases[event.phase - 1].events += 1;
    }
    let visible = |kind: Kind, e: &LogEvent| match kind {
        Kind::Superuser => true,
        Kind::Owner(i) => e.owner == Some(i),
    };
    for (kind, log) in clients {
        // Per event id: how many times it arrived, and when first.
        let mut arrivals: HashMap<i64, (u64, u64)> = HashMap::new();
        let mut on_connection = std::collections::HashSet::new();
        for r in &log.events {
            let entry = arrivals.entry(r.event_id).or_insert((0, r.at_ns));
            entry.0 += 1;
            entry.1 = entry.1.min(r.at_ns);
            if !on_connection.insert((r.event_id, r.connection)) {
                accounting.duplicated_on_one_connection += 1;
            }
        }
        for (id, (count, _)) in &arrivals {
            match by_id.get(id) {
                Some(e) if e.phase >= 1 && visible(*kind, e) => {}
                _ => accounting.unexpected += count,
            }
        }
        let per_kind = match kind {
            Kind::Superuser => &mut accounting.superusers,
            Kind::Owner(_) => &mut accounting.owners,
        };
        for event in events.iter().filter(counted).filter(|e| visible(*kind, e)) {
            let mut tally = Tally { owed: 1, ..Tally::default() };
            match arrivals.get(&event.id) {
                None => tally.lost = 1,
                Some(&(count, first)) => {
                    tally.duplicated = count - 1;
                    if let Some(commit) = event.seq.and_then(|seq| commits.get(&seq)) {
                        tally.max_gap_ns = first.saturating_sub(*commit);
                    }
                }
            }
            accounting.phases[event.phase - 1].add(&tally);
            per_kind.add(&tally);
        }
    }
    let logged: std::collections::HashSet<u32> = events.iter().filter_map(|e| e.seq).collect();
    accounting.missing_writes = writes.written.iter().filter(|w| !logged.contains(&w.seq)).count() as u64;
    accounting
}

/// How the clients' connections went.
struct Resumed {
    connections: u64,
    unavailable: u64,
    resyncs: u64,
    errors: Vec<String>,
    /// The most clients that missed a fence.
    behind: usize,
}

impl Resumed {
    fn of(logs: &[resuming::Log], behind: usize) -> Resumed {
        Resumed {
            connections: logs.iter().map(|l| l.connections).sum(),
            unavailable: logs.iter().map(|l| l.unavailable).sum(),
            resyncs: logs.iter().map(|l| l.resyncs).sum(),
            errors: logs.iter().flat_map(|l| l.errors.iter().cloned()).collect(),
            behind,
        }
    }

    /// A resync or another error reply means a client was not served as
    /// the contract says, even if the counts come out right.
    fn clean(&self) -> bool {
        self.resyncs == 0 && self.errors.is_empty() && self.behind == 0
    }

    fn print(&self) {
        println!(
            "clients: {} connections in all (each client's first, then one per resume), {} `unavailable` replies \
             (each resumed on a new connection), {} resyncs, {} other errors; {} missed a fence",
            self.connections,
            self.unavailable,
            self.resyncs,
            self.errors.len(),
            self.behind
        );
        for error in self.errors.iter().take(5) {
            println!("  error: {error}");
        }
    }

    fn json(&self, clients: usize) -> Value {
        json!({
            "clients": clients, "connections": self.connections, "unavailable": self.unavailable,
            "resyncs": self.resyncs, "errors": self.errors.iter().take(20).collect::<Vec<_>>(), "missed_a_fence": self.behind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resuming::{Log, Received};
    use crate::writers::Written;

    fn event(id: i64, owner: Option<usize>, phase: usize) -> LogEvent {
        LogEvent { id, owner, phase, seq: Some(id as u32), fence: false }
    }

    fn fence(id: i64, owner: Option<usize>, phase: usize) -> LogEvent {
        LogEvent { seq: None, fence: true, ..event(id, owner, phase) }
    }

    fn log(ids: &[i64]) -> Log {
        let events = ids.iter().map(|&event_id| Received { event_id, at_ns: 5_000, connection: 1 }).collect();
        Log { events, ..Log::default() }
    }

    fn writes(ids: &[i64]) -> WriteOutcome {
        let written = ids.iter().map(|&id| Written { seq: id as u32, deployment: 0, commit_ns: 1_000 }).collect();
        WriteOutcome { written, failed: 0, first_error: None, reconnects: 0, wall_s: 1.0 }
    }

    #[test]
    fn lost_duplicated_and_unexpected_events_are_counted_per_phase() {
        // Event 1 predates the clients; 2 and 3 are owner 0's, 4 owner 1's;
        // 6 and 5 are fences, owed to no one.
        let events = [
            event(1, Some(0), 0),
            event(2, Some(0), 1),
            fence(6, Some(0), 2),
            event(3, Some(0), 2),
            event(4, Some(1), 2),
            fence(5, Some(0), 3),
        ];
        let superuser = log(&[2, 6, 3, 3, 5]);
        let owner = log(&[1, 2, 4]);
        let clients = [(Kind::Superuser, &superuser), (Kind::Owner(0), &owner)];
        let a = account(&events, 2, &clients, &writes(&[2, 3, 4]));
        assert_eq!(a.phases[0], Tally { events: 1, owed: 2, lost: 0, duplicated: 0, max_gap_ns: 4_000 });
        assert_eq!((a.phases[1].events, a.phases[1].owed, a.phases[1].lost, a.phases[1].duplicated), (2, 3, 2, 1));
        assert_eq!((a.superusers.lost, a.superusers.duplicated), (1, 1), "4 lost, 3 twice");
        assert_eq!((a.owners.owed, a.owners.lost), (2, 1), "3 lost");
        assert_eq!(a.unexpected, 2, "event 1 (before subscribing) and 4 (another owner's)");
        assert_eq!(a.duplicated_on_one_connection, 1);
        assert!(!a.clean());
    }

    #[test]
    fn a_complete_run_is_clean_and_an_acknowledged_write_missing_from_the_log_is_not() {
        let events = [event(2, Some(0), 1), event(3, None, 1)];
        let superuser = log(&[2, 3]);
        let owner = log(&[2]);
        let clients = [(Kind::Superuser, &superuser), (Kind::Owner(0), &owner)];
        assert!(account(&events, 1, &clients, &writes(&[2, 3])).clean());
        let a = account(&events, 1, &clients, &writes(&[2, 3, 9]));
        assert_eq!(a.missing_writes, 1);
        assert!(!a.clean());
    }
}
