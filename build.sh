#!/usr/bin/env bash
# Builds ./llproxy (and ./llbench, the load-test driver).
set -euo pipefail
cd "$(dirname "$0")"
version=$(git describe --always --dirty 2>/dev/null || echo dev)
go build -trimpath -ldflags "-X main.version=$version" -o llproxy ./cmd/llproxy
go build -trimpath -o llbench ./cmd/llbench
