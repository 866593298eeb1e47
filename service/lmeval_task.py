"""An lm-evaluation-harness task YAML checked without lm-eval (no torch, no datasets): what
the API can know of an ``lm_eval`` tax task before any worker runs it.

:func:`check_task_yaml` reads the YAML with pyyaml (``include:`` merged as lm-eval merges
it, ``!function`` references recorded, not imported) and checks:

- one task (``task:`` a name; a group is refused), a known ``output_type``, the requested
  ``metric`` among the task's metrics;
- every file it names (includes, ``!function`` modules, ``dataset_path``,
  ``dataset_kwargs.data_files`` and ``data_dir``) exists and resolves inside the data roots,
  as the job's own paths do; a ``dataset_path`` that is neither a local file or folder nor
  a builder of local files (``json``, ``csv``, ...) names a hub data set, refused: the
  workers run lm-eval offline; URLs likewise;
- the splits it evaluates on exist among its ``data_files``;
- on the first lines of a local JSON Lines file, that ``doc_to_text``, ``doc_to_target`` and
  ``doc_to_choice`` name fields of the records (a bare name or the variables of a Jinja
  template), and that a multiple-choice target is a valid choice: a wrong ``doc_to_target``
  otherwise scores every model 0.
- ``!function`` (Python code run by the worker) only with the admin setting
  HMAOPT_ALLOW_TASK_CODE.

The worker checks what needs the data plane (workers/evaluate/lmeval.py: the task built by
lm-eval itself, the documents it reads, θ_base's figure).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.errors import PermissionDeniedError, SpecError
from service.paths import resolve_path

#: lm-eval's output types and the metrics each has when the YAML lists none
OUTPUT_TYPES = {"loglikelihood": ("perplexity", "acc"),
                "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
                "multiple_choice": ("acc", "acc_norm"),
                "generate_until": ("exact_match",)}
#: ``dataset_path`` values that are datasets' builders of local files, not hub names
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml",
                            "webdataset", "imagefolder", "audiofolder", "videofolder"})
#: lines of a JSON Lines data file whose records are checked against the doc_to_* fields
CHECKED_LINES = 50
_SPLITS = ("test_split", "validation_split", "training_split", "fewshot_split")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class _Function:
    """A ``!function module.name`` reference, unresolved."""

    ref: str
    base: Path


@dataclass
class TaskYaml:
    """A task YAML as read: its merged config and the files it names."""

    path: Path
    config: dict[str, Any]
    includes: list[Path] = field(default_factory=list)
    functions: list[_Function] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config["task"]


def read_task_yaml(path: str | Path, *, field: str | None = None) -> TaskYaml:
    """The YAML at ``path`` with its includes merged (SpecError naming ``field``)."""
    task = TaskYaml(Path(path), {})
    task.config = _load(Path(path), task, field, seen=set())
    name = task.config.get("task")
    if "group" in task.config or isinstance(name, list):
        raise SpecError(f"lm-eval task file {path} defines a group; give the YAML of one task",
                        field=field)
    if not isinstance(name, str) or not name:
        raise SpecError(f"lm-eval task file {path} has no 'task:' name", field=field)
    return task


def _load(path: Path, task: TaskYaml, field: str | None, *, seen: set[Path]) -> dict:
    real = path.resolve()
    if real in seen:
        raise SpecError(f"lm-eval task file {task.path}: include cycle at {path}", field=field)
    seen.add(real)

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        ref = _Function(loader.construct_scalar(node), path.parent)
        task.functions.append(ref)
        return ref

    Loader.add_constructor("!function", function)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise SpecError(f"lm-eval task file {path} is not valid YAML: {exc}", field=field) from exc
    except (OSError, UnicodeError) as exc:
        raise SpecError(f"lm-eval task file {path} cannot be read: {exc}", field=field) from exc
    if not isinstance(config, dict):
        raise SpecError(f"lm-eval task file {path} must hold a mapping of task fields",
                        field=field)
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            raise SpecError(f"lm-eval task file {path}: include {inc!r} is not a file name",
                            field=field)
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        task.includes.append(inc_path)
        if not inc_path.is_file():
            raise SpecError(f"lm-eval task file {path}: include {inc} does not exist",
                            field=field)
        merged.update(_load(inc_path, task, field, seen=seen))
    merged.update(config)
    return merged


def check_task_yaml(field: str, path: str | Path, *, data_roots: list[Path] | None,
                    allow_code: bool = False, metric: str | None = None,
                    metric_field: str | None = None) -> TaskYaml:
    """Everything the module docstring lists; SpecError or PermissionDeniedError naming
    ``field`` (``metric_field`` for a metric the task does not have). ``data_roots`` None:
    a local run, the files need only exist."""
    task = read_task_yaml(path, field=field)
    config, where = task.config, f"lm-eval task {task.name!r} ({path})"

    def inside(raw: str) -> Path:
        if data_roots is None:
            real = Path(os.path.realpath(raw))
            if not real.exists():
                raise SpecError(f"{where}: {raw} does not exist", field=field)
            return real
        return Path(resolve_path(field, raw, data_roots, kind="data"))

    for inc in task.includes:
        inside(str(inc))
    if task.functions and not allow_code:
        refs = ", ".join(sorted({f.ref for f in task.functions}))
        error = PermissionDeniedError(
            f"{field}: {where} runs Python code (!function {refs}); the server refuses task "
            "code unless the admin sets HMAOPT_ALLOW_TASK_CODE=true")
        error.field = field
        raise error
    for ref in task.functions:
        module = ref.base / (ref.ref.rpartition(".")[0].replace(".", "/") + ".py")
        if module.is_file():
            inside(str(module))
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise SpecError(f"{where}: output_type {output_type!r} is not one of "
                        f"{', '.join(OUTPUT_TYPES)}", field=field)
    _check_metric(config, output_type, metric, where, metric_field or field)
    files = _data_files(config, task.path.resolve().parent, where, field, inside)
    _check_splits(config, files, where, field)
    if output_type != "loglikelihood_rolling" and not isinstance(
            config.get("process_docs"), _Function):
        _check_fields(config, files, output_type, where, field)
    return task


def _check_metric(config: dict, output_type: str, metric: str | None, where: str,
                  field: str) -> None:
    listed = config.get("metric_list")
    if listed is not None and not isinstance(listed, list):
        raise SpecError(f"{where}: metric_list must be a list", field=field)
    names = ([m.get("metric") for m in listed if isinstance(m, dict)] if listed
             else list(OUTPUT_TYPES[output_type]))
    names = [n for n in names if isinstance(n, str)]
    if not names:
        raise SpecError(f"{where} has no metrics", field=field)
    if metric is not None and metric.split(",", 1)[0] not in names:
        raise SpecError(f"{where} has no metric {metric!r} (it has: {', '.join(names)})",
                        field=field)


def _data_files(config: dict, base: Path, where: str, field: str,
                inside) -> dict[str, list[Path]] | None:
    """The local data files by split (None: a local dataset folder, not checked further)."""
    dataset_path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SpecError(f"{where}: dataset_kwargs must be a mapping", field=field)
    if not isinstance(dataset_path, str) or not dataset_path:
        raise SpecError(f"{where} names no dataset_path (e.g. dataset_path: json with "
                        "dataset_kwargs.data_files)", field=field)
    offline = ("hmaopt runs lm-eval offline: put the data set in the data roots and name "
               "local files (dataset_path: json, dataset_kwargs.data_files)")
    local_path = None
    if dataset_path not in LOCAL_BUILDERS:
        if "://" in dataset_path:
            raise SpecError(f"{where}: dataset_path {dataset_path} is a URL; {offline}",
                            field=field)
        candidate = Path(dataset_path).expanduser()
        candidate = candidate if candidate.is_absolute() else base / candidate
        if not candidate.exists():
            raise SpecError(f"{where}: dataset_path {dataset_path!r} is neither a local file "
                            f"or folder nor a builder of local files ({', '.join(sorted(LOCAL_BUILDERS)[:4])}, "
                            f"...): it names a hub data set; {offline}", field=field)
        local_path = inside(str(candidate))
    files_base = local_path if local_path is not None and local_path.is_dir() else base
    if isinstance(kwargs.get("data_dir"), str):
        data_dir = kwargs["data_dir"]
        if "://" in data_dir:
            raise SpecError(f"{where}: data_dir {data_dir} is a URL; {offline}", field=field)
        files_base = inside(str(base / Path(data_dir).expanduser()))
    raw = kwargs.get("data_files")
    if raw is None:
        if dataset_path in LOCAL_BUILDERS and "data_dir" not in kwargs:
            raise SpecError(f"{where}: dataset_path {dataset_path} needs "
                            "dataset_kwargs.data_files (the local files to read)", field=field)
        return None
    by_split = raw if isinstance(raw, dict) else {"train": raw}
    out: dict[str, list[Path]] = {}
    for split, value in by_split.items():
        names = value if isinstance(value, list) else [value]
        out[str(split)] = []
        for name in names:
            if not isinstance(name, str):
                raise SpecError(f"{where}: data_files entry {name!r} is not a file name",
                                field=field)
            if "://" in name:
                raise SpecError(f"{where}: data file {name} is a URL; {offline}", field=field)
            full = Path(name).expanduser()
            full = full if full.is_absolute() else files_base / full
            matches = sorted(glob.glob(str(full))) if set("*?[") & set(name) else [str(full)]
            if not matches or not Path(matches[0]).exists():
                raise SpecError(f"{where}: data file {name!r} does not exist (looked for "
                                f"{full})", field=field)
            out[str(split)] += [inside(m) for m in matches]
    return out


def _check_splits(config: dict, files: dict[str, list[Path]] | None, where: str,
                  field: str) -> None:
    if config.get("test_split") is None and config.get("validation_split") is None:
        raise SpecError(f"{where} names no split to evaluate on (test_split or "
                        "validation_split)", field=field)
    if files is None:
        return
    for key in _SPLITS:
        split = config.get(key)
        if split is not None and str(split) not in files:
            raise SpecError(f"{where}: {key} {split!r} is not a split of its data_files "
                            f"(it has: {', '.join(files)})", field=field)


def _check_fields(config: dict, files: dict[str, list[Path]] | None, output_type: str,
                  where: str, field: str) -> None:
    """doc_to_* against the first records of the evaluated split, when they are JSON Lines."""
    if files is None:
        return
    split = config.get("test_split") or config.get("validation_split")
    records = _first_records(files.get(str(split), []))
    if not records:
        return
    keys = set(records[0])
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = config.get(key)
        if not isinstance(value, str) or value in keys:
            continue
        if "{{" in value or "{%" in value:
            missing = sorted(_template_names(value) - keys)
            if missing:
                raise SpecError(f"{where}: {key} uses {', '.join(missing)}, which the records "
                                f"of {split!r} do not have (their fields: "
                                f"{', '.join(sorted(keys))})", field=field)
        elif key != "doc_to_text" and _IDENT.match(value):
            raise SpecError(f"{where}: {key} {value!r} is not a field of the records of "
                            f"{split!r} (their fields: {', '.join(sorted(keys))}); lm-eval "
                            "would take the word itself as the target", field=field)
    if output_type == "multiple_choice":
        _check_targets(config, records, where, field)


def _check_targets(config: dict, records: list[dict], where: str, field: str) -> None:
    target, choice = config.get("doc_to_target"), config.get("doc_to_choice")
    for number, record in enumerate(records, start=1):
        choices = record.get(choice) if isinstance(choice, str) else (
            choice if isinstance(choice, list) else None)
        value = record.get(target) if isinstance(target, str) else target
        if not isinstance(choices, list) or value is None:
            return  # a template or a function: lm-eval's own check at the worker
        ok = (0 <= value < len(choices) if isinstance(value, int) and not isinstance(value, bool)
              else value in choices)
        if not ok:
            raise SpecError(f"{where}: record {number}: the target {value!r} "
                            f"(doc_to_target) is not one of its {len(choices)} choices "
                            "(an index from 0, or the text of a choice)", field=field)


def _first_records(files: list[Path]) -> list[dict]:
    """The first records of a JSON Lines file (none when it is not one)."""
    if not files or files[0].suffix not in (".jsonl", ".json"):
        return []
    records = []
    try:
        with files[0].open(encoding="utf-8") as lines:
            for _, line in zip(range(CHECKED_LINES), lines):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        return []
                    records.append(record)
    except (OSError, UnicodeError, ValueError):
        return []  # not JSON Lines (a JSON array, say): datasets reads it at the worker
    return records


def _template_names(template: str) -> set[str]:
    """The free variables of a Jinja template (lm-eval's doc_to_* templates)."""
    from jinja2 import Environment, meta
    from jinja2.exceptions import TemplateSyntaxError

    env = Environment()
    try:
        names = meta.find_undeclared_variables(env.parse(template))
    except TemplateSyntaxError:
        return set()  # lm-eval reports it at the worker
    return names - set(env.globals)
