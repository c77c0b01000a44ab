//! The windflow-notify benchmark (BENCHMARKS.md).
//!
//! `scripts/bench.sh s1`, or `cargo build --release --workspace --bins &&
//! target/release/bench s1`: the bench runs the `windflow-notify` binary
//! built beside it.
//! Each scenario creates its own database, runs the real
//! `windflow-notify serve` binary as a child process (CPU and RSS read from
//! /proc), drives writers (tokio-postgres) and WebSocket clients
//! (tokio-tungstenite) on loopback, and prints a table and JSON.
//!
//! Latency is commit-to-client: each write carries a marker `bm<seq>|` (in
//! the log line, `error_message` or `current_step`); the writer records
//! when its commit returned, the client when the frame arrived, both on
//! CLOCK_MONOTONIC. The same writes are timed by a bare LISTEN client (the
//! database's floor), and S2 repeats the fan-out with a bare broadcaster
//! (the WebSocket floor).

mod bare;
mod clients;
mod faults;
mod harness;
mod hogs;
mod hostile;
mod report;
mod resuming;
mod sse;
mod writers;

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;
use windflow_notify::auth::Viewer;

use crate::clients::{ClientSpec, Fleet, Transport, source_ip};
use crate::harness::{Database, Process, Sampler, SideRuntime, admin_url, now_ns};
use crate::report::{Delivery, Owed, analyse, print_table, round};
use crate::writers::{BareListener, WritePlan};

#[derive(Parser)]
#[command(name = "bench", about = "windflow-notify benchmark scenarios (see BENCHMARKS.md)")]
struct Cli {
    /// Also write the JSON result to this file.
    #[arg(long, global = true)]
    json: Option<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Latency: owners watching their deployments, a few superusers on deployment_events, mixed writes.
    S1 {
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 20)]
        superusers: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Also run on a private cluster whose WAL flush waits this long
        /// (commit_delay, commit_siblings = 0; commits still group, as on a
        /// cloud volume), beside the same run at the machine's flush: `1ms`.
        #[arg(long, value_parser = humantime::parse_duration)]
        flush_delay: Option<Duration>,
    },
    /// Fan-out: every connection on deployment_events; then the bare broadcaster to the same N.
    S2 {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        duration: u64,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Bytes per bare-broadcaster frame (about a windflow event frame).
        #[arg(long, default_value_t = 240)]
        frame_size: usize,
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// How the clients connect: WebSocket (`ws`) or Server-Sent Events (`sse`).
        #[arg(long, value_enum, default_value = "ws")]
        transport: Transport,
    },
    /// Memory: idle authenticated connections with two subscriptions each; RSS per connection.
    S3 {
        /// Comma-separated connection counts, each on a fresh server.
        #[arg(long, default_value = "10000,50000", value_delimiter = ',')]
        conns: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
    /// Ingest: writers as fast as they can, notifier attached; then the same with triggers disabled.
    S4 {
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Also run on a private cluster whose WAL flush waits this long
        /// (commit_delay, commit_siblings = 0; commits still group, as on a
        /// cloud volume), beside the same run at the machine's flush: `1ms`.
        #[arg(long, value_parser = humantime::parse_duration)]
        flush_delay: Option<Duration>,
    },
    /// 1 MiB log lines at a steady rate.
    S5 {
        #[arg(long, default_value_t = 10)]
        conns: usize,
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 1 << 20)]
        size: usize,
    },
    /// Hostile clients beside S1's good ones: never-reading `since 0` replayers and slow consumers.
    Hostile(hostile::Args),
    /// Faults under writes: the source's backend killed, PostgreSQL restarted, the server stopped; clients resume.
    Faults(faults::Args),
    /// CI smoke: a few hundred clients for a few seconds; fails on any lost or duplicated event.
    Smoke,
    /// (internal) The bare WebSocket broadcaster, as a child process.
    #[command(hide = true)]
    BareBroadcaster {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        events: u32,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        size: usize,
    },
    /// (internal) Hold idle connections listed in a file, as a child process (S3).
    #[command(hide = true)]
    Holder {
        #[arg(long)]
        plan: String,
        #[arg(long)]
        first_source: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = harness::raise_nofile();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, nofile)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: FAILED: events were lost, duplicated or misrouted (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false) when an event was lost or duplicated.
async fn run(cli: Cli, nofile: u64) -> Result<bool> {
    let helper = matches!(cli.scenario, Scenario::BareBroadcaster { .. } | Scenario::Holder { .. });
    if !helper {
        eprintln!("bench: RLIMIT_NOFILE {nofile}; load: {}", loadavg());
    }
    let result = match cli.scenario {
        Scenario::BareBroadcaster { conns, events, rate, size } => {
            bare::run(conns, events, rate, size).await?;
            return Ok(true);
        }
        Scenario::Holder { plan, first_source } => {
            hold(&plan, first_source).await?;
            return Ok(true);
        }
        Scenario::S1 { conns, superusers, rate, duration, writers, instances, flush_delay } => {
            let s1 = |admin: String, delay| s1(admin, delay, conns, superusers, rate, duration, writers, instances);
            with_flush_delay("S1", flush_delay, s1).await?
        }
        Scenario::S2 { conns, rate, duration, writers, frame_size, instances, transport } => {
            s2(conns, rate, duration, writers, frame_size, instances, transport).await?
        }
        Scenario::S3 { conns, instances } => s3(&conns, instances, nofile).await?,
        Scenario::S4 { writers, duration, flush_delay } => {
            let s4 = |admin: String, delay| s4(admin, delay, writers, duration);
            with_flush_delay("S4", flush_delay, s4).await?
        }
        Scenario::S5 { conns, rate, duration, size } => s5(conns, rate, duration, size).await?,
        Scenario::Hostile(args) => hostile::run(&args).await?,
        Scenario::Faults(args) => faults::run(&args).await?,
        Scenario::Smoke => s1(admin_url(), Duration::ZERO, 300, 10, 300.0, 3, 2, 1).await?,
    };
    let ok = result.get("ok").and_then(Value::as_bool).unwrap_or(true);
    let text = serde_json::to_string_pretty(&result)?;
    println!("\nJSON\n{text}");
    if let Some(path) = cli.json {
        std::fs::write(&path, text).with_context(|| format!("write {path}"))?;
    }
    Ok(ok)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn token(viewer: Viewer) -> Result<String> {
    windflow_testkit::token(viewer, Duration::from_secs(6 * 3600))
}

fn user(user_id: Uuid) -> Viewer {
    Viewer { user_id, organization_id: None, is_superuser: false }
}

/// Insert one deployment per owner (ids chosen here), in batches.
async fn create_deployments(db: &Database, owners: &[Uuid], org: Option<Uuid>) -> Result<Vec<Uuid>> {
    let client = harness::connect(&db.config).await?;
    let ids: Vec<Uuid> = owners.iter().map(|_| Uuid::new_v4()).collect();
    for (ids, owners) in ids.chunks(10_000).zip(owners.chunks(10_000)) {
        let orgs: Vec<Option<Uuid>> = vec![org; ids.len()];
        client
            .execute(
                "INSERT INTO deployments (id, user_id, organization_id, name)
                 SELECT id, user_id, org, 'bench-app' FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS t(id, user_id, org)",
                &[&ids, &owners, &orgs],
            )
            .await
            .context("insert deployments")?;
    }
    Ok(ids)
}

/// Migrate (the server does it on start, but deployments must exist before).
async fn migrate(db: &Database) -> Result<()> {
    windflow_notify::db::migrate(&db.config).await.context("migrate")?;
    Ok(())
}

async fn start_servers(db: &Database, instances: usize) -> Result<Vec<Process>> {
    let mut servers = Vec::new();
    for i in 0..instances {
        servers.push(Process::server(db, &format!("/tmp/{}-server{i}.log", db.name)).await?);
    }
    Ok(servers)
}

async fn stop_all(servers: Vec<Process>) {
    for server in servers {
        if let Err(e) = server.stop().await {
            eprintln!("bench: stopping a server: {e:#}");
        }
    }
}

/// Runs `body` with a fresh database, dropped afterwards whatever happens.
async fn with_database<T, F, Fut>(body: F) -> Result<T>
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    with_database_at(&admin_url(), body).await
}

/// Runs `body` with a fresh, migrated database on `admin`'s server.
async fn with_database_at<T, F, Fut>(admin: &str, body: F) -> Result<T>
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let db = Arc::new(Database::create_at(admin, "wf_bench").await?);
    let outcome = async {
        migrate(&db).await?;
        body(db.clone()).await
    }
    .await;
    if let Err(e) = db.drop_now().await {
        eprintln!("bench: {e:#}");
    }
    outcome
}

/// The event source the JSON names: the event log, read in id order, woken
/// by NOTIFY.
const SOURCE: &str = "log";

/// Run `scenario` on the given server; with `delay`, instead on a private
/// cluster twice, at the machine's flush and with each flush waiting
/// `delay` (commit_delay, commit_siblings = 0: a cloud volume's flush,
/// commits still grouping), the two side by side.
async fn with_flush_delay<F, Fut>(name: &str, delay: Option<Duration>, scenario: F) -> Result<Value>
where
    F: Fn(String, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    let Some(delay) = delay else { return scenario(admin_url(), Duration::ZERO).await };
    let cluster =
        tokio::task::spawn_blocking(harness::own_cluster).await?.context("a PostgreSQL cluster of our own")?;
    let url = cluster.url("postgres");
    let set_delay = |micros: u128| {
        let url = url.clone();
        async move {
            let admin = harness::connect(&url.parse().context("cluster URL")?).await?;
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET commit_delay = {micros}; ALTER SYSTEM SET commit_siblings = 0; SELECT pg_reload_conf()"
                ))
                .await
                .context("set commit_delay")
        }
    };
    set_delay(0).await?;
    let fast = scenario(url.clone(), Duration::ZERO).await?;
    set_delay(delay.as_micros().min(100_000)).await?;
    let mut slow = scenario(url, delay).await?;
    let figure = |v: &Value| match name {
        "S4" => v["pct_of_without_triggers"].as_f64().unwrap_or(f64::NAN),
        _ => v["p99_over_bare_ms"].as_f64().unwrap_or(f64::NAN),
    };
    let unit = if name == "S4" { "% of the writes/s without triggers" } else { "ms p99 over the bare LISTEN floor" };
    println!(
        "\n{name} at the machine's flush: {:.1} {unit}; with each flush waiting {delay:?}: {:.1} {unit}",
        figure(&fast),
        figure(&slow)
    );
    slow["ok"] = json!(slow["ok"].as_bool() == Some(true) && fast["ok"].as_bool() == Some(true));
    slow["cluster"] = json!("own");
    slow["machine_flush"] = fast;
    Ok(slow)
}

/// Connect the clients, run the writes, wait for delivery, and analyse.
/// Returns the windflow row, the floor's row and the write outcome.
async fn deliver(
    db: &Database,
    servers: &[Process],
    clients: Vec<(ClientSpec, Owed)>,
    plan: &WritePlan,
) -> Result<(Delivery, Delivery, writers::WriteOutcome)> {
    let (specs, owed): (Vec<ClientSpec>, Vec<Owed>) = clients.into_iter().unzip();
    let fleet = connect_fleet(specs).await?;
    let (windflow, bare, outcome, ()) = deliver_to(db, servers, fleet, &owed, plan, async {}).await?;
    Ok((windflow, bare, outcome))
}

/// Connect and set up every client (authenticated, subscribed).
async fn connect_fleet(specs: Vec<ClientSpec>) -> Result<Fleet> {
    let n = specs.len();
    let started = now_ns();
    let fleet = Fleet::connect(specs, 256).await?;
    eprintln!("bench: {n} clients connected in {:.1} s", (now_ns() - started) as f64 / 1e9);
    Ok(fleet)
}

/// Run the writes to a connected fleet (`owed[i]` is what client i is
/// owed), with `during` running alongside the writes; wait for delivery
/// and analyse. Returns the windflow row, the bare LISTEN row, the write
/// outcome and what `during` returned.
#[allow(clippy::too_many_arguments)]
async fn deliver_to<F: std::future::Future>(
    db: &Database,
    servers: &[Process],
    fleet: Fleet,
    owed: &[Owed],
    plan: &WritePlan,
    during: F,
) -> Result<(Delivery, Delivery, writers::WriteOutcome, F::Output)> {
    let (listen_side, write_side) = (SideRuntime::new("bare-listen")?, SideRuntime::new("writers")?);
    let config = db.config.clone();
    let bare = listen_side.handle.spawn(async move { BareListener::start(&config).await }).await??;
    let samplers: Vec<Sampler> = servers.iter().map(|s| Sampler::start(s.pid)).collect();
    let (outcome, extra) = tokio::join!(run_writes(&write_side, db, plan), during);
    let outcome = outcome?;
    if let Some(error) = &outcome.first_error {
        eprintln!("bench: {} writes failed; first: {error}", outcome.failed);
    }
    let mut per_deployment = std::collections::HashMap::<u32, u64>::new();
    for w in &outcome.written {
        *per_deployment.entry(w.deployment).or_default() += 1;
    }
    let expected: u64 = owed
        .iter()
        .map(|o| match o {
            Owed::All => outcome.written.len() as u64,
            Owed::Deployment(d) => per_deployment.get(d).copied().unwrap_or(0),
        })
        .sum();
    eprintln!(
        "bench: {} writes in {:.1} s ({:.0}/s); waiting for {expected} deliveries",
        outcome.written.len(),
        outcome.wall_s,
        outcome.written.len() as f64 / outcome.wall_s
    );
    let deadline = now_ns() + 30_000_000_000;
    while fleet.counters.received.load(Relaxed) < expected && now_ns() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Room for duplicates to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let usage: Vec<(f64, u64, u64)> = samplers.into_iter().map(Sampler::finish).collect();
    let logs = fleet.finish().await;
    let bare_seen = listen_side.handle.spawn(bare.finish()).await??;
    drop((listen_side, write_side));
    let ended_early = logs.iter().filter(|l| l.ended.is_some()).count();
    if ended_early > 0 {
        let why = logs.iter().find_map(|l| l.ended.clone()).unwrap_or_default();
        eprintln!("bench: {ended_early} clients ended before the run did; e.g. {why}");
    }
    let pairs: Vec<(Owed, &clients::ClientLog)> = owed.iter().copied().zip(logs.iter()).collect();
    let mut windflow = analyse("windflow-notify", &outcome.written, &pairs, false);
    windflow.cpu_pct = Some(usage.iter().map(|u| u.0).sum());
    windflow.rss_peak_kib = Some(usage.iter().map(|u| u.1).sum());
    windflow.ended_early = ended_early as u64;
    let bare_log =
        clients::ClientLog { samples: bare_seen.into_iter().map(|(s, t)| (s, t, 0)).collect(), ..Default::default() };
    let mut bare_row = analyse("bare LISTEN (floor)", &outcome.written, &[(Owed::All, &bare_log)], false);
    // The floor times what a bare LISTEN sees: the commits that NOTIFYed
    // (one at a time; the others' wake-up covered them). It owes nothing.
    bare_row.lost = 0;
    Ok((windflow, bare_row, outcome, extra))
}

async fn run_writes(side: &SideRuntime, db: &Database, plan: &WritePlan) -> Result<writers::WriteOutcome> {
    let (config, plan) = (db.config.clone(), plan.clone());
    side.handle.spawn(async move { writers::run(&config, &plan).await }).await?
}

fn write_json(o: &writers::WriteOutcome) -> Value {
    json!({"writes": o.written.len(), "failed": o.failed, "writes_per_s": round(o.written.len() as f64 / o.wall_s)})
}

fn spec(servers: &[Process], i: usize, token: Option<String>, subscribe: Vec<String>) -> ClientSpec {
    ClientSpec {
        target: servers[i % servers.len()].addr,
        source: source_ip(i),
        token,
        subscribe,
        min_len: 0,
        transport: Transport::WebSocket,
    }
}

/// S1's clients: each owner watching its deployment (`deployments[i]` is
/// `owners[i]`'s, and owed `Owed::Deployment(i)`), plus `superusers` on
/// `deployment_events`, owed everything.
fn s1_clients(
    servers: &[Process],
    owners: &[Uuid],
    deployments: &[Uuid],
    superusers: usize,
) -> Result<Vec<(ClientSpec, Owed)>> {
    let mut clients = Vec::new();
    for (i, (owner, deployment)) in owners.iter().zip(deployments).enumerate() {
        // The owner gets its events without subscribing; the logs
        // subscription also makes the hub deduplicate owner + topic.
        let subscribe = vec![format!("deployment_logs_{deployment}")];
        clients.push((spec(servers, i, Some(token(user(*owner))?), subscribe), Owed::Deployment(i as u32)));
    }
    for i in 0..superusers {
        let viewer = Viewer { is_superuser: true, ..user(Uuid::new_v4()) };
        let subscribe = vec!["deployment_events".to_string()];
        clients.push((spec(servers, owners.len() + i, Some(token(viewer)?), subscribe), Owed::All));
    }
    Ok(clients)
}

#[allow(clippy::too_many_arguments)]
async fn s1(
    admin: String,
    flush_delay: Duration,
    conns: usize,
    superusers: usize,
    rate: f64,
    duration: u64,
    writers: usize,
    instances: usize,
) -> Result<Value> {
    with_database_at(&admin, |db| async move {
        let owners: Vec<Uuid> = (0..conns.saturating_sub(superusers)).map(|_| Uuid::new_v4()).collect();
        let deployments = create_deployments(&db, &owners, None).await?;
        let servers = start_servers(&db, instances).await?;
        let clients = s1_clients(&servers, &owners, &deployments, superusers)?;
        let plan = WritePlan::mixed(writers, Some(rate), Duration::from_secs(duration), Arc::new(deployments));
        let outcome = deliver(&db, &servers, clients, &plan).await;
        stop_all(servers).await;
        let (windflow, bare, writes) = outcome?;
        print_table(
            &format!("S1 latency (flush delay {flush_delay:?}): {conns} connections ({superusers} superusers), {rate}/s mixed writes, {duration} s, {instances} instance(s)"),
            &[windflow.clone(), bare.clone()],
        );
        let p99_gap = windflow.p99_ms - bare.p99_ms;
        let target = if flush_delay.is_zero() { 2.0 } else { 25.0 };
        println!("p99 over the floor: {p99_gap:+.3} ms (target: within {target} ms)");
        Ok(json!({
            "scenario": "S1", "source": SOURCE, "flush_delay_ms": flush_delay.as_secs_f64() * 1e3, "conns": conns, "superusers": superusers, "rate": rate, "duration_s": duration,
            "instances": instances, "writes": write_json(&writes),
            "windflow": windflow.json(), "bare_listen": bare.json(),
            "p99_over_bare_ms": round(p99_gap), "target_met": p99_gap <= target,
            "ok": !windflow.failed() && !bare.failed(),
        }))
    })
    .await
}

async fn s2(
    conns: usize,
    rate: f64,
    duration: u64,
    writers: usize,
    frame_size: usize,
    instances: usize,
    transport: Transport,
) -> Result<Value> {
    with_database(|db| async move {
        let org = Uuid::new_v4();
        let publisher = Uuid::new_v4();
        let deployments = create_deployments(&db, &[publisher; 16], Some(org)).await?;
        let servers = start_servers(&db, instances).await?;
        let mut clients = Vec::new();
        for i in 0..conns {
            let viewer = Viewer { organization_id: Some(org), ..user(Uuid::new_v4()) };
            let subscribe = vec!["deployment_events".to_string()];
            let spec = ClientSpec { transport, ..spec(&servers, i, Some(token(viewer)?), subscribe) };
            clients.push((spec, Owed::All));
        }
        let plan = WritePlan::mixed(writers, Some(rate), Duration::from_secs(duration), Arc::new(deployments));
        let outcome = deliver(&db, &servers, clients, &plan).await;
        stop_all(servers).await;
        let (windflow, bare, writes) = outcome?;
        let events = writes.written.len() as u32;
        let broadcaster = bare_broadcast(conns, events, rate, frame_size).await?;
        print_table(
            &format!(
                "S2 fan-out: {conns} {} connections on deployment_events, {rate} events/s, {duration} s, {instances} instance(s)",
                transport.name()
            ),
            &[windflow.clone(), bare.clone(), broadcaster.clone()],
        );
        let ratio = windflow.msgs_per_s / broadcaster.msgs_per_s;
        println!("delivered rate vs bare broadcaster: {:.1} % (target: at least 80 %)", 100.0 * ratio);
        Ok(json!({
            "scenario": "S2", "transport": transport.name(), "conns": conns, "rate": rate, "duration_s": duration, "instances": instances,
            "writes": write_json(&writes), "windflow": windflow.json(), "bare_listen": bare.json(),
            "bare_broadcaster": broadcaster.json(), "rate_vs_broadcaster": round(ratio),
            "target_met": ratio >= 0.8, "ok": !windflow.failed() && !broadcaster.failed(),
        }))
    })
    .await
}

/// The same N clients against the bare broadcaster child process.
async fn bare_broadcast(conns: usize, events: u32, rate: f64, size: usize) -> Result<Delivery> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bare-broadcaster", "--conns", &conns.to_string(), "--events", &events.to_string()])
        .args(["--rate", &rate.to_string(), "--size", &size.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn the bare broadcaster")?;
    let pid = child.id().context("broadcaster pid")?;
    let mut stdin = child.stdin.take().context("broadcaster stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("broadcaster stdout")?).lines();
    let addr: SocketAddr = match lines.next_line().await? {
        Some(line) => line.strip_prefix("LISTENING ").context("broadcaster: no LISTENING line")?.parse()?,
        None => bail!("bare broadcaster exited at start"),
    };
    let specs: Vec<ClientSpec> = (0..conns)
        .map(|i| ClientSpec {
            target: addr,
            source: source_ip(i),
            token: None,
            subscribe: vec![],
            min_len: 0,
            transport: Transport::WebSocket,
        })
        .collect();
    let fleet = Fleet::connect(specs, 256).await?;
    let sampler = Sampler::start(pid);
    stdin.write_all(b"GO\n").await?;
    let expected = conns as u64 * u64::from(events);
    let deadline = now_ns() + (f64::from(events) / rate * 1e9) as u64 + 30_000_000_000;
    while fleet.counters.received.load(Relaxed) < expected && now_ns() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu, peak, _) = sampler.finish();
    let logs = fleet.finish().await;
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let written: Vec<writers::Written> =
        (0..events).map(|seq| writers::Written { seq, deployment: 0, commit_ns: 0 }).collect();
    let pairs: Vec<(Owed, &clients::ClientLog)> = logs.iter().map(|l| (Owed::All, l)).collect();
    let mut row = analyse("bare broadcaster (floor)", &written, &pairs, true);
    row.cpu_pct = Some(cpu);
    row.rss_peak_kib = Some(peak);
    Ok(row)
}

/// Connections per holder process: below the RLIMIT_NOFILE hard limit.
fn per_holder(nofile: u64) -> usize {
    (nofile.saturating_sub(200) as usize).clamp(100, 15_000)
}

async fn s3(counts: &[usize], instances: usize, nofile: u64) -> Result<Value> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let per_server = max.div_ceil(instances);
    if per_server as u64 + 200 > nofile {
        bail!(
            "{per_server} connections per server exceed RLIMIT_NOFILE {nofile} (the hard limit here); \
             use --instances {} or raise the hard limit",
            max.div_ceil(nofile.saturating_sub(200) as usize)
        );
    }
    with_database(|db| async move {
        let owners: Vec<Uuid> = (0..max).map(|_| Uuid::new_v4()).collect();
        let deployments = create_deployments(&db, &owners, None).await?;
        let mut rows = Vec::new();
        for &n in counts {
            let servers = start_servers(&db, instances).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before: u64 = servers.iter().map(|s| harness::sample(s.pid).rss_kib).sum();
            // Holder processes keep the connections, so this process needs no fds for them.
            let plan_path = format!("/tmp/{}-holders.txt", db.name);
            let mut plan = String::new();
            for i in 0..n {
                let target = servers[i % servers.len()].addr;
                let topics = format!("deployment_events deployment_progress_{}", deployments[i]);
                plan.push_str(&format!("{target} {} {topics}\n", token(user(owners[i]))?));
            }
            let per = per_holder(nofile);
            let mut holders = Vec::new();
            let started = now_ns();
            for (h, chunk) in plan.lines().collect::<Vec<_>>().chunks(per).enumerate() {
                let path = format!("{plan_path}.{h}");
                std::fs::write(&path, chunk.join("\n"))?;
                holders.push(spawn_holder(&path, h * per).await?);
            }
            let after_connect = (now_ns() - started) as f64 / 1e9;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after: u64 = servers.iter().map(|s| harness::sample(s.pid).rss_kib).sum();
            let mut open = 0.0;
            for s in &servers {
                open += harness::metric(s.addr, "windflow_connections").await.unwrap_or(0.0);
            }
            let per_conn = (after.saturating_sub(before)) as f64 / n as f64;
            println!(
                "S3 {n} idle connections ({} open per /metrics), 2 subscriptions each, {instances} instance(s): \
                 RSS {:.1} MiB -> {:.1} MiB = {per_conn:.2} KiB per connection (target: at most 8 KiB); connected in {after_connect:.1} s",
                open,
                before as f64 / 1024.0,
                after as f64 / 1024.0
            );
            rows.push(json!({
                "conns": n, "open_per_metrics": open, "instances": instances, "rss_before_kib": before,
                "rss_after_kib": after, "kib_per_conn": round(per_conn), "target_met": per_conn <= 8.0,
            }));
            for (mut stdin, mut child) in holders {
                let _ = stdin.shutdown().await;
                drop(stdin);
                let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            }
            stop_all(servers).await;
            for h in 0..n.div_ceil(per) {
                let _ = std::fs::remove_file(format!("{plan_path}.{h}"));
            }
        }
        Ok(json!({"scenario": "S3", "runs": rows, "ok": true}))
    })
    .await
}

async fn spawn_holder(plan: &str, first_source: usize) -> Result<(tokio::process::ChildStdin, tokio::process::Child)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["holder", "--plan", plan, "--first-source", &first_source.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn a holder")?;
    let stdin = child.stdin.take().context("holder stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("holder stdout")?).lines();
    match lines.next_line().await? {
        Some(line) if line == "READY" => Ok((stdin, child)),
        other => bail!("holder for {plan} failed: {other:?}"),
    }
}

/// (holder) Open the planned connections, print READY, hold them until stdin closes.
async fn hold(plan: &str, first_source: usize) -> Result<()> {
    let text = std::fs::read_to_string(plan)?;
    let mut specs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut parts = line.split(' ');
        let target: SocketAddr = parts.next().context("plan: target")?.parse()?;
        let token = parts.next().context("plan: token")?.to_string();
        specs.push(ClientSpec {
            target,
            source: source_ip(first_source + i),
            token: Some(token),
            subscribe: parts.map(str::to_string).collect(),
            min_len: 0,
            transport: Transport::WebSocket,
        });
    }
    let fleet = Fleet::connect(specs, 256).await?;
    println!("READY");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while stdin.next_line().await?.is_some() {}
    fleet.finish().await;
    Ok(())
}

async fn s4(admin: String, flush_delay: Duration, writers: usize, duration: u64) -> Result<Value> {
    with_database_at(&admin, |db| async move {
        let owners: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
        let deployments = Arc::new(create_deployments(&db, &owners, None).await?);
        let servers = start_servers(&db, 1).await?;
        let viewer = Viewer { is_superuser: true, ..user(Uuid::new_v4()) };
        let clients = vec![(spec(&servers, 0, Some(token(viewer)?), vec!["deployment_events".into()]), Owed::All)];
        let plan = WritePlan::mixed(writers, None, Duration::from_secs(duration), deployments.clone());
        // pg_notification_queue_usage() sampled every 100 ms throughout.
        let probe = harness::connect(&db.config).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let token_ = stop.clone();
        let usage = tokio::spawn(async move {
            let mut max = 0f64;
            loop {
                if let Ok(row) = probe.query_one("SELECT pg_notification_queue_usage()", &[]).await {
                    max = max.max(row.get::<_, f64>(0));
                }
                tokio::select! {
                    _ = token_.cancelled() => return max,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        let outcome = deliver(&db, &servers, clients, &plan).await;
        stop.cancel();
        let max_usage = usage.await.unwrap_or(f64::NAN);
        stop_all(servers).await;
        let (windflow, bare, with) = outcome?;
        // The same writes without the event triggers (updated_at's trigger stays).
        let admin = harness::connect(&db.config).await?;
        admin
            .batch_execute(
                "ALTER TABLE deployments DISABLE TRIGGER deployments_created_events, DISABLE TRIGGER deployments_changed_events;
                 ALTER TABLE deployment_logs DISABLE TRIGGER deployment_logs_events;",
            )
            .await?;
        let without = run_writes(&SideRuntime::new("writers")?, &db, &plan).await?;
        let with_rate = with.written.len() as f64 / with.wall_s;
        let without_rate = without.written.len() as f64 / without.wall_s;
        print_table(
            &format!(
                "S4 ingest (flush delay {flush_delay:?}): {writers} writers as fast as they can for {duration} s, server attached"
            ),
            &[windflow.clone(), bare.clone()],
        );
        println!(
            "writes/s with triggers {with_rate:.0}, without {without_rate:.0}: triggers cost {:.1} %; \
             max pg_notification_queue_usage() {max_usage}",
            100.0 * (1.0 - with_rate / without_rate)
        );
        Ok(json!({
            "scenario": "S4", "source": SOURCE, "flush_delay_ms": flush_delay.as_secs_f64() * 1e3,
            "writers": writers, "duration_s": duration,
            "with_triggers": write_json(&with), "without_triggers": write_json(&without),
            "trigger_cost_pct": round(100.0 * (1.0 - with_rate / without_rate)),
            "pct_of_without_triggers": round(100.0 * with_rate / without_rate),
            "max_notification_queue_usage": max_usage, "windflow": windflow.json(),
            "bare_listen": bare.json(),
            "target_met": max_usage == 0.0 && !windflow.failed(), "ok": !windflow.failed(),
        }))
    })
    .await
}

async fn s5(conns: usize, rate: f64, duration: u64, size: usize) -> Result<Value> {
    with_database(|db| async move {
        let owner = Uuid::new_v4();
        let deployments = create_deployments(&db, &[owner], None).await?;
        let servers = start_servers(&db, 1).await?;
        let mut clients = Vec::new();
        for i in 0..conns {
            // Half the owner's own connections, half superusers on the logs topic.
            let (viewer, subscribe) = if i % 2 == 0 {
                (user(owner), vec![])
            } else {
                (
                    Viewer { is_superuser: true, ..user(Uuid::new_v4()) },
                    vec![format!("deployment_logs_{}", deployments[0])],
                )
            };
            let mut spec = spec(&servers, i, Some(token(viewer)?), subscribe);
            spec.min_len = size;
            clients.push((spec, Owed::All));
        }
        let plan = WritePlan {
            writers: 1,
            rate: Some(rate),
            duration: Duration::from_secs(duration),
            deployments: Arc::new(deployments),
            status_in_5: 0,
            progress_in_5: 0,
            log_size: size,
        };
        let outcome = deliver(&db, &servers, clients, &plan).await;
        stop_all(servers).await;
        let (windflow, bare, writes) = outcome?;
        print_table(
            &format!("S5 large logs: {size}-byte log lines, {rate}/s for {duration} s, {conns} connections"),
            &[windflow.clone(), bare.clone()],
        );
        println!("frames shorter than the line written: {}", windflow.short_frames);
        Ok(json!({
            "scenario": "S5", "conns": conns, "rate": rate, "duration_s": duration, "size": size,
            "writes": write_json(&writes), "windflow": windflow.json(), "bare_listen": bare.json(),
            "ok": !windflow.failed(),
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn faults_default_to_a_30_s_server_outage() {
        let cli = Cli::try_parse_from(["bench", "faults"]);
        let Ok(Cli { scenario: Scenario::Faults(args), .. }) = cli else { panic!("faults did not parse") };
        assert_eq!((args.kills, args.server_down, args.kill_server), (3, 30, false));
    }

    #[test]
    fn a_flush_delay_is_a_duration() {
        let cli = Cli::try_parse_from(["bench", "s4", "--flush-delay", "1ms"]);
        let Ok(Cli { scenario: Scenario::S4 { flush_delay, .. }, .. }) = cli else { panic!("s4 did not parse") };
        assert_eq!(flush_delay, Some(Duration::from_millis(1)));
    }

    #[test]
    fn hostile_defaults_are_the_issue_8_scenario() {
        let cli = Cli::try_parse_from(["bench", "hostile", "--hostile", "200"]);
        let Ok(Cli { scenario: Scenario::Hostile(args), .. }) = cli else { panic!("hostile did not parse") };
        assert_eq!((args.hostile, args.good, args.log_rows, args.log_bytes), (200, 1000, 20, 500_000));
        assert_eq!((args.client_queue, args.duration), (64, 15));
    }
}
