#!/usr/bin/env bash
# What the triggers cost writers, in each event source (BENCHMARKS.md,
# "pgbench probe"): pgbench, 16 clients, one-row transactions on 64
# deployments (log inserts, then progress updates), 10 s a round, two
# rounds each, on a private PostgreSQL cluster with wal_level = logical:
# notify mode with a server attached, logical mode with a server
# streaming, then the triggers disabled. Run as root (initdb runs as
# postgres). DUR=seconds and ROUNDS="1 2" change the run.
PORT=${PORT:-55432}
source "$(dirname "$0")/lib/pgbench-cluster.sh"
cat > $DIR/logs.sql <<'S'
\set n random(1, 64)
INSERT INTO deployment_logs (deployment_id, message) SELECT id, 'pgbench line' FROM pgb_ids WHERE n = :n;
S
cat > $DIR/progress.sql <<'S'
\set n random(1, 64)
\set p random(0, 100)
UPDATE deployments SET progress = :p WHERE id = (SELECT id FROM pgb_ids WHERE n = :n);
S
bench() { # label
  for w in logs progress; do
    for round in ${ROUNDS:-1 2}; do
      tps=$(pgbench -h 127.0.0.1 -p $PORT -U postgres -n -c 16 -j 2 -T ${DUR:-10} -f $DIR/$w.sql windflow 2>/dev/null | grep -oP 'tps = \K[0-9.]+' | head -1)
      echo "$1 $w round$round ${tps}"
    done
  done
}
HTTP=127.0.0.1:$((PORT + 1))
serve() { # mode: start a server and wait until its event source is up
  DATABASE_URL=$URL JWT_SECRET_KEY=pgbench-modes-secret WINDFLOW_BIND=$HTTP $SRV serve >$DIR/serve-$1.log 2>&1 &
  for _ in $(seq 1 100); do curl -sf http://$HTTP/healthz >/dev/null && return; sleep 0.2; done
  echo "the server did not come up in $1 mode; see $DIR/serve-$1.log" >&2; exit 1
}
serve notify; bench "notify(A)"; kill %1; wait %1 2>/dev/null || true
DATABASE_URL=$URL $SRV event-source logical >&2
serve logical; bench "logical"; kill %1; wait %1 2>/dev/null || true
psql -h 127.0.0.1 -p $PORT -U postgres windflow -qc "ALTER TABLE deployments DISABLE TRIGGER deployments_events" -c "ALTER TABLE deployment_logs DISABLE TRIGGER USER"
bench "no-triggers(C)"
