#!/usr/bin/env bash
# Builds ./llproxy (and ./llbench, the load-test driver).
set -euo pipefail
cd "$(dirname "$0")"
go build -trimpath -o llproxy ./cmd/llproxy
go build -trimpath -o llbench ./cmd/llbench
