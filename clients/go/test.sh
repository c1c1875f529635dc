#!/usr/bin/env bash
# Vets and tests the Go client. Each test starts its own nerve-server: build it first with
# `cargo build --bin nerve-server`, or point NERVE_SERVER_BIN at one. Run from anywhere; extra arguments go
# to `go test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
go vet ./...
# the race detector costs about a second here and needs cgo (a C compiler)
race=-race
if [ "$(go env CGO_ENABLED)" != 1 ]; then
  echo "cgo is off: testing without the race detector" >&2
  race=
fi
# shellcheck disable=SC2086 # $race is one word or none
go test $race "$@" ./...
