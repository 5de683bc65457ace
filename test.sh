#!/usr/bin/env bash
# Runs every test: installs the official openai and ollama npm clients from
# their lockfiles (tests drive the gateway with them), vets, then runs the
# Go tests with the race detector.
set -euo pipefail
cd "$(dirname "$0")"

# The official clients the tests drive: the openai SDK and the ollama client.
for dir in internal/server/testdata/sdk internal/server/testdata/ollama internal/server/testdata/ui; do
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
done

go vet ./...
go test -race -count=1 "$@" ./...
