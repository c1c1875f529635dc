#!/usr/bin/env bash
# Makes sure Postgres and Redis answer on 127.0.0.1 for the tests: uses servers already running on the
# standard ports, otherwise installs the Debian packages (as root) and starts them, bound to 127.0.0.1.
# Prints the URLs as `export` lines:  eval "$(scripts/services.sh)"
#
# NERVE_TEST_DATABASE_URL / NERVE_TEST_REDIS_URL, when set, are used as they are and nothing is started.
set -euo pipefail

PG_PORT=5432
REDIS_PORT=6379
log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: %s\n' "$*" >&2; exit 1; }

wait_for() { # description, command...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up"
}

install_packages() {
  [ "$(id -u)" = 0 ] || die "need root to install $* (or start them yourself on 127.0.0.1)"
  log "installing $*"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

if [ -z "${NERVE_TEST_REDIS_URL:-}" ]; then
  if ! command -v redis-cli >/dev/null || ! redis_up; then
    command -v redis-server >/dev/null || install_packages redis-server
    if ! redis_up; then
      log "starting redis on 127.0.0.1:$REDIS_PORT"
      redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save "" --appendonly no \
        --dir /tmp --logfile /tmp/nerve-test-redis.log >&2
      wait_for redis redis_up
    fi
  fi
  NERVE_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi

if [ -z "${NERVE_TEST_DATABASE_URL:-}" ]; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    install_packages postgresql
  fi
  if ! pg_up; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -q "^$version main$"; then
      log "creating postgres $version cluster"
      pg_createcluster "$version" main -p "$PG_PORT" -- --auth-local=peer --auth-host=scram-sha-256 >&2
    fi
    log "starting postgres $version on 127.0.0.1:$PG_PORT"
    pg_ctlcluster "$version" main start -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c fsync=on" >&2
    wait_for postgres pg_up
  fi
  # a login for the tests; creating it needs the local superuser (true on a machine where we started it)
  if ! PGPASSWORD=nerve psql -h 127.0.0.1 -p "$PG_PORT" -U nerve -d nerve_test -Atqc 'select 1' >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "postgres runs but has no nerve/nerve_test login; set NERVE_TEST_DATABASE_URL"
    log "creating role nerve and database nerve_test"
    runuser -u postgres -- psql -p "$PG_PORT" -qc "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nerve') THEN
          CREATE ROLE nerve LOGIN PASSWORD 'nerve';
        END IF; END \$\$;" >&2
    runuser -u postgres -- psql -p "$PG_PORT" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'nerve_test'" | grep -q 1 \
      || runuser -u postgres -- psql -p "$PG_PORT" -qc "CREATE DATABASE nerve_test OWNER nerve" >&2
  fi
  NERVE_TEST_DATABASE_URL="postgres://nerve:nerve@127.0.0.1:$PG_PORT/nerve_test"
fi

echo "export NERVE_TEST_DATABASE_URL='$NERVE_TEST_DATABASE_URL'"
echo "export NERVE_TEST_REDIS_URL='$NERVE_TEST_REDIS_URL'"
