"""workers/answer.py: the winner is chosen on records the sampler never saw, held-out
figures come from records that played no part in the choice, and flags say when a result
does not hold. Constructed measurements (per-record rewards chosen by hand) stand in for
a model's, so that the rule is tested on cases a tiny model cannot be made to produce."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from service.spec import JobSpec
from workers.answer import choose
from workers.evaluate.job import Measurement
from workers.results import TrialRecord


SPEC = {"name": "answer", "base_model": "b", "aligned_model": "a",
        "groups": {"scheme": "blocks", "k": 2},
        "reward": {"type": "preference", "data": "p.jsonl"},
        "tax": {"budget": 0.1, "tasks": [{"name": "t", "type": "perplexity", "data": "t.jsonl"}]}}


def _m(rewards: list[float], tax: float, tax_se: float = 0.001) -> Measurement:
    mean = sum(rewards) / len(rewards)
    return Measurement(stage=2, tax=tax, metrics={}, task_tax={}, reward=mean, tax_se=tax_se,
                       reward_se=0.01, n_reward=len(rewards), n_tax=100,
                       records={"reward": list(rewards)})


@dataclass
class _Evaluator:
    """Per (ratios, part): a constructed measurement."""

    parts: dict
    merger: object = None
    has_validation: bool = True
    has_holdout: bool = True

    def evaluate(self):
        return self.parts[(tuple(self.merger.ratios), "search")]

    def evaluate_part(self, part, on_batch=None):
        return self.parts[(tuple(self.merger.ratios), part)]


@dataclass
class _Merger:
    ratios: list = field(default_factory=list)

    def apply(self, ratios):
        self.ratios = list(ratios)


@dataclass
class _Search:
    spec: JobSpec
    evaluator: _Evaluator
    merger: _Merger
    measured: dict = field(default_factory=dict)


def _record(number, kind, ratios, m: Measurement, budget=0.1) -> TrialRecord:
    return TrialRecord(number, kind, list(ratios), m.reward, m.tax, m.tax <= budget, 2, {}, 0.0,
                       0.0, ratios[0] if kind == "uniform" else None, {}, m.reward_se, m.tax_se,
                       m.n_reward, m.n_tax)


def _world(cases: dict, *, confidence=None, validation=True, finalists=3):
    """cases: name -> (number, kind, ratios, {part: measurement})."""
    spec = JobSpec.model_validate({**SPEC, "tax": {**SPEC["tax"], "confidence": confidence},
        "search": {"n_trials": 20, "finalists": finalists}})
    merger = _Merger()
    parts = {(tuple(r), p): m for _, _, r, ms in cases.values() for p, m in ms.items()}
    ev = _Evaluator(parts, merger, has_validation=validation)
    search = _Search(spec, ev, merger)
    records = [_record(n, k, r, ms["search"]) for n, k, r, ms in cases.values()]
    for n, _, _, ms in cases.values():
        search.measured[n] = ms["search"]
    return search, records


def test_a_consistent_candidate_beats_a_lucky_one_on_the_validation_data():
    search, records = _world({
        "lucky": (5, "search", [0.9, 0.2], {"search": _m([3, 3, 1, 1], 0.09),
                                            "validation": _m([0, 1, 0, 1], 0.09)}),
        "steady": (7, "search", [0.6, 0.5], {"search": _m([2, 2, 1, 2], 0.08),
                                             "validation": _m([2, 2, 1, 2], 0.08),
                                             "holdout": _m([2, 1.5, 2, 2], 0.08)}),
        "uniform": (1, "uniform", [0.5, 0.5], {"search": _m([1, 1, 0.5, 1], 0.05),
                                               "validation": _m([1, 1, 1, 0.5], 0.05),
                                               "holdout": _m([1, 1, 0.5, 1], 0.05)}),
        "over": (9, "search", [1.0, 1.0], {"search": _m([9, 9, 9, 9], 0.5)}),  # infeasible
    })
    a = choose(search, records)
    assert a.best.number == 7 and a.chosen_by == "validation"  # not the luckiest trial (5)
    assert a.uniform.number == 1
    assert {f["trial"] for f in a.finalists} == {5, 7, 1}  # never the infeasible one
    assert a.best_validation["reward"] == pytest.approx(1.75)
    # held-out figures of the winner: from the holdout records only, paired with the uniform
    assert a.best_holdout["reward"] == pytest.approx(1.875)
    assert a.holdout_gain.mean == pytest.approx(1.875 - 0.875)
    assert a.holdout_gain.excludes_zero and not a.flags
    assert a.per_record["best"]["holdout_reward"] == [2, 1.5, 2, 2]
    # the search gain is paired on the search records of the two trials
    assert a.gain.mean == pytest.approx(1.75 - 0.875)


def test_flags_say_when_the_holdout_does_not_agree():
    search, records = _world({
        "best": (4, "search", [0.7, 0.7], {"search": _m([2, 2, 2, 2], 0.09),
                                           "validation": _m([2, 2, 2, 1], 0.09),
                                           "holdout": _m([0, 1, 0, 1], 0.12)}),
        "uniform": (1, "uniform", [0.5, 0.5], {"search": _m([1, 1, 1, 1], 0.05),
                                               "validation": _m([1, 1, 1, 1], 0.05),
                                               "holdout": _m([1, 1, 0, 1], 0.05)}),
    })
    flags = {f["code"]: f["message"] for f in choose(search, records).flags}
    assert flags.keys() == {"holdout_over_budget", "holdout_gain_negative"}
    # 0.12 with SE 0.001 against 0.1: over the budget beyond its noise
    assert "beyond its noise" in flags["holdout_over_budget"]
    search.evaluator.parts[((0.7, 0.7), "holdout")] = _m([0, 1, 0, 1], 0.105, tax_se=0.01)
    over = [f["message"] for f in choose(search, records).flags
            if f["code"] == "holdout_over_budget"]
    # 0.105 with SE 0.01: the lower bound 0.105 - 1.645 * 0.01 = 0.0886 is under the budget
    assert over and "within its noise" in over[0] and "0.08855" in over[0]
    search.evaluator.parts[((0.7, 0.7), "holdout")] = _m([1, 2, 0, 1], 0.08)
    a = choose(search, records)
    assert {f["code"] for f in a.flags} == {"holdout_gain_not_significant"}
    assert a.holdout_gain.lo < 0 < a.holdout_gain.hi


def test_no_validation_data_keeps_the_search_rule_and_tax_confidence_counts():
    cases = {
        "top": (3, "search", [0.8, 0.8], {"search": _m([3, 3, 3, 3], 0.09),
                                          "validation": _m([0, 0, 0, 0], 0.09),
                                          "holdout": _m([3, 3, 3, 3], 0.09)}),
        "uniform": (1, "uniform", [0.5, 0.5], {"search": _m([1, 1, 1, 1], 0.05),
                                               "validation": _m([1, 1, 1, 1], 0.05),
                                               "holdout": _m([1, 1, 1, 1], 0.05)}),
    }
    search, records = _world(cases, validation=False)
    a = choose(search, records)
    assert a.best.number == 3 and a.chosen_by == "search" and not a.finalists
    # with tax.confidence 0.95, a pooled tax of 0.09 +- 0.01 (search 0.09 +- 0.001 and
    # validation 0.09 +- 0.02, 100 records each) is over 0.1 at its bound
    cases["top"][3]["validation"] = _m([3, 3, 3, 3], 0.09, tax_se=0.02)
    search, records = _world(cases, confidence=0.95)
    a = choose(search, records)
    assert a.best.number == 1  # the uniform ratio is within the budget by its bound too


def test_when_no_finalist_is_feasible_on_validation_the_search_decides_and_says_so():
    search, records = _world({
        "top": (3, "search", [0.8, 0.8], {"search": _m([3, 3, 3, 3], 0.09),
                                          "validation": _m([3, 3, 3, 3], 0.2),
                                          "holdout": _m([3, 3, 3, 3], 0.09)}),
    })
    a = choose(search, records)
    assert a.best.number == 3 and a.chosen_by == "search" and a.uniform is None
    assert [f["code"] for f in a.flags] == ["validation_over_budget"]


def test_feasibility_pools_the_search_and_validation_tax_so_the_baseline_stays_near_the_budget():
    """A uniform α near the budget, a hair over it on the validation records alone, stays the
    baseline: the pooled tax decides (the rule before dropped it for a weaker α)."""
    search, records = _world({
        "best": (6, "search", [0.7, 0.5], {"search": _m([2, 2, 2, 2], 0.08),
                                           "validation": _m([2, 2, 2, 1.5], 0.09),
                                           "holdout": _m([2, 2, 1.5, 2], 0.08)}),
        "near": (4, "uniform", [0.6, 0.6], {"search": _m([1.5, 1.5, 1.5, 1.5], 0.085),
                                            "validation": _m([1.5, 1.5, 1, 1.5], 0.105),
                                            "holdout": _m([1.5, 1.5, 1.5, 1], 0.09)}),
        "weak": (2, "uniform", [0.3, 0.3], {"search": _m([0, 0, 0, 0], 0.02),
                                            "validation": _m([0, 0, 0, 0], 0.02),
                                            "holdout": _m([0, 0, 0, 0], 0.02)}),
    })
    a = choose(search, records)
    assert a.uniform.number == 4  # pooled 0.095: within 0.1; validation alone: 0.105, over
    near = next(f for f in a.finalists if f["trial"] == 4)
    assert near["validation_tax"] == pytest.approx(0.105)
    assert near["pooled_tax"] == pytest.approx(0.095) and near["validation_feasible"]
    assert a.holdout_gain.mean == pytest.approx(1.875 - 1.375)
    # and a finalist far over on validation is still out: pooled (0.08 + 0.2) / 2 = 0.14
    search.evaluator.parts[((0.7, 0.5), "validation")] = _m([9, 9, 9, 9], 0.2)
    a = choose(search, records)
    assert a.best.number == 4 and a.uniform.number == 4


@dataclass
class _TuningSearch(_Search):
    """A search that can add uniform trials (``run_uniform``) on a constructed tax curve that
    rises faster than linearly, as vanilla averaging's does: 0.2 α² on the search records and
    0.3 α² on the validation ones (a split whose validation part costs every merge more)."""

    added: list = field(default_factory=list)

    def run_uniform(self, alpha, on_batch=None):
        number = 100 + len(self.added)
        _, _, _, ms = _uniform_case(alpha, number)
        for part, m in ms.items():
            self.evaluator.parts[((alpha, alpha), part)] = m
        self.measured[number] = ms["search"]
        self.added.append(alpha)
        return _record(number, "uniform", [alpha, alpha], ms["search"])


def _uniform_case(alpha, number):
    return (number, "uniform", [alpha, alpha], {
        "search": _m([4 * alpha] * 4, 0.2 * alpha ** 2),
        "validation": _m([4 * alpha] * 4, 0.3 * alpha ** 2),
        "holdout": _m([4 * alpha] * 4, 0.2 * alpha ** 2)})


def _block(number, tax, validation_tax):
    return (number, "search", [0.3, 0.9 + number / 1000],
            {"search": _m([3, 3, 3, 3], tax), "validation": _m([3, 3, 3, 2], validation_tax),
             "holdout": _m([3, 3, 2, 3], tax)})


def test_the_baseline_is_tuned_to_the_budget_on_the_pooled_records():
    """Both uniform finalists are within the budget on the search records and over it on the
    pooled ones: the answer stage adds uniform trials on a secant of the pooled tax (α 0, tax
    0 to the lowest α over), and the baseline is the best of them within the budget, not an
    α the answer's rule refuses."""
    cases = {"block": _block(9, 0.09, 0.095), "u70": _uniform_case(0.7, 5),
             "u65": _uniform_case(0.65, 4)}
    search, records = _world(cases)
    tuning = _TuningSearch(search.spec, search.evaluator, search.merger, search.measured)
    a = choose(tuning, records)

    def pooled(alpha):  # 100 tax records on each part: the mean of the two curves
        return 0.25 * alpha ** 2

    # the secant from (0, 0) to (0.65, pooled 0.105625), then between that point and 0.65
    first = round(0.65 * 0.1 / pooled(0.65), 6)
    second = round(first + (0.1 - pooled(first)) * (0.65 - first) / (pooled(0.65) - pooled(first)), 6)
    assert tuning.added == pytest.approx([first, second]) and pooled(second) <= 0.1
    assert a.uniform.number == 101 and a.uniform.ratios == pytest.approx([second, second])
    assert a.best.number == 9 and "uniform_over_budget" not in {f["code"] for f in a.flags}
    assert "bound" not in a.best_validation and "bound" not in a.uniform_validation
    added = {f["trial"]: f for f in a.finalists if f["trial"] >= 100}
    assert added[100]["validation_feasible"] and added[101]["validation_feasible"]
    assert a.holdout_gain.mean == pytest.approx(2.75 - 4 * second)
    # with search.pooled_uniform_trials 0, or a search that cannot add trials, the search
    # rule's uniform ratio stays, and the result says so
    for s, spec in ((search, search.spec), (tuning, search.spec.model_copy(update={
            "search": search.spec.search.model_copy(update={"pooled_uniform_trials": 0})}))):
        s.spec = spec
        a = choose(s, records)
        assert a.uniform.number == 5 and "uniform_over_budget" in {f["code"] for f in a.flags}


def test_when_the_best_finalists_all_fail_the_pooled_tax_the_next_ones_are_measured():
    """The three best search rewards sit at the budget's edge and over it pooled; the fourth
    has tax to spare: it is measured and wins over the uniform ratio."""
    cases = {f"edge{n}": _block(n, 0.099, 0.11) for n in (10, 11, 12)}
    cases["spare"] = (13, "search", [0.2, 0.8], {"search": _m([2.5] * 4, 0.07),
                                                 "validation": _m([2.5] * 4, 0.08),
                                                 "holdout": _m([2.5] * 4, 0.07)})
    cases["u50"] = (4, "uniform", [0.5, 0.5], {"search": _m([2] * 4, 0.05),
                                               "validation": _m([2] * 4, 0.06),
                                               "holdout": _m([2] * 4, 0.05)})
    search, records = _world(cases)
    a = choose(search, records)
    assert a.best.number == 13 and a.uniform.number == 4 and a.chosen_by == "validation"
    measured = [f["trial"] for f in a.finalists]
    assert set(measured) == {10, 11, 12, 13, 4}  # the next one only, then it stopped


def test_under_tax_confidence_a_holdout_tax_within_the_budget_but_not_its_bound_is_flagged():
    search, records = _world({
        "best": (4, "search", [0.7, 0.7], {"search": _m([2, 2, 2, 2], 0.05),
                                           "validation": _m([2, 2, 2, 2], 0.05),
                                           "holdout": _m([2, 2, 2, 2], 0.095, tax_se=0.01)}),
    }, confidence=0.95)
    flags = {f["code"]: f["message"] for f in choose(search, records).flags}
    assert "is within the budget 0.1, but its upper bound at tax.confidence 0.95 is over it" \
        in flags["holdout_over_budget"]
