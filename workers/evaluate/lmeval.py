"""lm-evaluation-harness tasks as tax tasks: one local task YAML, scored on the in-memory model.

:func:`lm_eval_metric` runs one lm-eval task (any output type: ``multiple_choice``,
``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) on a loaded ``transformers``
causal LM and returns the task's metric and its direction, as :data:`tasks.TAX_METRICS` does
for the built-in tax tasks.

- The model is wrapped, never copied or reloaded (``HFLM(pretrained=model)``): weights changed in
  place between calls are what the next call scores. HFLM puts the model in eval mode; its
  previous train/eval mode is restored afterwards.
- The task is read from its YAML (``include:`` and ``!function`` resolved by lm-eval's own
  loader, relative to the YAML), and relative local paths in ``dataset_kwargs`` (``data_files``,
  ``data_dir``) and ``dataset_path`` are made relative to the YAML's folder, not the working
  directory. The task is then built from that config alone: nothing else is indexed or fetched,
  so it runs offline as long as its data is local.
- Offline: a ``dataset_path`` that is neither local nor a builder of local files is a
  SpecError before lm-eval starts, and the run itself has hub access off
  (workers/evaluate/lmeval_env.py), so nothing is fetched or retried.
- :func:`check_task` is the worker's check before any model loads: the task built by lm-eval
  (its data read), the metric, and on the first documents that each target is one of the
  document's choices. :func:`check_base` refuses a θ_base figure that measures nothing
  (0, NaN, or the same value on every document), naming the task: a wrong ``doc_to_target``
  otherwise scores every model 0 and the task adds no tax at all.
- No stderr bootstrap; samples are logged so that :func:`lm_eval_records` can return the
  per-document values behind a mean metric (its standard error); zero-shot unless the YAML
  sets ``num_fewshot``.
- ``on_batch`` is called before every forward pass (loglikelihood) and every ``generate`` call
  (generation): once per batch; raising from it stops the evaluation and propagates unchanged.
- Deterministic for a fixed model: lm-eval's seeds (python, numpy, torch, few-shot sampler) are
  set for the run and the caller's random states are restored afterwards. lm-eval's warnings
  are collected and summarised once (lmeval_env.collected); its progress bars are off.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from service.errors import DependencyUnavailableError, EvaluationError, SpecError
from service.lmeval_task import LOCAL_BUILDERS
from workers.evaluate.lmeval_env import (LAST_WARNINGS, SEED, collected, describe, offline,
                                         quiet_bars, seeded)

_INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'hmaopt[lmeval]'"
_GLOB_CHARS = frozenset("*?[")
#: documents whose target :func:`check_task` checks against their choices
CHECKED_DOCS = 50


def lm_eval_metric(model, tokenizer, task_yaml: str | Path, *, metric: str | None = None,
                   batch_size: int = 16, limit: int | None = None,
                   on_batch: Callable[[], None] | None = None) -> tuple[float, bool]:
    """Run one local lm-evaluation-harness task on an in-memory transformers model.

    Returns (metric value, higher_is_better). ``metric`` is a metric name of the task (``acc``)
    or ``name,filter`` (``exact_match,strict-match``); default: the task's first metric, first
    filter. ``limit``: only the first ``limit`` documents (lm-eval's ``limit``).
    """
    value, higher, _ = lm_eval_records(model, tokenizer, task_yaml, metric=metric,
                                       batch_size=batch_size, limit=limit, on_batch=on_batch)
    return value, higher


def lm_eval_records(model, tokenizer, task_yaml: str | Path, *, metric: str | None = None,
                    batch_size: int = 16, limit: int | None = None,
                    on_batch: Callable[[], None] | None = None
                    ) -> tuple[float, bool, list[float] | None]:
    """:func:`lm_eval_metric` with the per-document values behind the figure, in document
    order, where lm-eval gives them (a metric aggregated by its mean; None otherwise)."""
    path, lm_eval, config = _prepare(task_yaml)
    name = config["task"]

    hook_errors: list[BaseException] = []

    def hook() -> None:
        if on_batch is not None:
            try:
                on_batch()
            except BaseException as exc:
                hook_errors.append(exc)
                raise

    with collected(name, key=str(path.resolve())), quiet_bars(), seeded(), offline():
        loaded, task = _load_task(lm_eval, config, path)
        metric_name, wanted = _pick_metric(task.higher_is_better(), metric, path, name)

        was_training = model.training
        try:
            lm = _make_lm(lm_eval, model, tokenizer, batch_size, hook)
            results = lm_eval["evaluate"](lm=lm, task_dict=loaded, limit=limit,
                                          bootstrap_iters=0, log_samples=True)
        except BaseException as exc:
            if any(exc is e for e in hook_errors) or not isinstance(exc, Exception):
                raise
            raise EvaluationError(f"lm-eval task {name!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            model.train(was_training)

    values = results["results"][name]
    key = next((k for k in values if k == wanted or k.split(",", 1)[0] == wanted), None)
    if key is None:
        raise EvaluationError(f"lm-eval task {name!r} returned no {wanted!r} value "
                              f"(it returned: {', '.join(k for k in values if ',' in k)})")
    try:
        value = float(values[key])
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"lm-eval task {name!r}: {key!r} is {values[key]!r}, not a number") from exc
    higher = results["higher_is_better"][name].get(metric_name)
    if higher is None:
        raise EvaluationError(f"lm-eval task {name!r} did not say whether higher {metric_name!r} is better")
    return value, bool(higher), _per_doc(results, name, key, metric_name, value)


def check_task(task_yaml: str | Path, *, metric: str | None = None, limit: int | None = None,
               label: str | None = None) -> str:
    """The worker's check of a task before any model loads (see the module docstring);
    returns the lm-eval task's name. ``label`` (the tax task) goes into the messages."""
    path, lm_eval, config = _prepare(task_yaml)
    name = config["task"]
    what = f"{label}: lm-eval task {name!r} ({path})" if label else f"lm-eval task {name!r} ({path})"
    with collected(name), quiet_bars(), seeded(), offline():
        _, task = _load_task(lm_eval, config, path)
        _pick_metric(task.higher_is_better(), metric, path, name)
        try:
            docs = list(task.eval_docs)[:min(CHECKED_DOCS, limit or CHECKED_DOCS)]
        except Exception as exc:
            raise EvaluationError(f"{what}: its documents cannot be read: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if not docs:
            raise SpecError(f"{what} has no documents to evaluate")
        if task.OUTPUT_TYPE == "multiple_choice":
            for i, doc in enumerate(docs):
                try:
                    target, choices = task.doc_to_target(doc), task.doc_to_choice(doc)
                except Exception as exc:
                    raise SpecError(f"{what}: document {i}: doc_to_target / doc_to_choice "
                                    f"fail: {type(exc).__name__}: {exc}") from exc
                ok = (0 <= target < len(choices) if isinstance(target, int)
                      else target in choices if isinstance(target, str) else True)
                if not ok:
                    raise SpecError(f"{what}: document {i}: its target {target!r} "
                                    f"(doc_to_target) is not one of its {len(choices)} "
                                    "choices; check doc_to_target and doc_to_choice")
    return name


def check_base(label: str, task_yaml: str | Path, value: float,
               per_doc: list[float] | None) -> None:
    """EvaluationError naming the task when θ_base's figure measures nothing: not finite, 0,
    or the same on every document (more than one): then no merge can show a tax on it."""
    where = f"{label} (lm-eval {task_yaml})"
    warned = LAST_WARNINGS.get(str(Path(task_yaml).expanduser().resolve()))
    hint = (" lm-eval warned: " + describe(warned) + ".") if warned else ""
    fix = (" Check the task's doc_to_target, doc_to_choice and metric against its data "
           "(a wrong doc_to_target scores every model 0).")
    if not math.isfinite(value):
        raise EvaluationError(f"{where}: θ_base's figure is {value}: the task measures "
                              f"nothing.{fix}{hint}")
    if value == 0:
        raise EvaluationError(f"{where}: θ_base scores 0: the task cannot show a loss "
                              f"against it (its tax would be 0 for every merge).{fix}{hint}")
    if per_doc is not None and len(per_doc) > 1 and len(set(per_doc)) == 1:
        raise EvaluationError(f"{where}: θ_base scores {per_doc[0]:g} on each of its "
                              f"{len(per_doc)} documents: the task cannot tell models apart "
                              "(choices that tie, a constant target; a base model perfect on "
                              "every document leaves no spread either: use harder or more "
                              f"documents).{fix}{hint}")


def _prepare(task_yaml: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(path, lm-eval's entry points, the task's config): the file checked, the config read
    and its data confirmed local."""
    path = Path(task_yaml).expanduser()
    if not path.is_file():
        raise SpecError(f"lm-eval task file {str(path)!r} does not exist or is not a file")
    lm_eval = _import_lm_eval()
    config = _read_config(path, lm_eval)
    dataset_path = config.get("dataset_path")
    if (isinstance(dataset_path, str) and dataset_path not in LOCAL_BUILDERS
            and not Path(dataset_path).expanduser().exists()):
        raise SpecError(f"lm-eval task file {str(path)!r}: dataset_path {dataset_path!r} is "
                        "not a local file or folder: it names a hub data set, and hmaopt runs "
                        "lm-eval offline; put the data in the data roots and name local "
                        "files (dataset_path: json, dataset_kwargs.data_files)")
    return path, lm_eval, config


def _load_task(lm_eval: dict[str, Any], config: dict[str, Any], path: Path):
    """(lm-eval's task dict, the task) built from ``config`` alone, zero-shot by default."""
    name = config["task"]
    try:
        loaded = lm_eval["TaskManager"](include_defaults=False).load([config])
        task = loaded["tasks"][name]
    except Exception as exc:
        offline_hint = (" (hmaopt runs lm-eval offline: its data must be local files)"
                        if "offline" in f"{type(exc).__name__} {exc}".lower() else "")
        raise EvaluationError(f"lm-eval task {name!r} ({path}) could not be loaded: "
                              f"{type(exc).__name__}: {exc}{offline_hint}") from exc
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=SEED)
    return loaded, task


def _per_doc(results: dict, name: str, key: str, metric_name: str,
             value: float) -> list[float] | None:
    """The documents' values of ``key`` (``metric,filter``) when their mean is the figure."""
    flt = key.split(",", 1)[1] if "," in key else "none"
    samples = [s for s in results.get("samples", {}).get(name, [])
               if s.get("filter", "none") == flt and metric_name in s]
    try:
        values = [float(s[metric_name]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    except (TypeError, ValueError, KeyError):
        return None
    if not values or abs(sum(values) / len(values) - value) > 1e-9 * max(1.0, abs(value)):
        return None  # not a mean over documents (a corpus-level metric): no per-doc values
    return values


def _import_lm_eval() -> dict[str, Any]:
    try:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DependencyUnavailableError(_INSTALL_HINT) from exc
    try:  # the YAML reader lm-eval itself uses (include:, !function)
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as exc:
        raise DependencyUnavailableError(
            f"this lm-evaluation-harness version is not supported ({exc}): "
            "pip install 'hmaopt[lmeval]'") from exc
    return {"evaluate": evaluate, "HFLM": HFLM, "TaskManager": TaskManager, "load_yaml": load_yaml}


def _read_config(path: Path, lm_eval: dict[str, Any]) -> dict[str, Any]:
    """The task's full config (includes merged, functions imported), local paths resolved."""
    import yaml

    try:
        config = lm_eval["load_yaml"](path, resolve_func=True)
    except yaml.YAMLError as exc:
        raise SpecError(f"lm-eval task file {str(path)!r} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"lm-eval task file {str(path)!r} cannot be read: {exc}") from exc
    except Exception as exc:  # bad include, bad !function reference, not a mapping
        raise SpecError(f"lm-eval task file {str(path)!r} cannot be loaded: "
                        f"{type(exc).__name__}: {exc}") from exc
    if "group" in config or isinstance(config.get("task"), list):
        raise SpecError(f"lm-eval task file {str(path)!r} defines a group; give the YAML of one task")
    name = config.get("task")
    if not name or not isinstance(name, str):
        raise SpecError(f"lm-eval task file {str(path)!r} has no 'task:' name")
    _resolve_local_paths(config, path)
    return config


def _local(value: Any, base: Path) -> Any:
    """A relative local path joined to ``base``; URLs, absolute paths and non-strings as they are."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    p = Path(value).expanduser()
    return value if p.is_absolute() else str(base / p)


def _resolve_local_paths(config: dict[str, Any], path: Path) -> None:
    """Make the task's local data paths relative to the YAML's folder, not the working directory.

    ``dataset_path`` when it names something beside the YAML (or starts with ./ ../ ~);
    ``dataset_kwargs.data_dir``; ``dataset_kwargs.data_files`` unless a local ``dataset_path``
    folder or a ``data_dir`` is their base already (datasets reads them relative to it).
    A local data file that does not exist is a :class:`SpecError`.
    """
    base = path.resolve().parent
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (dataset_path.startswith(("./", "../", "~"))
                                          or (base / dataset_path).exists()):
        config["dataset_path"] = _local(dataset_path, base)
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return
    kwargs = config["dataset_kwargs"] = dict(kwargs)
    files_base: Path | None = base
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = _local(kwargs["data_dir"], base)
        files_base = None if "://" in kwargs["data_dir"] else Path(kwargs["data_dir"])
    elif isinstance(config.get("dataset_path"), str) and Path(config["dataset_path"]).is_dir():
        files_base = Path(config["dataset_path"])
    files = kwargs.get("data_files")
    if files_base == base:
        if isinstance(files, list):
            files = [_local(f, base) for f in files]
        elif isinstance(files, dict):
            files = {split: [_local(f, base) for f in v] if isinstance(v, list) else _local(v, base)
                     for split, v in files.items()}
        else:
            files = _local(files, base)
        if files is not None:
            kwargs["data_files"] = files
    for file in _flatten(files):
        if files_base is None or "://" in file or _GLOB_CHARS & set(file):
            continue
        if not (files_base / Path(file).expanduser()).exists():
            raise SpecError(f"lm-eval task file {str(path)!r}: data file {file!r} does not exist")


def _flatten(files: Any) -> Iterator[str]:
    if isinstance(files, str):
        yield files
    elif isinstance(files, list):
        for f in files:
            yield from _flatten(f)
    elif isinstance(files, dict):
        for f in files.values():
            yield from _flatten(f)


def _pick_metric(directions: dict[str, bool], metric: str | None, path: Path,
                 name: str) -> tuple[str, str]:
    """(metric name, results key or key prefix) of the requested metric, else a SpecError."""
    if not directions:
        raise SpecError(f"lm-eval task file {str(path)!r}: task {name!r} has no metrics")
    if metric is None:
        first = next(iter(directions))
        return first, first
    metric_name = metric.split(",", 1)[0]
    if metric_name not in directions:
        raise SpecError(f"lm-eval task file {str(path)!r}: task {name!r} has no metric {metric!r} "
                        f"(it has: {', '.join(directions)})")
    return metric_name, metric


def _make_lm(lm_eval: dict[str, Any], model, tokenizer, batch_size: int, hook: Callable[[], None]):
    """HFLM around the model itself, calling ``hook`` per batch, without progress bars."""
    HFLM = lm_eval["HFLM"]

    class HookedHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            hook()
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            hook()
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, **kwargs):  # rolling asks for a bar
            return super()._loglikelihood_tokens(requests, **{**kwargs, "disable_tqdm": True})

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # HFLM sets a pad token: not on the caller's tokenizer
    # HFLM warns on every wrapped (not path-loaded) model; that is how it is meant to be used here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return HookedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size))
    finally:
        hf_logger.setLevel(level)
