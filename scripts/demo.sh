#!/usr/bin/env bash
# The main job: `hmaopt demo`. It builds the reference world once (cached in demo/world),
# starts the embedded stack (SQLite in demo/service, a Valkey server, one local worker, the
# API), submits the world's job over REST, shows its progress and prints the result and the
# job's dashboard page (up while the demo runs; `scripts/demo.sh --serve` keeps it up).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec .venv/bin/hmaopt demo --dir demo "$@"
