//! `windflow-notify check`: one line per check, `FAIL` with the fix for
//! each problem, exit status 1 when there is one. Each failing case is
//! made for real on a database of its own.

mod common;

use std::process::Command;

use common::*;

/// A login role of its own, dropped when the value is (declare it before
/// the databases it owns, so they are dropped first).
/// `database`'s URL, as `user` when given.
fn url_as(database: &TestDatabase, user: Option<&str>) -> String {
    match user {
        None => database.url.clone(),
        Some(user) => database.url.replacen("postgres@", &format!("{user}@"), 1),
    }
}

/// `check` against `url` with a connection count this machine holds.
fn check(url: &str) -> (i32, String) {
    let (code, stdout, stderr) =
        output_of(windflow_command(&["check"], &[("DATABASE_URL", url), ("WINDFLOW_MAX_CONNECTIONS", "100")]));
    assert_eq!(stderr, "", "findings go to stdout");
    (code, stdout)
}

fn migrate(url: &str) {
    let (code, _, stderr) = output_of(windflow_command(&["migrate"], &[("DATABASE_URL", url)]));
    assert_eq!(code, 0, "migrate: {stderr}");
}

/// A fresh database, migrated by the tests' own role (a superuser), and a client on it.
async fn migrated_database() -> (TestDatabase, tokio_postgres::Client) {
    let database = TestDatabase::create().await;
    migrate(&database.url);
    let client = database.client().await;
    (database, client)
}

/// The one line of `verdict` about `what`.
fn line<'a>(report: &'a str, verdict: &str, what: &str) -> &'a str {
    let prefix = format!("{verdict}  {what}: ");
    let lines: Vec<&str> = report.lines().filter(|line| line.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 1, "one {verdict} line about {what} in:\n{report}");
    lines[0]
}

fn problems(report: &str) -> usize {
    report.lines().filter(|line| line.starts_with("FAIL")).count()
}

/// A migrated database owned by a role that is not a superuser, which
/// ran the migrations: what a production setup looks like.
async fn ready_database(role: &Role) -> TestDatabase {
    let database = TestDatabase::create().await;
    admin_client()
        .await
        .batch_execute(&format!("ALTER DATABASE {} OWNER TO {}", database.name, role.name))
        .await
        .expect("give the database to the role");
    migrate(&url_as(&database, Some(&role.name)));
    database
}

#[tokio::test]
async fn a_ready_database_passes_every_check() {
    let role = Role::create().await;
    let database = ready_database(&role).await;
    let (code, report) = check(&url_as(&database, Some(&role.name)));
    assert_eq!(code, 0, "{report}");
    let lines: Vec<&str> = report.lines().collect();
    let (last, checks) = lines.split_last().expect("a report");
    assert_eq!(*last, "check: ready (0 warnings)", "{report}");
    assert!(checks.iter().all(|line| line.starts_with("ok ")), "{report}");
    for what in ["database", "migrations", "role", "open files"] {
        line(&report, "ok  ", what);
    }
    assert_eq!(report.matches("ok    trigger: ").count(), windflow_notify::check::TRIGGERS.len(), "{report}");
    assert!(report.contains("ok    notify: a NOTIFY reached a LISTEN"), "{report}");
}

#[test]
fn an_unreachable_database_is_one_failure_naming_database_url() {
    let (code, report) = check("postgres://postgres@127.0.0.1:1/none");
    assert_eq!(code, 1, "{report}");
    assert_eq!(problems(&report), 1, "{report}");
    let failure = line(&report, "FAIL", "database");
    assert!(failure.contains("DATABASE_URL") && failure.contains("127.0.0.1:1"), "{failure}");
    assert!(report.ends_with("check: not ready (0 warnings): fix each FAIL above\n"), "{report}");
}

#[tokio::test]
async fn an_unmigrated_database_says_to_migrate_once() {
    let database = TestDatabase::create().await;
    let (code, report) = check(&database.url);
    assert_eq!(code, 1, "{report}");
    assert_eq!(problems(&report), 1, "one problem, not one per missing object: {report}");
    assert!(line(&report, "FAIL", "migrations").contains("windflow-notify migrate"), "{report}");
}

#[tokio::test]
async fn a_pending_or_unknown_migration_is_named() {
    let (database, client) = migrated_database().await;
    client.batch_execute("DELETE FROM refinery_schema_history WHERE version = 2").await.expect("forget V2");
    let (code, report) = check(&database.url);
    assert_eq!(code, 1, "{report}");
    let pending = line(&report, "FAIL", "migrations");
    assert!(pending.contains("1 pending (V2__events)") && pending.contains("migrate"), "{pending}");

    client
        .batch_execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (2, 'events', '', '0'),
             (999, 'from_the_future', '', '1')",
        )
        .await
        .expect("record V2 changed and a newer migration");
    let (code, report) = check(&database.url);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("FAIL  migrations: V999__from_the_future is applied but unknown to this binary"),
        "{report}"
    );
    assert!(report.contains("FAIL  migrations: V2__events differs from the one applied"), "{report}");
}

#[tokio::test]
async fn a_disabled_or_missing_trigger_fails_with_the_fix() {
    let (database, client) = migrated_database().await;
    client.batch_execute("ALTER TABLE deployment_logs DISABLE TRIGGER deployment_logs_events").await.expect("disable");
    client.batch_execute("DROP TRIGGER deployments_changed_events ON deployments").await.expect("drop");
    let (code, report) = check(&database.url);
    assert_eq!(code, 1, "{report}");
    assert_eq!(problems(&report), 2, "{report}");
    assert!(
        report.contains(
            "FAIL  trigger: deployment_logs_events on deployment_logs is disabled: writes to deployment_logs make no events; ALTER TABLE deployment_logs ENABLE TRIGGER deployment_logs_events"
        ),
        "{report}"
    );
    assert!(report.contains("FAIL  trigger: deployments_changed_events on deployments is missing"), "{report}");
    assert!(report.contains("ok    trigger: deployments_touch_updated_at on deployments is enabled"), "{report}");

    client
        .batch_execute("ALTER TABLE deployment_logs ENABLE REPLICA TRIGGER deployment_logs_events")
        .await
        .expect("replica");
    let (_, report) = check(&database.url);
    assert!(report.contains("deployment_logs_events on deployment_logs fires only in replica sessions"), "{report}");
}

#[tokio::test]
async fn a_role_that_does_not_own_the_event_log_fails_and_a_superuser_is_warned() {
    let stranger = Role::create().await;
    let database = TestDatabase::create().await;
    migrate(&database.url);

    let (code, report) = check(&url_as(&database, Some(&stranger.name)));
    assert_eq!(code, 1, "{report}");
    let failure = line(&report, "FAIL", "role");
    assert!(
        failure.contains(&format!("is owned by postgres, not by {}", stranger.name))
            && failure.contains(&format!("GRANT postgres TO {}", stranger.name)),
        "{failure}"
    );

    // The tests' own role is a superuser: it works, with a warning.
    let (code, report) = check(&database.url);
    assert_eq!(code, 0, "a warning is not a failure: {report}");
    assert!(line(&report, "WARN", "role").contains("postgres is a superuser"), "{report}");
    assert!(report.ends_with("check: ready (1 warning)\n"), "{report}");
}

#[tokio::test]
async fn a_role_limited_to_one_connection_fails_the_notify_round_trip() {
    let role = Role::create().await;
    let database = ready_database(&role).await;
    admin_client().await.batch_execute(&format!("ALTER ROLE {} CONNECTION LIMIT 1", role.name)).await.expect("limit");
    let (code, report) = check(&url_as(&database, Some(&role.name)));
    assert_eq!(code, 1, "{report}");
    assert_eq!(problems(&report), 1, "{report}");
    let failure = line(&report, "FAIL", "notify");
    assert!(
        failure.contains("cannot open a second connection to LISTEN on") && failure.contains("too many connections"),
        "{failure}"
    );
}

#[tokio::test]
async fn an_open_file_limit_below_the_connections_is_named_with_the_fix() {
    let database = TestDatabase::create().await;
    migrate(&database.url);
    let url = database.url.as_str();
    // Past any hard limit: a failure.
    let (code, report, _) =
        output_of(windflow_command(&["check"], &[("DATABASE_URL", url), ("WINDFLOW_MAX_CONNECTIONS", "1000000000")]));
    assert_eq!(code, 1, "{report}");
    let failure = line(&report, "FAIL", "open files");
    assert!(
        failure.contains("cannot hold WINDFLOW_MAX_CONNECTIONS=1000000000") && failure.contains("LimitNOFILE="),
        "{failure}"
    );
    // A soft limit the hard one could raise: a warning.
    let mut lowered = Command::new("sh");
    lowered
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" check", env!("CARGO_BIN_EXE_windflow-notify")])
        .env_clear()
        .envs([("DATABASE_URL", url), ("WINDFLOW_MAX_CONNECTIONS", "1000")]);
    let (code, report, _) = output_of(lowered);
    assert_eq!(code, 0, "{report}");
    let warning = line(&report, "WARN", "open files");
    assert!(warning.contains("the soft limit (256)") && warning.contains("at least 1064"), "{warning}");
}
