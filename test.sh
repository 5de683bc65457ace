#!/usr/bin/env bash
# Runs every test: installs what the tests run for real (Debian packages,
# and the openai, @anthropic-ai/sdk, ollama and playwright-core npm
# packages from their lockfiles), vets, then runs the Go tests with the race detector.
set -euo pipefail
cd "$(dirname "$0")"

# The servers and tools the tests run for real: redis-server (replicas),
# PostgreSQL's initdb and pg_ctl (the usage ledger; each test starts its
# own server), promtool (the alert rules), chromium (the status page).
need=""
command -v redis-server >/dev/null || need="$need redis-server"
command -v promtool >/dev/null || need="$need prometheus"
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$need postgresql"
command -v chromium >/dev/null || need="$need chromium"
if [ -n "$need" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $need
fi

# The npm packages the tests drive: the openai and Anthropic SDKs, the ollama client, playwright-core.
for dir in internal/server/testdata/sdk internal/server/testdata/anthropic internal/server/testdata/ollama internal/server/testdata/ui; do
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
done

go vet ./...
go test -race -count=1 "$@" ./...
