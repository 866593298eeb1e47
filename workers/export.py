"""Streaming export of a merged checkpoint, written atomically.

The output folder gets safetensors shards (``max_shard_bytes`` each at most), the index when
there is more than one shard, the config, generation config and tokenizer files (from the
aligned checkpoint, else the base), and ``hma_manifest.json``. Each tensor is read from both
checkpoints, merged and written before the next is read, so peak memory is the tensors in
flight, independent of the model size. Everything is written to a temporary folder beside
the target, which is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from service._version import __version__
from service.errors import ConflictError
from service.settings import DEFAULT_MAX_SHARD_BYTES
from service.spec import GroupSpec
from workers.checkpoint import (
    SIDE_FILES,
    Checkpoint,
    TensorPlan,
    check_compatible,
    plan_shards,
    sha256_files,
    shard_file_names,
    write_index,
    write_shard,
)
from workers.grouping import Grouping, build_grouping
from workers.merge import lerp_merge

log = logging.getLogger(__name__)

MANIFEST = "hma_manifest.json"
FORMULA = "merged = base + ratio * (aligned - base)  (torch.lerp; ratio = weight on the ALIGNED model)"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    shards: tuple[str, ...]
    bytes_written: int
    seconds: float
    manifest: dict


def export_merge(
    base_model: str | Path,
    aligned_model: str | Path,
    out: str | Path,
    spec: GroupSpec,
    ratios: Sequence[float],
    *,
    allow_extrapolation: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Merge ``base_model`` and ``aligned_model`` with per-group ``ratios`` into folder ``out``."""
    started = time.perf_counter()
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConflictError(f"{out} already exists; choose another folder or allow overwriting")
    base = Checkpoint.open(base_model, allow_pickle=allow_pickle)
    aligned = Checkpoint.open(aligned_model, allow_pickle=allow_pickle)
    check_compatible(base, aligned)
    grouping = build_grouping(base.config, base.tensors, spec)
    ratios = grouping.check_ratios(ratios, allow_extrapolation=allow_extrapolation)

    plans = [
        TensorPlan(name, _out_dtype(info.dtype, dtype), info.shape)
        for name, info in base.tensors.items()
    ]
    shards = plan_shards(plans, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(p.nbytes for p in plans)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bar = _progress(total, progress, f"export {out.name}")
    try:
        def produce(plan: TensorPlan) -> torch.Tensor:
            merged = lerp_merge(
                base.read(plan.name), aligned.read(plan.name),
                grouping.ratio_of(plan.name, ratios), out_dtype=plan.dtype,
            )
            bar.update(plan.nbytes)
            return merged

        for fname, shard in zip(names, shards):
            write_shard(tmp / fname, shard, produce)
        if len(shards) > 1:
            write_index(tmp, shards, names)
        _copy_side_files(base, aligned, tmp, dtype)
        manifest = _manifest(base, aligned, grouping, ratios, dtype, names, total)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    log.info("exported %s: %d shard(s), %.1f MB in %.1f s", out, len(names), total / 1e6, seconds)
    return ExportResult(out, tuple(names), total, seconds, manifest)


def _out_dtype(src: torch.dtype, asked: torch.dtype | None) -> torch.dtype:
    return asked if asked is not None and src.is_floating_point else src


def _copy_side_files(base: Checkpoint, aligned: Checkpoint, dest: Path, dtype: torch.dtype | None) -> None:
    config = dict(aligned.config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        config.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname in SIDE_FILES:
        for source in (aligned.path, base.path):
            if (source / fname).is_file():
                shutil.copy2(source / fname, dest / fname)
                break


def _manifest(
    base: Checkpoint, aligned: Checkpoint, grouping: Grouping, ratios: Sequence[float],
    dtype: torch.dtype | None, shards: Sequence[str], total: int,
) -> dict:
    return {
        "hmaopt_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "formula": FORMULA,
        "ratio_convention": "ratio is the weight on the aligned (post-RLHF) model: 0 = base, 1 = aligned",
        "base_model": str(base.path.absolute()),
        "aligned_model": str(aligned.path.absolute()),
        "architecture": base.architecture,
        **grouping.describe(list(ratios)),
        "dtype": str(dtype).removeprefix("torch.") if dtype else "as checkpoint",
        "compute_dtype": "float32 (float64 for float64 tensors)",
        "shards": list(shards),
        "total_bytes": total,
        "source_sha256": {
            "base": sha256_files(base.weight_files),
            "aligned": sha256_files(aligned.weight_files),
        },
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
