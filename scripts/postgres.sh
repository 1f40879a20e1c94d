# Sourced by scripts/test and scripts/soak: find the PostgreSQL server of the tests, or start a
# throwaway one.
#
#   PG_URL=...; pg_reachable "$PG_URL" || start_throwaway_pg; trap stop_throwaway_pg EXIT
#
# start_throwaway_pg initdb's a cluster under /tmp on 127.0.0.1:54329 (trust auth) when the
# PostgreSQL binaries are installed and points PG_URL at it; stop_throwaway_pg removes it.

throwaway=""

pg_reachable() {
  python - "$1" <<'PY' >/dev/null 2>&1
import sys, psycopg
from urllib.parse import urlsplit
url = urlsplit(sys.argv[1])
psycopg.connect(host=url.hostname, port=url.port or 5432, user=url.username or "postgres",
                dbname="postgres", connect_timeout=3).close()
PY
}

start_throwaway_pg() {
  local bindir; bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [ -n "$bindir" ] && [ -x "$bindir/initdb" ] || return 1
  throwaway="$(mktemp -d /tmp/controlplane-pg.XXXXXX)"
  local run_as=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$throwaway"; run_as=(runuser -u postgres --); fi
  "${run_as[@]}" "$bindir/initdb" -D "$throwaway/data" -U postgres --auth=trust >/dev/null || return 1
  "${run_as[@]}" "$bindir/pg_ctl" -D "$throwaway/data" -l "$throwaway/log" -w \
    -o "-p 54329 -k $throwaway -c listen_addresses=127.0.0.1" start >/dev/null || return 1
  PG_URL="postgres://postgres@127.0.0.1:54329/controlplane"
  echo "$0: started a throwaway PostgreSQL on 127.0.0.1:54329 ($throwaway)"
}

stop_throwaway_pg() {
  [ -n "$throwaway" ] || return 0
  local bindir; bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
  local run_as=(); [ "$(id -u)" = 0 ] && run_as=(runuser -u postgres --)
  "${run_as[@]}" "$bindir/pg_ctl" -D "$throwaway/data" -m fast stop >/dev/null 2>&1
  rm -rf "$throwaway"
}
