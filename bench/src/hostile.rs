//! `bench hostile`: do hostile clients hurt the good ones? (With
//! `--replay-hogs`, the replay-hog phases of [`crate::hogs`] instead.)
//!
//! Two phases in one invocation, each on a fresh database and a fresh
//! server with the same settings, the same event log and the same writes:
//!
//! 1. **baseline**: S1's good clients (owners watching their deployments,
//!    a few superusers on `deployment_events`) and S1's mixed writes;
//! 2. **hostile**: the same, plus N *replayers* (superusers whose sockets
//!    have a tiny receive buffer and are never read, each subscribing to
//!    `deployment_events` with `since: 0` while the log holds large events)
//!    and N *slow consumers* (superusers on `deployment_events` that stop
//!    reading, so the server should kick them with 1013).
//!
//! Before the server starts, the log is filled with large log lines on a
//! deployment of its own, so the server's history is empty and every
//! `since: 0` replays from the event log. Another user (a *probe*)
//! subscribes to its own deployment's logs topic once a second after the
//! hostile clients connected (before the writes: replays running, no live
//! traffic), then every few seconds during the writes: that subscribe needs
//! the permission check in the database, so it shows whether the replays
//! starve everyone else. Nothing is timed against a
//! target; the run fails only on lost, duplicated or misrouted events
//! among the good clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;
use windflow_notify::auth::Viewer;

use crate::clients::{ClientSpec, Transport, Ws, next_json, open_with, source_ip};
use crate::harness::{self, Database, Process, Sampler};
use crate::report::{Delivery, Owed, print_table, round};
use crate::writers::WritePlan;
use crate::{connect_fleet, create_deployments, deliver_to, s1_clients, token, user, with_database, write_json};

/// Hostile setups in flight at once.
const SETUP_PARALLEL: usize = 64;
/// Bound on any one hostile client's setup, and on a probe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long hostile sockets are read after the run, to see how they ended:
/// longer than the server's 10 s bound on a kicked client's close (docs/protocol.md),
/// with room to read what the kernel buffered for each (megabytes).
const DRAIN_FOR: Duration = Duration::from_secs(30);
/// The first probe: this long after the hostile clients connected, before the writes.
const PROBE_SETTLE: Duration = Duration::from_secs(1);
/// Probes during the writes: the first this long into the writes, then one every PROBE_EVERY
/// (after the previous one answered), at most MAX_PROBES.
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_EVERY: Duration = Duration::from_secs(3);
const MAX_PROBES: usize = 10;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Replayers, and as many slow consumers.
    #[arg(long, default_value_t = 16)]
    pub hostile: usize,
    /// Well-behaved clients (S1's shape), superusers included.
    #[arg(long, default_value_t = 1000)]
    pub good: usize,
    #[arg(long, default_value_t = 20)]
    pub superusers: usize,
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of writes per phase.
    #[arg(long, default_value_t = 15)]
    pub duration: u64,
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Log lines in the event log before the server starts (what `since 0` replays).
    #[arg(long, default_value_t = 20)]
    pub log_rows: usize,
    #[arg(long, default_value_t = 500_000)]
    pub log_bytes: usize,
    /// WINDFLOW_CLIENT_QUEUE for the server, in both phases.
    #[arg(long, default_value_t = 64)]
    pub client_queue: usize,
    /// SO_RCVBUF of the hostile clients' sockets, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub recv_buffer: u32,
    /// Instead of the two phases above: the replay-hog phases (`crate::hogs`).
    #[command(flatten)]
    pub hogs: crate::hogs::HogArgs,
}

pub async fn run(args: &Args) -> Result<Value> {
    if args.superusers >= args.good {
        bail!("--superusers ({}) must be fewer than --good ({})", args.superusers, args.good);
    }
    if args.log_bytes > 64 << 20 || args.log_rows > 10_000 {
        bail!("--log-bytes is at most 64 MiB and --log-rows at most 10,000 (keeps the run bounded)");
    }
    if args.duration == 0 || args.duration > 600 || !(args.rate > 0.0 && args.rate <= 100_000.0) {
        bail!("--duration is 1..=600 s and --rate 0..=100,000 writes/s");
    }
    if !args.hogs.replay_hogs.is_empty() {
        return crate::hogs::run(&args.hogs, args.good, args.superusers, args.rate, args.duration, args.writers).await;
    }
    let baseline = phase(args, false).await.context("baseline phase")?;
    let hostile = phase(args, true).await.context("hostile phase")?;

    let mut good_base = baseline.good.clone();
    good_base.name = "good, baseline".into();
    let mut good_hostile = hostile.good.clone();
    good_hostile.name = format!("good, {} + {} hostile", args.hostile, args.hostile);
    let mut bare_base = baseline.bare.clone();
    bare_base.name = "bare LISTEN, baseline".into();
    let mut bare_hostile = hostile.bare.clone();
    bare_hostile.name = "bare LISTEN, hostile".into();
    print_table(
        &format!(
            "hostile: {} good clients ({} superusers), {}/s mixed writes for {} s; then the same beside {} never-reading \
             `since 0` replayers ({} log rows of {} bytes) and {} slow consumers; WINDFLOW_CLIENT_QUEUE={}",
            args.good,
            args.superusers,
            args.rate,
            args.duration,
            args.hostile,
            args.log_rows,
            args.log_bytes,
            args.hostile,
            args.client_queue
        ),
        &[good_base, good_hostile, bare_base, bare_hostile],
    );
    let ratio = hostile.good.p99_ms / baseline.good.p99_ms;
    println!("good clients' p99, hostile / baseline: {ratio:.2}");
    for p in [&baseline, &hostile] {
        p.print();
    }
    let ok = !baseline.good.failed() && !hostile.good.failed();
    Ok(json!({
        "scenario": "hostile", "hostile": args.hostile, "good": args.good, "superusers": args.superusers,
        "rate": args.rate, "duration_s": args.duration, "writers": args.writers, "log_rows": args.log_rows,
        "log_bytes": args.log_bytes, "client_queue": args.client_queue, "recv_buffer": args.recv_buffer,
        "baseline": baseline.json(), "with_hostile": hostile.json(),
        "p99_ratio": round(ratio),
        "ok": ok,
    }))
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    good: Delivery,
    bare: Delivery,
    writes: Value,
    rss_start_kib: u64,
    rss_peak_kib: u64,
    rss_end_kib: u64,
    kicked: Option<f64>,
    connections_at_end: Option<f64>,
    replayers: Setup,
    slow: Setup,
    probes: Vec<Probe>,
    shutdown: Option<harness::Stopped>,
}

impl Phase {
    fn subscribed_probes(&self) -> usize {
        self.probes.iter().filter(|p| p.outcome == "subscribed").count()
    }

    fn print(&self) {
        let mib = |k: u64| k as f64 / 1024.0;
        let unread = |v: Option<f64>| v.map(|k| k.to_string()).unwrap_or_else(|| "unread".into());
        println!(
            "{}: good clients lost {} events, {} of them owed to the {} good connections that ended early \
             (kicked or closed; resumable with since)",
            self.name, self.good.lost, self.good.lost_ended, self.good.ended_early
        );
        println!(
            "  server RSS {:.1} -> peak {:.1} MiB (end of run {:.1}); slow-consumer kicks (metric) {}; \
             connections open once the good clients left {}",
            mib(self.rss_start_kib),
            mib(self.rss_peak_kib),
            mib(self.rss_end_kib),
            unread(self.kicked),
            unread(self.connections_at_end),
        );
        for (what, setup) in [("replayers", &self.replayers), ("slow consumers", &self.slow)] {
            if setup.connected + setup.failed == 0 {
                continue;
            }
            let e = &setup.ends;
            println!(
                "  {what}: {} of {} set up; read after the run: {} saw close 1013, {} another close, \
                 {} ended without a close, {} still open after {} s; {} messages read",
                setup.connected,
                setup.connected + setup.failed,
                e.close_1013,
                e.other_close,
                e.no_close,
                e.still_open,
                DRAIN_FOR.as_secs(),
                e.messages
            );
            if let Some(error) = &setup.first_error {
                println!("  {} {what} failed to set up; first: {error}", setup.failed);
            }
        }
        let probes: Vec<String> =
            self.probes.iter().map(|p| format!("{} in {:.0} ms at {:+.1} s", p.outcome, p.ms, p.at_s)).collect();
        println!(
            "  another user's subscribe to its deployment's logs topic (time from the writes' start): \
             {} of {} subscribed ({})",
            self.subscribed_probes(),
            self.probes.len(),
            probes.join(", ")
        );
        if let Some(s) = &self.shutdown {
            let status = s.status.map(|s| s.to_string()).unwrap_or_else(|| "killed after 10 s".into());
            println!("  SIGTERM: {status} after {:.1} s", s.seconds);
        }
    }

    fn json(&self) -> Value {
        let probe_ms: Vec<f64> = self.probes.iter().map(|p| p.ms).collect();
        json!({
            "good": self.good.json(), "bare_listen": self.bare.json(), "writes": self.writes,
            "server_rss_kib": {"start": self.rss_start_kib, "peak": self.rss_peak_kib, "end": self.rss_end_kib},
            "slow_consumer_disconnects": self.kicked, "connections_at_end": self.connections_at_end,
            "replayers": self.replayers.json(), "slow_consumers": self.slow.json(),
            "other_user_subscribe": {
                "subscribed": self.subscribed_probes(), "tries": self.probes.len(),
                "all_subscribed": !self.probes.is_empty() && self.subscribed_probes() == self.probes.len(),
                "max_ms": probe_ms.iter().copied().reduce(f64::max).map(round),
                "tries_detail": self.probes.iter().map(|p| json!({
                    "at_s": round(p.at_s), "outcome": p.outcome, "ms": round(p.ms),
                })).collect::<Vec<_>>(),
            },
            "shutdown": self.shutdown.map(|s| json!({
                "exit": s.status.map(|s| s.to_string()), "seconds": round(s.seconds),
            })),
        })
    }
}

async fn phase(args: &Args, hostile: bool) -> Result<Phase> {
    let args = args.clone();
    with_database(move |db| async move {
        let owners: Vec<Uuid> = (0..args.good - args.superusers).map(|_| Uuid::new_v4()).collect();
        let deployments = create_deployments(&db, &owners, None).await?;
        // The large log lines' deployment (nobody good owns it) and the probe's.
        let probe_owner = Uuid::new_v4();
        let others = create_deployments(&db, &[Uuid::new_v4(), probe_owner], None).await?;
        fill_log(&db, others[0], args.log_rows, args.log_bytes).await?;
        let env = [("WINDFLOW_CLIENT_QUEUE", args.client_queue.to_string())];
        let log = format!("/tmp/{}-server0.log", db.name);
        let server = Process::server_with(&db, &log, &env).await?;
        let driven = drive(&args, &db, &server, hostile, owners, deployments, (probe_owner, others[1])).await;
        let shutdown = match server.stop().await {
            Ok(stopped) => Some(stopped),
            Err(e) => {
                eprintln!("bench: stopping the server: {e:#}");
                None
            }
        };
        let mut phase = driven?;
        phase.shutdown = shutdown;
        Ok(phase)
    })
    .await
}

/// Clients, writes and probes against a running server, then the hostile
/// sockets read to see how they ended.
async fn drive(
    args: &Args,
    db: &Database,
    server: &Process,
    hostile: bool,
    owners: Vec<Uuid>,
    deployments: Vec<Uuid>,
    (probe_owner, probe_deployment): (Uuid, Uuid),
) -> Result<Phase> {
    let rss_start_kib = harness::sample(server.pid).rss_kib;
    let sampler = Sampler::start(server.pid);
    let servers = std::slice::from_ref(server);
    let clients = s1_clients(servers, &owners, &deployments, args.superusers)?;
    let (specs, owed): (Vec<ClientSpec>, Vec<Owed>) = clients.into_iter().unzip();
    let first_source = specs.len();
    let fleet = connect_fleet(specs).await?;
    let (mut slow, mut replayers) = if hostile {
        // Slow consumers first: once the replays hold the database, a
        // subscribe that needs it may be refused.
        let slow = connect_hostile(server.addr, first_source, args.hostile, Role::Slow, args.recv_buffer).await?;
        let first_source = first_source + args.hostile;
        let replayers =
            connect_hostile(server.addr, first_source, args.hostile, Role::Replayer, args.recv_buffer).await?;
        (slow, replayers)
    } else {
        (Setup::default(), Setup::default())
    };
    let plan =
        WritePlan::mixed(args.writers, Some(args.rate), Duration::from_secs(args.duration), Arc::new(deployments));
    let probe_spec = ClientSpec {
        target: server.addr,
        source: source_ip(first_source + 2 * args.hostile),
        token: Some(token(user(probe_owner))?),
        subscribe: vec![],
        min_len: 0,
        transport: Transport::WebSocket,
    };
    // Replays running, no live traffic yet (in both phases, for the same timing).
    tokio::time::sleep(PROBE_SETTLE).await;
    let settled = Instant::now();
    let (outcome, ms) = probe(&probe_spec, probe_deployment).await;
    let before = Probe { at_s: -settled.elapsed().as_secs_f64(), outcome, ms };
    let probes = probe_loop(probe_spec, probe_deployment, plan.duration);
    let (good, bare, writes, mut probes) = deliver_to(db, servers, fleet, &owed, &plan, probes).await?;
    probes.insert(0, before);
    let kicked = harness::metric(server.addr, "windflow_slow_consumer_disconnects_total").await.ok();
    let connections_at_end = harness::metric(server.addr, "windflow_connections").await.ok();
    let rss_end_kib = harness::sample(server.pid).rss_kib;
    // Before the hostile sockets are read: reading lets stuck replays go on.
    let (_, rss_peak_kib, _) = sampler.finish();
    let deadline = Instant::now() + DRAIN_FOR;
    (slow.ends, replayers.ends) = tokio::join!(
        drain(std::mem::take(&mut slow.sockets), deadline),
        drain(std::mem::take(&mut replayers.sockets), deadline)
    );
    Ok(Phase {
        name: if hostile { "hostile" } else { "baseline" },
        writes: write_json(&writes),
        rss_start_kib,
        // Two samplers (the phase's and the writes'), 100 ms apart each: the higher.
        rss_peak_kib: rss_peak_kib.max(rss_end_kib).max(good.rss_peak_kib.unwrap_or(0)),
        rss_end_kib,
        good,
        bare,
        kicked,
        connections_at_end,
        replayers,
        slow,
        probes,
        shutdown: None,
    })
}

/// `rows` log lines of `bytes` bytes (hex, so TOAST cannot compress them
/// away) on `deployment`, each its own transaction.
async fn fill_log(db: &Database, deployment: Uuid, rows: usize, bytes: usize) -> Result<()> {
    let client = harness::connect(&db.config).await?;
    let bytes = i32::try_from(bytes).context("--log-bytes")?;
    let insert = "INSERT INTO deployment_logs (deployment_id, message)
                  SELECT $1, left(string_agg(md5(random()::text || g::text), ''), $2)
                  FROM generate_series(0, $2 / 32) AS g";
    let started = harness::now_ns();
    for _ in 0..rows {
        client.execute(insert, &[&deployment, &bytes]).await.context("fill the event log")?;
    }
    eprintln!(
        "bench: event log filled with {rows} log lines of {bytes} bytes in {:.1} s",
        (harness::now_ns() - started) as f64 / 1e9
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// `subscribe deployment_events since 0`, then never reads.
    Replayer,
    /// `subscribe deployment_events`, waits for `subscribed`, then never reads.
    Slow,
}

#[derive(Default)]
struct Setup {
    sockets: Vec<Ws>,
    connected: usize,
    failed: usize,
    first_error: Option<String>,
    /// How the connections ended, read after the run.
    ends: Ends,
}

impl Setup {
    fn json(&self) -> Value {
        let e = &self.ends;
        json!({
            "connected": self.connected, "failed": self.failed, "first_error": self.first_error,
            "after_the_run": {
                "close_1013": e.close_1013, "other_close": e.other_close, "ended_without_close": e.no_close,
                "still_open": e.still_open, "messages_read": e.messages,
            },
        })
    }
}

/// Set up `n` hostile superuser connections with a `recv_buffer`-byte
/// SO_RCVBUF. A failed setup is counted, not fatal: refusing a hostile
/// client is a fair answer.
async fn connect_hostile(
    target: SocketAddr,
    first_source: usize,
    n: usize,
    role: Role,
    recv_buffer: u32,
) -> Result<Setup> {
    let gate = Arc::new(Semaphore::new(SETUP_PARALLEL));
    let started = harness::now_ns();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let viewer = Viewer { is_superuser: true, ..user(Uuid::new_v4()) };
        let spec = ClientSpec {
            target,
            source: source_ip(first_source + i),
            token: Some(token(viewer)?),
            subscribe: vec![],
            min_len: 0,
            transport: Transport::WebSocket,
        };
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            match tokio::time::timeout(SETUP_TIMEOUT, hostile_setup(&spec, role, recv_buffer)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(anyhow::anyhow!("no setup within {} s", SETUP_TIMEOUT.as_secs())),
            }
        }));
    }
    let mut setup = Setup::default();
    for task in tasks {
        match task.await {
            Ok(Ok(ws)) => {
                setup.sockets.push(ws);
                setup.connected += 1;
            }
            Ok(Err(e)) => {
                setup.failed += 1;
                setup.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                setup.failed += 1;
                setup.first_error.get_or_insert_with(|| format!("setup task: {e}"));
            }
        }
    }
    eprintln!(
        "bench: {} {role:?} clients set up ({} failed) in {:.1} s",
        setup.connected,
        setup.failed,
        (harness::now_ns() - started) as f64 / 1e9
    );
    Ok(setup)
}

async fn hostile_setup(spec: &ClientSpec, role: Role, recv_buffer: u32) -> Result<Ws> {
    let mut ws = open_with(spec, Some(recv_buffer)).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "authenticated" {
        bail!("expected authenticated, got {first}");
    }
    match role {
        Role::Replayer => {
            let subscribe = json!({"type": "subscribe", "topic": "deployment_events", "since": 0});
            ws.send(Message::Text(subscribe.to_string().into())).await?;
        }
        Role::Slow => {
            let subscribe = json!({"type": "subscribe", "topic": "deployment_events"});
            ws.send(Message::Text(subscribe.to_string().into())).await?;
            let reply = next_json(&mut ws).await?;
            if reply["type"] != "subscribed" {
                bail!("expected subscribed, got {reply}");
            }
        }
    }
    Ok(ws)
}

/// How hostile connections ended, read after the run.
#[derive(Debug, Default)]
struct Ends {
    close_1013: usize,
    other_close: usize,
    no_close: usize,
    still_open: usize,
    messages: u64,
}

enum Ending {
    Close1013,
    OtherClose,
    NoClose,
    StillOpen,
}

/// Read every socket until `deadline`: what it was still sent, then how
/// its connection ended.
async fn drain(sockets: Vec<Ws>, deadline: Instant) -> Ends {
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut messages = 0u64;
                loop {
                    match tokio::time::timeout_at(deadline, ws.next()).await {
                        Err(_) => return (Ending::StillOpen, messages),
                        Ok(Some(Ok(Message::Close(Some(frame))))) if frame.code == CloseCode::Again => {
                            return (Ending::Close1013, messages);
                        }
                        Ok(Some(Ok(Message::Close(_)))) => return (Ending::OtherClose, messages),
                        Ok(Some(Ok(Message::Text(_)))) => messages += 1,
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(_))) | Ok(None) => return (Ending::NoClose, messages),
                    }
                }
            })
        })
        .collect();
    let mut ends = Ends::default();
    for task in tasks {
        let (ending, messages) = task.await.unwrap_or((Ending::NoClose, 0));
        ends.messages += messages;
        match ending {
            Ending::Close1013 => ends.close_1013 += 1,
            Ending::OtherClose => ends.other_close += 1,
            Ending::NoClose => ends.no_close += 1,
            Ending::StillOpen => ends.still_open += 1,
        }
    }
    ends
}

/// One try of another user subscribing to its own deployment's logs topic.
struct Probe {
    /// Seconds into the writes when it started (negative: before them).
    at_s: f64,
    /// `subscribed`, `error <code>`, or what went wrong.
    outcome: String,
    /// From sending `subscribe` to the reply (or to the failure).
    ms: f64,
}

/// Probes while the writes run (bounded by `duration` and MAX_PROBES).
async fn probe_loop(spec: ClientSpec, deployment: Uuid, duration: Duration) -> Vec<Probe> {
    let start = Instant::now();
    let end = start + duration;
    let mut next = start + PROBE_FIRST;
    let mut probes = Vec::new();
    while probes.len() < MAX_PROBES && next < end {
        tokio::time::sleep_until(next).await;
        let at_s = start.elapsed().as_secs_f64();
        let (outcome, ms) = probe(&spec, deployment).await;
        probes.push(Probe { at_s, outcome, ms });
        next = (next + PROBE_EVERY).max(Instant::now());
    }
    probes
}

/// (outcome, ms from `subscribe` to the reply), within SETUP_TIMEOUT.
async fn probe(spec: &ClientSpec, deployment: Uuid) -> (String, f64) {
    match tokio::time::timeout(SETUP_TIMEOUT, probe_once(spec, deployment)).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => (format!("failed: {e:#}"), f64::NAN),
        Err(_) => (format!("no reply within {} s", SETUP_TIMEOUT.as_secs()), f64::NAN),
    }
}

async fn probe_once(spec: &ClientSpec, deployment: Uuid) -> Result<(String, f64)> {
    let mut ws = open_with(spec, None).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "authenticated" {
        bail!("expected authenticated, got {first}");
    }
    let sent = Instant::now();
    let subscribe = json!({"type": "subscribe", "topic": format!("deployment_logs_{deployment}")});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    let reply = next_json(&mut ws).await?;
    let ms = sent.elapsed().as_secs_f64() * 1e3;
    let outcome = match reply["type"].as_str() {
        Some("subscribed") => "subscribed".to_string(),
        Some("error") => format!("error {}", reply["data"]["code"].as_str().unwrap_or("?")),
        _ => format!("unexpected {reply}"),
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    Ok((outcome, ms))
}
