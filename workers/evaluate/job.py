"""The evaluator of one job: reward and alignment tax of the live (merged) model, staged.

Data: every JSONL set of the job is split once, deterministically (by record content, see
:func:`~workers.evaluate.data.split_parts`), into a search part (what the sampler tunes
on), a validation part (where the best few candidates are measured again to choose the
answer) and a holdout part (measured only for the answer); the search part of each tax set
is cut again into stage 1 (the first ``prune_fraction``) and stage 2 (the rest). lm-eval
tasks are not split: they run whole in stage 2, and their validation and holdout figures
are their search figure (such a measurement says ``held_out: False``).

A trial (:meth:`JobEvaluator.evaluate`):

1. stage 1: the tax sets' stage-1 slices; their weighted tax is the *partial tax*. With
   pruning on, a trial whose partial tax exceeds ``budget + prune_margin`` beyond its noise
   (its one-sided lower bound at ``prune_confidence`` is above it: the stage-1 slices are
   small, and their tax alone is a noisy estimate) stops here (pruned, its partial metrics
   kept);
2. stage 2: the rest of each tax set (metrics are computed from sufficient statistics summed
   over both stages, so the full figure equals a one-shot measurement) and the reward.

Tax per task is the relative degradation against θ_base on the same slice; the job's tax is
the weighted mean over tasks. Every figure carries its standard error, from the per-record
values behind it (reward: over prompts; tax: each task's tax over its records, paired with
θ_base on the same records by the delta method, then combined over the independent tasks;
see service/stats.py), and the per-record values stay on the measurement (``records``, in
memory only) so that two merges can be compared record by record. θ_base's statistics are measured once per job and cached in
a JSON file keyed by the base checkpoint's and the data files' hashes and the evaluation
settings (:func:`~workers.evaluate.basecache.base_cache_key`), so reruns skip them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from service import stats
from service.errors import SpecError
from service.spec import JobSpec, TaxTask
from workers.evaluate import tasks as T
from workers.evaluate.basecache import base_cache_key  # noqa: F401  (re-exported)
from workers.evaluate.data import load_jsonl, split_parts
from workers.evaluate.lm import BatchHook
from workers.evaluate.tasks import PerRecord

log = logging.getLogger(__name__)

SLICES = ("stage1", "stage2", "validation", "holdout")
#: the parts a merge is measured on after the search: where the answer is chosen, reported
PARTS = ("validation", "holdout")


@dataclass
class Measurement:
    """What one evaluation found. ``stage`` is 1 when stopped after stage 1, else 2.

    ``reward_se``, ``tax_se``: standard errors (None where a figure has no spread to
    estimate it from: one record, a python reward, an lm-eval metric without per-document
    values); ``n_reward``, ``n_tax``: the records behind each; ``held_out``: False when a
    figure of a held-out part had to use the search data (unsplit sets), and
    ``from_search_data`` names those sets (tax task names, ``reward``); ``records``: the
    per-record values (reward per prompt, per task its PerRecord), not serialised.
    """

    stage: int
    tax: float
    metrics: dict[str, float]  # per task: its metric (accuracy, perplexity, ...)
    task_tax: dict[str, float]  # per task: relative degradation against θ_base
    reward: float | None = None
    pruned: bool = False
    seconds: float = 0.0
    reward_se: float | None = None
    tax_se: float | None = None
    n_reward: int = 0
    n_tax: int = 0
    held_out: bool = True
    from_search_data: list[str] = field(default_factory=list)
    records: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("records")
        return out

    @property
    def reward_records(self) -> list[float] | None:
        return self.records.get("reward")


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
        validation_share = spec.search.validation_fraction
        self.tasks: dict[str, _Task] = {}
        for task in spec.tax.tasks:
            if task.type == "lm_eval":
                self.tasks[task.name] = _Task(task, True)
                continue
            records = load_jsonl(task.data, task.type)
            search, validation, holdout = split_parts(records, fraction, validation_share,
                                                      seed=f"tax:{task.name}")
            n1 = max(1, round(len(search) * spec.search.prune_fraction)) if len(search) > 1 else 0
            self.tasks[task.name] = _Task(task, T.TAX_METRICS[task.type][1], {
                "stage1": search[:n1], "stage2": search[n1:], "validation": validation,
                "holdout": holdout})
        reward = spec.reward
        self.python_reward = T.load_python_reward(reward.function) if reward.type == "python" else None
        self.reward_sets: dict[str, list[dict]] = {}
        if reward.type in ("reward_model", "preference"):
            kind, path = (("prompts", reward.prompts) if reward.type == "reward_model"
                          else ("preference", reward.data))
            search, valid, holdout = split_parts(load_jsonl(path, kind), fraction,
                                                 validation_share, seed="reward")
            self.reward_sets = {"search": search, "validation": valid, "holdout": holdout}
        if reward.type == "reward_model" and reward_model is None:
            raise SpecError("reward type reward_model needs a loaded reward model",
                            field="reward.model")
        self.base: dict[str, dict] | None = None

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
        """Measure θ_base's per-record values on every slice (the live model must hold
        θ_base). Returns True when they came from the cache."""
        file = Path(cache_dir) / f"{cache_key}.json" if cache_dir and cache_key else None
        if file is not None and file.is_file():
            try:
                cached = json.loads(file.read_text())
                slices = {n: {s for s in SLICES if t.slices.get(s)} for n, t in self.tasks.items()
                          if t.spec.type != "lm_eval"}
                if set(cached) == set(self.tasks) and all(set(cached[n]) == s
                                                          for n, s in slices.items()):
                    self.base = {name: self._base_from_json(name, d) for name, d in cached.items()}
                    log.info("θ_base figures from cache %s", file)
                    return True
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("ignoring unreadable θ_base cache %s", file)
        base: dict[str, dict] = {}
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                value, higher, per_doc = self._lm_eval(task.spec, on_batch)
                task.higher_is_better = higher
                base[name] = {"value": value, "higher_is_better": higher, "per_doc": per_doc}
                continue
            base[name] = {s: self._records(task, s, on_batch) for s in SLICES if task.slices[s]}
        self.base = base
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            tmp.write_text(json.dumps({n: {k: (v.to_json() if isinstance(v, PerRecord) else v)
                                           for k, v in d.items()} for n, d in base.items()}))
            tmp.replace(file)
        return False

    def _base_from_json(self, name: str, d: dict) -> dict:
        if self.tasks[name].spec.type == "lm_eval":
            self.tasks[name].higher_is_better = d["higher_is_better"]
            return {"value": d["value"], "higher_is_better": d["higher_is_better"],
                    "per_doc": d.get("per_doc")}
        return {k: PerRecord.from_json(v) for k, v in d.items()}

    # ------------------------------------------------------------------ trials

    def evaluate(self, *, budget: float | None = None, prune_margin: float = 0.0,
                 prune_confidence: float | None = None, on_batch: BatchHook = None,
                 on_stage: Callable[[Measurement], None] | None = None) -> Measurement:
        """Staged evaluation of the live model on the search data (see the module docstring).

        With ``budget`` set, a trial whose stage-1 tax exceeds ``budget + prune_margin`` (its
        lower bound at ``prune_confidence`` when given) is returned after stage 1 with
        ``pruned=True``. ``on_stage`` sees the stage-1 measurement.
        """
        if self.base is None:
            raise RuntimeError("measure_base() first")
        started = time.perf_counter()
        stage1 = {n: self._records(t, "stage1", on_batch) for n, t in self.tasks.items()
                  if t.slices.get("stage1")}
        partial = self._combine({n: (stage1[n], self.base[n]["stage1"]) for n in stage1})
        if stage1:
            partial.stage = 1
            partial.seconds = time.perf_counter() - started
            if on_stage is not None:
                on_stage(partial)
            if budget is not None and stats.lower_bound_of(
                    partial.tax, partial.tax_se, prune_confidence) > budget + prune_margin:
                partial.pruned = True
                return partial
        pairs, lm_values = {}, {}
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                lm_values[name] = self._lm_eval(task.spec, on_batch)
                continue
            s1 = stage1.get(name, PerRecord())
            s2 = self._records(task, "stage2", on_batch) if task.slices["stage2"] else PerRecord()
            base = self.base[name]
            pairs[name] = (s1 + s2, base.get("stage1", PerRecord()) + base.get("stage2", PerRecord()))
        result = self._combine(pairs, lm_values)
        self._reward_into(result, "search", on_batch)
        result.seconds = time.perf_counter() - started
        return result

    def evaluate_part(self, part: str, on_batch: BatchHook = None) -> Measurement:
        """Reward and tax of the live model on the ``validation`` or ``holdout`` part (no
        staging). A set without records in that part is measured on its search part, and
        the measurement says ``held_out: False``."""
        if self.base is None:
            raise RuntimeError("measure_base() first")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {part!r}")
        started = time.perf_counter()
        pairs, lm_values, unsplit = {}, {}, []
        for name, task in self.tasks.items():
            if task.spec.type == "lm_eval":
                lm_values[name] = self._lm_eval(task.spec, on_batch)
            elif task.slices[part]:
                pairs[name] = (self._records(task, part, on_batch), self.base[name][part])
            else:  # too small to split: its search records stand in
                unsplit.append(name)
                merged = PerRecord()
                base = PerRecord()
                for s in ("stage1", "stage2"):
                    if task.slices[s]:
                        merged = merged + self._records(task, s, on_batch)
                        base = base + self.base[name][s]
                pairs[name] = (merged, base)
        result = self._combine(pairs, lm_values)
        result.from_search_data = [*lm_values, *unsplit]  # lm-eval tasks are never split
        result.held_out = not result.from_search_data
        self._reward_into(result, part, on_batch)
        result.seconds = time.perf_counter() - started
        return result

    def evaluate_holdout(self, on_batch: BatchHook = None) -> Measurement:
        """Reward and tax of the live model on the holdout data (no staging)."""
        return self.evaluate_part("holdout", on_batch)

    @property
    def has_holdout(self) -> bool:
        return self._has("holdout")

    @property
    def has_validation(self) -> bool:
        return self._has("validation")

    def _has(self, part: str) -> bool:
        return (any(t.slices.get(part) for t in self.tasks.values())
                or bool(self.reward_sets.get(part)))

    def reward(self, part: str, on_batch: BatchHook = None) -> float:
        """The reward of the live model on the ``search``, ``validation`` or ``holdout`` part
        of its data."""
        values, _ = self.reward_records(part, on_batch)
        return values if isinstance(values, float) else math.fsum(values) / len(values)

    def reward_records(self, part: str, on_batch: BatchHook = None
                       ) -> tuple[list[float] | float, bool]:
        """(the reward per prompt, or the python reward's one number; whether the part's own
        records were used: False when the part is empty and the search part stood in)."""
        spec = self.spec.reward
        if spec.type == "python":
            value = self.python_reward(self.model, self.tokenizer)
            try:
                return float(value), part == "search"
            except (TypeError, ValueError) as exc:
                raise SpecError(f"{spec.function} returned {value!r}, not a number",
                                field="reward.function") from exc
        own = bool(self.reward_sets.get(part))
        records = self.reward_sets[part] if own else self.reward_sets["search"]
        if spec.type == "preference":
            return T.preference_margins(self.model, self.tokenizer, records,
                                        batch_size=spec.batch_size, on_batch=on_batch), own
        return T.reward_model_scores(self.model, self.tokenizer, self.reward_model,
                                     self.reward_tokenizer, records,
                                     max_new_tokens=spec.max_new_tokens,
                                     batch_size=spec.batch_size, on_batch=on_batch), own

    def _reward_into(self, m: Measurement, part: str, on_batch: BatchHook) -> None:
        values, own = self.reward_records(part, on_batch)
        if isinstance(values, float):  # a python reward: one number, no spread
            m.reward, m.reward_se, m.n_reward = values, None, 1
        else:
            m.reward, m.reward_se = stats.mean_se(values)
            m.n_reward = len(values)
            m.records["reward"] = values
        if part != "search" and not own:
            m.held_out = False
            m.from_search_data.append("reward")

    # ------------------------------------------------------------------ helpers

    def _records(self, task: _Task, part: str, on_batch: BatchHook) -> PerRecord:
        t, records = task.spec, task.slices[part]
        if t.type == "multiple_choice":
            return T.multiple_choice_records(self.model, self.tokenizer, records,
                                             batch_size=t.batch_size, on_batch=on_batch)
        if t.type == "exact_match":
            return T.exact_match_records(self.model, self.tokenizer, records,
                                         max_new_tokens=t.max_new_tokens,
                                         batch_size=t.batch_size, on_batch=on_batch)
        return T.perplexity_records(self.model, self.tokenizer, records,
                                    batch_size=t.batch_size, on_batch=on_batch)

    def _lm_eval(self, t: TaxTask, on_batch: BatchHook) -> tuple[float, bool, list[float] | None]:
        from workers.evaluate.lmeval import lm_eval_records  # lm-eval is an optional extra

        return lm_eval_records(self.model, self.tokenizer, t.data, metric=t.metric,
                               batch_size=t.batch_size, limit=t.limit, on_batch=on_batch)

    def _combine(self, pairs: dict[str, tuple[PerRecord, PerRecord]],
                 lm_values: dict[str, tuple] | None = None) -> Measurement:
        metrics, task_tax, parts, per_task = {}, {}, [], {}
        n_tax = 0
        for name, (merged, base) in pairs.items():
            task = self.tasks[name]
            metrics[name], task_tax[name], se = T.task_tax(task.spec.type, merged, base,
                                                           task.higher_is_better)
            parts.append((task.spec.weight, task_tax[name], se))
            per_task[name] = merged
            n_tax += len(merged)
        for name, (value, _, per_doc) in (lm_values or {}).items():
            base = self.base[name]
            metrics[name] = value
            task_tax[name] = T.relative_degradation(value, base["value"], base["higher_is_better"])
            se = None
            if per_doc is not None and base.get("per_doc") is not None:
                ones = [1.0] * len(per_doc)
                _, _, se = T.task_tax("lm_eval", PerRecord(per_doc, ones),
                                      PerRecord(base["per_doc"], ones), base["higher_is_better"])
                per_task[name] = PerRecord(per_doc, ones)
            parts.append((self.tasks[name].spec.weight, task_tax[name], se))
            n_tax += len(per_doc) if per_doc is not None else 1
        tax, tax_se = stats.combine(parts)
        return Measurement(stage=2, tax=tax, metrics=metrics, task_tax=task_tax, tax_se=tax_se,
                           n_tax=n_tax, records={"tax": per_task})
