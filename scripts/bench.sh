#!/usr/bin/env bash
# Run one benchmark scenario (BENCHMARKS.md): scripts/bench.sh s1 [options]
# Scenarios: s1 s2 s3 s4 s5 hostile faults smoke; `scripts/bench.sh s1 --help` lists options.
# Needs PostgreSQL (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

# The bench (bench/, a workspace member) and the server it runs, side by side.
cargo build --release --locked --workspace --bins >&2
# Many connections: as many file descriptors as allowed (the tool raises its
# soft limit to the hard one too), and a wide ephemeral port range when the
# kernel lets us (the tool also spreads clients over 127.0.0.x sources).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ -w /proc/sys/net/ipv4/ip_local_port_range ]; then
    echo "1024 65535" >/proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
fi
exec "${CARGO_TARGET_DIR:-target}/release/bench" "$@"
