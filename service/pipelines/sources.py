"""Checkpoint sources: the newest *complete* checkpoint of a folder, never a half-written one.

A checkpoint folder counts as complete when all of these hold:

- ``config.json`` exists and parses;
- its weights are there in full: ``model.safetensors``, or ``model.safetensors.index.json``
  and every shard its ``weight_map`` names; each safetensors file is as long as its own
  header says (8 + header + the end of the last tensor), so a truncated shard fails;
  (``pytorch_model.bin`` pickles count only with ``HMAOPT_ALLOW_PICKLE``);
- the source's ``marker`` file exists, when one is set;
- no file in it is younger than ``settle_seconds`` (a writer may still be at work).

The newest is the complete folder whose newest file is newest. Its fingerprint (sha256 of
the names, sizes and modification times of its files) tells a run whether it already
processed that checkpoint.

:func:`check_pipeline` checks a pipeline's sources (and its promote folder and template)
against the roots before its first run.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import PathNotAllowedError, SpecError
from service.paths import resolve_job_paths, resolve_path
from service.pipelines.spec import PipelineSpec, Source
from service.settings import Settings
from service.spec import JobSpec


@dataclass(frozen=True)
class Found:
    path: str
    fingerprint: str


def incomplete_reason(folder: Path, *, marker: str | None, settle_seconds: float,
                      allow_pickle: bool, now: float | None = None) -> str | None:
    """Why ``folder`` is not (yet) a complete checkpoint, or None when it is."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json does not parse"
    if marker is not None and not (folder / marker).is_file():
        return f"no {marker} marker"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return "model.safetensors.index.json does not parse"
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif allow_pickle and (folder / "pytorch_model.bin").is_file():
        shards = []
    else:
        return "no model.safetensors (or index)"
    for shard in shards:
        if "/" in shard or shard.startswith("."):
            return f"the index names {shard!r}, outside the folder"
        problem = _safetensors_short(folder / shard)
        if problem:
            return problem
    files = [p for p in folder.iterdir() if p.is_file()]
    newest = max(p.stat().st_mtime for p in files)
    age = (time.time() if now is None else now) - newest
    if age < settle_seconds:
        return f"written {age:.0f} s ago (settles after {settle_seconds:.0f} s)"
    return None


def _safetensors_short(path: Path) -> str | None:
    """None when ``path`` holds all the bytes its header announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", head)
            if n > min(size, 100_000_000):
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError):
        return f"{path.name} has no readable safetensors header"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return f"{path.name} has a malformed safetensors header"
    if size < 8 + n + end:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def fingerprint(folder: Path) -> str:
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def newest_complete(source: Source, settings: Settings, field: str,
                    now: float | None = None) -> tuple[Found | None, list[str]]:
    """The source's checkpoint (None when no complete one exists yet) and, for the record,
    why each newer candidate was passed over."""
    kw = dict(marker=source.marker, settle_seconds=source.settle_seconds,
              allow_pickle=settings.allow_pickle, now=now)
    if source.path is not None:
        path = Path(resolve_path(f"{field}.path", source.path, settings.model_roots,
                                 kind="model"))
        reason = incomplete_reason(path, **kw)
        if reason:
            return None, [f"{path.name}: {reason}"]
        return Found(str(path), fingerprint(path)), []
    folder = Path(resolve_path(f"{field}.dir", source.dir, settings.model_roots, kind="model"))
    if not folder.is_dir():
        raise SpecError(f"{source.dir} is not a folder", field=f"{field}.dir")
    candidates = []
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith(".") and not sub.is_symlink():
            try:
                files = [p.stat().st_mtime for p in sub.iterdir() if p.is_file()]
                candidates.append((max(files, default=sub.stat().st_mtime), sub.name, sub))
            except OSError:  # removed while we looked
                continue
    passed = []
    for _, _, sub in sorted(candidates, reverse=True):
        try:
            reason = incomplete_reason(sub, **kw)
        except OSError as exc:  # a file renamed or removed while we read: still changing
            reason = f"changing while read ({exc.strerror or exc})"
        if reason is None:
            return Found(str(sub), fingerprint(sub)), passed
        passed.append(f"{sub.name}: {reason}")
    return None, passed


def check_pipeline(spec: PipelineSpec, settings: Settings) -> None:
    """What can be checked of a pipeline before its first run: the sources and the promote
    folder inside the model roots (the promote folder outside the sources), the template's
    other paths inside their roots."""
    for field, source in (("aligned", spec.aligned), ("base", spec.base)):
        if source is None:
            continue
        raw = source.dir or source.path
        sub = "dir" if source.dir else "path"
        resolved = resolve_path(f"{field}.{sub}", raw, settings.model_roots, kind="model")
        if source.dir and not Path(resolved).is_dir():
            raise SpecError(f"{raw} is not a folder", field=f"{field}.dir")
    promote = Path(resolve_path("promote.dir", spec.promote.dir, settings.model_roots,
                                must_exist=False, kind="model"))
    for field, source in (("aligned", spec.aligned), ("base", spec.base)):
        if source is not None and source.dir is not None:
            folder = Path(resolve_path(f"{field}.dir", source.dir, settings.model_roots,
                                       kind="model"))
            if promote == folder or promote.is_relative_to(folder):
                raise PathNotAllowedError(f"promote.dir: {spec.promote.dir} lies in the "
                                          f"{field} source folder: a promoted merge would be "
                                          "taken as the next checkpoint")
    # a path that exists for the template's aligned_model check: the source itself
    any_checkpoint = resolve_path("aligned", spec.aligned.dir or spec.aligned.path,
                                  settings.model_roots, kind="model")
    paths = {"aligned_model": any_checkpoint}
    if spec.base is not None:
        paths["base_model"] = any_checkpoint
    # validated again (not a model_copy): a JobSpec is never built unchecked
    job = JobSpec.model_validate({**spec.job.model_dump(), **paths})
    resolve_job_paths(job, settings)
