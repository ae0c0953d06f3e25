#!/usr/bin/env bash
# Start or stop a throw-away PostgreSQL server on 127.0.0.1 for the multi-worker tests and benchmarks.
#   bash scripts/postgres.sh start   -> prints the SQLAlchemy URL on stdout
#   bash scripts/postgres.sh status  -> exit 0 when it runs
#   bash scripts/postgres.sh stop
# Installs Debian's postgresql with apt-get when no server binaries are found and we are root.
set -euo pipefail
PGROOT=${EVOMERGE_PG_DIR:-/tmp/evomerge-pg}
PORT=${EVOMERGE_PG_PORT:-55432}

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

as_pg() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-start}" in
start)
  if ! BIN=$(find_bindir); then
    if [ "$(id -u)" != 0 ]; then echo "postgresql is not installed and we are not root" >&2; exit 1; fi
    echo "installing postgresql with apt-get..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
    BIN=$(find_bindir)
  fi
  if [ ! -s "$PGROOT/data/PG_VERSION" ]; then
    rm -rf "$PGROOT"; mkdir -p "$PGROOT"
    [ "$(id -u)" = 0 ] && chown postgres "$PGROOT"
    as_pg "$BIN/initdb" -D "$PGROOT/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if ! as_pg "$BIN/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/log" -w \
      -o "-p $PORT -k $PGROOT -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2
  fi
  as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='evomerge'" \
    | grep -q 1 || as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres evomerge
  echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/evomerge"
  ;;
status)  # exit 0 when our server is running
  BIN=$(find_bindir) || exit 1
  as_pg "$BIN/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1
  ;;
stop)
  BIN=$(find_bindir) || exit 0
  as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -m fast stop >/dev/null 2>&1 || true
  ;;
*) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
