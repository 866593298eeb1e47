"""Metrics of one model on one data set: the tax tasks and the reward types.

Each tax metric has a direction; :func:`relative_degradation` turns a value and the base
model's value into the task's tax (positive = worse than the base model). The ``*_stats``
functions return a metric's sufficient statistics (total, count), which add up across
slices of a data set (staged evaluation); :func:`finish_metric` turns them into the metric.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Sequence

import torch

from service.errors import EvaluationError, SpecError
from workers.evaluate.lm import BatchHook, continuation_logprobs, greedy_generate

#: metric name and whether higher is better, per tax task type
TAX_METRICS: dict[str, tuple[str, bool]] = {
    "multiple_choice": ("accuracy", True),
    "exact_match": ("accuracy", True),
    "perplexity": ("perplexity", False),
}


def relative_degradation(value: float, base_value: float, higher_is_better: bool) -> float:
    """(base - value) / |base| for higher-is-better metrics, (value - base) / |base| otherwise."""
    scale = max(abs(base_value), 1e-12)
    return (base_value - value) / scale if higher_is_better else (value - base_value) / scale


def multiple_choice_stats(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                          on_batch: BatchHook = None) -> tuple[float, float]:
    """(records whose answer has the highest log-likelihood among its choices, records)."""
    pairs = [(r["prompt"], c) for r in records for c in r["choices"]]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, on_batch=on_batch)
    correct, i = 0, 0
    for r in records:
        n = len(r["choices"])
        lls = [s for s, _ in scores[i:i + n]]
        correct += int(max(range(n), key=lls.__getitem__) == r["answer"])
        i += n
    return float(correct), float(len(records))


def multiple_choice_accuracy(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                             on_batch: BatchHook = None) -> float:
    """Share of records whose answer has the highest log-likelihood among its choices."""
    return finish_metric("multiple_choice", *multiple_choice_stats(
        model, tokenizer, records, batch_size=batch_size, on_batch=on_batch))


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$|^[{re.escape(string.punctuation)}]+")


def normalize_answer(text: str) -> str:
    """Lower case, first line only, collapsed whitespace, outer punctuation stripped."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _PUNCT.sub("", " ".join(first.lower().split())).strip()


def exact_match_stats(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 16,
                      batch_size: int = 16, on_batch: BatchHook = None) -> tuple[float, float]:
    """(greedy completions equal to the answer after :func:`normalize_answer`, records)."""
    outputs = greedy_generate(model, tokenizer, [r["prompt"] for r in records],
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_batch=on_batch)
    hits = sum(normalize_answer(o) == normalize_answer(r["answer"]) for o, r in zip(outputs, records))
    return float(hits), float(len(records))


def exact_match_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 16,
                         batch_size: int = 16, on_batch: BatchHook = None) -> float:
    """Share of greedy completions equal to the answer after :func:`normalize_answer`."""
    return finish_metric("exact_match", *exact_match_stats(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
        on_batch=on_batch))


def perplexity_stats(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                     on_batch: BatchHook = None) -> tuple[float, float]:
    """(total negative log-likelihood, total tokens) of the texts."""
    scores = continuation_logprobs(model, tokenizer, [("", r["text"]) for r in records],
                                   batch_size=batch_size, on_batch=on_batch)
    return -sum(s for s, _ in scores), float(sum(n for _, n in scores))


def perplexity(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
               on_batch: BatchHook = None) -> float:
    """exp(total negative log-likelihood / total tokens) over the texts."""
    return finish_metric("perplexity", *perplexity_stats(
        model, tokenizer, records, batch_size=batch_size, on_batch=on_batch))


def finish_metric(task_type: str, total: float, count: float) -> float:
    """A tax metric from its sufficient statistics (sums over records add across slices)."""
    if count <= 0:
        raise EvaluationError(f"{task_type} data has nothing to measure (no records or tokens)")
    if task_type == "perplexity":
        return math.exp(total / count)
    return total / count


def preference_margin(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                      on_batch: BatchHook = None) -> float:
    """Mean of log p(chosen | prompt) - log p(rejected | prompt): no generation."""
    pairs = [(r["prompt"], r[k]) for r in records for k in ("chosen", "rejected")]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, on_batch=on_batch)
    margins = [scores[2 * i][0] - scores[2 * i + 1][0] for i in range(len(records))]
    return sum(margins) / len(margins)


@torch.inference_mode()
def reward_model_score(model, tokenizer, reward_model, reward_tokenizer, records: Sequence[dict],
                       *, max_new_tokens: int = 32, batch_size: int = 16,
                       on_batch: BatchHook = None) -> float:
    """Mean reward-model score of the greedy completions to the prompts."""
    completions = greedy_generate(model, tokenizer, [r["prompt"] for r in records],
                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  on_batch=on_batch)
    device = next(reward_model.parameters()).device
    total = 0.0
    for start in range(0, len(records), batch_size):
        texts = [r["prompt"] + c for r, c in zip(records[start:start + batch_size],
                                                 completions[start:start + batch_size])]
        enc = reward_tokenizer(texts, return_tensors="pt", padding=True)
        logits = reward_model(**{k: v.to(device) for k, v in enc.items()}).logits
        total += float(logits[:, 0].float().sum())
    return total / len(records)


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
