"""The stages of a search before (and beside) the sampler's own trials, and which is due.

1. The uniform baseline (kind 'uniform'): a grid of α enqueued at once (``baseline: grid``)
   or the largest feasible α found by secant steps on the budget (``baseline: bisection``,
   workers/ray.py :class:`~workers.ray.Bisection`), one point at a time.
2. Warm starts (kind 'warm'): ``search.warm_start`` vectors, then their ray to the budget.
3. The gradient stage (``strategy: gradient | hybrid``, kind 'gradient'): once the baseline
   is complete, HMA's gradient-learned ratios (workers/gradient.py) as a direction, then
   ``gradient_refine`` true evaluations along its ray to the budget. Its result and cost
   (seconds, evaluation equivalents) are stored in the study's ``gradient`` attribute, so a
   resumed or shared study runs it once.

4. The walk to the budget (``walk_steps``, default 0: off; kind 'walk'): whenever a sampler trial becomes
   the best feasible one, up to ``walk_steps`` true evaluations along its ray (its ratios
   times a scale) to where the tax meets the budget, since the best reward usually sits
   there and a sampler seldom lands on it.

With ``strategy: gradient`` the search ends when these stages have nothing more to run;
otherwise the sampler proposes the remaining trials.
"""

from __future__ import annotations

import logging
import statistics

from optuna.trial import TrialState

from workers.gradient import learn_ratios
from service.stats import upper_bound
from workers.ray import Bisection, WarmStart, next_scale, tax_of, usable_ray
from workers.results import best_of

log = logging.getLogger(__name__)


class Stages:
    """A search's stages: what each enqueues, and when the gradient stage is due."""

    def __init__(self, search) -> None:
        self.search = search
        self.spec = search.spec
        self.study = search.study
        self.bisection = (Bisection(search) if self.spec.baseline_mode() == "bisection"
                          else None)
        self.warm = WarmStart(search)
        self.gradient: WarmStart | None = None
        self.walk = Walk(search)

    @property
    def strategy(self) -> str:
        return self.spec.search.strategy

    def enqueue_initial(self) -> None:
        """What is known at set-up: the grid, the warm vectors, a stored gradient result."""
        self.requeue_baseline()
        self.warm.enqueue(self.search.taken)
        stored = self.study.user_attrs.get("gradient")
        if stored is not None and self.strategy != "optuna":
            self._gradient_ray(stored)

    def requeue_baseline(self) -> None:
        """Enqueue the grid points not yet taken (an interrupted or failed one runs again);
        the bisection enqueues its next point itself. Where workers share the study, call it
        under the job's "setup" lock."""
        if self.bisection is not None:
            return
        done = {t.user_attrs.get("uniform_ratio") for t in self.search.taken("uniform")}
        for alpha in self.search.grid:
            if alpha not in done:
                self.study.enqueue_trial(self.search.space.uniform_params(alpha),
                                         user_attrs={"kind": "uniform", "uniform_ratio": alpha})

    def before_ask(self) -> None:
        """Enqueue the next point each stage has due (under the ask lock)."""
        if self.bisection is not None:
            self.bisection.step()
        self.warm.refine()
        if self.gradient is not None:
            self.gradient.refine()
        self.walk.step()

    def baseline_complete(self) -> bool:
        if self.bisection is not None:
            return self.bisection.complete()
        pending = (TrialState.WAITING, TrialState.RUNNING) if self.search.live_running \
            else (TrialState.WAITING,)  # a CLI study resumed after a crash: RUNNING is stale
        return not any(t.state in pending for t in self.study.get_trials(deepcopy=False)
                       if t.user_attrs.get("kind") == "uniform")

    def gradient_due(self) -> bool:
        """The gradient stage is to run now: its strategy, the baseline complete, not yet run."""
        if self.strategy == "optuna" or self.gradient is not None:
            return False
        stored = self.study.user_attrs.get("gradient")
        if stored is not None:  # another worker ran it
            self._gradient_ray(stored)
            return False
        return self.baseline_complete()

    def exhausted(self) -> bool:
        """``strategy: gradient``: no stage has a point waiting (the sampler never runs; a
        point of another worker still running is waited for by the driver, and when none
        is, the search ends)."""
        if self.strategy != "gradient":
            return False
        return not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def run_gradient(self, on_batch=None) -> dict:
        """Run the gradient stage once (call it under the job's "gradient" lock) and enqueue
        its ray; its stored result."""
        stored = self.study.user_attrs.get("gradient")
        if stored is None:
            search = self.search
            records = search.records()
            uniform = [r for r in records if r.kind == "uniform" and r.feasible
                       and (r.uniform_ratio or 0) > 0]
            target = max((r.uniform_ratio for r in uniform), default=None)
            result = learn_ratios(
                search.merger, search.evaluator, low=search.space.low, high=search.space.high,
                mean_ratio=self.spec.mean_ratio, target_ratio=target,
                steps=self.spec.search.gradient_steps, seed=self.spec.search.seed,
                on_batch=on_batch)
            per_eval = [r.eval_seconds + r.merge_seconds for r in records if r.stage == 2]
            unit = statistics.median(per_eval) if per_eval else None
            stored = {"ratios": result.ratios, "seconds": result.seconds,
                      "steps": result.steps, "responses": result.responses,
                      "eval_equivalents": result.seconds / unit if unit else None,
                      "target_uniform_ratio": target,
                      "final_loss": result.history[-1]["loss"] if result.history else None}
            self._gradient_ray(stored)  # its trials first: whoever sees the attr sees them
            self.study.set_user_attr("gradient", stored)
            return stored
        self._gradient_ray(stored)
        return stored

    def _gradient_ray(self, stored: dict) -> None:
        self.gradient = WarmStart(self.search, [list(stored["ratios"])],
                                  refine=self.spec.search.gradient_refine, kind="gradient")
        self.gradient.enqueue(self.search.taken)


class Walk:
    """Steps along the ray of the best feasible sampler trial toward the budget."""

    def __init__(self, search) -> None:
        self.search = search
        self.limit = search.spec.search.walk_steps
        self.budget = search.spec.tax.budget
        self.low, self.high = search.space.low, search.space.high

    def step(self) -> float | None:
        """Enqueue the next point on the best sampler trial's ray when one is due; its scale."""
        search = self.search
        if not self.limit or search.spec.mean_ratio is not None:
            return None
        best = best_of(search.records(), "search")
        if best is None or not usable_ray(best.ratios, self.low, self.high) \
                or not any(v > 0 for v in best.ratios):
            return None
        key = f"walk:{best.number}"
        live = search.live_running
        points = [t for t in search.study.get_trials(deepcopy=False)
                  if t.user_attrs.get("ray") == key and t.state != TrialState.FAIL
                  and (live or t.state != TrialState.RUNNING)]
        if len(points) >= self.limit or any(
                t.state in (TrialState.WAITING, TrialState.RUNNING) for t in points):
            return None
        bound = upper_bound(best.tax, best.tax_se, search.spec.tax.confidence)
        measured = {(1.0, bound)} | {(t.user_attrs["ray_scale"], tax_of(t))
                                     for t in points if "tax" in t.user_attrs}
        scale = next_scale(best.ratios, measured, budget=self.budget, high=self.high)
        if scale is None:
            return None
        vector = [v * scale for v in best.ratios]
        params = dict(zip(search.space.param_names(),
                          [min(max(v, self.low), self.high) for v in vector]))
        search.study.enqueue_trial(params, user_attrs={
            "kind": "walk", "ray": key, "ray_scale": scale, "walk_from": best.number})
        log.info("search %s: walk from trial %d at scale %.4f", search.name, best.number,
                 scale)
        return scale
