#!/usr/bin/env bash
# Runs every check and test of the project: formatting, clippy, proto lint, unit and end-to-end tests,
# the store conformance suite on SQLite and Postgres, the live streams' on embedded and Redis, the README walkthrough against a live server, the
# Python and Go clients (codegen drift check, mypy, pytest, go vet, go test), a smoke run of the
# benchmark tool and the Helm chart checks.
# Starts Postgres and Redis on 127.0.0.1 when they are not running (scripts/services.sh) and installs the
# tools it needs once, into ~/.cache/nerve-tools (NERVE_TOOLS overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${NERVE_TOOLS:-$HOME/.cache/nerve-tools}"
GRPCURL_VERSION=v1.9.3
BUF_VERSION=1.75.0

# the modules of tests/e2e that assert API behaviour; they run once per backend
BEHAVIOUR_TESTS="publish:: subscribe:: groups:: filters:: request_reply:: replay:: admin:: observability:: security::"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "tools"
# go install leaves grpcurl's --version unset: the module version is in the binary's build info
if [ ! -x "$TOOLS/bin/grpcurl" ] \
  || ! go version -m "$TOOLS/bin/grpcurl" | grep -q "github.com/fullstorydev/grpcurl[[:space:]]*$GRPCURL_VERSION[[:space:]]"; then
  echo "installing grpcurl $GRPCURL_VERSION into $TOOLS/bin"
  GOBIN="$TOOLS/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION" \
    || fail "could not install grpcurl (needs Go and the Go module proxy)"
fi
BUF="$TOOLS/npm/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version)" != "$BUF_VERSION" ]; then
  echo "installing buf $BUF_VERSION into $TOOLS/npm"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" "@bufbuild/buf@$BUF_VERSION" \
    || fail "could not install buf (needs npm)"
fi
# programs the tests start themselves: the failure tests run redis-server processes of their own, the
# TLS tests make their keys with openssl (scripts/dev-pki.sh); each binary is its Debian package's name
for program in redis-server openssl; do
  command -v "$program" >/dev/null && continue
  [ "$(id -u)" = 0 ] || fail "$program is missing: install Debian's $program package, or run as root"
  echo "installing $program"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$program"; } >&2 \
    || fail "could not install $program"
done
echo "grpcurl: $("$TOOLS/bin/grpcurl" -version 2>&1)"
echo "buf: $("$BUF" --version)"

step "cargo fmt --check"
cargo fmt --all -- --check || fail "formatting differs: run cargo fmt --all"

step "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings || fail "clippy found problems"

step "buf lint and format"
(cd proto && "$BUF" lint && "$BUF" format --diff --exit-code) || fail "proto/ is not buf-lint clean"

step "services: postgres and redis on 127.0.0.1"
exports=$(scripts/services.sh) || fail "could not start postgres and redis (see above)"
eval "$exports"
echo "$exports"
# tests work in schemas t_* and Redis keys nerve-test:*; drop what earlier runs left behind
if command -v psql >/dev/null; then
  psql "$NERVE_TEST_DATABASE_URL" -Atqc "SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\_%'" \
    | while read -r schema; do
        # without the NOTICE per dropped table, which buried the test output of CI runs
        psql "$NERVE_TEST_DATABASE_URL" -qc "SET client_min_messages = warning; DROP SCHEMA $schema CASCADE" >/dev/null
      done
fi
if command -v redis-cli >/dev/null; then
  redis-cli -u "$NERVE_TEST_REDIS_URL" --scan --pattern 'nerve-test:*' | xargs -r -n 500 redis-cli -u "$NERVE_TEST_REDIS_URL" del >/dev/null
fi

step "cargo test (embedded backend; store and stream conformance and failure tests on Postgres + Redis)"
GRPCURL="$TOOLS/bin/grpcurl" cargo test --locked --workspace || fail "tests failed (the first failure is above)"

step "behaviour tests again, on Postgres + Redis"
NERVE_TEST_BACKEND=redis cargo test --locked --test e2e -- $BEHAVIOUR_TESTS \
  || fail "behaviour tests failed on Postgres + Redis (the first failure is above)"

# the client suites run against the nerve-server binary cargo test just built
export NERVE_SERVER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/nerve-server"

step "generated Python and Go stubs match proto/"
scripts/generate-clients.sh --check || fail "generated client code drifted from proto/: run scripts/generate-clients.sh"

step "Python client: mypy --strict and pytest"
clients/python/test.sh -q || fail "Python client checks failed"

step "Go client: go vet and go test"
# -count=1: go's test cache does not see the nerve-server binary change, so a cached pass could hide a server change
clients/go/test.sh -count=1 || fail "Go client checks failed"

step "benchmark tool smoke run (seconds per scenario, both backends; targets are not checked here)"
scripts/bench-smoke.sh || fail "nerve-bench smoke run failed"

step "Helm chart: lint, render, Kubernetes schemas, chart tests"
scripts/helm-check.sh || fail "Helm chart checks failed"

step "all checks passed"
