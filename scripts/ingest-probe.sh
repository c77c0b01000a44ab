#!/usr/bin/env bash
# What the triggers cost writers, design against design, at this machine's
# WAL flush and at an emulated 1 ms flush (commit_delay = 1000,
# commit_siblings = 0: each flush waits 1 ms, commits still group, as on a
# cloud volume). A private PostgreSQL cluster, no server attached: pgbench
# runs S4's mix (1 status change, 2 progress updates, 2 log lines in 5
# one-row transactions) on 64 deployments, CLIENTS clients (default "4 16"),
# DUR seconds a run (default 8), ROUNDS rounds (default 2), variants
# alternated within each round. Prints tps per run, then the median of
# each variant as a share of `off`.
#   off      the triggers disabled (the write alone)
#   v7       the migrations up to V7: signed NOTIFY per event, per-deployment locks
#   v8       the migrations up to V8: ids at commit, wake-up NOTIFY, 4 indexes
#   v8-2idx  V8 without the two visibility indexes (owner, organization)
#   v8-now   V8 with the triggers fired at each row (not deferred to commit)
#   v8-nopin V8 without the trigger functions' pinned search_path (its cost)
#   v8-adv   V8 with the wake-up taken as pg_try_advisory_xact_lock, not a row lock
#   v8-lean  all three: no visibility indexes, no pin, the advisory wake-up
#   base     the migrations of the commit BASE (default HEAD), to weigh a
#            change of the working tree's against it
# Run as root (initdb runs as postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-55462}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DIR=$(mktemp -d /tmp/ingest-probe.XXXX); chown postgres "$DIR"
su postgres -c "$BIN/initdb -D $DIR/data -A trust -U postgres >/dev/null"
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = 100
shared_buffers = 256MB
autovacuum = off
CONF
su postgres -c "$BIN/pg_ctl -D $DIR/data -l $DIR/log -w start >/dev/null"
trap 'su postgres -c "$BIN/pg_ctl -D $DIR/data -m immediate stop >/dev/null"; rm -rf $DIR' EXIT
P() { PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -p "$PORT" -U postgres -qAtX -v ON_ERROR_STOP=1 "$@"; }
setup() { # database, highest migration, [directory of the migrations]
  P -c "CREATE DATABASE $1"
  for f in $(ls "${3:-sql}"/V*__*.sql | sort -V); do
    v=$(basename "$f" | sed -E 's/^V([0-9]+)__.*/\1/')
    [ "$v" -le "$2" ] && P -d "$1" -f "$f" >/dev/null 2>&1
  done
  P -d "$1" -c "INSERT INTO deployments (user_id, organization_id, name) SELECT gen_random_uuid(), gen_random_uuid(), 'd'||g FROM generate_series(1,64) g" \
    -c "CREATE TABLE pgb_ids AS SELECT row_number() OVER (ORDER BY id) AS n, id FROM deployments" -c "ALTER TABLE pgb_ids ADD PRIMARY KEY (n)"
}
setup v7 7
setup v8 8
mkdir -p "$DIR/base-sql"
git archive "${BASE:-HEAD}" sql | tar -x -C "$DIR/base-sql" --strip-components=1
setup base 100 "$DIR/base-sql"
P -d v8 -Atc "SELECT string_agg(format('CREATE TRIGGER %I AFTER %s ON %I FOR EACH ROW %s EXECUTE FUNCTION %s()', t.tgname || '_now',
    CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' ELSE 'INSERT' END, c.relname,
    coalesce('WHEN ' || substring(pg_get_triggerdef(t.oid) FROM 'WHEN (\(.*\)) EXECUTE'), ''), p.proname), E';\n') || ';'
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
  WHERE t.tgconstraint <> 0 AND p.proname LIKE 'windflow%' AND c.relname IN ('deployments', 'deployment_logs')" > "$DIR/now.sql"
P -d v8 -f "$DIR/now.sql"
P -d v8 -Atc "SELECT string_agg(pg_get_functiondef(f::regprocedure) || ';', E'\n')
  FROM unnest(ARRAY['windflow_record(text,uuid,uuid,uuid,json)', 'windflow_deployment_events()',
                    'windflow_deployment_log_events()']) f" > "$DIR/v8-functions.sql"
# windflow_record comes first: its wake-up test is the first IF NOT FOUND.
sed 's/PERFORM FROM windflow_wakeup FOR UPDATE SKIP LOCKED;/PERFORM WHERE false;/;
     0,/IF NOT FOUND THEN/s//IF NOT pg_try_advisory_xact_lock(2003201652, 1) THEN/' "$DIR/v8-functions.sql" > "$DIR/advisory.sql"
P -d v8 -c "ALTER TABLE deployments DISABLE TRIGGER deployments_created_events_now, DISABLE TRIGGER deployments_changed_events_now" \
        -c "ALTER TABLE deployment_logs DISABLE TRIGGER deployment_logs_events_now"
cp scripts/lib/s4-mix.sql "$DIR/mix.sql"
triggers() { # database, ENABLE|DISABLE, which: deferred|now
  local suffix=""; [ "$3" = now ] && suffix=_now
  P -d "$1" -c "ALTER TABLE deployments $2 TRIGGER deployments_created_events$suffix, $2 TRIGGER deployments_changed_events$suffix" \
            -c "ALTER TABLE deployment_logs $2 TRIGGER deployment_logs_events$suffix"
}
variant() { # name -> prints the database to run on, after putting it in that state
  case $1 in
    off) P -d v8 -c "ALTER TABLE deployments DISABLE TRIGGER USER" -c "ALTER TABLE deployment_logs DISABLE TRIGGER USER"
         P -d v8 -c "ALTER TABLE deployments ENABLE TRIGGER deployments_touch_updated_at"; echo v8 ;;
    v7) echo v7 ;;
    base) echo base ;;
    v8|v8-2idx|v8-now|v8-nopin|v8-adv|v8-lean)
      P -d v8 -f "$DIR/v8-functions.sql" >/dev/null
      case $1 in
        v8-nopin|v8-lean) P -d v8 -c "ALTER FUNCTION windflow_deployment_events() RESET search_path" \
                          -c "ALTER FUNCTION windflow_deployment_log_events() RESET search_path" ;;
      esac
      case $1 in
        v8-adv|v8-lean) P -d v8 -f "$DIR/advisory.sql" >/dev/null ;;
      esac
      P -d v8 -c "ALTER TABLE deployments DISABLE TRIGGER USER" -c "ALTER TABLE deployment_logs DISABLE TRIGGER USER"
      P -d v8 -c "ALTER TABLE deployments ENABLE TRIGGER deployments_touch_updated_at"
      if [ "$1" = v8-now ]; then triggers v8 ENABLE now; else triggers v8 ENABLE deferred; fi
      if [ "$1" = v8-2idx ] || [ "$1" = v8-lean ]; then
        P -d v8 -c "DROP INDEX IF EXISTS windflow_events_user_id_idx" -c "DROP INDEX IF EXISTS windflow_events_organization_id_idx"
      else
        P -d v8 -c "CREATE INDEX IF NOT EXISTS windflow_events_user_id_idx ON windflow_events (user_id, id)" \
          -c "CREATE INDEX IF NOT EXISTS windflow_events_organization_id_idx ON windflow_events (organization_id, id) WHERE organization_id IS NOT NULL"
      fi
      echo v8 ;;
  esac
}
VARIANTS=${VARIANTS:-off v7 v8 v8-2idx v8-now}
declare -A tps
for delay in 0 1000; do
  P -c "ALTER SYSTEM SET commit_delay = $delay" -c "ALTER SYSTEM SET commit_siblings = 0" -c "SELECT pg_reload_conf()" >/dev/null
  for c in ${CLIENTS:-4 16}; do
    for round in $(seq 1 "${ROUNDS:-2}"); do
      for v in $VARIANTS; do
        db=$(variant "$v" | tail -n 1)
        t=$(pgbench -h 127.0.0.1 -p "$PORT" -U postgres -n -M prepared -c "$c" -j 2 -T "${DUR:-8}" -f "$DIR/mix.sql" "$db" 2>/dev/null | grep -oP 'tps = \K[0-9.]+' | head -1)
        echo "flush_delay_us=$delay clients=$c round=$round $v $t"
        tps[$delay,$c,$v]="${tps[$delay,$c,$v]:-} $t"
      done
    done
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
printf '%-10s' variant; for delay in 0 1000; do for c in ${CLIENTS:-4 16}; do printf '%20s' "${delay}us/${c}c"; done; done; echo
for v in $VARIANTS; do
  printf '%-10s' "$v"
  for delay in 0 1000; do for c in ${CLIENTS:-4 16}; do
    m=$(echo "${tps[$delay,$c,$v]}" | median); off=$(echo "${tps[$delay,$c,off]}" | median)
    printf '%20s' "$(awk -v m="$m" -v o="$off" 'BEGIN {printf "%.0f (%.0f%%)", m, 100*m/o}')"
  done; done; echo
done
