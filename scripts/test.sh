#!/usr/bin/env bash
# Set up, then run the test suite. If PostgreSQL server binaries are installed (Debian:
# apt-get install postgresql), a throwaway server is started on loopback so the store tests run on
# PostgreSQL as well as SQLite; without them those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "${STILLROOM_TEST_PG_URL:-}" ] && [ -n "$pgbin" ] && [ -x "$pgbin/pg_ctl" ]; then
  pgdir=$(mktemp -d /tmp/stillroom-pg.XXXXXX)
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  run_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
  [ "$(id -u)" = 0 ] && chown postgres "$pgdir"
  run_pg "$pgbin/initdb -D $pgdir/data -U stillroom --auth=trust >$pgdir/initdb.log 2>&1"
  run_pg "$pgbin/pg_ctl -D $pgdir/data -o '-k $pgdir -p $port -c listen_addresses=127.0.0.1' -l $pgdir/server.log -w start >/dev/null"
  trap 'run_pg "$pgbin/pg_ctl -D $pgdir/data -m fast stop" >/dev/null 2>&1 || true; rm -rf "$pgdir"' EXIT
  export STILLROOM_TEST_PG_URL="postgresql://stillroom@127.0.0.1:$port/postgres"
  echo "test: PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
fi

set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit $rc
