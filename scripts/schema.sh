#!/usr/bin/env bash
# Write sql/schema.sql again from the migrations (a fresh database,
# migrated, then pg_dump --schema-only): after adding a migration.
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE_SCHEMA=1 cargo test --locked --test schema -- --quiet
git diff --stat sql/schema.sql
