"""optuna-dashboard (its own WSGI app and HTTP API, what ``optuna-dashboard URL`` serves) on
the studies hmaopt writes: feasibility shown, the best trial feasible in both modes, metric
names, parameters named as the slots; a study begun with positional names resumes under them.

The job: a tiny real model pair (tests/models.py) with the aligned and base roles chosen so
that the tax rises with α, and a python reward that rises toward the aligned weights, so
uniform α = 1 has the highest reward and breaks the budget (the case optuna-dashboard used
to call best).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from service.spec import JobSpec
from tests.models import make_tiny_job, read_folder
from tests.optuna_dashboard import dashboard_study
from workers.results import RATIO_CONVENTION
from workers.search import Search, load_job, measure_base

BUDGET = 0.1
#: the aligned model's tensors, for :func:`toward_aligned` (filled by :func:`_search`)
ALIGNED: dict = {}


def toward_aligned(model, tokenizer) -> float:
    """A python reward: minus the mean squared distance of the merged weights to the aligned
    ones (x 1e4), so it rises with every ratio."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            total += float(((p.float() - ALIGNED[name].float()) ** 2).sum())
            n += p.numel()
    return -1e4 * total / n


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    spec = make_tiny_job(tmp_path_factory.mktemp("dashboard"),
                         tax={"budget": BUDGET},
                         reward={"type": "python", "function": f"{__name__}:toward_aligned"},
                         search={"n_trials": 10, "uniform_grid": [0.0, 0.25, 0.5, 0.75, 1.0]})
    # the second random model as θ_base: the tax then rises with α on these sets
    spec["base_model"], spec["aligned_model"] = spec["aligned_model"], spec["base_model"]
    return spec


def _search(spec_dict: dict, url: str, **kwargs) -> Search:
    spec = JobSpec.model_validate(spec_dict)
    ALIGNED.clear()
    ALIGNED.update(read_folder(Path(spec.aligned_model)))
    merger, ev = load_job(spec, device="cpu")  # an untied Llama: every tensor saved
    measure_base(merger, ev)
    search = Search(spec, merger, ev, storage=url, **kwargs)
    search.run()
    return search


def _check_trials(search: Search, detail: dict) -> dict[int, dict]:
    """Every finished trial shows its one constraint (tax bound - budget) and slot-named
    params; returns the dashboard's trials by number."""
    shown = {t["number"]: t for t in detail["trials"]}
    for t in search.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                             optuna.trial.TrialState.PRUNED)):
        d = shown[t.number]
        assert d["constraints"] == [pytest.approx(t.user_attrs["tax_bound"] - BUDGET)]
        assert [p["name"] for p in d["params"]] == ["block0", "block1"]
        assert (d["constraints"][0] <= 0) == t.user_attrs["feasible"]
        assert list(t.constraints.values()) == d["constraints"]  # Optuna reads the same one
    assert [p["name"] for p in detail["intersection_search_space"]] == ["block0", "block1"]
    return shown


def _outranked(search: Search) -> list:
    """The infeasible complete trials whose reward beats the best feasible one's."""
    best = search.best()
    assert best is not None
    return [r for r in search.records() if not r.feasible and r.reward is not None
            and r.reward > best.reward]


def test_constrained_study_shows_the_constraint_and_a_feasible_best_trial(job, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _search(job, url)
    detail = dashboard_study(url, s.name)
    shown = _check_trials(s, detail)
    best = s.best()
    over = _outranked(s)
    assert any(r.kind == "uniform" and r.ratios == [1.0, 1.0] for r in over), \
        "uniform α = 1 must have the top reward and break the budget, else nothing is tested"
    assert [t["number"] for t in detail["best_trials"]] == [best.number]
    assert detail["best_trials"][0]["constraints"][0] <= 0
    assert detail["objective_names"] == ["reward"]
    # a feasible trial's value is its reward; an infeasible one is told less than the best
    for r in s.records():
        value = shown[r.number].get("values")
        if r.reward is None:
            assert value is None  # pruned
        elif r.feasible:
            assert value == [pytest.approx(r.reward)]
        else:
            assert value[0] < best.reward
    # Optuna's own best trial agrees
    assert optuna.load_study(study_name=s.name, storage=url).best_trial.number == best.number


def test_pareto_study_shows_only_feasible_trials_on_its_front(job, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _search({**job, "mode": "pareto", "search": {**job["search"], "sampler": "nsga2"}}, url)
    detail = dashboard_study(url, s.name)
    _check_trials(s, detail)
    assert _outranked(s)
    front = {t["number"] for t in detail["best_trials"]}
    assert front == {r.number for r in s.pareto()}  # hmaopt's front of the feasible trials
    assert all(t["constraints"][0] <= 0 for t in detail["best_trials"])
    assert detail["objective_names"] == ["reward", "tax"]
    study = optuna.load_study(study_name=s.name, storage=url)
    assert {t.number for t in study.best_trials} == front


def test_a_study_begun_with_positional_names_resumes_under_them(job, tmp_path):
    """A study an earlier hmaopt wrote (params ratio_<i>, constraint ``constraints:tax``, no
    ``params`` in its job attribute) resumes: the sampler's trials keep ratio_<i>."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    spec = JobSpec.model_validate(job)
    old = optuna.create_study(storage=url, study_name="hmaopt:tiny", direction="maximize")
    old.set_user_attr("hmaopt", {
        "version": "0.1.0", "spec": spec.model_dump(mode="json"), "slots": ["block0", "block1"],
        "budget": BUDGET, "mode": "constrained", "uniform_grid": spec.uniform_grid(),
        "ratio_convention": RATIO_CONVENTION})
    for alpha, reward, tax in ((0.0, -16.0, 0.0), (0.25, -9.0, 0.0)):  # as that release did
        old.enqueue_trial({"ratio_0": alpha, "ratio_1": alpha},
                          user_attrs={"kind": "uniform", "uniform_ratio": alpha})
        trial = old.ask()
        ratios = [trial.suggest_float(f"ratio_{i}", 0.0, 1.0) for i in range(2)]
        for key, value in {"ratios": dict(zip(["block0", "block1"], ratios)), "reward": reward,
                           "tax": tax, "tax_bound": tax, "feasible": True, "stage": 2,
                           "metrics": {}, "task_tax": {}}.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("tax", tax - BUDGET)
        old.tell(trial, reward)
    s = _search(job, url, resume=True)
    assert s.finished() == 10
    trials = s.study.get_trials()
    assert all(set(t.params) == {"ratio_0", "ratio_1"} for t in trials)
    assert s.study.user_attrs["hmaopt"]["params"] == ["ratio_0", "ratio_1"]
    done = sorted(t.user_attrs["uniform_ratio"] for t in trials if t.user_attrs["kind"] == "uniform")
    assert done == [0.0, 0.25, 0.5, 0.75, 1.0]  # the baseline went on where it stopped
    assert all(len(t.constraints) == 1 for t in trials)  # one constraint each, either form
    # the dashboard shows the new trials' constraints, and a feasible best
    detail = dashboard_study(url, s.name)
    assert all(t["constraints"] for t in detail["trials"] if t["number"] >= 2)
    assert [t["number"] for t in detail["best_trials"]] == [s.best().number]
