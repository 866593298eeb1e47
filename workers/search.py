"""The search: one Optuna study per job over the per-group ratios, under a tax budget.

Per trial (ask/tell, so that a caller can stop between trials and resume later)::

    ratios = RatioSpace.suggest(trial)         # one ratio per group slot, in ratio_bounds
    LiveMerger.apply(ratios)                   # in place, on the device
    JobEvaluator.evaluate(budget, ...)         # stage 1 tax -> prune? -> stage 2 + reward
    trial.set_constraint("tax", tax - budget)  # feasible when tax <= budget
    study.tell(trial, reward | [reward, tax])  # or PRUNED with the partial figures

- The uniform baseline (vanilla averaging on a grid of α) is enqueued first and evaluated
  in full (never pruned), so the baseline curve is complete and a job's answer is never
  worse than vanilla averaging at the same budget.
- ``mode: constrained`` maximises the reward; ``mode: pareto`` maximises the reward and
  minimises the tax (Optuna's Pareto front, constrained to the budget).
- Samplers: tpe (default, multivariate), gp, cmaes, nsga2, random, all seeded. TPE, GP and
  NSGA-II use the constraint; CMA-ES ignores Optuna constraints, so it is told the reward
  minus a penalty proportional to the excess tax (the ``reward`` attribute stays true).
- Warm start: ``search.warm_start`` vectors run right after the baseline; with
  ``warm_start_refine`` the worker then steps along the first vector's ray (ratios times a
  scale) to where the tax meets the budget (:meth:`Search.refine_warm_start`, called before
  each ask), since the best reward usually sits at the budget.
- Every trial's user attributes: ``kind`` (uniform | search | warm), ``ratios`` (by slot),
  ``reward``, ``tax``, ``feasible``, ``metrics`` and ``task_tax`` (per task), ``stage``
  (1 = pruned after stage 1, 2 = complete), ``merge_seconds``, ``eval_seconds``; a uniform
  trial also ``uniform_ratio``; a warm trial ``warm_start`` (the vector as given) and, on
  the refined ray, ``ray_scale`` (and ``refine`` for the steps). The study's user
  attributes hold the job (``hmaopt``) and, at the end, the ``result`` (best, baseline,
  gain, holdout figures).
- After the search the best feasible ratio vector and the best feasible uniform α are
  re-measured on the holdout data.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service._version import __version__
from service.errors import ConflictError, EvaluationError, SpecError
from service.spec import JobSpec
from workers.ratios import RatioSpace

log = logging.getLogger(__name__)

#: prefix of every study hmaopt creates; :func:`study_name` is the one builder of names
STUDY_PREFIX = "hmaopt"
#: CMA-ES only: penalty per unit of excess tax, in units of the baseline's reward spread
CMAES_PENALTY = 10.0
#: warm-start ray: a vector within this (per slot) of scale x the first vector lies on its ray
RAY_TOLERANCE = 1e-4
#: warm-start ray: stop refining once a feasible scale's tax is within this share of the
#: budget, or the feasible and infeasible scales are this close
RAY_CLOSE = 0.005


def study_name(key: str) -> str:
    """The Optuna study name of a job (``key``: the job id in the service, the spec name in the CLI)."""
    return f"{STUDY_PREFIX}:{key}"


def make_sampler(spec: JobSpec):
    """The spec's sampler, seeded."""
    import optuna

    s = spec.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=10)
    if s.sampler == "gp":
        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=10,
                                             deterministic_objective=True)
    if s.sampler == "cmaes":
        spec.check()  # refuses mode pareto
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=1,
                                            warn_independent_sampling=False)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed,
                                             population_size=max(8, min(50, s.n_trials // 4)))
    return optuna.samplers.RandomSampler(seed=s.seed)


@dataclass
class TrialRecord:
    number: int
    kind: str
    ratios: list[float]
    reward: float | None
    tax: float
    feasible: bool
    stage: int
    metrics: dict[str, float]
    merge_seconds: float
    eval_seconds: float
    uniform_ratio: float | None = None
    task_tax: dict[str, float] = field(default_factory=dict)

    def brief(self, slots: Sequence[str]) -> dict:
        return {"trial": self.number, "kind": self.kind,
                "ratios": dict(zip(slots, self.ratios)), "reward": self.reward, "tax": self.tax,
                "metrics": self.metrics}


@dataclass
class SearchResult:
    """What a search found; :meth:`to_dict` is the JSON written by ``hmaopt search --json``."""

    study: str
    storage: str | None
    mode: str
    budget: float
    slots: list[str]
    best: TrialRecord | None
    uniform: TrialRecord | None
    best_holdout: dict | None
    uniform_holdout: dict | None
    pareto: list[TrialRecord]
    counts: dict[str, int]
    seconds: dict[str, float]
    base_cached: bool
    trials: list[TrialRecord] = field(default_factory=list, repr=False)

    @property
    def feasible(self) -> bool:
        return self.best is not None

    @property
    def gain(self) -> float | None:
        if self.best is None or self.uniform is None:
            return None
        return self.best.reward - self.uniform.reward

    @property
    def holdout_gain(self) -> float | None:
        if self.best_holdout is None or self.uniform_holdout is None:
            return None
        return self.best_holdout["reward"] - self.uniform_holdout["reward"]

    def to_dict(self) -> dict:
        best = self.best.brief(self.slots) if self.best else None
        if best is not None:
            best["holdout"] = self.best_holdout
        uniform = None
        if self.uniform is not None:
            uniform = {"trial": self.uniform.number, "ratio": self.uniform.uniform_ratio,
                       "reward": self.uniform.reward, "tax": self.uniform.tax,
                       "metrics": self.uniform.metrics, "holdout": self.uniform_holdout}
        return {
            "study": self.study, "storage": self.storage, "mode": self.mode,
            "budget": self.budget, "ratio_convention": "ratio = weight on the aligned model",
            "slots": self.slots, "feasible": self.feasible, "best": best,
            "best_uniform": uniform, "gain": self.gain, "holdout_gain": self.holdout_gain,
            "pareto": [t.brief(self.slots) for t in self.pareto],
            "trials": self.counts, "seconds": self.seconds, "base_cached": self.base_cached,
            "version": __version__,
        }


class Search:
    """A job's study with its live merger and evaluator; :meth:`run` drives the trials."""

    def __init__(self, spec: JobSpec, merger, evaluator, *, storage: str | None = None,
                 name: str | None = None, resume: bool = False,
                 live_running: bool = False) -> None:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        self.spec = spec
        self.merger = merger
        self.evaluator = evaluator
        self.slots = list(merger.grouping.slots)
        self.space = RatioSpace(self.slots, spec.ratio_bounds, spec.mean_ratio)
        spec.check()
        self.grid = spec.uniform_grid()
        self.storage = storage
        self.live_running = live_running
        self.name = name or study_name(spec.name)
        directions = ["maximize"] if spec.mode == "constrained" else ["maximize", "minimize"]
        sampler = make_sampler(spec)
        try:
            names = set(optuna.get_all_study_names(storage)) if storage is not None else set()
            if self.name in names and not resume:
                raise ConflictError(f"study {self.name!r} already exists in "
                                    f"{_safe_url(storage)}: resume it (--resume) or choose "
                                    "another name (--study)")
            self.study = optuna.create_study(storage=storage, study_name=self.name,
                                             sampler=sampler, directions=directions,
                                             load_if_exists=resume)
        except (ValueError, ImportError, SQLAlchemyError,
                optuna.exceptions.StorageInternalError) as exc:
            raise SpecError(f"cannot open the Optuna storage {_safe_url(storage)}: {exc}",
                            field="storage") from exc
        job = {"version": __version__, "spec": spec.model_dump(mode="json"),
               "slots": self.slots, "budget": spec.tax.budget, "mode": spec.mode,
               "uniform_grid": self.grid,
               "ratio_convention": "ratio = weight on the aligned model"}
        stored = self.study.user_attrs.get("hmaopt")
        if stored is not None:
            changed = [k for k in ("slots", "budget", "mode", "uniform_grid")
                       if stored.get(k) != job[k]]
            if changed:
                raise ConflictError(f"study {self.name!r} was run with another {', '.join(changed)}: "
                                    "a resumed study must keep them; start a new study (--study)")
        self.study.set_user_attr("hmaopt", job)
        self._ray_done = False
        self._enqueue_baseline()
        self._enqueue_warm_start()

    # ------------------------------------------------------------------ setup

    def _enqueue_baseline(self) -> None:
        """Enqueue the grid points not yet done or waiting (an interrupted one runs again).

        With ``live_running`` (the service, where other workers may share the study and the
        trials of dead ones have been failed), a running grid point counts as taken.
        """
        from optuna.trial import TrialState

        states = (TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)
        if self.live_running:
            states += (TrialState.RUNNING,)
        done = {t.user_attrs.get("uniform_ratio")
                for t in self.study.get_trials(deepcopy=False, states=states)
                if t.user_attrs.get("kind") == "uniform"}
        for alpha in self.grid:
            if alpha not in done:
                self.study.enqueue_trial(self.space.uniform_params(alpha),
                                         user_attrs={"kind": "uniform", "uniform_ratio": alpha})

    def _enqueue_warm_start(self) -> None:
        """Enqueue the spec's warm-start ratio vectors not yet done or waiting (kind 'warm'),
        after the uniform baseline."""
        from optuna.trial import TrialState

        warm = self.spec.search.warm_start or []
        for ratios in warm:
            if set(ratios) != set(self.slots):
                raise SpecError(f"search.warm_start names slots {sorted(ratios)}, but this "
                                f"job's grouping has {self.slots}", field="search.warm_start")
        states = (TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)
        if self.live_running:
            states += (TrialState.RUNNING,)
        done = [t.user_attrs.get("warm_start")
                for t in self.study.get_trials(deepcopy=False, states=states)
                if t.user_attrs.get("kind") == "warm" and not t.user_attrs.get("refine")]
        ray = self._ray()
        for ratios in warm:
            vector = [float(ratios[s]) for s in self.slots]
            if vector in done:
                done.remove(vector)
                continue
            attrs = {"kind": "warm", "warm_start": vector}
            scale = _scale_on(ray, vector) if ray else None
            if scale is not None and all(self.space.low <= v <= self.space.high
                                         for v in vector):  # not clipped off the ray
                attrs["ray_scale"] = scale
            self.study.enqueue_trial(self._clipped(vector), user_attrs=attrs)

    def _clipped(self, vector: Sequence[float]) -> dict[str, float]:
        return dict(zip(self.space.param_names(),
                        [min(max(v, self.space.low), self.space.high) for v in vector]))

    def _ray(self) -> list[float] | None:
        """The first warm-start vector when its ray is to be refined, else None."""
        s = self.spec.search
        if not s.warm_start or not s.warm_start_refine or self.spec.mean_ratio is not None:
            return None
        ray = [float(s.warm_start[0][slot]) for slot in self.slots]
        # the ray runs from the base model (scale 0) and its points must not be clipped
        if self.space.low > 0 or not all(0 <= v <= self.space.high for v in ray):
            return None
        return ray

    def refine_warm_start(self) -> float | None:
        """Enqueue the next point on the first warm-start vector's ray when one is due (call it
        before asking; under the service's ask lock): the scale where the tax meets the budget,
        by the secant through the feasible scale closest under it (or scale 0, the base model,
        tax 0) and the lowest infeasible one above it; without one, extrapolated from the next
        feasible scale down (from the base where the tax does not rise), up to the ratio
        bounds. One point at a time, after every point on the ray has finished; at most
        ``warm_start_refine``; none once that feasible point's tax is within ``RAY_CLOSE`` of
        the budget or the step would be under ``RAY_CLOSE`` in scale. Not when the ray's points would be clipped (``ratio_bounds``
        above 0, or the vector outside them). Returns the scale enqueued."""
        from optuna.trial import TrialState

        ray = self._ray()
        if self._ray_done or ray is None or not any(v > 0 for v in ray):
            return None
        # a RUNNING point is under way only where other workers may run it (the service); a
        # CLI study resumed after a crash has it stale, and leaves it out
        on_ray = [t for t in self.study.get_trials(deepcopy=False)
                  if t.user_attrs.get("ray_scale") is not None and t.state != TrialState.FAIL
                  and (self.live_running or t.state != TrialState.RUNNING)]
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in on_ray):
            return None
        scale = self._next_scale(ray, on_ray)
        if scale is None:  # for good: this process stops looking (it reads every trial)
            self._ray_done = True
            return None
        vector = [v * scale for v in ray]
        self.study.enqueue_trial(self._clipped(vector), user_attrs={
            "kind": "warm", "warm_start": vector, "ray_scale": scale, "refine": True})
        log.info("search %s: warm-start ray refined at scale %.4f", self.name, scale)
        return scale

    def _next_scale(self, ray: list[float], on_ray: list) -> float | None:
        if sum(bool(t.user_attrs.get("refine")) for t in on_ray) >= \
                self.spec.search.warm_start_refine:
            return None
        budget = self.spec.tax.budget
        measured = {(t.user_attrs["ray_scale"], t.user_attrs["tax"]) for t in on_ray
                    if "tax" in t.user_attrs}
        if not measured:  # its points failed (and do not run again)
            return None
        points = sorted(measured | {(0.0, 0.0)})
        feasible = [p for p in points if p[1] <= budget]
        over = [p for p in points if p[1] > budget]
        lo = max(feasible)
        if budget - lo[1] <= RAY_CLOSE * budget:
            return None
        cap = min(self.space.high / v for v in ray if v > 0)
        hi = min((p for p in over if p[0] > lo[0]), default=None)  # uneven tax: above lo only
        if hi is not None:
            if hi[0] - lo[0] <= RAY_CLOSE:
                return None
            scale = lo[0] + (budget - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
            margin = 0.1 * (hi[0] - lo[0])  # stay inside the bracket
            scale = min(max(scale, lo[0] + margin), hi[0] - margin)
        else:
            below = feasible[-2]  # the next feasible scale down (at least the base)
            rise, run = lo[1] - below[1], lo[0] - below[0]
            if rise > 0 and run > 0:
                scale = min(cap, lo[0] + (budget - lo[1]) * run / rise)
            elif lo[1] > 0:  # uneven tax: the slope from the base (scale 0, tax 0) instead
                scale = min(cap, budget * lo[0] / lo[1])
            else:
                scale = cap
            if scale - lo[0] <= RAY_CLOSE:
                return None
        return scale

    def finished(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in self.study.get_trials(deepcopy=False))

    # ------------------------------------------------------------------ trials

    def run_trial(self, on_batch=None, trial=None) -> TrialRecord:
        """Ask (unless given an asked ``trial``), merge, evaluate, tell: one trial."""
        from optuna.trial import TrialState

        if trial is None:
            self.refine_warm_start()
            trial = self.study.ask()
        kind = trial.user_attrs.get("kind", "search")
        spec = self.spec
        budget = spec.tax.budget
        try:
            ratios = self.space.suggest(trial)
            t0 = time.perf_counter()
            self.merger.apply(ratios)
            merge_s = time.perf_counter() - t0
            prune = spec.search.pruning and kind != "uniform"
            m = self.evaluator.evaluate(budget=budget if prune else None,
                                        prune_margin=spec.search.prune_margin, on_batch=on_batch)
            bad = [k for k, v in (("tax", m.tax), ("reward", m.reward))
                   if v is not None and not math.isfinite(v)]
            if bad:
                raise EvaluationError(f"trial {trial.number} (ratios {ratios}): {bad[0]} is "
                                      f"{m.tax if bad[0] == 'tax' else m.reward}; check the "
                                      "data and the models for NaN/inf")
            feasible = not m.pruned and m.tax <= budget
            attrs = {"kind": kind, "ratios": dict(zip(self.slots, ratios)), "reward": m.reward,
                     "tax": m.tax, "feasible": feasible, "metrics": m.metrics,
                     "task_tax": m.task_tax, "stage": m.stage, "merge_seconds": merge_s,
                     "eval_seconds": m.seconds}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trial.set_constraint("tax", m.tax - budget)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        record = TrialRecord(trial.number, kind, list(ratios), m.reward, m.tax, feasible, m.stage,
                             m.metrics, merge_s, m.seconds, trial.user_attrs.get("uniform_ratio"),
                             dict(m.task_tax))
        with warnings.catch_warnings():  # CMA-ES: "constraints set but not used" (see _objective)
            warnings.filterwarnings("ignore", message="Constraints have been set")
            if m.pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            elif spec.mode == "pareto":
                self.study.tell(trial, [m.reward, m.tax])
            else:
                self.study.tell(trial, self._objective(m.reward, m.tax))
        return record

    def _objective(self, reward: float, tax: float) -> float:
        if self.spec.search.sampler != "cmaes" or tax <= self.spec.tax.budget:
            return reward
        rewards = [r.reward for r in self.records() if r.kind == "uniform" and r.reward is not None]
        spread = (max(rewards) - min(rewards)) if len(rewards) > 1 else 1.0
        excess = (tax - self.spec.tax.budget) / max(self.spec.tax.budget, 1e-3)
        return reward - CMAES_PENALTY * max(spread, 1e-6) * excess

    def run(self, *, progress: bool = False, should_stop: Callable[[], bool] | None = None,
            on_trial: Callable[[TrialRecord], None] | None = None, on_batch=None) -> None:
        """Run trials until ``n_trials`` are finished (complete or pruned) or ``should_stop``."""
        total = self.spec.search.n_trials
        bar = _bar(total, self.finished(), progress)
        try:
            while self.finished() < total:
                if should_stop is not None and should_stop():
                    log.info("search %s stopped after %d trials", self.name, self.finished())
                    break
                record = self.run_trial(on_batch=on_batch)
                if on_trial is not None:
                    on_trial(record)
                if bar is not None:
                    best = self.best()
                    bar.set_postfix_str(
                        f"best {best.reward:.4g} @ tax {best.tax:.3f}" if best else "none feasible",
                        refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ results

    def records(self) -> list[TrialRecord]:
        from optuna.trial import TrialState

        out = []
        for t in self.study.get_trials(deepcopy=False,
                                       states=(TrialState.COMPLETE, TrialState.PRUNED)):
            a = t.user_attrs
            if "tax" not in a:
                continue
            out.append(TrialRecord(
                t.number, a.get("kind", "search"), list(a["ratios"].values()), a.get("reward"),
                a["tax"], bool(a.get("feasible")), int(a.get("stage", 2)), a.get("metrics", {}),
                float(a.get("merge_seconds", 0.0)), float(a.get("eval_seconds", 0.0)),
                a.get("uniform_ratio"), a.get("task_tax", {})))
        return out

    def best(self, kind: str | None = None) -> TrialRecord | None:
        """The feasible trial of highest reward (of ``kind`` only when given)."""
        feasible = [r for r in self.records() if r.feasible and r.reward is not None
                    and (kind is None or r.kind == kind)]
        return max(feasible, key=lambda r: (r.reward, -r.tax, -r.number), default=None)

    def pareto(self) -> list[TrialRecord]:
        """Feasible trials not dominated in (higher reward, lower tax)."""
        pts = [r for r in self.records() if r.feasible and r.reward is not None]
        front = [r for r in pts if not any(
            (o.reward >= r.reward and o.tax <= r.tax) and (o.reward > r.reward or o.tax < r.tax)
            for o in pts)]
        return sorted(front, key=lambda r: r.tax)

    def measure_holdout(self, record: TrialRecord | None, on_batch=None) -> dict | None:
        if record is None or not self.evaluator.has_holdout:
            return None
        self.merger.apply(record.ratios)
        m = self.evaluator.evaluate_holdout(on_batch=on_batch)
        return {"reward": m.reward, "tax": m.tax, "feasible": m.tax <= self.spec.tax.budget,
                "metrics": m.metrics}

    def result(self, *, base_cached: bool, base_seconds: float, total_seconds: float,
               on_batch=None) -> SearchResult:
        """Re-measure the best and the best uniform trial on the holdout; store the result."""
        records = self.records()
        best, uniform = self.best(), self.best("uniform")
        best_h = self.measure_holdout(best, on_batch)
        same = uniform is not None and best is not None and uniform.number == best.number
        uniform_h = best_h if same else self.measure_holdout(uniform, on_batch)
        n = len(records)
        counts = {"finished": n, "complete": sum(r.stage == 2 for r in records),
                  "pruned": sum(r.stage == 1 for r in records),
                  "uniform": sum(r.kind == "uniform" for r in records)}
        merge = sum(r.merge_seconds for r in records)
        evaluation = sum(r.eval_seconds for r in records)
        seconds = {"total": total_seconds, "base": base_seconds,
                   "per_trial": (merge + evaluation) / n if n else math.nan,
                   "merge_per_trial": merge / n if n else math.nan,
                   "eval_per_trial": evaluation / n if n else math.nan}
        result = SearchResult(self.name, _safe_url(self.storage), self.spec.mode,
                              self.spec.tax.budget, self.slots, best, uniform, best_h, uniform_h,
                              self.pareto(), counts, seconds, base_cached, records)
        self.study.set_user_attr("result", jsonable(result.to_dict()))
        return result


def load_job(spec: JobSpec, *, device: str | None = "auto"):
    """(LiveMerger, JobEvaluator) of a job: both checkpoints, tokenizer, data, reward model."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from service.settings import get_settings
    from workers.evaluate.job import JobEvaluator
    from workers.merge import LiveMerger

    hf_logging.disable_progress_bar()  # one bar: the trials'
    settings = get_settings()
    merger = LiveMerger.load(spec.base_model, spec.aligned_model, spec.groups, device=device,
                             allow_pickle=settings.allow_pickle,
                             trust_remote_code=settings.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model,
                                              trust_remote_code=settings.trust_remote_code)
    evaluator = JobEvaluator.load(spec, merger.model, tokenizer,
                                  trust_remote_code=settings.trust_remote_code)
    return merger, evaluator


def measure_base(merger, evaluator, *, cache_dir: str | Path | None = None,
                 on_batch=None) -> bool:
    """Write θ_base into the live model and measure it (from the cache in ``cache_dir``/base
    when there). Returns True on a cache hit."""
    from service.settings import get_settings
    from workers.evaluate.job import base_cache_key

    spec = evaluator.spec
    merger.apply([0.0] * merger.grouping.n_ratios)
    if cache_dir is None:
        return evaluator.measure_base(on_batch=on_batch)
    dev = next(merger.model.parameters())
    key = base_cache_key(spec, spec.base_model, device=dev.device.type, dtype=str(dev.dtype),
                         allow_pickle=get_settings().allow_pickle)
    return evaluator.measure_base(cache_dir=Path(cache_dir) / "base", cache_key=key,
                                  on_batch=on_batch)


def run_search(spec: JobSpec, *, storage: str | None = None, name: str | None = None,
               resume: bool = False, device: str | None = "auto", progress: bool = False,
               cache_dir: str | Path | None = None, should_stop=None, on_trial=None,
               log_fn: Callable[[str], None] | None = None) -> SearchResult:
    """Load the models, measure θ_base (cached), run the study, re-measure on the holdout."""
    from service.settings import get_settings

    say = log_fn or (lambda _msg: None)
    started = time.perf_counter()
    merger, evaluator = load_job(spec, device=device)
    search = Search(spec, merger, evaluator, storage=storage, name=name, resume=resume)
    t0 = time.perf_counter()
    cached = measure_base(merger, evaluator, cache_dir=cache_dir or get_settings().cache_dir)
    base_seconds = time.perf_counter() - t0
    say(f"θ_base figures {'from cache' if cached else 'measured'} ({base_seconds:.1f} s)")
    search.run(progress=progress, should_stop=should_stop, on_trial=on_trial)
    say("re-measuring the best ratios and the best uniform ratio on the holdout data")
    return search.result(base_cached=cached, base_seconds=base_seconds,
                         total_seconds=time.perf_counter() - started)


def _scale_on(ray: Sequence[float], vector: Sequence[float]) -> float | None:
    """The scale s with ``vector`` = s x ``ray`` (within RAY_TOLERANCE per slot), else None."""
    norm = sum(v * v for v in ray)
    if norm == 0:
        return None
    scale = sum(v * w for v, w in zip(ray, vector)) / norm
    if all(abs(w - scale * v) <= RAY_TOLERANCE for v, w in zip(ray, vector)):
        return scale
    return None


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", dynamic_ncols=True)


def _safe_url(storage) -> str | None:
    """The storage URL (of a URL or an RDBStorage) without a password."""
    from service.db.session import safe_url

    return safe_url(getattr(storage, "url", storage))


def jsonable(value):
    """NaN/inf -> None, for JSON and Optuna's storage."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
