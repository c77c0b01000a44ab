#!/usr/bin/env bash
# Old build against new, alternated in one run: the same bench scenario from
# two checkouts (each built with `cargo build --release --workspace --bins`),
# ROUNDS times each (default 3), old then new, on a private PostgreSQL
# cluster (wal_level = logical, autovacuum off) so both meet the same
# database; with FLUSH_DELAYS="0 1000" (µs, default 0) the whole round robin
# runs once per commit_delay (commit_siblings = 0: a slower WAL flush that
# still groups commits). Each run's JSON goes to OUT (default
# /tmp/ab.<time>/<old|new>-<delay>-<round>.json); one summary line per run.
#   usage: scripts/ab.sh OLD_CHECKOUT NEW_CHECKOUT [-o 'old-only args'] -- SCENARIO ARGS...
#   e.g.:  FLUSH_DELAYS="0 1000" scripts/ab.sh /work/old . -o '--source logical' -- s4 --writers 16
# Run as root (initdb runs as postgres).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); shift 2
old_args=""
if [ "${1:-}" = "-o" ]; then old_args=$2; shift 2; fi
[ "${1:-}" = "--" ] && shift
OUT=${OUT:-/tmp/ab.$(date +%s)}; mkdir -p "$OUT"
PORT=${PORT:-55511}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DIR=$(mktemp -d /tmp/ab-cluster.XXXX); chown postgres "$DIR"
su postgres -c "$BIN/initdb -D $DIR/data -A trust -U postgres >/dev/null"
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
wal_level = logical
max_connections = 500
shared_buffers = 256MB
autovacuum = off
CONF
su postgres -c "$BIN/pg_ctl -D $DIR/data -l $DIR/log -w start >/dev/null"
trap 'su postgres -c "$BIN/pg_ctl -D $DIR/data -m fast stop >/dev/null"; rm -rf $DIR' EXIT
export BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:$PORT/postgres
summary() { # json file: the figures a reader compares
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
def row(d, label):
    out = [label]
    if "with_triggers" in d:
        w, wo = d["with_triggers"]["writes_per_s"], d["without_triggers"]["writes_per_s"]
        out.append(f"writes/s {w:.0f} of {wo:.0f} without triggers ({100*w/wo:.0f} %)")
    if "windflow" in d and "latency_ms" in d["windflow"]:
        l = d["windflow"]["latency_ms"]
        out.append(f"p50 {l.get('p50')} p99 {l.get('p99')} ms")
    if "bare_listen" in d and isinstance(d["bare_listen"], dict) and "latency_ms" in d["bare_listen"]:
        out.append(f"floor p99 {d['bare_listen']['latency_ms'].get('p99')} ms")
    return "  ".join(out)
print(row(d, d.get("source", "")))
if "notify" in d:
    print("   " + row(d["notify"], "notify"))
PY
}
for delay in ${FLUSH_DELAYS:-0}; do
  psql -h 127.0.0.1 -p "$PORT" -U postgres -qAtc "ALTER SYSTEM SET commit_delay = $delay" \
    -c "ALTER SYSTEM SET commit_siblings = 0" -c "SELECT pg_reload_conf()" >/dev/null
  for round in $(seq 1 "${ROUNDS:-3}"); do
    for side in old new; do
      dir=$old; extra=$old_args; [ $side = new ] && { dir=$new; extra=""; }
      json=$OUT/$side-$delay-$round.json
      # shellcheck disable=SC2086
      (cd "$dir" && target/release/bench "$@" $extra --json "$json" > "$OUT/$side-$delay-$round.log" 2>&1) \
        || echo "  ($side run failed: see $OUT/$side-$delay-$round.log)"
      [ -f "$json" ] && echo "commit_delay=${delay}us round $round $side: $(summary "$json")"
    done
  done
done
echo "JSON and logs in $OUT"
