# Sourced by the pgbench scripts: builds the release server, starts a
# private PostgreSQL cluster (wal_level = logical, on $PORT, removed on
# exit with whatever the script started in the background), and creates
# the database `windflow`, migrated, with 64 deployments and the table
# pgb_ids (n -> deployment id) the pgbench scripts pick them from.
# Sets BIN, SRV, DIR, URL and P (psql on that database). $CLUSTER_CONF is
# appended to postgresql.conf. Run as root (initdb runs as postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
cargo build --release --locked --bin windflow-notify >&2
SRV=$PWD/target/release/windflow-notify
DIR=$(mktemp -d /tmp/pgb.XXXX)
chown postgres $DIR
su postgres -c "$BIN/initdb -D $DIR/data -A trust -U postgres >/dev/null"
cat >> $DIR/data/postgresql.conf <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
wal_level = logical
max_connections = 200
shared_buffers = 256MB
${CLUSTER_CONF:-}
CONF
su postgres -c "$BIN/pg_ctl -D $DIR/data -l $DIR/log -w start >/dev/null"
trap 'jobs -p | xargs -r kill 2>/dev/null || true; wait; su postgres -c "$BIN/pg_ctl -D $DIR/data -m fast stop >/dev/null"; rm -rf $DIR' EXIT
URL=postgres://postgres@127.0.0.1:$PORT/windflow
P="psql -h 127.0.0.1 -p $PORT -U postgres -q windflow"
psql -h 127.0.0.1 -p $PORT -U postgres -qc "CREATE DATABASE windflow"
DATABASE_URL=$URL $SRV migrate 2>/dev/null
$P -c "INSERT INTO deployments (user_id, name) SELECT gen_random_uuid(), 'd'||g FROM generate_series(1,64) g"
$P -c "CREATE TABLE pgb_ids AS SELECT row_number() OVER (ORDER BY id) AS n, id FROM deployments" -c "ALTER TABLE pgb_ids ADD PRIMARY KEY (n)"
