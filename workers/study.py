"""Optuna plumbing of a job's study: its name, its storage, its seeded sampler, its metric
names, what a trial tells Optuna (values and the tax constraint), and the one function that
fails the trials dead workers left RUNNING.

What Optuna is told, so that tools reading the study without hmaopt (``optuna.load_study``,
optuna-dashboard 0.21) see feasibility and the right best trial:

- the constraint ``tax_bound - budget`` (feasible when <= 0) goes in the trial system
  attribute ``constraints`` as a one-value list (:func:`set_tax_constraint`): the form both
  Optuna's samplers and optuna-dashboard read. Optuna 5's ``trial.set_constraint("tax", v)``
  writes ``constraints:tax``, which optuna-dashboard 0.21 does not read; writing both would
  make Optuna count two constraints (GPSampler fits one model per constraint);
- a feasible trial is told its reward (pareto mode: reward and tax). optuna-dashboard picks
  its best trial by value alone (single objective: the storage's highest value; pareto: the
  non-dominated complete trials), constraints ignored, so an infeasible trial is told a value
  ranked below every feasible one (:func:`told_values`): a reward under the best feasible
  reward by a penalty that grows with the excess tax (-inf while no trial is feasible) and, in
  pareto mode, its tax upper bound (over the budget) as its tax. TPE and NSGA-II rank
  infeasible trials by their violation alone, so this changes nothing for them; CMA-ES, which
  ignores constraints, learns the penalty from it. The true reward and tax stay in the user
  attributes ``reward`` and ``tax``.

No model is needed here, so the dead-worker recovery (workers/recovery.py) opens a study
through this module without loading the search.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import optuna
from optuna.trial import TrialState

from service.db.session import engine_kwargs
from service.spec import JobSpec
from workers.local import LocalSampler

#: prefix of every study hmaopt creates; :func:`study_name` is the one builder of names
STUDY_PREFIX = "hmaopt"
#: the trial system attribute of the constraint values (a list): what optuna-dashboard reads
#: (its CONSTRAINTS_KEY) and Optuna still reads beside its ``constraints:<name>`` form
CONSTRAINTS_ATTR = "constraints"
#: an infeasible trial's value is lowered by this many units of the reward spread of the
#: uniform baseline per budget of excess tax (:func:`told_values`)
INFEASIBLE_PENALTY = 10.0


def study_name(key: str) -> str:
    """The Optuna study name of a job (``key``: the job id in the service, the spec name in the CLI)."""
    return f"{STUDY_PREFIX}:{key}"


def storage_at(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on ``url`` with the service's engine settings (SQLite busy timeout);
    opening it may create Optuna's tables."""
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))


def make_sampler(spec: JobSpec):
    """The spec's sampler, seeded."""
    s = spec.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=10)
    if s.sampler == "gp":
        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=10,
                                             deterministic_objective=True)
    if s.sampler == "cmaes":  # the spec refuses mode pareto with it
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=1,
                                            warn_independent_sampling=False)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed,
                                             population_size=max(8, min(50, s.n_trials // 4)))
    if s.sampler == "local":  # the spec refuses mode pareto with it
        return LocalSampler(seed=s.seed, sigma0=s.local_sigma)
    return optuna.samplers.RandomSampler(seed=s.seed)


def metric_names(mode: str) -> list[str]:
    """The study's metric names, one per objective (optuna-dashboard's axis titles)."""
    return ["reward"] if mode == "constrained" else ["reward", "tax"]


def set_metric_names(study: optuna.Study, mode: str) -> None:
    """Name the study's objectives (``study.set_metric_names`` is marked experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(mode))


def set_tax_constraint(storage: optuna.storages.BaseStorage, study_id: int, number: int,
                       value: float) -> None:
    """Store trial ``number``'s tax constraint (``value`` <= 0: feasible) in the list form
    that Optuna and optuna-dashboard both read (the module docstring says why not
    ``set_constraint``). Call it before the trial is told."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    storage.set_trial_system_attr(trial_id, CONSTRAINTS_ATTR, [float(value)])


def told_values(mode: str, *, reward: float, tax: float, bound: float, budget: float,
                feasible: bool, best_feasible: float, spread: float) -> list[float]:
    """The values a complete trial tells Optuna. Feasible: its reward (and tax in pareto mode).
    Infeasible (``bound`` > ``budget``): ``min(reward, best_feasible)`` less
    INFEASIBLE_PENALTY x ``spread`` per budget of excess, strictly under ``best_feasible``
    (the best feasible reward so far, -inf when none), and in pareto mode ``bound`` as its
    tax: every feasible trial's tax is at most the budget, so the best feasible trial
    dominates it."""
    value = reward
    if not feasible:
        excess = (bound - budget) / max(budget, 1e-3)
        value = min(reward, best_feasible) - INFEASIBLE_PENALTY * max(spread, 1e-6) * max(excess, 0.0)
        if value >= best_feasible:
            value = math.nextafter(best_feasible, -math.inf)
    if mode == "constrained":
        return [value]
    return [value, tax if feasible else max(tax, bound)]


def best_feasible_reward(records: Sequence) -> tuple[float, float]:
    """(the best feasible reward, -inf when none; the reward spread of the uniform baseline,
    1 with fewer than two points) of trial records (workers/results.py TrialRecord)."""
    feasible = [r.reward for r in records if r.feasible and r.reward is not None]
    uniform = [r.reward for r in records if r.kind == "uniform" and r.reward is not None]
    spread = (max(uniform) - min(uniform)) if len(uniform) > 1 else 1.0
    return (max(feasible) if feasible else -math.inf), spread


def fail_stale_trials(study: optuna.Study, dead: Callable[[str], bool],
                      stale_seconds: float) -> tuple[list[optuna.trial.FrozenTrial], int]:
    """Fail the RUNNING trials of dead workers: those whose ``worker`` attribute ``dead``
    accepts, and those with no worker yet that are older than ``stale_seconds`` (a live
    worker attributes its trial within milliseconds). Returns (the failed trials, how many
    RUNNING trials are left: live work to wait for). The one place trials are failed for a
    dead worker, as Optuna's own ``fail_stale_trials`` is for its heartbeats."""
    cutoff = datetime.now() - timedelta(seconds=stale_seconds)
    failed, left = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if dead(owner) if owner is not None else (t.datetime_start is not None
                                                  and t.datetime_start < cutoff):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t)
        else:
            left += 1
    return failed, left


def load_study(key: str, url: str) -> optuna.Study | None:
    """A job's study in the database at ``url``; None when it was never created."""
    try:
        return optuna.load_study(study_name=study_name(key), storage=storage_at(url))
    except KeyError:
        return None
