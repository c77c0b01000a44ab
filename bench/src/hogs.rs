//! `bench hostile --replay-hogs 60,600`: can one user hold the replays?
//!
//! The second hostile review's attack: N connections of one user who may
//! see nothing, each pipelining `subscribe deployment_events since 0` over
//! a large event log, again and again. Beside them: S1's good clients and
//! writes, and another user who resumes its 10 events from the log (`since
//! 0`) every [`RESUME_EVERY`], timed from its `subscribe` to its tenth
//! event. One phase without hogs, then one per N, each on a fresh server
//! (an empty history, so every resume reads the log) over the same log.
//! The run fails only on events lost, duplicated or misrouted among the
//! good clients or the resumer; the figures to compare are the resume's
//! time and the good clients' p99, each against the phase without hogs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use windflow_notify::auth::Viewer;

use crate::clients::{ClientSpec, Transport, Ws, next_json, open_with, source_ip};
use crate::harness::{self, Database, Process};
use crate::report::{Delivery, Owed, print_table, round};
use crate::writers::WritePlan;
use crate::{connect_fleet, create_deployments, deliver_to, s1_clients, token, user, with_database, write_json};

/// How often the resumer resumes, during the writes.
const RESUME_EVERY: Duration = Duration::from_secs(2);
/// The resumer's events, written before the filler.
const RESUMER_EVENTS: usize = 10;
/// `subscribe … since 0` each hog keeps in flight.
const PIPELINED: usize = 8;
/// Bound on one resume.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Clone, Debug)]
pub struct HogArgs {
    /// Hog connections per phase, comma-separated (a phase without hogs comes first).
    #[arg(long, value_delimiter = ',')]
    pub replay_hogs: Vec<usize>,
    /// Rows of the event log (other users' events) before the first phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub hog_log_rows: i64,
}

pub async fn run(
    hogs: &HogArgs,
    good: usize,
    superusers: usize,
    rate: f64,
    duration: u64,
    writers: usize,
) -> Result<Value> {
    if hogs.replay_hogs.iter().any(|n| *n > 5000) || !(1..=10_000_000).contains(&hogs.hog_log_rows) {
        bail!("--replay-hogs are at most 5,000 each and --hog-log-rows 1..=10,000,000");
    }
    let hogs = hogs.clone();
    with_database(move |db| async move {
        let owners: Vec<Uuid> = (0..good - superusers).map(|_| Uuid::new_v4()).collect();
        let deployments = create_deployments(&db, &owners, None).await?;
        let resumer = Uuid::new_v4();
        let resumer_deployment = create_deployments(&db, &[resumer], None).await?[0];
        fill(&db, resumer_deployment, hogs.hog_log_rows).await?;
        let plan = WritePlan::mixed(writers, Some(rate), Duration::from_secs(duration), Arc::new(deployments.clone()));
        let mut phases = Vec::new();
        for n in std::iter::once(0).chain(hogs.replay_hogs.iter().copied()) {
            let phase = phase(&db, n, &owners, &deployments, superusers, resumer, &plan).await?;
            phases.push(phase);
        }
        let base = &phases[0];
        let rows: Vec<Delivery> = phases
            .iter()
            .map(|p| {
                let mut row = p.good.clone();
                row.name = format!("good, {} hogs", p.hogs);
                row
            })
            .collect();
        print_table(
            &format!(
                "replay hogs: {good} good clients ({superusers} superusers), {rate}/s writes for {duration} s, a log of \
                 {} rows; one user who may see nothing pipelining `deployment_events since 0` on N connections; \
                 another resuming its {RESUMER_EVENTS} events every {} s",
                hogs.hog_log_rows,
                RESUME_EVERY.as_secs()
            ),
            &rows,
        );
        let mut ok = true;
        let mut json_phases = Vec::new();
        for p in &phases {
            let resume_ratio = p.resume_median_ms() / base.resume_median_ms();
            let p99_ratio = p.good.p99_ms / base.good.p99_ms;
            println!(
                "{} hogs: resume of {RESUMER_EVENTS} events median {:.1} ms, max {:.1} ms ({} of {} complete; {:.2}x \
                 without hogs); good p99 {:.2}x without hogs; {} hog replays answered",
                p.hogs,
                p.resume_median_ms(),
                p.resume_max_ms(),
                p.resumes.iter().filter(|r| r.complete).count(),
                p.resumes.len(),
                resume_ratio,
                p99_ratio,
                p.hog_replays
            );
            let complete = p.resumes.iter().all(|r| r.complete) && !p.resumes.is_empty();
            ok &= !p.good.failed() && complete;
            json_phases.push(json!({
                "hogs": p.hogs, "good": p.good.json(), "writes": p.writes,
                "resume_ms": p.resumes.iter().map(|r| round(r.ms)).collect::<Vec<_>>(),
                "resume_median_ms": round(p.resume_median_ms()), "resume_ratio": round(resume_ratio),
                "good_p99_ratio": round(p99_ratio), "hog_replays_answered": p.hog_replays,
                "resumes_complete": complete,
            }));
        }
        Ok(json!({
            "scenario": "hostile-replay-hogs", "good": good, "superusers": superusers, "rate": rate,
            "duration_s": duration, "log_rows": hogs.hog_log_rows, "phases": json_phases, "ok": ok,
        }))
    })
    .await
}

/// The resumer's events, then `rows` events of other users, straight into
/// the log (as its owner: the bench's role), in one statement.
async fn fill(db: &Database, resumer_deployment: Uuid, rows: i64) -> Result<()> {
    let client = harness::connect(&db.config).await?;
    for i in 0..RESUMER_EVENTS {
        client
            .execute(
                "INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)",
                &[&resumer_deployment, &format!("resumer line {i}")],
            )
            .await
            .context("the resumer's events")?;
    }
    let started = harness::now_ns();
    client
        .execute(
            "INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
             SELECT 'DEPLOYMENT_PROGRESS', gen_random_uuid(), gen_random_uuid(),
                    CASE WHEN g % 2 = 0 THEN gen_random_uuid() END,
                    json_build_object('progress', g % 100, 'current_step', 'filler', 'total_steps', 100)
               FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .context("fill the event log")?;
    client.batch_execute("ANALYZE windflow_events").await?;
    eprintln!("bench: event log filled with {rows} rows in {:.1} s", (harness::now_ns() - started) as f64 / 1e9);
    Ok(())
}

struct Phase {
    hogs: usize,
    good: Delivery,
    writes: Value,
    resumes: Vec<Resume>,
    hog_replays: u64,
}

impl Phase {
    fn resume_times(&self) -> Vec<f64> {
        let mut ms: Vec<f64> = self.resumes.iter().map(|r| r.ms).collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    fn resume_median_ms(&self) -> f64 {
        let ms = self.resume_times();
        ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn resume_max_ms(&self) -> f64 {
        self.resume_times().last().copied().unwrap_or(f64::NAN)
    }
}

struct Resume {
    ms: f64,
    complete: bool,
}

async fn phase(
    db: &Database,
    hogs: usize,
    owners: &[Uuid],
    deployments: &[Uuid],
    superusers: usize,
    resumer: Uuid,
    plan: &WritePlan,
) -> Result<Phase> {
    let server = Process::server(db, &format!("/tmp/{}-hogs{hogs}.log", db.name)).await?;
    let servers = std::slice::from_ref(&server);
    let clients = s1_clients(servers, owners, deployments, superusers)?;
    let (specs, owed): (Vec<ClientSpec>, Vec<Owed>) = clients.into_iter().unzip();
    let first_source = specs.len();
    let fleet = connect_fleet(specs).await?;
    // One user who owns nothing, in an organization that holds nothing.
    let hog = Viewer { user_id: Uuid::new_v4(), organization_id: Some(Uuid::new_v4()), is_superuser: false };
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut hog_tasks = Vec::new();
    for i in 0..hogs {
        let spec = ClientSpec {
            target: server.addr,
            source: source_ip(first_source + i),
            token: Some(token(hog)?),
            subscribe: vec![],
            min_len: 0,
            transport: Transport::WebSocket,
        };
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        hog_tasks.push(tokio::spawn(async move { hog_loop(spec, stop, answered).await }));
    }
    let resumer_spec = ClientSpec {
        target: server.addr,
        source: source_ip(first_source + hogs),
        token: Some(token(user(resumer))?),
        subscribe: vec![],
        min_len: 0,
        transport: Transport::WebSocket,
    };
    let resumes = resume_loop(resumer_spec, plan.duration);
    let outcome = deliver_to(db, servers, fleet, &owed, plan, resumes).await;
    stop.store(true, Relaxed);
    for task in hog_tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("bench: a hog ended: {e:#}"),
            Err(e) => eprintln!("bench: a hog task: {e}"),
        }
    }
    if let Err(e) = server.stop().await {
        eprintln!("bench: stopping the server: {e:#}");
    }
    let (good, _, writes, resumes) = outcome?;
    Ok(Phase { hogs, good, writes: write_json(&writes), resumes, hog_replays: answered.load(Relaxed) })
}

/// Keep [`PIPELINED`] `subscribe deployment_events since 0` in flight
/// until `stop`, counting the `subscribed` answers.
async fn hog_loop(spec: ClientSpec, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) -> Result<()> {
    let mut ws = open_with(&spec, None).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "authenticated" {
        bail!("expected authenticated, got {first}");
    }
    let subscribe = json!({"type": "subscribe", "topic": "deployment_events", "since": 0}).to_string();
    for _ in 0..PIPELINED {
        ws.send(Message::Text(subscribe.clone().into())).await?;
    }
    while !stop.load(Relaxed) {
        let message = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(None) => bail!("the server closed a hog's connection"),
            Ok(Some(message)) => message?,
        };
        if let Message::Text(text) = message
            && serde_json::from_str::<Value>(text.as_str()).is_ok_and(|v| v["type"] == "subscribed")
        {
            answered.fetch_add(1, Relaxed);
            ws.send(Message::Text(subscribe.clone().into())).await?;
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Every [`RESUME_EVERY`] during `duration`: the resumer connects, resumes
/// `deployment_events` from 0, and is timed to its tenth event.
async fn resume_loop(spec: ClientSpec, duration: Duration) -> Vec<Resume> {
    let end = Instant::now() + duration;
    let mut resumes = Vec::new();
    while Instant::now() < end {
        let started = Instant::now();
        let complete = match tokio::time::timeout(RESUME_TIMEOUT, resume_once(&spec)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                eprintln!("bench: a resume failed: {e:#}");
                false
            }
            Err(_) => false,
        };
        resumes.push(Resume { ms: started.elapsed().as_secs_f64() * 1e3, complete });
        tokio::time::sleep_until(started + RESUME_EVERY).await;
    }
    resumes
}

async fn resume_once(spec: &ClientSpec) -> Result<()> {
    let mut ws: Ws = open_with(spec, None).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "authenticated" {
        bail!("expected authenticated, got {first}");
    }
    let subscribe = json!({"type": "subscribe", "topic": "deployment_events", "since": 0}).to_string();
    ws.send(Message::Text(subscribe.into())).await?;
    let mut seen = 0;
    while seen < RESUMER_EVENTS {
        let message = next_json(&mut ws).await?;
        if message["type"] == "DEPLOYMENT_LOGS_UPDATE"
            && message["data"]["logs"].as_str().is_some_and(|logs| logs.starts_with("resumer line"))
        {
            seen += 1;
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
