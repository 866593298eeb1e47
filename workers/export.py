"""Streaming export of a merged checkpoint, written atomically.

The output folder gets safetensors shards (``max_shard_bytes`` each at most), the index when
there is more than one shard, the config, generation config and tokenizer files (from the
aligned checkpoint, else the base), ``hma_manifest.json`` (the merge, the job that chose it
when there is one, and the ``hmaopt merge`` command that reproduces it) and ``README.md``, a
Hugging Face model card (workers/modelcard.py). Everything is written to a temporary folder
beside the target, synced, and renamed into place only when complete. The folder and its
files are created under the process umask, as ``save_pretrained`` creates them (0777 and
0666 less the umask), whatever the modes of the source files.

Two safetensors checkpoints of F32, F16 or BF16 floats (the common case) are merged by the
torch-free pipeline in workers/stream.py: reading, hashing, merging and writing overlap,
and peak memory is its fixed slots, independent of the model size. Anything else (pickle,
F64 or F8 tensors) takes the torch path: each tensor read from both checkpoints, merged by
:func:`workers.merge.lerp_merge` and written before the next is read.

The manifest's sha256 of each source file is computed while the stream reads it (the torch
path: a pass after the merge), or taken from workers/hashcache.py when the file is the one
hashed before (same device, inode, size, mtime and ctime); a source that changes during the
export fails it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service._version import __version__
from service.errors import ConflictError, MergeError, SpecError
from service.settings import DEFAULT_MAX_SHARD_BYTES
from service.spec import GroupSpec
from workers.checkpoint import (
    SIDE_FILES,
    Checkpoint,
    TensorPlan,
    check_compatible,
    plan_shards,
    sha256_file,
    sha256_files,
    shard_file_names,
    write_index,
    write_shard,
)
from workers.dtypes import FLOAT_DTYPES, TORCH_NAMES, dtype_name
from workers.grouping import Grouping, build_grouping
from workers.hashcache import HashCache, changed, file_ids
from workers.modelcard import CARD, job_provenance, job_section, reproduce_command, write_card

if TYPE_CHECKING:
    import torch

__all__ = ["MANIFEST", "ExportResult", "export_merge", "job_provenance"]

log = logging.getLogger(__name__)

MANIFEST = "hma_manifest.json"
FORMULA = "merged = base + ratio * (aligned - base)  (torch.lerp; ratio = weight on the ALIGNED model)"
#: ``--dtype`` names (as workers.device.parse_dtype) -> safetensors names.
DTYPE_ARGS = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16",
              "float16": "F16", "fp16": "F16", "float64": "F64"}


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
    dtype: torch.dtype | str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    sync: bool = True,
    job: dict | None = None,
    hash_cache: str | Path | bool | None = True,
) -> ExportResult:
    """Merge ``base_model`` and ``aligned_model`` with per-group ``ratios`` into folder ``out``.

    ``dtype``: a ``torch.dtype``, a name (``bfloat16``, ``float32``, ...; ``auto`` or None
    keeps the checkpoint's). ``sync``: fsync the files and folders before and after the
    rename, so a finished export survives a crash. ``job``: the job that chose the ratios
    (:func:`workers.modelcard.job_provenance`), recorded in the manifest and the card.
    ``hash_cache``: where the sources' sha256 are remembered between exports
    (workers/hashcache.py; True: ``Settings().cache_dir / "sha256"``, a folder, or False/None
    to hash every source file every time). Either way a source file that changes while it is
    merged fails the export.
    """
    started = time.perf_counter()
    asked = _dtype_arg(dtype)
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConflictError(f"{out} already exists; choose another folder or allow overwriting")
    base = Checkpoint.open(base_model, allow_pickle=allow_pickle)
    aligned = Checkpoint.open(aligned_model, allow_pickle=allow_pickle)
    check_compatible(base, aligned)
    grouping = build_grouping(base.config, base.tensors, spec)
    ratios = grouping.check_ratios(ratios, allow_extrapolation=allow_extrapolation)

    plans = [
        TensorPlan(name, _out_dtype(info.dtype_name, asked), info.shape)
        for name, info in base.tensors.items()
    ]
    shards = plan_shards(plans, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(p.nbytes for p in plans)

    out.parent.mkdir(parents=True, exist_ok=True)
    section = job_section(job) if job is not None else None  # hashes the data: before the temp
    sources = [*base.weight_files, *aligned.weight_files]
    ids = file_ids(sources)  # before anything is read: what a remembered digest must match
    cache = _hash_cache(hash_cache)
    known = cache.lookup(ids) if cache is not None else {}
    tmp = _make_temp_dir(out)
    bar = _progress(total, progress, f"export {out.name}")
    try:
        streamed = _streamable(base, aligned, plans)
        if streamed:  # the stream fsyncs its shards itself
            from workers.stream import stream_merge

            hashes = stream_merge(base, aligned, shards, names, tmp,
                                  lambda name: grouping.ratio_of(name, ratios),
                                  sync=sync, on_bytes=bar.update, known=known)
        else:
            _torch_merge(base, aligned, grouping, ratios, shards, names, tmp, bar)
            hashes = {"base": _sha256s(base.weight_files, known),
                      "aligned": _sha256s(aligned.weight_files, known)}
        if moved := changed(ids):
            raise MergeError(f"{moved[0]} changed while it was being merged; export again "
                             "once the checkpoint is complete")
        if cache is not None:
            by_name = [(c, hashes[which]) for which, c in (("base", base), ("aligned", aligned))]
            cache.store(ids, {f: h[f.name] for c, h in by_name for f in c.weight_files
                              if f not in known})
        if len(shards) > 1:
            write_index(tmp, shards, names)
        _copy_side_files(base, aligned, tmp, asked)
        manifest = _manifest(base, aligned, grouping, ratios, asked, names, total, hashes)
        manifest["job"] = section
        manifest["reproduce"] = reproduce_command(
            base.path.absolute(), aligned.path.absolute(), out, spec, ratios,
            dtype=TORCH_NAMES[asked] if asked else None, max_shard_bytes=max_shard_bytes,
            extrapolated=any(not 0.0 <= r <= 1.0 for r in ratios),
            pickle="pickle" in (base.format, aligned.format))
        manifest["card"] = CARD
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        write_card(tmp, manifest, out=out, manifest_name=MANIFEST)
        if sync:
            _sync_folder(tmp, skip=set(names) if streamed else set())
        _replace_dir(tmp, out)
        if sync:
            _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    log.info("exported %s: %d shard(s), %.1f MB in %.1f s", out, len(names), total / 1e6, seconds)
    return ExportResult(out, tuple(names), total, seconds, manifest)


def _make_temp_dir(out: Path) -> Path:
    """A new empty folder beside ``out``, made with mode 0777 less the umask (as the final
    folder should be: ``tempfile.mkdtemp`` would make it 0700)."""
    while True:
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
        try:
            os.mkdir(tmp)  # mode 0o777 & ~umask
            return tmp
        except FileExistsError:
            continue


def _dtype_arg(dtype: Any) -> str | None:
    """The safetensors name of the asked output dtype; None keeps the checkpoint's."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype not in DTYPE_ARGS:
        raise SpecError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16, float16 or float64",
                        field="dtype")
    return DTYPE_ARGS[dtype] if isinstance(dtype, str) else dtype_name(dtype)


def _out_dtype(src: str, asked: str | None) -> str:
    return asked if asked is not None and src in FLOAT_DTYPES else src


def _streamable(base: Checkpoint, aligned: Checkpoint, plans: Sequence[TensorPlan]) -> bool:
    from workers.lerp_numpy import supported

    return base.format == aligned.format == "safetensors" and all(
        supported(base.tensors[p.name].dtype_name, p.dtype_name) for p in plans
    )


def _torch_merge(base: Checkpoint, aligned: Checkpoint, grouping: Grouping, ratios, shards,
                 names, tmp: Path, bar) -> None:
    """One tensor at a time with torch: pickle checkpoints, F64 and F8 tensors."""
    from workers.dtypes import torch_dtype
    from workers.merge import lerp_merge

    def produce(plan: TensorPlan):
        merged = lerp_merge(
            base.read(plan.name), aligned.read(plan.name),
            grouping.ratio_of(plan.name, ratios), out_dtype=torch_dtype(plan.dtype_name),
        )
        bar.update(plan.nbytes)
        return merged

    for fname, shard in zip(names, shards):
        write_shard(tmp / fname, shard, produce)


def _copy_side_files(base: Checkpoint, aligned: Checkpoint, dest: Path, dtype: str | None) -> None:
    config = dict(aligned.config)
    if dtype is not None:
        config["dtype"] = TORCH_NAMES[dtype]
        config.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname in SIDE_FILES:
        for source in (aligned.path, base.path):
            if (source / fname).is_file():
                shutil.copyfile(source / fname, dest / fname)  # a new file: umask's mode
                break


def _manifest(
    base: Checkpoint, aligned: Checkpoint, grouping: Grouping, ratios: Sequence[float],
    dtype: str | None, shards: Sequence[str], total: int,
    hashes: dict[str, dict[str, str]] | None = None,
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
        "dtype": TORCH_NAMES[dtype] if dtype else "as checkpoint",
        "compute_dtype": "float32 (float64 for float64 tensors)",
        "shards": list(shards),
        "total_bytes": total,
        "source_sha256": hashes or {  # normally given: hashed while read, or remembered
            "base": sha256_files(base.weight_files),
            "aligned": sha256_files(aligned.weight_files),
        },
    }


def _hash_cache(where: str | Path | bool | None) -> HashCache | None:
    if where is None or where is False:
        return None
    if where is True:
        from service.settings import get_settings

        return HashCache(get_settings().cache_dir / "sha256")
    return HashCache(where)


def _sha256s(files: Sequence[Path], known: dict[Path, str]) -> dict[str, str]:
    """The torch path's digests: remembered, else a pass over the file."""
    return {f.name: known[f] if f in known else sha256_file(f) for f in files}


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path, *, skip: set[str]) -> None:
    """fsync every file in ``folder`` (but ``skip``: synced already), then the folder."""
    for f in folder.iterdir():
        if f.name not in skip and f.is_file():
            _fsync_path(f)
    _fsync_path(folder)


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
