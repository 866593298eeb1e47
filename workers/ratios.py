"""Ratio-vector parametrisations for the search.

Free ratios: one Optuna parameter per slot, named as the slot (``block0``, ``layer3``,
``block0.attn``, ``all``: workers/grouping.py), within ``ratio_bounds``; so optuna-dashboard
and ``optuna.load_study`` show the names the service's pages, results and exports show.

The paper's constraint (``mean_ratio``: the mean of the ratios is fixed) is built into the
parametrisation: the sampler proposes free weights ``w:<slot>`` in the bounds, and the ratio
vector is their Euclidean projection onto {r : mean(r) = m, low <= r_i <= high}, i.e.
``r_i = clip(w_i + t, low, high)`` with the shift ``t`` that makes the mean exactly ``m``.
Every proposal is therefore feasible for the constraint, and a proposal that already
satisfies it is kept unchanged.

Studies begun by an earlier hmaopt named the parameters by position (``ratio_<i>``, ``w_<i>``:
:func:`legacy_param_names`; their stored job lists no ``params``); such a study resumes under
its own names (workers/search.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def project_mean(weights: Sequence[float], mean: float, low: float, high: float) -> list[float]:
    """Project ``weights`` onto {mean(r) = ``mean``, low <= r_i <= high} (bisection on the shift)."""
    if not low <= mean <= high:
        raise ValueError(f"mean {mean} outside [{low}, {high}]")
    n = len(weights)

    def mean_at(t: float) -> float:
        return sum(min(high, max(low, w + t)) for w in weights) / n

    lo_t, hi_t = low - max(weights), high - min(weights)  # mean_at(lo_t) = low, mean_at(hi_t) = high
    for _ in range(100):
        mid = (lo_t + hi_t) / 2
        if mean_at(mid) < mean:
            lo_t = mid
        else:
            hi_t = mid
    t = (lo_t + hi_t) / 2
    ratios = [min(high, max(low, w + t)) for w in weights]
    # remove the bisection's last rounding error on an unclipped coordinate
    error = mean * n - sum(ratios)
    free = [i for i, r in enumerate(ratios) if low < r < high]
    if free:
        ratios[free[0]] = min(high, max(low, ratios[free[0]] + error))
    return ratios


def param_names(slots: Sequence[str], mean_ratio: float | None) -> list[str]:
    """The Optuna parameter names of ``slots``: the slot names (``w:<slot>`` under
    ``mean_ratio``, where the parameter is a weight before the projection, not the ratio)."""
    return list(slots) if mean_ratio is None else [f"w:{s}" for s in slots]


def legacy_param_names(slots: Sequence[str], mean_ratio: float | None) -> list[str]:
    """The names earlier studies gave the parameters: ``ratio_<i>`` (``w_<i>``)."""
    prefix = "ratio" if mean_ratio is None else "w"
    return [f"{prefix}_{i}" for i in range(len(slots))]


class RatioSpace:
    """Turns an Optuna trial into a ratio vector, and a uniform ratio into enqueued params.

    ``names``: the parameter names, one per slot (default :func:`param_names`; a resumed
    study passes the names it was begun with)."""

    def __init__(self, slots: Sequence[str], bounds: tuple[float, float], mean_ratio: float | None,
                 names: Sequence[str] | None = None):
        self.slots = tuple(slots)
        self.low, self.high = bounds
        self.mean_ratio = mean_ratio
        self.names = tuple(names) if names is not None else tuple(param_names(slots, mean_ratio))
        if len(self.names) != len(self.slots):
            raise ValueError(f"{len(self.names)} parameter names for {len(self.slots)} slots")

    def param_names(self) -> list[str]:
        return list(self.names)

    def suggest(self, trial) -> list[float]:
        with warnings.catch_warnings():
            # GPSampler (proposing at the first suggest) warns at every proposal that it clips
            # the -inf an infeasible trial told before any feasible one (workers/study.py
            # told_values) to the worst finite value: as intended
            warnings.filterwarnings("ignore", message="Clip non-finite values")
            values = [trial.suggest_float(name, self.low, self.high) for name in self.param_names()]
        return self.from_params(values)

    def from_params(self, values: Sequence[float]) -> list[float]:
        if self.mean_ratio is None:
            return list(values)
        return project_mean(values, self.mean_ratio, self.low, self.high)

    def uniform_params(self, ratio: float) -> dict[str, float]:
        """Params that give every slot ``ratio`` (for enqueueing the vanilla-averaging baseline)."""
        return dict.fromkeys(self.param_names(), ratio)
