"""``sampler: local``: a Gaussian search around the best feasible trial so far.

After the uniform baseline, the best feasible point of a job is usually vanilla averaging
tuned to the budget (the bisection's α), and on the reference worlds most of what a cold
sampler proposes is either over the budget or far below the baseline (docs/benchmarks.md).
This sampler starts where the answer is: every proposal is the incumbent (the feasible
trial of highest told value, i.e. the best feasible reward) plus a Gaussian step of size
sigma, clipped to the bounds, of which only MEAN_SHARE of the mean component is kept
(mostly a redistribution between the groups). The step size follows the one-fifth success
rule of the (1+1) evolution strategy (Rechenberg; Kern et al. 2004): it grows by
:data:`GROW` after a proposal that became the new incumbent and shrinks by
``GROW ** -1/4`` after one that did not, so it settles where about one proposal in five
succeeds.

It keeps no state of its own: the incumbent and the step size are recomputed from the
study's trials at each proposal (in trial-number order; a failed trial, e.g. one of a dead
worker, does not count), and the noise is drawn from a generator seeded by (seed, trial
number). A resumed study and several workers sharing one study therefore propose exactly
what a single uninterrupted run would, given the same finished trials. Before any trial is
feasible (or outside the relative search space) it samples uniformly, from a generator
seeded the same way.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.search_space import intersection_search_space
from optuna.trial import FrozenTrial, TrialState

#: the step size's factor after a success (and to the power -1/4 after a failure)
GROW = 1.5
#: the share of a step's mean component that is kept (1 would be isotropic steps): the tax
#: rises mostly with the mean ratio, so from an incumbent at the budget a step that keeps
#: the mean moves along the budget's edge rather than over it or away from it
MEAN_SHARE = 0.25
#: the step size's bounds, as shares of a parameter's range
SIGMA_MIN, SIGMA_MAX = 0.005, 0.5


def feasible(trial: FrozenTrial) -> bool:
    """A complete trial within its constraints (hmaopt's tax constraint: <= 0)."""
    constraints = trial.system_attrs.get("constraints") or []
    return trial.state == TrialState.COMPLETE and trial.value is not None \
        and math.isfinite(trial.value) and all(c <= 0 for c in constraints)


def proposed(trial: FrozenTrial) -> bool:
    """A trial the sampler proposed (an enqueued one carries Optuna's ``fixed_params``)."""
    return "fixed_params" not in trial.system_attrs


def step_size(trials: Sequence[FrozenTrial], sigma0: float) -> tuple[FrozenTrial | None, float]:
    """(the incumbent, the step size) after ``trials``, taken in number order: the one-fifth
    rule over the sampler's finished proposals made while an incumbent existed (a pruned one
    is a failure; a failed one, whose worker died or whose evaluation broke, says nothing
    of the step and does not count); enqueued trials (baseline, warm starts, rays) only
    move the incumbent."""
    best, sigma = None, sigma0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        better = feasible(t) and (best is None or t.value > best.value)
        if proposed(t) and best is not None:  # a proposal from an incumbent
            sigma *= GROW if better else GROW ** -0.25
            sigma = min(max(sigma, SIGMA_MIN), SIGMA_MAX)
        if better:
            best = t
    return best, sigma


class LocalSampler(optuna.samplers.BaseSampler):
    """Gaussian proposals around the best feasible trial, the step size by the 1/5 rule."""

    def __init__(self, seed: int = 0, sigma0: float = 0.1) -> None:
        if not SIGMA_MIN <= sigma0 <= SIGMA_MAX:
            raise ValueError(f"sigma0 {sigma0} outside [{SIGMA_MIN}, {SIGMA_MAX}]")
        self.seed, self.sigma0 = seed, sigma0
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        space = intersection_search_space(study.get_trials(deepcopy=False,
                                                           states=(TrialState.COMPLETE,)))
        return {k: d for k, d in space.items()
                if isinstance(d, FloatDistribution) and not d.log}

    def sample_relative(self, study, trial, search_space) -> dict[str, float]:
        if not search_space or len(study.directions) > 1 or not proposed(trial):
            return {}  # nothing to propose in, pareto mode, or an enqueued trial
        best, sigma = step_size(study.get_trials(deepcopy=False), self.sigma0)
        if best is None or any(name not in best.params for name in search_space):
            return {}
        rng = np.random.default_rng([self.seed, trial.number])
        names = sorted(search_space)
        z = rng.normal(0.0, 1.0, len(names))
        if len(names) > 1:  # mostly a redistribution: the mean ratio moves by MEAN_SHARE
            z = z - z.mean() + MEAN_SHARE * z.mean()
        proposal = {}
        for name, step in zip(names, z):
            d = search_space[name]
            x = best.params[name] + sigma * (d.high - d.low) * step
            proposal[name] = float(min(max(x, d.low), d.high))
        return proposal

    def sample_independent(self, study, trial, param_name, param_distribution):
        d = param_distribution
        if isinstance(d, FloatDistribution) and not d.log and d.step is None:
            # uniform, seeded by (seed, trial number, parameter): the same draw for the same
            # trial number in every worker and after a resume
            rng = np.random.default_rng([self.seed, trial.number,
                                         zlib.crc32(param_name.encode())])
            return float(rng.uniform(d.low, d.high))
        return self._random.sample_independent(study, trial, param_name, param_distribution)
