//! PostgreSQL: the pool, migrations, the event feed ([`feed`]: where
//! events enter), and the queries sessions run on the event log
//! ([`events`]).

pub mod events;
pub mod feed;
pub mod retention;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// A tokio-postgres error with what PostgreSQL said, or the I/O cause:
/// its own Display is only "db error" or "error connecting to server".
pub fn describe(error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (error.as_db_error(), error.source()) {
        (Some(db), _) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

/// What went wrong on an event source's connection, for its log line: an
/// error PostgreSQL answered (a refused query, a terminated backend) or a
/// connection that broke.
pub(crate) fn source_failure(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(_) => format!("PostgreSQL said {}", describe(error)),
        None => format!("connection lost: {}", describe(error)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL: `{0}` is not a PostgreSQL URL; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE")]
    Scheme(String),
    #[error(
        "DATABASE_URL: cannot be read ({}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        describe(.0)
    )]
    Url(tokio_postgres::Error),
    #[error(
        "DATABASE_URL: database \"{name}\" does not exist on {server}; create it with `{createdb}`, or run `windflow-notify demo`, which creates it"
    )]
    MissingDatabase { name: String, server: String, createdb: String },
    #[error("DATABASE_URL: cannot connect to PostgreSQL at {server}: {}; {hint}", describe(.cause))]
    Connect { server: String, cause: tokio_postgres::Error, hint: &'static str },
    #[error("migration failed: {0}")]
    Migrate(#[from] refinery::Error),
    #[error("database query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(
        "the database is a standby (pg_is_in_recovery() is true): LISTEN cannot work there; point DATABASE_URL at the primary"
    )]
    Standby,
    #[error("the event log's replay limits are closed (shutting down)")]
    Closed,
}

pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    // Name the scheme only: the rest of the URL may hold a password.
    if let Some((scheme, _)) = url.split_once("://")
        && !matches!(scheme, "postgres" | "postgresql")
    {
        return Err(DbError::Scheme(format!("{scheme}://")));
    }
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true).keepalives_idle(Duration::from_secs(10));
    Ok(config)
}

/// The pool for everything but LISTEN: permission checks, replays, pruning.
pub fn pool(config: &tokio_postgres::Config) -> Pool {
    let mut config = config.clone();
    config.application_name("windflow-notify");
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    // Builds only fail without a runtime or with a zero size; neither applies.
    Pool::builder(manager)
        .max_size(16)
        .wait_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap_or_else(|e| unreachable!("pool configuration is static: {e}"))
}

/// Connect one client outside the pool, driving its connection on a task
/// that ends when the client is dropped.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, DbError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| connect_error(config, e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %describe(&e), "database connection ended with an error");
        }
    });
    Ok(client)
}

/// `host:port` of the first server in `config`, as a person would type it.
fn server_of(config: &tokio_postgres::Config) -> (String, u16) {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// A failed connection, with what to do about the usual causes.
pub(crate) fn connect_error(config: &tokio_postgres::Config, source: tokio_postgres::Error) -> DbError {
    let (host, port) = server_of(config);
    let server = format!("{host}:{port}");
    let code = source.as_db_error().map(|db| db.code().clone());
    let hint = match code {
        Some(code) if code == SqlState::INVALID_CATALOG_NAME => {
            let name = config.get_dbname().unwrap_or("postgres").to_string();
            let user = config.get_user().unwrap_or("postgres");
            let createdb = format!("createdb -h {host} -p {port} -U {user} {}", quote_for_shell(&name));
            return DbError::MissingDatabase { name, server, createdb };
        }
        Some(code) if code == SqlState::INVALID_PASSWORD || code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "check the user and password in DATABASE_URL"
        }
        Some(code) if code == SqlState::TOO_MANY_CONNECTIONS => "PostgreSQL has no connection to spare; retry later",
        Some(_) => "check DATABASE_URL",
        None => "is PostgreSQL running there, and are host and port in DATABASE_URL right?",
    };
    DbError::Connect { server, cause: source, hint }
}

/// `name` as one shell word.
fn quote_for_shell(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        name.to_string()
    } else {
        format!("'{}'", name.replace('\'', r"'\''"))
    }
}

/// Apply pending migrations. An advisory lock keeps several instances that
/// start together from racing on them.
pub async fn migrate(config: &tokio_postgres::Config) -> Result<(), DbError> {
    let mut client = connect(config).await?;
    refuse_standby(&client).await?;
    client.execute("SELECT pg_advisory_lock(7262018450731)", &[]).await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    client.execute("SELECT pg_advisory_unlock(7262018450731)", &[]).await?;
    let report = report?;
    for migration in report.applied_migrations() {
        info!(migration = %migration, "migration applied");
    }
    Ok(())
}

pub async fn refuse_standby(client: &Client) -> Result<(), DbError> {
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
    if row.get::<_, bool>(0) { Err(DbError::Standby) } else { Ok(()) }
}

/// Create the database named in `config` if it does not exist, connecting
/// to the `postgres` database of the same server to do it.
pub async fn create_database_if_missing(config: &tokio_postgres::Config) -> Result<bool, DbError> {
    let name = config.get_dbname().unwrap_or("postgres").to_string();
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await?;
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        client.batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&name))).await?;
        info!(database = %name, "database created");
    }
    Ok(!exists)
}

/// Quote an SQL identifier, doubling embedded quotes.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_of_another_database_names_its_scheme_only() {
        let error = parse_url("mysql://root:hunter2@db/app").map(|_| ()).unwrap_err().to_string();
        assert!(error.starts_with("DATABASE_URL: `mysql://` is not a PostgreSQL URL; expected postgres://"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(parse_url("postgresql://u@h/d").is_ok() && parse_url("host=localhost dbname=d").is_ok());
    }

    #[test]
    fn database_names_are_quoted_for_the_shell() {
        assert_eq!(quote_for_shell("windflow"), "windflow");
        assert_eq!(quote_for_shell("it's"), r"'it'\''s'");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("windflow"), "\"windflow\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
