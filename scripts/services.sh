#!/usr/bin/env bash
# Makes sure Postgres and Redis answer on 127.0.0.1 for the tests: uses servers already running on the
# standard ports when the tests can use them, otherwise installs the Debian packages (as root) and starts
# them, bound to 127.0.0.1: on the standard ports when those are free, else private ones on 15432 and
# 16379 (a Redis with a password, a Postgres with other logins, or another program holds the port).
# Prints the URLs as `export` lines:  eval "$(scripts/services.sh)"
#
# NERVE_TEST_DATABASE_URL / NERVE_TEST_REDIS_URL, when set, are used as they are and nothing is started.
set -euo pipefail

PG_PORT=5432
PG_PRIVATE_PORT=15432
REDIS_PORT=6379
REDIS_PRIVATE_PORT=16379
log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: %s\n' "$*" >&2; exit 1; }

wait_for() { # description, log file, command...
  local what=$1 logfile=$2; shift 2
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  [ -f "$logfile" ] && tail -n 5 "$logfile" >&2
  die "$what did not come up (its log: $logfile)"
}

install_packages() {
  [ "$(id -u)" = 0 ] || die "need root to install $* (or start them yourself on 127.0.0.1)"
  log "installing $*"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# whether anything accepts connections on the port
port_taken() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redis_up() { redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

start_redis() { # port
  local logfile="/tmp/nerve-test-redis-$1.log"
  log "starting redis on 127.0.0.1:$1"
  redis-server --bind 127.0.0.1 --port "$1" --daemonize yes --save "" --appendonly no \
    --dir /tmp --logfile "$logfile" >&2
  wait_for "redis on port $1" "$logfile" redis_up "$1"
}

if [ -z "${NERVE_TEST_REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || install_packages redis-server
  if redis_up "$REDIS_PORT"; then
    port=$REDIS_PORT
  elif redis_up "$REDIS_PRIVATE_PORT"; then
    port=$REDIS_PRIVATE_PORT
  elif ! port_taken "$REDIS_PORT"; then
    port=$REDIS_PORT
    start_redis "$port"
  else
    port=$REDIS_PRIVATE_PORT
    log "port $REDIS_PORT is taken by something that does not answer PING (a password?): a private redis instead"
    port_taken "$port" && die "port $port is taken too; set NERVE_TEST_REDIS_URL"
    start_redis "$port"
  fi
  NERVE_TEST_REDIS_URL="redis://127.0.0.1:$port"
fi

# bounded: a port held by something that is not Postgres may never answer
pg_login() {
  PGCONNECT_TIMEOUT=3 PGPASSWORD=nerve timeout 10 psql -h 127.0.0.1 -p "$1" -U nerve -d nerve_test \
    -Atqc 'select 1' >/dev/null 2>&1
}
pg_up() { pg_isready -q -h 127.0.0.1 -p "$1"; }
# as the local superuser, over the cluster's socket (a Debian cluster this machine runs)
pg_admin() { local port=$1; shift; runuser -u postgres -- psql -p "$port" "$@"; }

# a Debian cluster `name` on `port`, made when missing, started bound to 127.0.0.1 when down, with the
# tests' login
debian_cluster() { # name, port
  local name=$1 port=$2 version
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_up "$port"; then
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -q "^$version $name$"; then
      log "creating postgres $version cluster $name"
      pg_createcluster "$version" "$name" -p "$port" -- --auth-local=peer --auth-host=scram-sha-256 >&2
    fi
    log "starting postgres $version ($name) on 127.0.0.1:$port"
    pg_ctlcluster "$version" "$name" start -o "-c listen_addresses=127.0.0.1 -c port=$port -c fsync=on" >&2
    wait_for "postgres on port $port" "/var/log/postgresql/postgresql-$version-$name.log" pg_up "$port"
  fi
  log "creating role nerve and database nerve_test on port $port"
  pg_admin "$port" -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nerve') THEN
        CREATE ROLE nerve LOGIN PASSWORD 'nerve';
      END IF; END \$\$;" >&2
  pg_admin "$port" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'nerve_test'" | grep -q 1 \
    || pg_admin "$port" -qc "CREATE DATABASE nerve_test OWNER nerve" >&2
}

if [ -z "${NERVE_TEST_DATABASE_URL:-}" ]; then
  command -v psql >/dev/null && command -v pg_isready >/dev/null || install_packages postgresql
  if pg_login "$PG_PORT"; then
    port=$PG_PORT
  elif pg_login "$PG_PRIVATE_PORT"; then
    port=$PG_PRIVATE_PORT
  else
    # creating logins and clusters needs the local superuser (true on a machine where we start it)
    [ "$(id -u)" = 0 ] || die "postgres on port $PG_PORT has no nerve/nerve_test login (password nerve); create one or set NERVE_TEST_DATABASE_URL"
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || install_packages postgresql
    port=$PG_PORT
    if ! port_taken "$PG_PORT" || pg_admin "$PG_PORT" -Atqc 'select 1' >/dev/null 2>&1; then
      debian_cluster main "$PG_PORT"
    fi
    if ! pg_login "$PG_PORT"; then
      # another install, or a nerve role with another password: a cluster of the tests' own
      log "postgres on port $PG_PORT takes no nerve/nerve_test login: a private cluster on $PG_PRIVATE_PORT instead"
      port=$PG_PRIVATE_PORT
      debian_cluster nerve_test "$PG_PRIVATE_PORT"
    fi
  fi
  pg_login "$port" || die "postgres on port $port takes no nerve/nerve_test login (password nerve); set NERVE_TEST_DATABASE_URL"
  NERVE_TEST_DATABASE_URL="postgres://nerve:nerve@127.0.0.1:$port/nerve_test"
fi

echo "export NERVE_TEST_DATABASE_URL='$NERVE_TEST_DATABASE_URL'"
echo "export NERVE_TEST_REDIS_URL='$NERVE_TEST_REDIS_URL'"
