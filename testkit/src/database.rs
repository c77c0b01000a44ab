//! A fresh, empty database per test or benchmark run, dropped afterwards.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use uuid::Uuid;

/// A connected client; its connection runs on a task of its own.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.context("connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("database connection error: {e}");
        }
    });
    Ok(client)
}

/// A database of its own (`<prefix>_<uuid>`), empty: not even migrated.
/// Dropped by [`Database::drop_now`], or when the value is dropped.
pub struct Database {
    pub name: String,
    /// `postgres://…/<name>`, for a child process's `DATABASE_URL`.
    pub url: String,
    pub config: tokio_postgres::Config,
    admin_url: String,
    dropped: AtomicBool,
}

impl Database {
    /// A fresh database named `<prefix>_<uuid>` (`wf_test`, `wf_bench`: a
    /// leftover says who left it) on the server `admin_url` (a URL ending
    /// in `/<database>`) points to.
    pub async fn create_at(admin_url: &str, prefix: &str) -> Result<Database> {
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let admin: tokio_postgres::Config = admin_url.parse().with_context(|| format!("admin URL {admin_url}"))?;
        let Some((base, _)) = admin_url.rsplit_once('/') else {
            bail!("admin URL {admin_url} must end in /<database>")
        };
        let url = format!("{base}/{name}");
        connect(&admin)
            .await
            .context("PostgreSQL must be running")?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("create database {name}"))?;
        let mut config = admin;
        config.dbname(&name);
        Ok(Database { name, url, config, admin_url: admin_url.to_string(), dropped: AtomicBool::new(false) })
    }

    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.config).await
    }

    /// Drop the database now (whoever is still connected is disconnected).
    pub async fn drop_now(&self) -> Result<()> {
        if self.dropped.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        drop_database(&self.admin_url, &self.name).await
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let admin: tokio_postgres::Config = admin_url.parse()?;
    connect(&admin)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("drop database {name}"))
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.dropped.swap(true, Ordering::Relaxed) {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside a runtime, where blocking on one is not
        // allowed: a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&admin_url, &name))
        })
        .join();
    }
}
