"""The uncertainty of a figure measured on a finite set of records (prompts, items, texts).

Pure Python (no numpy), so that the control plane (the pipelines' promotion decision) and
the data plane (the evaluators) share one definition:

- :func:`mean_se`: a mean and its standard error, ``sd / sqrt(n)`` (sample sd, n - 1).
- :func:`ratio_influence`: a ratio of sums (accuracy = correct / items, mean NLL = NLL /
  tokens) and each record's influence on it (the delta method: the SE of the ratio is the
  SE of the mean influence), so that a figure built from ratios gets its SE record by record.
- :func:`paired_interval`: the mean of ``a - b`` record by record (two merges on the same
  records) with a Student-t interval: deterministic, zero width for identical records.
- :func:`combine`: a weighted mean of figures measured on independent record sets.
- :func:`upper_bound`: a one-sided bound ``value + z * se`` at a confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the SE is None for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_influence(totals: Sequence[float], counts: Sequence[float]) -> tuple[float, list[float]]:
    """(sum(totals) / sum(counts), each record's influence on it): record i contributes
    ``(total_i - ratio * count_i) / mean(count)``, whose mean is 0 and whose SE is the
    ratio's (delta method)."""
    n = len(totals)
    count = math.fsum(counts)
    if n == 0 or count <= 0:
        raise ValueError("nothing to measure")
    ratio = math.fsum(totals) / count
    mean_count = count / n
    return ratio, [(t - ratio * c) / mean_count for t, c in zip(totals, counts)]


def se_of(influence: Sequence[float]) -> float | None:
    """The SE of a figure from its per-record influence values (None below two records)."""
    return mean_se(influence)[1] if len(influence) > 1 else None


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # scipy is a dependency (Optuna's GP sampler); loaded on use

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """A paired difference: its mean over ``n`` records, SE and two-sided interval."""

    mean: float
    lo: float
    hi: float
    se: float | None
    n: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_list(self) -> list[float]:
        return [self.lo, self.hi]


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``a[i] - b[i]`` with a two-sided Student-t interval at ``level``. The two
    sequences must be the same records in the same order. With one record the interval is
    the point itself (nothing to estimate a spread from)."""
    if len(a) != len(b):
        raise ValueError(f"paired figures need the same records ({len(a)} against {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    mean, se = mean_se(diffs)
    if se is None:
        return Interval(mean, mean, mean, None, len(diffs), level)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * se
    return Interval(mean, mean - half, mean + half, se, len(diffs), level)


def lower_bound(a: Sequence[float], b: Sequence[float], confidence: float) -> float:
    """The one-sided lower bound of the paired mean difference at ``confidence``."""
    iv = paired_interval(a, b, level=2 * confidence - 1)
    return iv.lo


def combine(parts: Sequence[tuple[float, float, float | None]]) -> tuple[float, float | None]:
    """The weighted mean of figures on independent record sets, and its SE: ``parts`` are
    (weight, value, se); the SE is None when any part's is."""
    total = math.fsum(w for w, _, _ in parts)
    if total <= 0:
        return 0.0, 0.0
    value = math.fsum(w * v for w, v, _ in parts) / total
    if any(se is None for _, _, se in parts):
        return value, None
    return value, math.sqrt(math.fsum((w / total * se) ** 2 for w, _, se in parts))


def lower_bound_of(value: float, se: float | None, confidence: float | None) -> float:
    """``value - z * se`` (:func:`upper_bound`'s mirror); the value itself without a
    confidence or an SE."""
    return 2 * value - upper_bound(value, se, confidence)


def upper_bound(value: float, se: float | None, confidence: float | None) -> float:
    """``value + z * se``, z the one-sided normal quantile at ``confidence``; the value
    itself without a confidence or an SE."""
    if confidence is None or se is None:
        return value
    return value + NormalDist().inv_cdf(confidence) * se
