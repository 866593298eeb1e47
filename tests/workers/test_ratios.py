from __future__ import annotations

import random

import optuna
import pytest

from workers.ratios import RatioSpace, legacy_param_names, project_mean


def test_projection_keeps_mean_and_bounds():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 9)
        w = [rng.uniform(0, 1) for _ in range(n)]
        m = rng.uniform(0.05, 0.95)
        r = project_mean(w, m, 0.0, 1.0)
        assert sum(r) / n == pytest.approx(m, abs=1e-12)
        assert all(0.0 <= x <= 1.0 for x in r)


def test_projection_is_identity_on_feasible_points_and_ordered():
    assert project_mean([0.1, 0.2, 0.3], 0.2, 0, 1) == pytest.approx([0.1, 0.2, 0.3])
    r = project_mean([0.9, 0.9, 0.0], 0.2, 0, 1)
    assert r[0] == pytest.approx(r[1]) and r[2] == 0.0 and r[0] == pytest.approx(0.3)
    assert project_mean([0.5, 0.5], 0.2, 0, 1) == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError):
        project_mean([0.5], 1.5, 0, 1)


def test_space_with_optuna_trials():
    space = RatioSpace(["block0", "block1", "block2"], (0.0, 1.0), mean_ratio=0.2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.uniform_params(0.2))
    seen = []
    study.optimize(lambda t: seen.append(space.suggest(t)) or 0.0, n_trials=20)
    assert seen[0] == pytest.approx([0.2, 0.2, 0.2])
    assert all(sum(r) / 3 == pytest.approx(0.2) for r in seen)
    free = RatioSpace(["a", "b"], (0.0, 0.5), None)
    assert free.param_names() == ["a", "b"]  # the slot names
    assert space.param_names() == ["w:block0", "w:block1", "w:block2"]  # weights, not ratios
    assert RatioSpace(["a", "b"], (0.0, 0.5), None,
                      names=legacy_param_names(["a", "b"], None)).param_names() == \
        ["ratio_0", "ratio_1"]  # a study begun before the slot names
