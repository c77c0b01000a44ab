//! What windflow-notify's integration tests (`tests/common`) and its
//! benchmark (`bench/`) both need, written once: a fresh database per run
//! ([`Database`]), a private PostgreSQL cluster ([`Cluster`]), tokens
//! signed with a known secret, and plain HTTP and WebSocket reads.
//!
//! Everything returns `anyhow::Result`: the benchmark reports a failure
//! and cleans up; the tests' thin wrappers in `tests/common` turn it into
//! a panic that names what failed.

mod cluster;
mod database;
mod http;
pub mod sse;
mod ws;

use std::time::Duration;

use windflow_notify::auth::{self, TokenRequest, Viewer};

pub use cluster::Cluster;
pub use database::{Database, connect};
pub use http::{free_port, http_get, metric};
pub use ws::{next_json, upgrade_request};

/// The HS256 secret of every server the tests and the benchmark start.
pub const SECRET: &str = "test-secret";

/// The PostgreSQL server to create databases on: `$variable`
/// (`TEST_DATABASE_URL`, `BENCH_DATABASE_URL`), else the local one.
pub fn admin_url(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A token for `viewer`, signed with [`SECRET`], valid for `ttl`.
pub fn token(viewer: Viewer, ttl: Duration) -> anyhow::Result<String> {
    let request = TokenRequest { viewer, ttl, audience: None, issuer: None };
    Ok(auth::sign(&request, jsonwebtoken::Algorithm::HS256, Some(SECRET), None)?)
}
