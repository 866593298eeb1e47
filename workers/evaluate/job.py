"""The evaluator of one job: reward and alignment tax of the live (merged) model, staged.

Data: every JSONL set of the job is split once, deterministically (by record content, see
:func:`~workers.evaluate.data.split_holdout`), into a search part and a holdout part; the
search part of each tax set is cut again into stage 1 (the first ``prune_fraction``) and
stage 2 (the rest). lm-eval tasks are not split: they run whole in stage 2, and their
holdout figure is their search figure.

A trial (:meth:`JobEvaluator.evaluate`):

1. stage 1: the tax sets' stage-1 slices; their weighted tax is the *partial tax*. With
   pruning on, a trial whose partial tax exceeds ``budget + prune_margin`` stops here
   (pruned, its partial metrics kept);
2. stage 2: the rest of each tax set (metrics are computed from sufficient statistics summed
   over both stages, so the full figure equals a one-shot measurement) and the reward.

Tax per task is the relative degradation against θ_base on the same slice; the job's tax is
the weighted mean over tasks. θ_base's statistics are measured once per job and cached in
a JSON file keyed by the base checkpoint's and the data files' hashes and the evaluation
settings (:func:`base_cache_key`), so reruns skip them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from service.errors import SpecError
from service.spec import JobSpec, TaxTask
from workers.evaluate import tasks as T
from workers.evaluate.data import load_jsonl, split_holdout
from workers.evaluate.lm import BatchHook

log = logging.getLogger(__name__)

#: bump when a metric's computation changes: cached θ_base figures of another version are ignored
EVALUATOR_VERSION = 1

SLICES = ("stage1", "stage2", "holdout")

Stats = tuple[float, float]  # a metric's sufficient statistics: (total, count)


@dataclass
class Measurement:
    """What one evaluation found. ``stage`` is 1 when stopped after stage 1, else 2."""

    stage: int
    tax: float
    metrics: dict[str, float]  # per task: its metric (accuracy, perplexity, ...)
    task_tax: dict[str, float]  # per task: relative degradation against θ_base
    reward: float | None = None
    pruned: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Task:
    spec: TaxTask
    higher_is_better: bool
    slices: dict[str, list[dict]] = field(default_factory=dict)  # empty for lm_eval


class JobEvaluator:
    """Measures the reward and the tax of ``model`` (the live merged model) for one job."""

    def __init__(self, spec: JobSpec, model, tokenizer, *, reward_model=None,
                 reward_tokenizer=None) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        fraction = spec.search.holdout_fraction
        self.tasks: dict[str, _Task] = {}
        for task in spec.tax.tasks:
            if task.type == "lm_eval":
                self.tasks[task.name] = _Task(task, True)
                continue
            records = load_jsonl(task.data, task.type)
            search, holdout = split_holdout(records, fraction, seed=f"tax:{task.name}")
            n1 = max(1, round(len(search) * spec.search.prune_fraction)) if len(search) > 1 else 0
            self.tasks[task.name] = _Task(task, T.TAX_METRICS[task.type][1], {
                "stage1": search[:n1], "stage2": search[n1:], "holdout": holdout})
        reward = spec.reward
        self.python_reward = T.load_python_reward(reward.function) if reward.type == "python" else None
        self.reward_sets: dict[str, list[dict]] = {}
        if reward.type in ("reward_model", "preference"):
            kind, path = (("prompts", reward.prompts) if reward.type == "reward_model"
                          else ("preference", reward.data))
            search, holdout = split_holdout(load_jsonl(path, kind), fraction, seed="reward")
            self.reward_sets = {"search": search, "holdout": holdout}
        if reward.type == "reward_model" and reward_model is None:
            raise SpecError("reward type reward_model needs a loaded reward model",
                            field="reward.model")
        self.base: dict[str, dict[str, Stats | float]] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, spec: JobSpec, model, tokenizer, *, trust_remote_code: bool = False) -> JobEvaluator:
        """Also loads the reward model of a ``reward_model`` job onto the model's device."""
        rm = rm_tok = None
        if spec.reward.type == "reward_model":
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from workers.checkpoint import Checkpoint

            Checkpoint.open(spec.reward.model)  # clear errors for a missing or pickle folder
            device = next(model.parameters()).device
            rm = AutoModelForSequenceClassification.from_pretrained(
                spec.reward.model, trust_remote_code=trust_remote_code,
                use_safetensors=True).to(device).eval()
            rm_tok = AutoTokenizer.from_pretrained(spec.reward.model,
                                                   trust_remote_code=trust_remote_code)
            if rm_tok.pad_token is None:
                rm_tok.pad_token = rm_tok.eos_token
            if rm.config.pad_token_id is None:
                rm.config.pad_token_id = rm_tok.pad_token_id
        return cls(spec, model, tokenizer, reward_model=rm, reward_tokenizer=rm_tok)

    # ------------------------------------------------------------------ θ_base

    def measure_base(self, *, cache_dir: str | Path | None = None, cache_key: str | None = None,
                     on_batch: BatchHook = None) -> bool:
        """Measure θ_base's statistics on every slice (the live model must hold θ_base).

        Returns True when they came from the cache.
        """
        file = Path(cache_dir) / f"{cache_key}.json" if cache_dir and cache_key else None
        if file is not None and file.is_file():
            try:
                cached = json.loads(file.read_text())
                if set(cached) == set(self.tasks):
                    self.base = {t: {k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in d.items()} for t, d in cached.items()}
                    log.info("θ_base figures from cache %s", file)
                    return True
            except (OSError, ValueError):
                log.warning("ignoring unreadable θ_base cache %s", file)
        base: dict[str, dict[str, Stats | float]] = {}
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                value, higher = self._lm_eval(task.spec, on_batch)
                task.higher_is_better = higher
                base[name] = {"value": value, "higher_is_better": higher}
                continue
            base[name] = {s: self._stats(task, s, on_batch) for s in SLICES if task.slices[s]}
        self.base = base
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            tmp.write_text(json.dumps(base))
            tmp.replace(file)
        return False

    # ------------------------------------------------------------------ trials

    def evaluate(self, *, budget: float | None = None, prune_margin: float = 0.0,
                 on_batch: BatchHook = None,
                 on_stage: Callable[[Measurement], None] | None = None) -> Measurement:
        """Staged evaluation of the live model on the search data (see the module docstring).

        With ``budget`` set, a trial whose stage-1 tax exceeds ``budget + prune_margin`` is
        returned after stage 1 with ``pruned=True``. ``on_stage`` sees the stage-1 measurement.
        """
        if self.base is None:
            raise RuntimeError("measure_base() first")
        started = time.perf_counter()
        stage1 = {n: self._stats(t, "stage1", on_batch) for n, t in self.tasks.items()
                  if t.slices.get("stage1")}
        partial = self._combine({n: (stage1[n], self.base[n]["stage1"]) for n in stage1})
        if stage1:
            partial.stage = 1
            partial.seconds = time.perf_counter() - started
            if on_stage is not None:
                on_stage(partial)
            if budget is not None and partial.tax > budget + prune_margin:
                partial.pruned = True
                return partial
        pairs = {}
        lm_values = {}
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                lm_values[name] = self._lm_eval(task.spec, on_batch)[0]
                continue
            s1 = stage1.get(name, (0.0, 0.0))
            s2 = self._stats(task, "stage2", on_batch) if task.slices["stage2"] else (0.0, 0.0)
            b1 = self.base[name].get("stage1", (0.0, 0.0))
            b2 = self.base[name].get("stage2", (0.0, 0.0))
            pairs[name] = ((s1[0] + s2[0], s1[1] + s2[1]), (b1[0] + b2[0], b1[1] + b2[1]))
        result = self._combine(pairs, lm_values)
        result.reward = self.reward("search", on_batch)
        result.seconds = time.perf_counter() - started
        return result

    def evaluate_holdout(self, on_batch: BatchHook = None) -> Measurement:
        """Reward and tax of the live model on the holdout data (no staging)."""
        if self.base is None:
            raise RuntimeError("measure_base() first")
        started = time.perf_counter()
        pairs, lm_values = {}, {}
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                lm_values[name] = self._lm_eval(task.spec, on_batch)[0]
            elif task.slices["holdout"]:
                pairs[name] = (self._stats(task, "holdout", on_batch), self.base[name]["holdout"])
        result = self._combine(pairs, lm_values)
        result.reward = self.reward("holdout", on_batch)
        result.seconds = time.perf_counter() - started
        return result

    @property
    def has_holdout(self) -> bool:
        return (any(t.slices.get("holdout") for t in self.tasks.values())
                or bool(self.reward_sets.get("holdout")))

    def reward(self, part: str, on_batch: BatchHook = None) -> float:
        """The reward of the live model on the ``search`` or ``holdout`` part of its data."""
        spec = self.spec.reward
        if spec.type == "python":
            value = self.python_reward(self.model, self.tokenizer)
            try:
                return float(value)
            except (TypeError, ValueError) as exc:
                raise SpecError(f"{spec.function} returned {value!r}, not a number",
                                field="reward.function") from exc
        records = self.reward_sets[part] or self.reward_sets["search"]
        if spec.type == "preference":
            return T.preference_margin(self.model, self.tokenizer, records,
                                       batch_size=spec.batch_size, on_batch=on_batch)
        return T.reward_model_score(self.model, self.tokenizer, self.reward_model,
                                    self.reward_tokenizer, records,
                                    max_new_tokens=spec.max_new_tokens,
                                    batch_size=spec.batch_size, on_batch=on_batch)

    # ------------------------------------------------------------------ helpers

    def _stats(self, task: _Task, part: str, on_batch: BatchHook) -> Stats:
        t, records = task.spec, task.slices[part]
        if t.type == "multiple_choice":
            return T.multiple_choice_stats(self.model, self.tokenizer, records,
                                           batch_size=t.batch_size, on_batch=on_batch)
        if t.type == "exact_match":
            return T.exact_match_stats(self.model, self.tokenizer, records,
                                       max_new_tokens=t.max_new_tokens,
                                       batch_size=t.batch_size, on_batch=on_batch)
        return T.perplexity_stats(self.model, self.tokenizer, records,
                                  batch_size=t.batch_size, on_batch=on_batch)

    def _lm_eval(self, t: TaxTask, on_batch: BatchHook) -> tuple[float, bool]:
        from workers.evaluate.lmeval import lm_eval_metric

        return lm_eval_metric(self.model, self.tokenizer, t.data, metric=t.metric,
                              batch_size=t.batch_size, limit=t.limit, on_batch=on_batch)

    def _combine(self, pairs: dict[str, tuple[Stats, Stats]],
                 lm_values: dict[str, float] | None = None) -> Measurement:
        metrics, task_tax = {}, {}
        for name, (stats, base_stats) in pairs.items():
            kind = self.tasks[name].spec.type
            metrics[name] = T.finish_metric(kind, *stats)
            base_value = T.finish_metric(kind, *base_stats)
            task_tax[name] = T.relative_degradation(metrics[name], base_value,
                                                    self.tasks[name].higher_is_better)
        for name, value in (lm_values or {}).items():
            base = self.base[name]
            metrics[name] = value
            task_tax[name] = T.relative_degradation(value, base["value"], base["higher_is_better"])
        weights = {n: self.tasks[n].spec.weight for n in task_tax}
        total = sum(weights.values())
        tax = sum(task_tax[n] * w for n, w in weights.items()) / total if total else 0.0
        return Measurement(stage=2, tax=tax, metrics=metrics, task_tax=task_tax)


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
