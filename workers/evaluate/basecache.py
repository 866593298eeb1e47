"""The key of θ_base's cached figures: what they depend on, hashed.

The base weights' and the data files' sha256, the device and dtype, the data split and the
evaluator's version: a change to any of them measures θ_base again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service.spec import JobSpec

#: bump when a metric's computation changes: cached θ_base figures of another version are ignored
EVALUATOR_VERSION = 3  # 3: generation batched by prompt length


def base_cache_key(spec: JobSpec, base_model: str | Path, *, device: str, dtype: str,
                   allow_pickle: bool = False) -> str:
    """The θ_base cache key: hashes of the base weights and data files, and the settings.

    For an lm_eval task only its YAML is hashed, not the data files it names.
    """
    from workers.checkpoint import Checkpoint, sha256_file

    ckpt = Checkpoint.open(base_model, allow_pickle=allow_pickle)
    parts = {
        "version": EVALUATOR_VERSION,
        "weights": [sha256_file(f) for f in ckpt.weight_files],
        "device": device, "dtype": dtype,
        "holdout_fraction": spec.search.holdout_fraction,
        "validation_fraction": spec.search.validation_fraction,
        "prune_fraction": spec.search.prune_fraction,
        "tasks": [dict(t.model_dump(exclude={"weight"}), data_sha256=_data_hash(t.data))
                  for t in spec.tax.tasks],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _data_hash(path: str) -> str:
    from workers.checkpoint import sha256_file

    file = Path(path)
    if file.is_file():
        return sha256_file(file)
    return "missing"
