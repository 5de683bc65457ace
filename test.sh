#!/usr/bin/env bash
# Runs every test: installs the official openai npm SDK from its lockfile
# (the SDK test drives the gateway with it), vets, then runs the Go tests
# with the race detector.
set -euo pipefail
cd "$(dirname "$0")"

sdk=internal/server/testdata/sdk
if [ ! -d "$sdk/node_modules/openai" ] || [ "$sdk/package-lock.json" -nt "$sdk/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$sdk" --no-audit --no-fund --loglevel=error
fi

go vet ./...
go test -race -count=1 "$@" ./...
