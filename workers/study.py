"""Optuna plumbing of a job's study: its name, its storage, its seeded sampler, and the one
function that fails the trials dead workers left RUNNING.

No model is needed here, so the dead-worker recovery (workers/recovery.py) opens a study
through this module without loading the search.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import datetime, timedelta

import optuna
from optuna.trial import TrialState

from service.db.session import engine_kwargs
from service.spec import JobSpec

#: prefix of every study hmaopt creates; :func:`study_name` is the one builder of names
STUDY_PREFIX = "hmaopt"


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
    return optuna.samplers.RandomSampler(seed=s.seed)


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
