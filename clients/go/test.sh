#!/usr/bin/env bash
# Vets and tests the Go client. Each test starts its own nerve-server: build it first with
# `cargo build --bin nerve-server`, or point NERVE_SERVER_BIN at one. Run from anywhere; extra arguments go
# to `go test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
go vet ./...
go test "$@" ./...
