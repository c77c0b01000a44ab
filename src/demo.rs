//! `windflow-notify demo`: the server plus a simulator, for a first look.
//!
//! The simulator is an ordinary writer: it has its own PostgreSQL
//! connection and only INSERTs and UPDATEs rows, exactly what a WindFlow
//! API server or Celery worker does. Every event the dashboard shows
//! therefore went through the triggers, the event log, the listener and
//! the hub like any other.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::auth::{self, KeyError, TokenRequest, Verifier, Viewer};
use crate::config::{self, BindError, JwtArgs, ServerArgs};
use crate::db::{self, DbError};

/// Long enough to leave the dashboard open for a day.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// What a restarted demo keeps: its cast and, when `JWT_SECRET_KEY` is
/// unset, the secret it generated, so that a dashboard left open keeps
/// its token and its cards. A table of the demo's database, not a
/// migration: a real deployment never has it.
const STATE: &str = "
    CREATE TABLE IF NOT EXISTS windflow_demo (
        singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        user_id         uuid NOT NULL,
        organization_id uuid NOT NULL,
        teammate        uuid NOT NULL,
        stranger        uuid NOT NULL,
        stranger_org    uuid NOT NULL,
        -- The HMAC secret of the printed tokens while JWT_SECRET_KEY is unset.
        jwt_secret      text
    );
    REVOKE ALL ON windflow_demo FROM PUBLIC;";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Serve(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("JWT_ALGORITHM: the demo signs its own token, so it needs HS256, HS384 or HS512 (got {0:?})")]
    Algorithm(Algorithm),
}

/// Who the simulated deployments belong to.
struct Cast {
    /// The user whose token is printed.
    you: Viewer,
    /// A member of your organization: you see their deployments by subscribing.
    teammate: Uuid,
    /// Someone in another organization: you never see theirs.
    stranger: Uuid,
    stranger_org: Uuid,
}

/// One simulated deployment and how its lives go.
struct Slot {
    id: Uuid,
    name: &'static str,
    image: &'static str,
    /// Lives 0, `fail_every`, 2 × `fail_every`… fail at the health check (0: never).
    fail_every: u32,
}

/// Create the database if needed, migrate, serve, and simulate until
/// `shutdown` is cancelled (Ctrl-C). A second run on the same database
/// carries on with the first one's user, deployments and secret.
pub async fn run(
    database: tokio_postgres::Config,
    mut jwt: JwtArgs,
    settings: ServerArgs,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    if !matches!(jwt.jwt_algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(DemoError::Algorithm(jwt.jwt_algorithm));
    }
    db::create_database_if_missing(&database).await?;
    // Migrate before the simulator writes; `serve` finds nothing left to do.
    db::migrate(&database).await?;
    let listener = config::listen(settings.bind).await?;
    let address = listener.local_addr().unwrap_or(settings.bind);

    let writer = db::connect(&database).await?;
    writer.batch_execute(STATE).await.map_err(DbError::from)?;
    let cast = cast(&writer).await?;
    // Without JWT_SECRET_KEY, the secret the first run generated.
    let secret_kept = jwt.jwt_secret_key.as_deref().is_none_or(str::is_empty);
    if secret_kept {
        // Two v4 UUIDs: 244 random bits, plenty for a throwaway HMAC key.
        let fresh = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        let kept: String = writer
            .query_one("UPDATE windflow_demo SET jwt_secret = coalesce(jwt_secret, $1) RETURNING jwt_secret", &[&fresh])
            .await
            .map_err(DbError::from)?
            .get(0);
        jwt.jwt_secret_key = Some(kept);
    }
    let verifier = Verifier::from_args(&jwt)?;
    let token = auth::sign(
        &TokenRequest {
            viewer: cast.you,
            ttl: TOKEN_TTL,
            audience: jwt.jwt_audience.clone(),
            issuer: jwt.jwt_issuer.clone(),
        },
        jwt.jwt_algorithm,
        jwt.jwt_secret_key.as_deref(),
        None,
    )?;
    let (slots, resumed) = deployments(&writer, &cast).await?;
    drop(writer);
    print_banner(address, &token, &database, &cast, &slots, secret_kept, resumed);

    let server = async {
        let result = crate::serve(listener, &database, settings, verifier, shutdown.clone()).await;
        // Whatever ended the server also ends the simulator.
        shutdown.cancel();
        result
    };
    let first_life = u32::from(resumed);
    let (served, ()) = tokio::join!(server, simulate(&database, &slots, first_life, &shutdown));
    served.map_err(|e| DemoError::Serve(Box::new(e)))
}

/// The demo's cast: the one an earlier run of this database chose, or a new one.
async fn cast(client: &Client) -> Result<Cast, DbError> {
    client
        .execute(
            "INSERT INTO windflow_demo (user_id, organization_id, teammate, stranger, stranger_org)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (singleton) DO NOTHING",
            &[&Uuid::new_v4(), &Uuid::new_v4(), &Uuid::new_v4(), &Uuid::new_v4(), &Uuid::new_v4()],
        )
        .await?;
    let row = client
        .query_one("SELECT user_id, organization_id, teammate, stranger, stranger_org FROM windflow_demo", &[])
        .await?;
    Ok(Cast {
        you: Viewer { user_id: row.get(0), organization_id: Some(row.get(1)), is_superuser: false },
        teammate: row.get(2),
        stranger: row.get(3),
        stranger_org: row.get(4),
    })
}

/// The five simulated deployments: those an earlier run created for this
/// cast, and any missing, created now. True when all five existed.
async fn deployments(client: &Client, cast: &Cast) -> Result<(Vec<Slot>, bool), DbError> {
    let org = cast.you.organization_id;
    let plan: [(&str, &str, u32, Uuid, Option<Uuid>); 5] = [
        ("api-gateway", "traefik:v3.1", 0, cast.you.user_id, org),
        ("web-frontend", "nginx:1.27-alpine", 0, cast.you.user_id, org),
        ("billing-worker", "python:3.12-slim", 2, cast.you.user_id, org),
        ("docs-site", "caddy:2.8", 0, cast.teammate, org),
        ("other-org-db", "postgres:16", 0, cast.stranger, Some(cast.stranger_org)),
    ];
    let mut slots = Vec::with_capacity(plan.len());
    let mut resumed = true;
    for (name, image, fail_every, owner, organization) in plan {
        let existing = client
            .query_opt(
                "SELECT id FROM deployments WHERE user_id = $1 AND name = $2 ORDER BY created_at LIMIT 1",
                &[&owner, &name],
            )
            .await?;
        let row = match existing {
            Some(row) => row,
            None => {
                resumed = false;
                client
                    .query_one(
                        "INSERT INTO deployments (user_id, organization_id, name) VALUES ($1, $2, $3) RETURNING id",
                        &[&owner, &organization, &name],
                    )
                    .await?
            }
        };
        slots.push(Slot { id: row.get(0), name, image, fail_every });
    }
    Ok((slots, resumed))
}

fn print_banner(
    address: SocketAddr,
    token: &str,
    database: &tokio_postgres::Config,
    cast: &Cast,
    slots: &[Slot],
    secret_kept: bool,
    resumed: bool,
) {
    let shown = if address.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
    } else {
        address
    };
    let binary = std::env::current_exe()
        .ok()
        .and_then(|path| path.to_str().map(str::to_string))
        .unwrap_or_else(|| "windflow-notify".into());
    let psql = psql_command(database);
    let first = slots.first().map(|slot| slot.id).unwrap_or_default();
    println!();
    if resumed {
        println!("windflow-notify demo: carrying on with this database's demo (same user, same deployments).");
    } else {
        println!("windflow-notify demo: simulated deployments are now writing rows to PostgreSQL.");
    }
    println!();
    println!("  Dashboard (open in a browser):");
    println!("    http://{shown}/?token={token}");
    println!();
    println!("  The same events in a terminal:");
    println!("    {binary} tail --url ws://{shown}/ws --topic deployment_events --since 0 --token {token}");
    println!();
    println!("  Make an event by hand (it shows up in both):");
    println!(
        "    {psql} -c \"INSERT INTO deployment_logs (deployment_id, message) VALUES ('{first}', '[INFO] hello from psql')\""
    );
    println!(
        "    {psql} -c \"INSERT INTO deployments (user_id, organization_id, name) VALUES ('{}', '{}', 'my-app')\"",
        cast.you.user_id,
        cast.you.organization_id.unwrap_or_default()
    );
    println!();
    println!(
        "  You are user {} in organization {}; `other-org-db` belongs to another organization, so you never see it.",
        cast.you.user_id,
        cast.you.organization_id.unwrap_or_default()
    );
    if secret_kept {
        println!(
            "  JWT_SECRET_KEY is unset: the token is signed with a secret the demo generated and keeps in the table windflow_demo of this database, so it stays valid when the demo restarts."
        );
    }
    println!("  Ctrl-C stops everything.");
    println!();
}

/// A `psql` invocation for the demo's database, without the password.
fn psql_command(database: &tokio_postgres::Config) -> String {
    let host = database
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = database.get_ports().first().copied().unwrap_or(5432);
    let user = database.get_user().unwrap_or("postgres");
    let dbname = database.get_dbname().unwrap_or(user);
    format!("psql -h {host} -p {port} -U {user} {dbname}")
}

/// Drive every slot until shutdown; after a lost connection, reconnect
/// and start the lives over.
async fn simulate(database: &tokio_postgres::Config, slots: &[Slot], first_life: u32, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        let outcome: Result<(), String> = async {
            let (client, connection) = database.connect(NoTls).await.map_err(|e| e.to_string())?;
            // The connection is driven here rather than spawned, so it ends with the simulator.
            tokio::select! {
                ended = connection => Err(ended.err().map_or("the server closed the connection".into(), |e| e.to_string())),
                result = run_slots(&client, slots, first_life, shutdown) => result.map_err(|e| e.to_string()),
            }
        }
        .await;
        if let Err(e) = outcome {
            warn!(error = %e, "demo writer failed; retrying in 2 s");
            if !pause(Duration::from_secs(2), shutdown).await {
                return;
            }
        }
    }
}

/// Drive each slot's lives from `first_life` (1 after a restart: the
/// deployments start over from pending, wherever the last run left them).
async fn run_slots(
    client: &Client,
    slots: &[Slot],
    first_life: u32,
    shutdown: &CancellationToken,
) -> Result<(), DbError> {
    let lives = slots.iter().enumerate().map(|(index, slot)| async move {
        // Staggered, so the deployments are not all at the same step.
        if !pause(Duration::from_millis(1500 * index as u64), shutdown).await {
            return Ok::<(), DbError>(());
        }
        let mut life = first_life;
        while live(client, slot, life, shutdown).await? {
            life += 1;
        }
        Ok(())
    });
    for result in futures_util::future::join_all(lives).await {
        result?;
    }
    info!("demo simulator stopped");
    Ok(())
}

const STEPS: [&str; 6] = [
    "Validating stack",
    "Pulling images",
    "Creating network",
    "Creating volumes",
    "Starting containers",
    "Running health checks",
];

/// One life of a deployment: pending, deploying step by step, then running
/// or failed, then a pause. Returns false once shutdown is requested.
async fn live(client: &Client, slot: &Slot, life: u32, shutdown: &CancellationToken) -> Result<bool, DbError> {
    let id = &slot.id;
    let log = |message: String| async move {
        client.execute("INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)", &[id, &message]).await
    };
    if life > 0 {
        client
            .execute(
                "UPDATE deployments SET status = 'pending', progress = 0, current_step = 'Queued', error_message = NULL WHERE id = $1",
                &[id],
            )
            .await?;
        log(format!("[INFO] Redeploy #{life} of {} requested", slot.name)).await?;
    }
    if !pause(between(1000, 2500), shutdown).await {
        return Ok(false);
    }
    let total = STEPS.len() as i32;
    client
        .execute(
            "UPDATE deployments SET status = 'deploying', progress = 0, current_step = $2, total_steps = $3 WHERE id = $1",
            &[id, &STEPS[0], &total],
        )
        .await?;
    log(format!("[INFO] Deploying {} ({})", slot.name, slot.image)).await?;
    let fails = slot.fail_every > 0 && life.is_multiple_of(slot.fail_every);
    for index in 0..STEPS.len() {
        if !pause(between(700, 1600), shutdown).await {
            return Ok(false);
        }
        for line in step_logs(slot, index) {
            log(line).await?;
        }
        if fails && index == STEPS.len() - 1 {
            let error = format!("Health check failed: {} did not answer on :8080 within 30s", slot.name);
            client
                .execute("UPDATE deployments SET status = 'failed', error_message = $2 WHERE id = $1", &[id, &error])
                .await?;
            log(format!("[ERROR] {error}")).await?;
            return Ok(pause(between(8000, 14000), shutdown).await);
        }
        let progress = ((index as i32 + 1) * 100 / total).min(100);
        let next = STEPS.get(index + 1).copied().unwrap_or("Done");
        client
            .execute("UPDATE deployments SET progress = $2, current_step = $3 WHERE id = $1", &[id, &progress, &next])
            .await?;
    }
    client.execute("UPDATE deployments SET status = 'running', current_step = 'Running' WHERE id = $1", &[id]).await?;
    log(format!("[INFO] {} is running", slot.name)).await?;
    Ok(pause(between(8000, 14000), shutdown).await)
}

fn step_logs(slot: &Slot, step: usize) -> Vec<String> {
    match step {
        0 => vec![format!("[INFO] Stack {} validated: 1 service, 2 volumes", slot.name)],
        1 => vec![format!("[INFO] Pulling {}", slot.image), format!("[INFO] {}: Pull complete", slot.image)],
        2 => vec![format!("[INFO] Network {}_default created", slot.name)],
        3 => vec![format!("[INFO] Volume {}_data created", slot.name)],
        4 => vec![
            format!("[INFO] Container {}-1 created", slot.name),
            format!("[INFO] Container {}-1 started", slot.name),
        ],
        _ => vec![format!("[INFO] Waiting for {} to become healthy", slot.name)],
    }
}

/// Sleep unless shutdown comes first; false when it did.
async fn pause(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

/// A human-looking delay of `low_ms` up to (not including) `high_ms`.
fn between(low_ms: u64, high_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(low_ms..high_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_command_names_the_database_without_the_password() {
        let config =
            db::parse_url("postgres://alice:secret@db.example:6543/windflow").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(psql_command(&config), "psql -h db.example -p 6543 -U alice windflow");
    }

    #[test]
    fn delays_stay_in_range() {
        for _ in 0..1000 {
            let delay = between(700, 1600);
            assert!(delay >= Duration::from_millis(700) && delay < Duration::from_millis(1600));
        }
    }
}
