//! `sql/schema.sql` is today's schema, as a migrated database has it: a
//! reader learns what the triggers do there, without replaying V1 to the
//! last migration. This test fails when it drifts from the migrations;
//! `scripts/schema.sh` (or `UPDATE_SCHEMA=1 cargo test --test schema`)
//! writes it again.

mod common;

use common::*;

const HEADER: &str = "\
-- Today's schema of windflow-notify's tables, functions and triggers, as a
-- database migrated with sql/V*.sql has it (pg_dump --schema-only). Generated:
-- do not edit. Change the schema with a new migration, then run
-- scripts/schema.sh; tests/schema.rs fails when this file and the migrations
-- disagree.
";

/// `pg_dump` of a freshly migrated database, without what changes from one
/// dump to the next (versions, the `\restrict` key).
async fn dump_of_a_migrated_database() -> String {
    let database = TestDatabase::create().await;
    windflow_notify::db::migrate(&database.config).await.expect("migrate");
    let output = tokio::process::Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--exclude-table=refinery_schema_history", "--dbname", &database.url])
        .output()
        .await
        .expect("pg_dump (PostgreSQL's client tools) must be installed");
    assert!(output.status.success(), "pg_dump: {}", String::from_utf8_lossy(&output.stderr));
    let dump = String::from_utf8(output.stdout).expect("UTF-8");
    let kept: Vec<&str> = dump
        .lines()
        .filter(|line| {
            !(line.starts_with("\\restrict")
                || line.starts_with("\\unrestrict")
                || line.starts_with("-- Dumped from")
                || line.starts_with("-- Dumped by"))
        })
        .collect();
    format!("{HEADER}{}\n", kept.join("\n").trim())
}

#[tokio::test]
async fn schema_sql_is_what_the_migrations_make() {
    let dumped = dump_of_a_migrated_database().await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &dumped).expect("write sql/schema.sql");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != dumped {
        let first = committed.lines().zip(dumped.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "sql/schema.sql differs from what the migrations make (first at line {}: {:?} vs {:?}); run scripts/schema.sh",
            first + 1,
            committed.lines().nth(first),
            dumped.lines().nth(first)
        );
    }
}
