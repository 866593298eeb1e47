"""The answer of a search: a winner that is not the luckiest trial, and how sure it is.

The sampler tunes on the search data, so the best search reward of many trials overstates
what the winner does elsewhere (the winner's curse). After the trials:

1. Finalists: the ``search.finalists`` feasible trials of highest search reward, and the two
   best feasible uniform ratios (vanilla averaging near the budget).
2. Each finalist is measured again on the validation data, records the sampler never saw.
   The winner is the finalist of highest validation reward among those feasible on the
   search and validation tax records pooled (the pooled tax's upper bound at
   ``tax.confidence`` when set: see :func:`_pooled_tax`); the best uniform ratio likewise
   among the uniform finalists, by the same rule; when none of those is feasible there,
   up to ``search.pooled_uniform_trials`` uniform trials are added, tuned to the budget
   on the pooled records (:func:`_pooled_uniform`). Without validation data
   (``validation_fraction: 0``), or when no finalist is feasible there (flagged), the
   search figures decide, as before.
3. The winner and the best uniform ratio are measured on the holdout data, which played no
   part in the choice; held-out figures are reported from it only.
4. Gains are paired: winner minus best uniform record by record on the same prompts, with a
   95 % Student-t interval (service/stats.py), on the search data and on the holdout.
5. Flags say when a result does not hold: holdout tax over the budget, a holdout gain that
   is negative or whose interval includes 0, figures that are not held out (unsplit sets),
   no finalist (or no uniform ratio) feasible on the validation data.
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
#: the narrowest α bracket the answer stage's uniform trials step in, and how close under
#: the budget (a share of it) a uniform ratio within it ends their steps
MIN_STEP = 0.005
CLOSE = 0.005


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

        def score(r: TrialRecord) -> dict:
            v = part_dict(measure(r, "validation"), budget, confidence)
            v["pooled_tax"], v["pooled_tax_se"] = _pooled_tax(r, v)
            v["bound"] = upper_bound(v["pooled_tax"], v["pooled_tax_se"], confidence)
            # a finalist is feasible on the search records (it is one) and pooled
            v["feasible"] = r.feasible and v["bound"] <= budget
            scored.append((r, v))
            answer.finalists.append({"trial": r.number, "kind": r.kind,
                                     "search_reward": r.reward, "search_tax": r.tax,
                                     "validation_reward": v["reward"],
                                     "validation_tax": v["tax"],
                                     "pooled_tax": v["pooled_tax"],
                                     "validation_feasible": v["feasible"]})
            return v

        for r in finalists:
            score(r)
        _more_finalists(feasible, scored, score, spec.search.finalists)
        _pooled_uniform(search, scored, score, budget, on_batch)
        for _, v in scored:  # the bound served the steps; the result shows the figures
            del v["bound"]
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
        elif answer.uniform is not None:
            answer.flag("uniform_over_budget",
                        "no uniform ratio is within the tax budget on the search and "
                        "validation data pooled: the gain is against the best uniform ratio on "
                        "the search data, which the answer's own rule refuses")
    _held_out(answer, search, measure, budget, confidence)
    return answer


def _more_finalists(feasible: list[TrialRecord], scored: list, score, n: int) -> None:
    """When no finalist of the sampler's (not a uniform ratio) is within the budget on the
    pooled records, score the next feasible ones by search reward, up to ``n`` more, until
    one is. The best search rewards crowd the budget's edge, where the pooled test is close
    to a coin flip; without this the answer would fall to the uniform ratio (or to the
    search rule) although a merge with some tax to spare was measured."""
    if any(v["feasible"] for r, v in scored if r.kind != "uniform"):
        return
    done = {r.number for r, _ in scored}
    for r in [r for r in feasible if r.kind != "uniform" and r.number not in done][:n]:
        if score(r)["feasible"]:
            return


def _pooled_uniform(search, scored: list, score, budget: float, on_batch) -> None:
    """Tune vanilla averaging to the budget on the pooled records when no uniform finalist is
    within it there. The bisection tuned α on the search records alone, so where the
    validation records cost more tax (a split's offset: every merge alike) the best uniform
    ratios sit over the budget by the answer's own rule. The baseline would then be an α that
    rule refuses (the gain understated) or the next lower α measured (often far lower: the
    gain inflated). Instead up to ``search.pooled_uniform_trials`` uniform trials are added
    (``search.run_uniform``), each a secant step on the pooled tax's bound between the
    highest α within the budget (θ_base, α 0 and tax 0, to begin with) and the lowest over
    it, each scored as a finalist, until one within the budget is within 0.5 % of it or the
    bracket is narrower than :data:`MIN_STEP` (the bisection's rules, workers/ray.py). The
    first step, from α 0, is held a fiftieth of the bracket inside (the tax rises faster
    than linearly in α, so that secant lands under the budget), the next ones a tenth
    (between two measured points noise can carry a secant past the budget). Not under
    ``mean_ratio`` (the uniform ratio is fixed) or ``ratio_bounds`` above 0 (no α 0)."""
    run = getattr(search, "run_uniform", None)
    spec = search.spec
    uniform = [(r, v) for r, v in scored if r.kind == "uniform"]
    if (run is None or not uniform or any(v["feasible"] for _, v in uniform)
            or spec.mean_ratio is not None or spec.ratio_bounds[0] > 0):
        return
    lo = (0.0, 0.0)
    hi = min((r.ratios[0], v["bound"]) for r, v in uniform)
    for step in range(spec.search.pooled_uniform_trials):
        (a0, t0), (a1, t1) = lo, hi
        width = a1 - a0
        if width <= MIN_STEP or t1 <= t0 or t0 >= budget * (1 - CLOSE):
            return
        alpha = a0 + (budget - t0) * width / (t1 - t0)
        margin = width / (50 if step == 0 else 10)
        alpha = round(min(max(alpha, a0 + margin), a1 - margin), 6)
        record = run(alpha, on_batch)
        v = score(record)
        if v["feasible"]:
            lo = (alpha, v["bound"])
        else:
            hi = (alpha, v["bound"])


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
    if not h["feasible"] and h["tax"] > budget:
        answer.flag("holdout_over_budget", f"the holdout tax {h['tax']:.4g} is over the budget "
                                           f"{budget}" + _se(h["tax_se"])
                    + _noise(h["tax"], h["tax_se"], budget))
    elif not h["feasible"]:  # under tax.confidence: the point is within, its bound is not
        answer.flag("holdout_over_budget", f"the holdout tax {h['tax']:.4g}" + _se(h["tax_se"])
                    + f" is within the budget {budget}, but its upper bound at tax.confidence "
                      f"{confidence} is over it")
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
    at :data:`GAIN_LEVEL` above the budget (the pipelines apply the same test at
    ``promote.confidence``, 0.95 by default, to keep a run unpromoted)."""
    if se is None:
        return ""
    low = lower_bound_of(tax, se, GAIN_LEVEL)
    if low > budget:
        return f", beyond its noise (one-sided 95 % lower bound {low:.4g})"
    return f", within its noise (one-sided 95 % lower bound {low:.4g} is under the budget)"


def _se(se: float | None) -> str:
    return f" (SE {se:.2g})" if se is not None else ""
