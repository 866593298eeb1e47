"""Metrics of one model on one data set: the tax tasks and the reward types.

Each tax metric has a direction; :func:`relative_degradation` turns a value and the base
model's value into the task's tax (positive = worse than the base model). The ``*_records``
functions return a metric's per-record values, whose sums are its sufficient statistics
(total, count) and add up across slices of a data set (staged evaluation);
:func:`finish_metric` turns them into the metric.

Behind each figure are per-record values (:class:`PerRecord`: a total and a count per
record, e.g. correct 0/1 of 1 item, or the NLL of a text over its tokens; the ``*_records``
functions), kept so that every figure gets a standard error and two merges can be compared
record by record: :func:`task_tax` gives a task's tax with each record's influence on it,
paired with θ_base on the same records.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Sequence

from dataclasses import dataclass, field

import torch

from service import stats
from service.errors import EvaluationError, SpecError
from workers.evaluate.lm import BatchHook, continuation_logprobs, greedy_generate

#: metric name and whether higher is better, per tax task type
TAX_METRICS: dict[str, tuple[str, bool]] = {
    "multiple_choice": ("accuracy", True),
    "exact_match": ("accuracy", True),
    "perplexity": ("perplexity", False),
}


@dataclass
class PerRecord:
    """A metric's per-record values: ``totals[i]`` over ``counts[i]`` (1 per item for an
    accuracy; the tokens of a text for a mean NLL). Their sums are the sufficient
    statistics; records in data-set order, so two measurements of one slice pair up."""

    totals: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.totals)

    def __add__(self, other: PerRecord) -> PerRecord:
        return PerRecord(self.totals + other.totals, self.counts + other.counts)

    def sums(self) -> tuple[float, float]:
        return math.fsum(self.totals), math.fsum(self.counts)

    def to_json(self) -> list[list[float]]:
        return [self.totals, self.counts]

    @classmethod
    def from_json(cls, value) -> PerRecord:
        totals, counts = value
        return cls(list(map(float, totals)), list(map(float, counts)))


def relative_degradation(value: float, base_value: float, higher_is_better: bool) -> float:
    """(base - value) / |base| for higher-is-better metrics, (value - base) / |base| otherwise."""
    scale = max(abs(base_value), 1e-12)
    return (base_value - value) / scale if higher_is_better else (value - base_value) / scale


def task_tax(task_type: str, merged: PerRecord, base: PerRecord,
             higher_is_better: bool) -> tuple[float, float, float | None]:
    """(metric, tax, SE of the tax) of one task from the per-record values of the merged
    model and of θ_base on the same records. The tax is :func:`relative_degradation` of the
    metrics; its SE comes from each record's influence on it (delta method, paired: the
    same records measured twice, so what is common to both cancels)."""
    metric = finish_metric(task_type, *merged.sums())
    base_metric = finish_metric(task_type, *base.sums())
    tax = relative_degradation(metric, base_metric, higher_is_better)
    if len(merged) != len(base):
        raise EvaluationError(f"{task_type}: {len(merged)} records against θ_base's "
                              f"{len(base)}; the θ_base cache is stale (delete it)")
    mean, phi = stats.ratio_influence(merged.totals, merged.counts)
    base_mean, phi_base = stats.ratio_influence(base.totals, base.counts)
    if task_type == "perplexity":  # tax = exp(L - L_base) - 1, L the mean NLL per token
        factor = math.exp(mean - base_mean)
        influence = [factor * (p - q) for p, q in zip(phi, phi_base)]
    else:  # tax = sign * (base - metric) / base, metric a mean over records
        scale = max(abs(base_mean), 1e-12)
        sign = 1.0 if higher_is_better else -1.0
        influence = [sign * (-p + mean / scale * q) / scale for p, q in zip(phi, phi_base)]
    return metric, tax, stats.se_of(influence)


def multiple_choice_records(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                            on_batch: BatchHook = None) -> PerRecord:
    """Per record: 1 when its answer has the highest log-likelihood among its choices."""
    pairs = [(r["prompt"], c) for r in records for c in r["choices"]]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, on_batch=on_batch)
    correct, i = [], 0
    for r in records:
        n = len(r["choices"])
        lls = [s for s, _ in scores[i:i + n]]
        correct.append(float(max(range(n), key=lls.__getitem__) == r["answer"]))
        i += n
    return PerRecord(correct, [1.0] * len(records))


def multiple_choice_accuracy(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                             on_batch: BatchHook = None) -> float:
    """Share of records whose answer has the highest log-likelihood among its choices."""
    return finish_metric("multiple_choice", *multiple_choice_records(
        model, tokenizer, records, batch_size=batch_size, on_batch=on_batch).sums())


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$|^[{re.escape(string.punctuation)}]+")


def normalize_answer(text: str) -> str:
    """Lower case, first line only, collapsed whitespace, outer punctuation stripped."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _PUNCT.sub("", " ".join(first.lower().split())).strip()


def exact_match_records(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 16,
                        batch_size: int = 16, on_batch: BatchHook = None) -> PerRecord:
    """Per record: 1 when the greedy completion equals the answer (:func:`normalize_answer`)."""
    outputs = greedy_generate(model, tokenizer, [r["prompt"] for r in records],
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_batch=on_batch)
    hits = [float(normalize_answer(o) == normalize_answer(r["answer"]))
            for o, r in zip(outputs, records)]
    return PerRecord(hits, [1.0] * len(records))


def exact_match_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 16,
                         batch_size: int = 16, on_batch: BatchHook = None) -> float:
    """Share of greedy completions equal to the answer after :func:`normalize_answer`."""
    return finish_metric("exact_match", *exact_match_records(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
        on_batch=on_batch).sums())


def perplexity_records(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                       on_batch: BatchHook = None) -> PerRecord:
    """Per text: its negative log-likelihood over its tokens."""
    scores = continuation_logprobs(model, tokenizer, [("", r["text"]) for r in records],
                                   batch_size=batch_size, on_batch=on_batch)
    return PerRecord([-s for s, _ in scores], [float(n) for _, n in scores])


def perplexity(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
               on_batch: BatchHook = None) -> float:
    """exp(total negative log-likelihood / total tokens) over the texts."""
    return finish_metric("perplexity", *perplexity_records(
        model, tokenizer, records, batch_size=batch_size, on_batch=on_batch).sums())


def finish_metric(task_type: str, total: float, count: float) -> float:
    """A tax metric from its sufficient statistics (sums over records add across slices)."""
    if count <= 0:
        raise EvaluationError(f"{task_type} data has nothing to measure (no records or tokens)")
    if task_type == "perplexity":
        return math.exp(total / count)
    return total / count


def preference_margins(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                       on_batch: BatchHook = None) -> list[float]:
    """Per pair: log p(chosen | prompt) - log p(rejected | prompt): no generation."""
    pairs = [(r["prompt"], r[k]) for r in records for k in ("chosen", "rejected")]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, on_batch=on_batch)
    return [scores[2 * i][0] - scores[2 * i + 1][0] for i in range(len(records))]


def preference_margin(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                      on_batch: BatchHook = None) -> float:
    """Mean of log p(chosen | prompt) - log p(rejected | prompt): no generation."""
    margins = preference_margins(model, tokenizer, records, batch_size=batch_size,
                                 on_batch=on_batch)
    return sum(margins) / len(margins)


@torch.inference_mode()
def reward_model_scores(model, tokenizer, reward_model, reward_tokenizer,
                        records: Sequence[dict], *, max_new_tokens: int = 32,
                        batch_size: int = 16, on_batch: BatchHook = None) -> list[float]:
    """Per prompt: the reward model's score of the greedy completion."""
    completions = greedy_generate(model, tokenizer, [r["prompt"] for r in records],
                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  on_batch=on_batch)
    return score_completions(reward_model, reward_tokenizer, records, completions,
                             batch_size=batch_size)


@torch.inference_mode()
def score_completions(reward_model, reward_tokenizer, records: Sequence[dict],
                      completions: Sequence[str], *, batch_size: int = 16) -> list[float]:
    """Per prompt: the reward model's score of prompt + completion."""
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(records), batch_size):
        texts = [r["prompt"] + c for r, c in zip(records[start:start + batch_size],
                                                 completions[start:start + batch_size])]
        enc = reward_tokenizer(texts, return_tensors="pt", padding=True)
        logits = reward_model(**{k: v.to(device) for k, v in enc.items()}).logits
        scores.extend(float(v) for v in logits[:, 0].float())
    return scores


def reward_model_score(model, tokenizer, reward_model, reward_tokenizer, records: Sequence[dict],
                       *, max_new_tokens: int = 32, batch_size: int = 16,
                       on_batch: BatchHook = None) -> float:
    """Mean reward-model score of the greedy completions to the prompts."""
    scores = reward_model_scores(model, tokenizer, reward_model, reward_tokenizer, records,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 on_batch=on_batch)
    return sum(scores) / len(scores)


def load_python_reward(function: str):
    """Import ``module:function``; the function takes (model, tokenizer) and returns a float."""
    module_name, _, attr = function.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"cannot import {function!r}: {exc}", field="reward.function") from exc
    if not callable(fn):
        raise SpecError(f"{function!r} is not callable", field="reward.function")
    return fn
