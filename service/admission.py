"""Admission of a job: everything that can be known of a job spec before a worker runs it,
checked where the job is accepted, each refusal naming the spec field.

:func:`admit_job` is what the API runs on a submission (service/api/routes/jobs.py), and
what a worker runs again when it loads the job (workers/job.py), with the same settings
(a local search, ``hmaopt search``, runs :func:`check_job_files`: the same checks without
the roots):

1. paths: every input resolves inside the roots, model folders hold no link out, the
   export folder is allowed (service/paths.py, :func:`~service.paths.resolve_job_paths`);
2. checkpoints, from their files alone (service/modelconfig.py, no torch): a config.json
   naming the layer count; ``groups.k`` and ``groups.boundaries`` within it; base and aligned
   of one architecture and depth; safetensors weights (a folder with only pickle weights is
   refused unless the admin sets HMAOPT_ALLOW_PICKLE); no checkpoint code (``auto_map``)
   unless the admin sets HMAOPT_TRUST_REMOTE_CODE, which the workers then pass to
   transformers;
3. JSONL sets (service/records.py): the whole file when it is at most
   :data:`FULL_CHECK_BYTES`, else its first :data:`HEAD_LINES` lines; an empty set is refused;
4. lm-eval task YAMLs (service/lmeval_task.py).

Refusals by an admin setting are PermissionDeniedError (403), the rest SpecError (422);
both carry ``field``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from service.errors import PermissionDeniedError, SpecError
from service.lmeval_task import check_task_yaml
from service.modelconfig import num_layers, read_config, remote_code, weight_format
from service.paths import MODEL_FIELDS, resolve_job_paths
from service.records import read_records
from service.settings import Settings
from service.spec import JobSpec

log = logging.getLogger(__name__)

#: a JSONL set of at most this many bytes is checked whole at submission
FULL_CHECK_BYTES = 8 * 1024 * 1024
#: lines checked of a larger set
HEAD_LINES = 1000


def admit_job(spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec with its paths resolved inside the roots, once every check above passed."""
    resolved = resolve_job_paths(spec, settings)
    check_job_files(resolved, settings, data_roots=settings.data_roots)
    return resolved


def check_job_files(spec: JobSpec, settings: Settings, *,
                    data_roots: list[Path] | None = None) -> None:
    """Checks 2 to 4 on a spec whose paths are resolved. ``data_roots`` None: a local run,
    where nothing is confined and pickle weights are left to the loader's own refusal."""
    paths = spec.paths()
    for name in MODEL_FIELDS:
        if name in paths:
            check_checkpoint(name, paths[name], settings, pickle=data_roots is not None)
    check_layers(spec)
    for name, path in paths.items():
        kind = _jsonl_kind(spec, name)
        if kind is not None:
            check_jsonl(name, path, kind)
    for i, task in enumerate(spec.tax.tasks):
        if task.type == "lm_eval":
            check_task_yaml(f"tax.tasks.{i}.data", task.data, data_roots=data_roots,
                            allow_code=settings.allow_task_code or data_roots is None,
                            metric=task.metric, metric_field=f"tax.tasks.{i}.metric")


def refused(field: str, message: str) -> PermissionDeniedError:
    """A PermissionDeniedError whose body names ``field`` (as a SpecError's does)."""
    error = PermissionDeniedError(f"{field}: {message}")
    error.field = field
    return error


def check_checkpoint(field: str, folder: str, settings: Settings, *, pickle: bool = True) -> None:
    """A checkpoint folder the workers will load: config, weight format (``pickle``: refuse
    pickle-only weights here), checkpoint code."""
    if not os.path.isdir(folder):
        raise SpecError(f"{folder} is not a folder: give the checkpoint's folder", field=field)
    config = read_config(folder)
    if config is None:
        raise SpecError(f"{folder} has no readable config.json (a Hugging Face checkpoint "
                        "folder, as save_pretrained writes it)", field=field)
    fmt = weight_format(folder)
    if fmt is None:
        raise SpecError(f"no weights in {folder}: expected model.safetensors or "
                        "model.safetensors.index.json", field=field)
    if fmt == "pickle" and pickle and not settings.allow_pickle:
        raise refused(field, f"{folder} holds pickle weights (pytorch_model*.bin) and no "
                      "safetensors: loading pickle can run arbitrary code. Convert it "
                      "(save_pretrained(dir, safe_serialization=True)), or the admin allows "
                      "pickle with HMAOPT_ALLOW_PICKLE=true")
    code = remote_code(folder)
    if code and not settings.trust_remote_code:
        raise refused(field, f"{folder} ships its own model code (auto_map in "
                      f"{', '.join(code)}); the server runs no checkpoint code unless the "
                      "admin sets HMAOPT_TRUST_REMOTE_CODE=true")


def check_layers(spec: JobSpec) -> None:
    """``groups`` against the base model's layer count; base and aligned alike."""
    base, aligned = read_config(spec.base_model) or {}, read_config(spec.aligned_model) or {}
    layers = num_layers(spec.base_model)
    if layers is None or layers <= 0:
        raise SpecError(f"{spec.base_model}/config.json names no layer count", field="base_model")
    for key in ("model_type", "architectures"):
        if base.get(key) != aligned.get(key):
            raise SpecError(f"{key} {aligned.get(key)!r} differs from the base model's "
                            f"{base.get(key)!r}: both must be the same architecture",
                            field="aligned_model")
    if num_layers(spec.aligned_model) != layers:
        raise SpecError(f"{num_layers(spec.aligned_model)} layers against the base model's "
                        f"{layers}", field="aligned_model")
    groups = spec.groups
    if groups.scheme == "blocks" and groups.blocks > layers:
        raise SpecError(f"k={groups.blocks} blocks but the model has {layers} layers "
                        f"({spec.base_model}/config.json)", field="groups.k")
    if groups.scheme == "custom" and groups.boundaries[-1] >= layers:
        raise SpecError(f"boundary {groups.boundaries[-1]} is not inside the model's "
                        f"{layers} layers (0..{layers - 1})", field="groups.boundaries")


def check_jsonl(field: str, path: str, kind: str) -> None:
    """A JSONL set: whole when small, else its first lines; at least one record."""
    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}", field=field) from exc
    limit = None if size <= FULL_CHECK_BYTES else HEAD_LINES
    if not sum(1 for _ in read_records(path, kind, field=field, max_lines=limit)):
        raise SpecError(f"{path} holds no {kind} records", field=field)
    if limit is not None:
        log.info("%s: %s is %d bytes; its first %d lines checked", field, path, size, limit)


def _jsonl_kind(spec: JobSpec, field: str) -> str | None:
    if field == "reward.prompts":
        return "prompts"
    if field == "reward.data":
        return "preference"
    if field.startswith("tax.tasks."):
        task = spec.tax.tasks[int(field.split(".")[2])]
        return None if task.type == "lm_eval" else task.type
    return None
