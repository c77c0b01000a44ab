//! `windflow-notify check`: is this database, and this machine, ready for
//! `serve`? It changes nothing. It prints one line per check (`ok`,
//! `WARN` or `FAIL`, then what was found and, for a problem, the fix) and
//! exits 1 when any check failed, so it can gate a deployment.
//!
//! The names it checks come from the constants below, in one place: a
//! migration that renames or adds a trigger changes [`TRIGGERS`] here.

use std::future::poll_fn;
use std::num::NonZeroUsize;
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

use crate::config::{DatabaseArgs, ServerArgs};
use crate::db::{self, describe};

/// The triggers that make events, and the one that keeps `updated_at`
/// (whose value the status events carry): (table, trigger).
pub const TRIGGERS: &[(&str, &str)] = &[
    ("deployments", "deployments_created_events"),
    ("deployments", "deployments_changed_events"),
    ("deployment_logs", "deployment_logs_events"),
    ("deployments", "deployments_touch_updated_at"),
    ("windflow_events", "windflow_events_truncated"),
];
/// The event log, which the server's role must own.
pub const EVENT_LOG: &str = "windflow_events";
/// refinery's record of the migrations applied.
pub const MIGRATIONS_TABLE: &str = "refinery_schema_history";
/// The round trip's channel: one of its own, never `windflow_events`,
/// where every running server would count it as a forged notification.
const ROUND_TRIP_CHANNEL: &str = "windflow_check";
/// How long the round trip's notification may take.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);
/// Files the server holds open besides one socket per client: the pool
/// (16), the event source, the listening socket, the runtime's own.
pub const RESERVED_FILES: u64 = 64;
/// The notification queue's usage above which `check` warns: NOTIFY
/// fails for every writer when it is full.
const QUEUE_WARN: f64 = 0.5;

/// The settings of `serve`, so `check` runs with the server's environment
/// as it is; it reads the database and `WINDFLOW_MAX_CONNECTIONS`.
#[derive(clap::Args, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but an operator should know.
    Warn,
    /// `serve` would fail, or lose or refuse events.
    Fail,
}

/// One line of the report.
#[derive(Debug)]
pub struct Finding {
    pub verdict: Verdict,
    /// What was checked, one word (`migrations`, `trigger`).
    pub what: &'static str,
    pub said: String,
}

impl Finding {
    fn new(verdict: Verdict, what: &'static str, said: impl Into<String>) -> Finding {
        Finding { verdict, what, said: said.into() }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{verdict}  {}: {}", self.what, self.said)
    }
}

/// Run every check, printing each finding as it comes; false when one failed.
pub async fn run(args: &CheckArgs) -> bool {
    let mut failed = false;
    let mut warned = 0;
    for finding in findings(args).await {
        println!("{finding}");
        failed |= finding.verdict == Verdict::Fail;
        warned += usize::from(finding.verdict == Verdict::Warn);
    }
    let warnings = if warned == 1 { "1 warning".to_string() } else { format!("{warned} warnings") };
    if failed {
        println!("check: not ready ({warnings}): fix each FAIL above");
    } else {
        println!("check: ready ({warnings})");
    }
    !failed
}

/// Every check's findings, in order.
pub async fn findings(args: &CheckArgs) -> Vec<Finding> {
    let mut findings = database(&args.database.database_url).await;
    findings.push(open_files(args.server.max_connections, &std::fs::read_to_string("/proc/self/limits")));
    findings
}

/// The checks that need the database.
async fn database(url: &str) -> Vec<Finding> {
    let connected = match db::parse_url(url) {
        Ok(config) => db::connect(&config).await.map(|client| (config, client)),
        Err(e) => Err(e),
    };
    let (config, client) = match connected {
        Ok(connected) => connected,
        Err(e) => return vec![Finding::new(Verdict::Fail, "database", e.to_string())],
    };
    // A query PostgreSQL refuses fails its own check; the others go on.
    let refused = |what: &'static str, e: tokio_postgres::Error| {
        Finding::new(Verdict::Fail, what, format!("cannot check: {}", describe(&e)))
    };
    let mut findings = vec![connection(&client).await.unwrap_or_else(|e| refused("database", e))];
    let none_applied = match migrations(&client).await {
        Ok(migrated) => {
            findings.extend(migrated.findings);
            migrated.none_applied
        }
        Err(e) => {
            findings.push(refused("migrations", e));
            false
        }
    };
    // Without a single migration, the triggers and the event log are
    // missing too: the migrations' line says it once.
    if !none_applied {
        for (table, trigger) in TRIGGERS {
            findings.push(trigger_enabled(&client, table, trigger).await.unwrap_or_else(|e| refused("trigger", e)));
        }
        findings.push(role(&client).await.unwrap_or_else(|e| refused("role", e)));
    }
    findings.push(round_trip(&client, &config).await);
    findings.push(queue(&client).await.unwrap_or_else(|e| refused("notify", e)));
    findings
}

async fn connection(client: &Client) -> Result<Finding, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, current_setting('server_version'), pg_is_in_recovery()",
            &[],
        )
        .await?;
    let (user, database, version): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    if row.get::<_, bool>(3) {
        return Ok(Finding::new(
            Verdict::Fail,
            "database",
            format!(
                "{database} is a standby (pg_is_in_recovery() is true): LISTEN and writes cannot work there; point DATABASE_URL at the primary"
            ),
        ));
    }
    Ok(Finding::new(Verdict::Ok, "database", format!("connected to {database} as {user} (PostgreSQL {version})")))
}

struct Migrated {
    findings: Vec<Finding>,
    none_applied: bool,
}

/// Compare refinery's table with the migrations embedded in this binary.
async fn migrations(client: &Client) -> Result<Migrated, tokio_postgres::Error> {
    let fail = |said: String| Finding::new(Verdict::Fail, "migrations", said);
    let exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&MIGRATIONS_TABLE]).await?;
    if !exists.get::<_, bool>(0) {
        let said = format!(
            "none applied ({MIGRATIONS_TABLE} does not exist), so no tables, triggers or event log: run `windflow-notify migrate` (serve also does it at start)"
        );
        return Ok(Migrated { findings: vec![fail(said)], none_applied: true });
    }
    let applied: Vec<(i64, String, String)> = client
        .query(&format!("SELECT version::int8, name, checksum FROM {MIGRATIONS_TABLE} ORDER BY version"), &[])
        .await?
        .iter()
        .map(|row| {
            (
                row.get(0),
                row.get::<_, Option<String>>(1).unwrap_or_default(),
                row.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        })
        .collect();
    let runner = db::migrations();
    let known: Vec<(i64, &str, u64)> =
        runner.get_migrations().iter().map(|m| (i64::from(m.version()), m.name(), m.checksum())).collect();
    let problems = compare_migrations(&applied, &known);
    let findings = if problems.is_empty() {
        vec![Finding::new(Verdict::Ok, "migrations", format!("all {} applied, none changed", known.len()))]
    } else {
        problems.into_iter().map(fail).collect()
    };
    Ok(Migrated { findings, none_applied: false })
}

/// What is wrong between the migrations applied (`version, name,
/// checksum` as refinery stores them) and those this binary embeds.
fn compare_migrations(applied: &[(i64, String, String)], known: &[(i64, &str, u64)]) -> Vec<String> {
    let mut problems = Vec::new();
    let pending: Vec<String> = known
        .iter()
        .filter(|(version, ..)| !applied.iter().any(|(v, ..)| v == version))
        .map(|(version, name, _)| format!("V{version}__{name}"))
        .collect();
    if !pending.is_empty() {
        problems.push(format!(
            "{} pending ({}): run `windflow-notify migrate` (serve also does it at start)",
            pending.len(),
            pending.join(", ")
        ));
    }
    for (version, name, checksum) in applied {
        match known.iter().find(|(v, ..)| v == version) {
            None => problems.push(format!(
                "V{version}__{name} is applied but unknown to this binary: the database was migrated by a newer windflow-notify; run that version"
            )),
            Some((_, _, expected)) if checksum != &expected.to_string() => problems.push(format!(
                "V{version}__{name} differs from the one applied (checksum {checksum}, this binary's {expected}): the database was migrated by another build; run the build that migrated it"
            )),
            Some(_) => {}
        }
    }
    problems
}

async fn trigger_enabled(client: &Client, table: &str, trigger: &str) -> Result<Finding, tokio_postgres::Error> {
    let what = "trigger";
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL,
                    (SELECT tgenabled::text FROM pg_trigger
                     WHERE tgrelid = to_regclass($1) AND tgname = $2 AND NOT tgisinternal)",
            &[&table, &trigger],
        )
        .await?;
    let enable = format!("ALTER TABLE {table} ENABLE TRIGGER {trigger}");
    Ok(match (row.get::<_, bool>(0), row.get::<_, Option<String>>(1).as_deref()) {
        (false, _) => {
            Finding::new(Verdict::Fail, what, format!("table {table} does not exist: run `windflow-notify migrate`"))
        }
        (true, None) => Finding::new(
            Verdict::Fail,
            what,
            format!(
                "{trigger} on {table} is missing: writes to {table} make no events; run `windflow-notify migrate`, or restore it"
            ),
        ),
        (true, Some("O" | "A")) => Finding::new(Verdict::Ok, what, format!("{trigger} on {table} is enabled")),
        (true, Some("R")) => Finding::new(
            Verdict::Fail,
            what,
            format!("{trigger} on {table} fires only in replica sessions: ordinary writes make no events; {enable}"),
        ),
        (true, Some(_)) => Finding::new(
            Verdict::Fail,
            what,
            format!("{trigger} on {table} is disabled: writes to {table} make no events; {enable}"),
        ),
    })
}

/// The server's role owns the event log (it reads what only the owner may),
/// and had better not be a superuser.
async fn role(client: &Client) -> Result<Finding, tokio_postgres::Error> {
    let what = "role";
    let row = client
        .query_one(
            "SELECT current_user::text,
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    (SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = to_regclass($1)),
                    (SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = to_regclass($1))",
            &[&EVENT_LOG],
        )
        .await?;
    let user: String = row.get(0);
    let superuser = row.get::<_, Option<bool>>(1).unwrap_or(false);
    let owner: Option<String> = row.get(2);
    let has_owners_rights = row.get::<_, Option<bool>>(3).unwrap_or(false);
    Ok(match owner {
        None => Finding::new(
            Verdict::Fail,
            what,
            format!("the event log {EVENT_LOG} does not exist: run `windflow-notify migrate`"),
        ),
        Some(_) if superuser => Finding::new(
            Verdict::Warn,
            what,
            format!(
                "{user} is a superuser: the server needs only to own the event log; run it as a role that is not (create one, let it own the database, and migrate as it), so a leaked DATABASE_URL reaches less"
            ),
        ),
        Some(owner) if owner == user => {
            Finding::new(Verdict::Ok, what, format!("{user} owns the event log and is not a superuser"))
        }
        Some(owner) if has_owners_rights => Finding::new(
            Verdict::Ok,
            what,
            format!("{user} has the rights of {owner}, the event log's owner, and is not a superuser"),
        ),
        Some(owner) => Finding::new(
            Verdict::Fail,
            what,
            format!(
                "the event log {EVENT_LOG} is owned by {owner}, not by {user}, the role DATABASE_URL names: the server reads what only the owner may; connect as {owner} (the role that ran the migrations), or GRANT {owner} TO {user}"
            ),
        ),
    })
}

/// NOTIFY from one session reaches a LISTEN in another, as the triggers'
/// notifications must reach the server.
async fn round_trip(client: &Client, config: &tokio_postgres::Config) -> Finding {
    let what = "notify";
    let channel = format!("{ROUND_TRIP_CHANNEL}_{}", Uuid::new_v4().simple());
    let fail = |said: String| Finding::new(Verdict::Fail, what, said);
    let mut config = config.clone();
    config.application_name("windflow-notify-check");
    let (listener, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            return fail(format!(
                "cannot open a second connection to LISTEN on: {}; the server needs one for LISTEN beside its pool (up to 17 in all)",
                describe(&e)
            ));
        }
    };
    let nonce = Uuid::new_v4().to_string();
    let arrived = async {
        // Driven here, not spawned: notifications come through poll_message
        // only, and the connection ends with this check.
        let statement = format!("LISTEN {channel}");
        let listen = listener.batch_execute(&statement);
        let mut listen = std::pin::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                done = &mut listen, if !listening => {
                    done.map_err(|e| format!("LISTEN refused: {}", describe(&e)))?;
                    listening = true;
                    client
                        .execute("SELECT pg_notify($1, $2)", &[&channel, &nonce])
                        .await
                        .map_err(|e| format!("NOTIFY refused: {}", describe(&e)))?;
                }
                message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == channel && n.payload() == nonce => {
                        return Ok(());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("the LISTEN connection failed: {}", describe(&e))),
                    None => return Err("the LISTEN connection closed".to_string()),
                },
            }
        }
    };
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, arrived).await {
        Ok(Ok(())) => Finding::new(Verdict::Ok, what, "a NOTIFY reached a LISTEN in another session"),
        Ok(Err(problem)) => fail(problem),
        Err(_) => fail(format!(
            "a NOTIFY did not reach a LISTEN in another session within {ROUND_TRIP_TIMEOUT:?}: is DATABASE_URL a pooler in transaction mode (LISTEN needs a session of its own)?"
        )),
    }
}

async fn queue(client: &Client) -> Result<Finding, tokio_postgres::Error> {
    let usage: f64 = client.query_one("SELECT pg_notification_queue_usage()", &[]).await?.get(0);
    let percent = format!("{:.1}%", usage * 100.0);
    Ok(if usage > QUEUE_WARN {
        Finding::new(
            Verdict::Warn,
            "notify",
            format!(
                "the notification queue is {percent} full: a session that LISTENs but does not read (or a transaction open for hours) holds it; when it is full every writer's commit fails"
            ),
        )
    } else {
        Finding::new(Verdict::Ok, "notify", format!("the notification queue is {percent} full"))
    })
}

/// The open-file limit of this process (read from `limits`, the text of
/// `/proc/self/limits`) against what `max_connections` clients need.
fn open_files(max_connections: NonZeroUsize, limits: &std::io::Result<String>) -> Finding {
    let what = "open files";
    let needed = max_connections.get() as u64 + RESERVED_FILES;
    let Some((soft, hard)) = limits.as_ref().ok().and_then(|text| max_open_files(text)) else {
        return Finding::new(Verdict::Warn, what, "cannot read this process's limit (/proc/self/limits): not checked");
    };
    let show = |limit: Option<u64>| limit.map_or("unlimited".to_string(), |n| n.to_string());
    let holds = |limit: Option<u64>| limit.is_none_or(|n| n >= needed);
    let connections = max_connections.get();
    if holds(soft) {
        return Finding::new(
            Verdict::Ok,
            what,
            format!(
                "the limit ({}) holds WINDFLOW_MAX_CONNECTIONS={connections} plus {RESERVED_FILES} for the server itself",
                show(soft)
            ),
        );
    }
    let raise = format!(
        "raise it to at least {needed} for the server (LimitNOFILE= in its systemd unit, --ulimit nofile= for a container, ulimit -n in a shell), or lower WINDFLOW_MAX_CONNECTIONS"
    );
    if holds(hard) {
        Finding::new(
            Verdict::Warn,
            what,
            format!(
                "the soft limit ({}) is below WINDFLOW_MAX_CONNECTIONS={connections} plus {RESERVED_FILES}; the hard limit ({}) allows it: {raise}",
                show(soft),
                show(hard)
            ),
        )
    } else {
        Finding::new(
            Verdict::Fail,
            what,
            format!(
                "the limit (soft {}, hard {}) cannot hold WINDFLOW_MAX_CONNECTIONS={connections} plus {RESERVED_FILES}: clients past it are refused at accept; {raise}",
                show(soft),
                show(hard)
            ),
        )
    }
}

/// (soft, hard) of "Max open files" in `/proc/self/limits`; `None` is unlimited.
fn max_open_files(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    let mut values = line.trim_start_matches("Max open files").split_whitespace();
    let mut limit = || -> Option<Option<u64>> {
        match values.next()? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some((limit()?, limit()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     \n\
        Max processes             95636                95636                processes \n\
        Max open files            1024                 524288               files     \n";

    fn count(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        assert_eq!(max_open_files(LIMITS), Some((Some(1024), Some(524_288))));
        assert_eq!(max_open_files("Max open files  unlimited  unlimited  files"), Some((None, None)));
        assert_eq!(max_open_files("nothing here"), None);
    }

    #[test]
    fn the_open_file_limit_must_hold_the_connections_and_the_server() {
        let limits = Ok(LIMITS.to_string());
        assert_eq!(open_files(count(1024 - RESERVED_FILES as usize), &limits).verdict, Verdict::Ok);
        assert_eq!(open_files(count(1024), &limits).verdict, Verdict::Warn, "the hard limit allows it");
        let fail = open_files(count(524_288), &limits);
        assert_eq!(fail.verdict, Verdict::Fail);
        assert!(fail.said.contains("LimitNOFILE") && fail.said.contains("524352"), "{fail}");
        let unreadable = Err(std::io::Error::other("no /proc"));
        assert_eq!(open_files(count(1), &unreadable).verdict, Verdict::Warn);
    }

    #[test]
    fn migrations_pending_unknown_or_changed_are_named() {
        let known = [(1, "schema", 11), (2, "events", 22)];
        let applied = |rows: &[(i64, &str, &str)]| -> Vec<(i64, String, String)> {
            rows.iter().map(|(v, n, c)| (*v, n.to_string(), c.to_string())).collect()
        };
        assert!(compare_migrations(&applied(&[(1, "schema", "11"), (2, "events", "22")]), &known).is_empty());
        let pending = compare_migrations(&applied(&[(1, "schema", "11")]), &known);
        assert!(
            pending.len() == 1 && pending[0].contains("V2__events") && pending[0].contains("migrate"),
            "{pending:?}"
        );
        let newer = compare_migrations(&applied(&[(1, "schema", "11"), (2, "events", "22"), (3, "x", "3")]), &known);
        assert!(newer.len() == 1 && newer[0].contains("V3__x") && newer[0].contains("newer"), "{newer:?}");
        let changed = compare_migrations(&applied(&[(1, "schema", "99"), (2, "events", "22")]), &known);
        assert!(
            changed.len() == 1 && changed[0].contains("V1__schema") && changed[0].contains("differs"),
            "{changed:?}"
        );
    }
}
