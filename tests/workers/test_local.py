"""The local sampler (workers/local.py) on synthetic studies: no model needed."""

from __future__ import annotations

import math

import optuna
import pytest

from workers.local import GROW, LocalSampler, step_size

SPACE = {"a": optuna.distributions.FloatDistribution(0.0, 1.0),
         "b": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _study(sampler=None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=sampler or LocalSampler(seed=3))


def _tell(study, a: float, b: float, value: float, *, feasible: bool = True,
          enqueued: bool = False) -> None:
    if enqueued:
        study.enqueue_trial({"a": a, "b": b})
    trial = study.ask()
    trial.suggest_float("a", 0.0, 1.0)
    trial.suggest_float("b", 0.0, 1.0)
    if not enqueued:  # a proposal: what the sampler chose is what the test measures
        a, b = trial.params["a"], trial.params["b"]
    study._storage.set_trial_system_attr(trial._trial_id, "constraints",
                                         [-1.0 if feasible else 1.0])
    study.tell(trial, value)


def test_proposals_centre_on_the_best_feasible_trial_not_on_an_infeasible_one():
    study = _study(LocalSampler(seed=1, sigma0=0.02))
    _tell(study, 0.6, 0.6, 1.0, enqueued=True)  # the incumbent
    _tell(study, 0.1, 0.9, 5.0, feasible=False, enqueued=True)  # better value, infeasible
    proposals = []
    for _ in range(8):
        trial = study.ask()
        proposals.append((trial.suggest_float("a", 0, 1), trial.suggest_float("b", 0, 1)))
        study._storage.set_trial_system_attr(trial._trial_id, "constraints", [-1.0])
        study.tell(trial, 0.0)  # worse: the incumbent stays
    assert all(abs(a - 0.6) < 0.1 and abs(b - 0.6) < 0.1 for a, b in proposals), proposals
    assert len(set(proposals)) == len(proposals)  # a fresh draw each time


def test_the_step_size_follows_the_one_fifth_rule():
    """After a success the step grows by GROW; after a failure it shrinks by GROW^-1/4."""
    study = _study()
    _tell(study, 0.5, 0.5, 1.0, enqueued=True)  # the baseline: sets the incumbent only
    best, sigma = step_size(study.get_trials(), 0.1)
    assert best.number == 0 and sigma == pytest.approx(0.1)
    _tell(study, 0, 0, 2.0)  # a proposal that became the incumbent
    _tell(study, 0, 0, 0.0)  # and one that did not
    _tell(study, 0, 0, 1.5)
    best, sigma = step_size(study.get_trials(), 0.1)
    assert best.number == 1
    assert sigma == pytest.approx(0.1 * GROW * GROW ** -0.5)
    # an infeasible proposal with a higher value is a failure too
    _tell(study, 0, 0, 9.0, feasible=False)
    assert step_size(study.get_trials(), 0.1) == (best, pytest.approx(sigma * GROW ** -0.25))
    # a failed trial (a dead worker's) says nothing of the step
    study.tell(study.ask(fixed_distributions=SPACE), state=optuna.trial.TrialState.FAIL)
    assert step_size(study.get_trials(), 0.1) == (best, pytest.approx(sigma * GROW ** -0.25))


def test_a_resumed_study_proposes_what_the_uninterrupted_one_did(tmp_path):
    """No state outside the study: after a 'crash', a fresh sampler on the study reloaded
    from SQLite draws the same next point as a study that ran on with the same history, a
    failed trial (a dead worker's) changes nothing, and so does a fallback draw before any
    trial is feasible."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    for name, feasible in (("s", True), ("none-feasible", False)):
        study = optuna.create_study(storage=url, study_name=name, direction="maximize",
                                    sampler=LocalSampler(seed=7))
        _tell(study, 0.4, 0.3, 1.0, enqueued=True, feasible=feasible)
        _tell(study, 0, 0, 0.5, feasible=feasible)
        on = optuna.create_study(direction="maximize", sampler=LocalSampler(seed=7))
        for t in study.get_trials():
            on.add_trial(t)
        # the uninterrupted run's trial 2 (one that failed first, then trial 3)
        on.tell(on.ask(fixed_distributions=SPACE), state=optuna.trial.TrialState.FAIL)
        want = on.ask(fixed_distributions=SPACE).params
        # the crashed run: trial 2 failed by the recovery, a new process asks trial 3
        del study
        crashed = optuna.load_study(storage=url, study_name=name, sampler=LocalSampler(seed=7))
        crashed.tell(crashed.ask(fixed_distributions=SPACE),
                     state=optuna.trial.TrialState.FAIL)
        again = optuna.load_study(storage=url, study_name=name, sampler=LocalSampler(seed=7))
        got = again.ask(fixed_distributions=SPACE)
        assert got.number == 3 and got.params == pytest.approx(want), name
        other = optuna.load_study(storage=url, study_name=name, sampler=LocalSampler(seed=8))
        assert other.ask(fixed_distributions=SPACE).params != pytest.approx(want)


def test_it_climbs_a_smooth_constrained_objective_better_than_random_search():
    """Maximise a + b - 2 (a - 0.8)^2 under a + b <= 1.2 (an edge like the tax budget's):
    from the uniform point on the edge (what the bisection finds), the local sampler ends
    nearer the optimum (0.8, 0.4) than random search in every one of 5 seeds (paired by
    seed, 30 proposals each)."""
    def objective(a: float, b: float) -> tuple[float, bool]:
        return a + b - 2 * (a - 0.8) ** 2, a + b <= 1.2

    def run(sampler) -> float:
        study = _study(sampler)
        study.enqueue_trial({"a": 0.6, "b": 0.6})  # the tuned uniform baseline: 1.12
        best = -math.inf
        for _ in range(31):
            trial = study.ask()
            a, b = trial.suggest_float("a", 0, 1), trial.suggest_float("b", 0, 1)
            value, ok = objective(a, b)
            study._storage.set_trial_system_attr(trial._trial_id, "constraints",
                                                 [-1.0 if ok else 1.0])
            study.tell(trial, value if ok else value - 10)
            best = max(best, value) if ok else best
        return best

    optimum = 1.2  # a = 0.8, b = 0.4
    for seed in range(5):
        local = run(LocalSampler(seed=seed))
        rand = run(optuna.samplers.RandomSampler(seed=seed))
        assert optimum - local < optimum - rand, (seed, local, rand)
        assert optimum - local < 0.03  # from 0.08 at the baseline


def test_the_spec_refuses_local_with_mode_pareto(tmp_path):
    from service.errors import SpecError
    from service.spec import JobSpec
    from tests.models import make_tiny_job

    raw = make_tiny_job(tmp_path)
    raw["mode"] = "pareto"
    raw["search"]["sampler"] = "local"
    with pytest.raises(SpecError, match="local optimises one objective"):
        JobSpec.model_validate(raw)
