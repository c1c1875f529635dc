#!/usr/bin/env bash
# Smoke run of the benchmark tool: every scenario and baseline for about a second each, with tiny counts,
# on both backends (embedded, then Postgres + Redis). Proves nerve-bench works end to end; it exits
# non-zero when a scenario errors, never because a performance target is missed.
#
# Assumes scripts/services.sh already ran (NERVE_TEST_DATABASE_URL and NERVE_TEST_REDIS_URL set):
#   eval "$(scripts/services.sh)" && scripts/bench-smoke.sh
# Uses ${CARGO_TARGET_DIR:-target}/debug/{nerve-server,nerve-bench}, building them when needed. The NATS
# comparison runs when nats-server is installed and is skipped (with a message) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NERVE_TEST_DATABASE_URL:?not set: run eval \"\$(scripts/services.sh)\" first}"
: "${NERVE_TEST_REDIS_URL:?not set: run eval \"\$(scripts/services.sh)\" first}"

target=${CARGO_TARGET_DIR:-target}
cargo build --quiet -p nerve -p nerve-bench

out="$target/bench-smoke.json"
"$target/debug/nerve-bench" \
  --server-bin "$target/debug/nerve-server" \
  --backends embedded,postgres \
  --duration 1s \
  --publishers 1,4 \
  --batch-sizes 1,10 \
  --rates 100,500 \
  --fanout-rate 100 \
  --groups 2 \
  --drain-events 2000 \
  --slow-duration 1s \
  --slow-rate 100 \
  --rr-concurrency 1,4 \
  --replay-events 3000 \
  --filter \
  --json "$out"
echo "bench-smoke: ok (results in $out)"
