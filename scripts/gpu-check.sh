#!/usr/bin/env bash
# The device check (issue 17), on a machine with one CUDA GPU: the CUDA tests, the merge
# bandwidth against copy bandwidth, and bench/bench_gpu.py (memory per mode, generation
# tokens/s against the bandwidth bound, a few-trial bf16 search on a ~1B model with the
# seconds per trial split). Sized for ~8 minutes on an H200. Writes into ${OUT:-out/gpu}.
#
# The GPU machine of this workplace has torch (CUDA), transformers, accelerate and
# safetensors but not the rest: carry wheels in .whl (see /work/.library/device/README.md):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl \
#     optuna sqlalchemy alembic pydantic pydantic-settings pydantic-core ... pytest
# and the check installs them into /tmp/site first.
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
status=0
timeout 180 $py -m pytest -m cuda -q -p no:cacheprovider tests/workers 2>&1 | tee "$out/cuda-tests.txt" || status=1
(cd bench && timeout 120 $py bench_merge.py --device cuda --dtype bfloat16 --size large \
   --json "../$out/merge.json") 2>&1 | tee "$out/merge.txt" || status=1
(cd bench && timeout 300 $py bench_gpu.py --json "../$out/gpu.json") 2>&1 | tee "$out/gpu.txt" || status=1
exit $status
