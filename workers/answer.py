"""The answer of a search: a winner that is not the luckiest trial, and how sure it is.

The sampler tunes on the search data, so the best search reward of many trials overstates
what the winner does elsewhere (the winner's curse). After the trials:

1. Finalists: the ``search.finalists`` feasible trials of highest search reward, and the two
   best feasible uniform ratios (vanilla averaging near the budget).
2. Each finalist is measured again on the validation data, records the sampler never saw.
   The winner is the finalist of highest validation reward among those feasible on the
   search and validation tax records pooled (the pooled tax's upper bound at
   ``tax.confidence`` when set: see :func:`_pooled_tax`); the best uniform ratio likewise
   among the uniform finalists, by the same rule. Without validation data
   (``validation_fraction: 0``), or when no finalist is feasible there (flagged), the
   search figures decide, as before.
3. The winner and the best uniform ratio are measured on the holdout data, which played no
   part in the choice; held-out figures are reported from it only.
4. Gains are paired: winner minus best uniform record by record on the same prompts, with a
   95 % Student-t interval (service/stats.py), on the search data and on the holdout.
5. Flags say when a result does not hold: holdout tax over the budget, a holdout gain that
   is negative or whose interval includes 0, figures that are not held out (unsplit sets),
   no finalist feasible on the validation data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from service.stats import Interval, lower_bound_of, paired_interval, upper_bound
from workers.results import TrialRecord, best_of

log = logging.getLogger(__name__)

#: uniform ratios among the finalists, beside ``search.finalists`` trials of any kind
UNIFORM_FINALISTS = 2
#: the level of the gain intervals
GAIN_LEVEL = 0.95


def part_dict(m, budget: float, confidence: float | None) -> dict:
    """A measurement on the validation or holdout data, as the result shows it."""
    return {"reward": m.reward, "reward_se": m.reward_se, "tax": m.tax, "tax_se": m.tax_se,
            "n_reward": m.n_reward, "n_tax": m.n_tax, "held_out": m.held_out,
            "from_search_data": m.from_search_data,
            "feasible": upper_bound(m.tax, m.tax_se, confidence) <= budget,
            "metrics": m.metrics}


@dataclass
class Answer:
    """What :func:`choose` decided, with the measurements behind it."""

    best: TrialRecord | None
    uniform: TrialRecord | None
    chosen_by: str = "search"  # validation | search
    best_validation: dict | None = None
    uniform_validation: dict | None = None
    best_holdout: dict | None = None
    uniform_holdout: dict | None = None
    gain: Interval | None = None
    holdout_gain: Interval | None = None
    finalists: list[dict] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)
    per_record: dict = field(default_factory=dict)

    def flag(self, code: str, message: str) -> None:
        self.flags.append({"code": code, "message": message})


class _Measurer:
    """Measures a trial's merge on a part, once per (trial, part)."""

    def __init__(self, search, on_batch) -> None:
        self.search, self.on_batch, self.cache = search, on_batch, {}

    def __call__(self, record: TrialRecord, part: str):
        key = (record.number, part)
        if key not in self.cache:
            if part == "search" and record.number in self.search.measured:
                self.cache[key] = self.search.measured[record.number]
            else:
                self.search.merger.apply(record.ratios)
                ev = self.search.evaluator
                self.cache[key] = ev.evaluate(on_batch=self.on_batch) if part == "search" \
                    else ev.evaluate_part(part, on_batch=self.on_batch)
        return self.cache[key]


def choose(search, records: list[TrialRecord], on_batch=None) -> Answer:
    """The winner, the best uniform ratio, their held-out figures, gains and flags."""
    spec = search.spec
    budget, confidence = spec.tax.budget, spec.tax.confidence
    measure = _Measurer(search, on_batch)
    feasible = sorted((r for r in records if r.feasible and r.reward is not None),
                      key=lambda r: (-r.reward, r.tax, r.number))
    answer = Answer(best_of(records), best_of(records, "uniform"))
    if answer.best is not None and search.evaluator.has_validation:
        uniform = [r for r in feasible if r.kind == "uniform"][:UNIFORM_FINALISTS]
        finalists = list({r.number: r for r in feasible[:spec.search.finalists] + uniform}
                         .values())
        scored = []
        for r in finalists:
            v = part_dict(measure(r, "validation"), budget, confidence)
            v["pooled_tax"], v["pooled_tax_se"] = _pooled_tax(r, v)
            v["feasible"] = upper_bound(v["pooled_tax"], v["pooled_tax_se"],
                                        confidence) <= budget
            scored.append((r, v))
            answer.finalists.append({"trial": r.number, "kind": r.kind,
                                     "search_reward": r.reward, "search_tax": r.tax,
                                     "validation_reward": v["reward"],
                                     "validation_tax": v["tax"],
                                     "pooled_tax": v["pooled_tax"],
                                     "validation_feasible": v["feasible"]})
        answer.chosen_by = "validation"
        ok = [(r, v) for r, v in scored if v["feasible"]]
        if ok:
            answer.best, answer.best_validation = max(
                ok, key=lambda rv: (rv[1]["reward"], rv[0].reward, -rv[0].number))
        else:
            answer.chosen_by = "search"
            answer.best_validation = next((v for r, v in scored
                                           if r.number == answer.best.number), None)
            answer.flag("validation_over_budget",
                        f"no finalist is within the tax budget {budget} on the search and "
                        "validation data pooled; the answer is the best trial on the search "
                        "data")
        ok_uniform = [(r, v) for r, v in ok if r.kind == "uniform"]
        if ok_uniform:
            answer.uniform, answer.uniform_validation = max(
                ok_uniform, key=lambda rv: (rv[1]["reward"], rv[0].reward, -rv[0].number))
    _held_out(answer, search, measure, budget, confidence)
    return answer


def _pooled_tax(record: TrialRecord, v: dict) -> tuple[float, float | None]:
    """A finalist's tax on its search and validation records together (each part weighed by
    its records), with its SE. Feasibility on the validation data alone would be a fresh
    coin flip for every candidate near the budget (a part of 90 items moves a task's tax by
    about 0.01 an item), and it would drop the near-budget uniform ratio, leaving a weak
    baseline and an inflated gain; the sampler selects on the reward far more than on the
    tax, so the search records' selection bias on the tax is small beside that noise."""
    ns, nv = record.n_tax, v["n_tax"]
    if not ns or not nv:
        return v["tax"], v["tax_se"]
    tax = (ns * record.tax + nv * v["tax"]) / (ns + nv)
    if record.tax_se is None or v["tax_se"] is None:
        return tax, None
    se = ((ns * record.tax_se) ** 2 + (nv * v["tax_se"]) ** 2) ** 0.5 / (ns + nv)
    return tax, se


def _held_out(answer: Answer, search, measure, budget: float, confidence: float | None) -> None:
    best, uniform = answer.best, answer.uniform
    if best is None:
        return
    if uniform is not None:
        answer.gain = _paired(measure(best, "search"), measure(uniform, "search"))
    if not search.evaluator.has_holdout:
        answer.flag("no_holdout", "the job has no holdout data: nothing checks the search "
                                  "figures (holdout_fraction 0)")
        return
    mh = measure(best, "holdout")
    answer.best_holdout = part_dict(mh, budget, confidence)
    answer.per_record["best"] = {"holdout_reward": mh.reward_records}
    if uniform is not None:
        uh = measure(uniform, "holdout")
        answer.uniform_holdout = part_dict(uh, budget, confidence)
        answer.per_record["best_uniform"] = {"holdout_reward": uh.reward_records}
        answer.holdout_gain = _paired(mh, uh)
    h, g = answer.best_holdout, answer.holdout_gain
    if not h["feasible"]:
        answer.flag("holdout_over_budget", f"the holdout tax {h['tax']:.4g} is over the budget "
                                           f"{budget}" + _se(h["tax_se"])
                    + _noise(h["tax"], h["tax_se"], budget))
    if g is not None and g.mean < 0:
        answer.flag("holdout_gain_negative", f"on the holdout data the winner loses to the "
                                             f"best uniform ratio by {-g.mean:.4g}")
    elif g is not None and not g.excludes_zero:
        answer.flag("holdout_gain_not_significant",
                    f"the holdout gain {g.mean:.4g} has a 95 % interval [{g.lo:.4g}, "
                    f"{g.hi:.4g}] that includes 0 (n = {g.n})")
    if not h["held_out"]:
        answer.flag("not_held_out", "some holdout figures are measured on the search data: "
                    f"{', '.join(h['from_search_data'])} (sets that cannot be split: lm-eval "
                    "tasks, sets too small)")


def _paired(a, b) -> Interval | None:
    """The paired reward difference of two measurements of the same records."""
    ra, rb = a.reward_records, b.reward_records
    if ra is None or rb is None:  # a python reward: one number each
        return Interval(a.reward - b.reward, a.reward - b.reward, a.reward - b.reward, None,
                        1, GAIN_LEVEL)
    return paired_interval(ra, rb, level=GAIN_LEVEL)


def _noise(tax: float, se: float | None, budget: float) -> str:
    """Whether a tax over the budget is over it beyond its noise: its one-sided lower bound
    at :data:`GAIN_LEVEL` above the budget (the pipelines keep such a run unpromoted)."""
    if se is None:
        return ""
    low = lower_bound_of(tax, se, GAIN_LEVEL)
    if low > budget:
        return f", beyond its noise (one-sided 95 % lower bound {low:.4g})"
    return f", within its noise (one-sided 95 % lower bound {low:.4g} is under the budget)"


def _se(se: float | None) -> str:
    return f" (SE {se:.2g})" if se is not None else ""
