#!/usr/bin/env bash
# Smoke run of the benchmark tool: every scenario and baseline for about a second each, with tiny
# counts, on both backends (embedded and Postgres + Redis; the latency scenario in 2 interleaved
# rounds). Proves nerve-bench works end to end; it exits non-zero when a scenario errors or a row of
# results counted no events (or, but for a drain, timed none), never because a performance target is
# missed.
#
# Assumes scripts/services.sh already ran (NERVE_TEST_DATABASE_URL and NERVE_TEST_REDIS_URL set):
#   eval "$(scripts/services.sh)" && scripts/bench-smoke.sh
# Uses ${CARGO_TARGET_DIR:-target}/debug/{nerve-server,nerve-bench}, building them (with the tests)
# when needed. The NATS comparison needs a nats-server: the tool looks on PATH, in /usr/sbin and in
# ~/.cache/nerve-tools/bin (or takes NERVE_BENCH_NATS_SERVER); when there is none, this script
# installs Debian's package as root, as scripts/services.sh installs Postgres and Redis. The end of
# the output says whether NATS ran.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NERVE_TEST_DATABASE_URL:?not set: run eval \"\$(scripts/services.sh)\" first}"
: "${NERVE_TEST_REDIS_URL:?not set: run eval \"\$(scripts/services.sh)\" first}"

nats_found() {
  [ -n "${NERVE_BENCH_NATS_SERVER:-}" ] || command -v nats-server >/dev/null \
    || [ -x /usr/sbin/nats-server ] || [ -x "$HOME/.cache/nerve-tools/bin/nats-server" ]
}
if ! nats_found; then
  if [ "$(id -u)" = 0 ]; then
    echo "bench-smoke: installing nats-server (Debian package)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server; } >&2 \
      || echo "bench-smoke: could not install nats-server" >&2
  else
    echo "bench-smoke: no nats-server and not root: not installing it" >&2
  fi
fi

target=${CARGO_TARGET_DIR:-target}
# every target, as `cargo test --workspace` builds them: the test dependencies' features (tonic's TLS
# client) are then the same, so after scripts/test.sh's cargo test this compiles only nerve-bench's
# binary instead of tonic and everything above it again
cargo build --quiet --locked --workspace --all-targets

out="$target/bench-smoke.json"
rm -f "$out"
status=0
"$target/debug/nerve-bench" \
  --server-bin "$target/debug/nerve-server" \
  --backends embedded,postgres \
  --duration 1s \
  --publishers 1,4 \
  --batch-sizes 1,10 \
  --rates 100,500 \
  --rounds 2 \
  --warm-up 100ms \
  --fanout-rate 100 \
  --groups 2 \
  --drain-events 2000 \
  --slow-duration 1s \
  --slow-rate 100 \
  --rr-concurrency 1,4 \
  --replay-events 3000 \
  --wide-types 20 \
  --filter \
  --json "$out" || status=$?

# what the exit status does not show: rows that counted nothing, and whether the NATS path ran
checks=0
if [ -f "$out" ]; then
  python3 - "$out" <<'PY' || checks=$?
import json, sys
report = json.load(open(sys.argv[1]))
rows = report["rows"]
failed = False
empty = [f'{r["scenario"]} / {r["system"]} / {r["case"]}' for r in rows if r["events"] == 0]
if not rows:
    print("bench-smoke: FAILED: the run produced no rows of results")
    failed = True
for e in empty:
    print(f"bench-smoke: FAILED: 0 events in {e}")
    failed = True
# a drain times its rate only; every other row with events must have timed them
untimed = [f'{r["scenario"]} / {r["system"]} / {r["case"]}' for r in rows
           if r["events"] > 0 and r["latency"] is None and r["scenario"] != "drain"]
for u in untimed:
    print(f"bench-smoke: FAILED: events but no latency figures in {u}")
    failed = True
nats = sorted({r["system"] for r in rows if r["system"].startswith("nats")})
if nats:
    print(f"bench-smoke: NATS JetStream exercised: {', '.join(nats)}")
else:
    why = [n for n in report["notes"] if "nats" in n.lower()] or ["no NATS rows in the results"]
    print("bench-smoke: NATS JetStream NOT exercised: " + "; ".join(why))
sys.exit(1 if failed else 0)
PY
else
  echo "bench-smoke: FAILED: nerve-bench wrote no results to $out"
  checks=1
fi
if [ "$status" != 0 ] || [ "$checks" != 0 ]; then
  echo "bench-smoke: FAILED (nerve-bench exit status $status; see above)"
  exit 1
fi
echo "bench-smoke: ok (results in $out)"
