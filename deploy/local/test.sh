#!/usr/bin/env bash
# Runs the whole test suite: unit tests and integration tests against real servers on 127.0.0.1
# (each test starts its own Tansu broker and Mosquitto on free ports). Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/prerequisites.sh
exec cargo nextest run --workspace --locked --no-fail-fast "$@"
