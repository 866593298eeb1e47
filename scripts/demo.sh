#!/usr/bin/env bash
# The main job until the search lands: build a tiny base/aligned Llama pair locally and merge
# it with per-block ratios (ratio = weight on the ALIGNED model).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/python -m tests.models demo/models
.venv/bin/hmaopt merge --base demo/models/base --aligned demo/models/aligned \
  --groups blocks:3 --ratios 0.2,0.5,0.8 --out demo/merged --overwrite
echo "manifest: demo/merged/hma_manifest.json"
head -c 600 demo/merged/hma_manifest.json; echo " ..."
