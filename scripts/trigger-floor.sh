#!/usr/bin/env bash
# How far a slimmer event log could take logical mode (BENCHMARKS.md, "The
# floor of a trigger-written log"): pgbench, 4 clients, S4's mix (1 status
# change, 2 progress updates, 2 log lines in 5 one-row transactions) on 64
# deployments, 10 s a round, on a private PostgreSQL cluster with
# wal_level = logical, in logical mode. Three trigger variants, alternated
# ROUNDS times, first with a server streaming, then without one:
#   as-built  the migrations' triggers;
#   slimmest  one INSERT per event, nothing else: no per-deployment locks,
#             no SECURITY DEFINER, no mode lookup, no index but the
#             primary key (what no correct design can undercut: it keeps
#             neither the per-deployment order nor the writers' privileges);
#   off       the triggers disabled.
# Run as root (initdb runs as postgres). DUR=seconds and ROUNDS=n change
# the run.
PORT=${PORT:-55442}
CLUSTER_CONF="autovacuum = off"
source "$(dirname "$0")/lib/pgbench-cluster.sh"
DATABASE_URL=$URL $SRV event-source logical >&2

# The variants, as SQL that puts the database in that state.
$P -Atc "SELECT string_agg(pg_get_functiondef(f::regproc) || ';', E'\n')
           FROM unnest(ARRAY['windflow_deployment_events', 'windflow_deployment_log_events']) f" > $DIR/as-built-functions.sql
cat > $DIR/as-built.sql <<SQL
\i $DIR/as-built-functions.sql
CREATE INDEX IF NOT EXISTS windflow_events_deployment_id_idx ON windflow_events (deployment_id, id);
ALTER TABLE deployments ENABLE TRIGGER deployments_events;
ALTER TABLE deployment_logs ENABLE TRIGGER deployment_logs_events;
SQL
cat > $DIR/slimmest.sql <<'SQL'
CREATE OR REPLACE FUNCTION windflow_deployment_log_events() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
    SELECT 'DEPLOYMENT_LOGS_UPDATE', d.id, d.user_id, d.organization_id, json_build_object(
        'deployment_id', NEW.deployment_id, 'logs', NEW.message,
        'timestamp', windflow_utc(NEW.created_at), 'append', true)
    FROM deployments d WHERE d.id = NEW.deployment_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION windflow_deployment_events() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
        VALUES ('DEPLOYMENT_STATUS_CHANGED', NEW.id, NEW.user_id, NEW.organization_id, json_build_object(
            'deployment_id', NEW.id, 'status', NEW.status,
            'old_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            'timestamp', windflow_utc(NEW.updated_at), 'user_id', NEW.user_id,
            'name', NEW.name, 'error_message', NEW.error_message));
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.progress, NEW.current_step, NEW.total_steps)
            IS DISTINCT FROM (OLD.progress, OLD.current_step, OLD.total_steps) THEN
        INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
        VALUES ('DEPLOYMENT_PROGRESS', NEW.id, NEW.user_id, NEW.organization_id, json_build_object(
            'deployment_id', NEW.id, 'progress', NEW.progress, 'current_step', NEW.current_step,
            'total_steps', NEW.total_steps, 'timestamp', windflow_utc(NEW.updated_at)));
    END IF;
    RETURN NULL;
END $$;
DROP INDEX IF EXISTS windflow_events_deployment_id_idx;
ALTER TABLE deployments ENABLE TRIGGER deployments_events;
ALTER TABLE deployment_logs ENABLE TRIGGER deployment_logs_events;
SQL
cat > $DIR/off.sql <<'SQL'
ALTER TABLE deployments DISABLE TRIGGER deployments_events;
ALTER TABLE deployment_logs DISABLE TRIGGER deployment_logs_events;
SQL
cp scripts/lib/s4-mix.sql $DIR/mix.sql
rounds() { # label
  for round in $(seq 1 ${ROUNDS:-3}); do
    for variant in as-built slimmest off; do
      $P -f $DIR/$variant.sql >/dev/null 2>&1
      tps=$(pgbench -h 127.0.0.1 -p $PORT -U postgres -n -M prepared -c 4 -j 2 -T ${DUR:-10} -f $DIR/mix.sql windflow 2>/dev/null | grep -oP 'tps = \K[0-9.]+' | head -1)
      echo "$1 $variant round$round $tps"
    done
  done
}
HTTP=127.0.0.1:$((PORT + 1))
DATABASE_URL=$URL JWT_SECRET_KEY=trigger-floor-secret WINDFLOW_BIND=$HTTP $SRV serve >$DIR/serve.log 2>&1 &
for _ in $(seq 1 100); do curl -sf http://$HTTP/healthz >/dev/null && break; sleep 0.2; done
curl -sf http://$HTTP/healthz >/dev/null || { echo "the server did not come up; see $DIR/serve.log" >&2; exit 1; }
rounds served
kill %1; wait %1 2>/dev/null || true
rounds unserved
