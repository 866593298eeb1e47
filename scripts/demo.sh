#!/usr/bin/env bash
# The main job: build the reference world once (cached in demo/world), then run its search
# in-process into a SQLite study (demo/hmaopt.db). A rerun reuses both and prints the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/hmaopt world build demo/world --reuse
.venv/bin/hmaopt search demo/world/spec.yaml --storage sqlite:///demo/hmaopt.db \
  --study demo --resume --json demo/result.json
echo "result: demo/result.json; study 'demo' in demo/hmaopt.db"
