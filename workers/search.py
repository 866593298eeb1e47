"""The search: one Optuna study per job over the per-group ratios, under a tax budget, and
the one trial driver (:meth:`Search.run`) that the CLI and the service's workers share.

Per trial (ask/tell, so that a caller can stop between trials and resume later)::

    trial = Search.claim()                     # under the job's lock: the trial cap, ask
    ratios = RatioSpace.suggest(trial)         # one ratio per group slot, in ratio_bounds
    LiveMerger.apply(ratios)                   # in place, on the device
    JobEvaluator.evaluate(budget, ...)         # stage 1 tax -> prune? -> stage 2 + reward
    set_tax_constraint(bound - budget)         # feasible when tax's bound <= budget
    study.tell(trial, told_values(...))        # reward | [reward, tax]; or PRUNED

- The uniform baseline (vanilla averaging on a grid of α) is enqueued first and evaluated
  in full (never pruned), so the baseline curve is complete and a job's answer is never
  worse than vanilla averaging at the same budget.
- ``mode: constrained`` maximises the reward; ``mode: pareto`` maximises the reward and
  minimises the tax (Optuna's Pareto front, constrained to the budget).
- Samplers: tpe (default, multivariate), gp, cmaes, nsga2, random, local (workers/local.py),
  all seeded. TPE, GP and NSGA-II use the constraint; CMA-ES ignores Optuna constraints.
  Every sampler is told, for an infeasible trial, a value under the best feasible reward,
  less a penalty proportional to the excess tax (workers/study.py :func:`told_values`: so
  optuna-dashboard, which ranks by value alone, never calls it best); the ``reward`` and
  ``tax`` attributes stay true.
- Optuna's view: parameters named as the slots (workers/ratios.py; a study begun with
  positional names keeps them), metric names ``reward`` (and ``tax``), the constraint in
  the system attribute both Optuna and optuna-dashboard read.
- Warm start: ``search.warm_start`` vectors run right after the baseline; with
  ``warm_start_refine`` the search then steps along the first vector's ray (ratios times a
  scale) to where the tax meets the budget (workers/ray.py; :meth:`Search.refine_warm_start`
  runs before each ask), since the best reward usually sits at the budget.
- Shared studies (the service, ``live_running``): several workers run one study; a trial
  is claimed only while fewer than ``n_trials`` are complete, pruned or running, and a
  RUNNING trial whose worker is dead is failed (:func:`fail_stale_trials`) and runs again.
- Every trial's user attributes: ``kind`` (uniform | search | warm), ``ratios`` (by slot),
  ``reward``, ``tax``, ``feasible``, ``metrics`` and ``task_tax`` (per task), ``stage``
  (1 = pruned after stage 1, 2 = complete), ``merge_seconds``, ``eval_seconds``, ``worker``
  (service); a uniform trial also ``uniform_ratio``; a warm trial ``warm_start`` (the vector
  as given) and, on the refined ray, ``ray_scale`` (and ``refine`` for the steps); a
  uniform trial the answer stage added (past the cap: workers/answer.py) ``answer_stage``. The
  study's user attributes hold the job (``hmaopt``) and, at the end, the ``result``.
- After the search the best feasible ratio vector and the best feasible uniform α are
  re-measured on the holdout data.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from service._version import __version__
from service.db.session import safe_url
from service.errors import ConflictError, EvaluationError, SpecError
from service.settings import get_settings
from service.spec import JobSpec
from service.stats import upper_bound
from workers.answer import choose, part_dict
from workers.job import load_job, measure_base
from workers.ratios import RatioSpace, legacy_param_names, param_names
from workers.stages import Stages
from workers.results import (RATIO_CONVENTION, SearchResult, TrialRecord, best_of, jsonable,
                             pareto_of, summary)
from workers.study import (STUDY_PREFIX, best_feasible_reward, fail_stale_trials, make_sampler,
                           set_metric_names, set_tax_constraint, storage_at, study_name,
                           told_values)

__all__ = ["STUDY_PREFIX", "Search", "SearchResult", "TrialHooks", "TrialRecord",
           "fail_stale_trials", "jsonable", "load_job", "make_sampler", "measure_base",
           "storage_at", "run_search", "study_name"]

log = logging.getLogger(__name__)

#: seconds a driver that found no free trial (others still running) waits before looking again
IDLE_POLL_SECONDS = 0.5
#: trials that count toward ``n_trials``: finished ones, and in a shared study running ones
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_TAKEN = _FINISHED + (TrialState.RUNNING,)


@dataclass
class TrialHooks:
    """What the caller of :meth:`Search.run` supplies; the defaults are one process's (CLI).

    - ``should_stop``: checked before each claim; True ends the run (the service raises
      instead, to say why: cancelled, worker stopping).
    - ``lock(name)``: the job's lock of that name ("ask" around the cap and the ask,
      "setup" around enqueueing), a Redis lock where workers share the study.
    - ``on_batch``: at every evaluation batch (a cancel check that raises).
    - ``on_trial``: after each tell, with the record (the service records and publishes it).
    - ``on_error``: a trial raised (the service learns whether it was declared dead).
    - ``worker``: this worker's id, stored on each trial it claims.
    - ``alive_workers``: the ids of the live workers; with it, a RUNNING trial of another
      live worker is waited for and one of a dead worker is failed (shared studies).
    """

    should_stop: Callable[[], bool] = lambda: False
    lock: Callable[[str], AbstractContextManager] = lambda _name: nullcontext()
    on_batch: Callable | None = None
    on_trial: Callable[[TrialRecord], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    worker: str | None = None
    alive_workers: Callable[[], set[str]] | None = None
    stale_seconds: float = 60.0
    poll_seconds: float = IDLE_POLL_SECONDS


class Search:
    """A job's study with its live merger and evaluator; :meth:`run` drives the trials.

    ``storage``: None (in memory), a database URL, or an RDBStorage (:func:`storage_at`).
    ``live_running``: the study is shared by live workers (the service), so a RUNNING trial
    is someone's work in hand, not the leftover of a crashed process.
    """

    def __init__(self, spec: JobSpec, merger, evaluator, *,
                 storage: str | optuna.storages.BaseStorage | None = None,
                 name: str | None = None, resume: bool = False,
                 live_running: bool = False) -> None:
        self.spec = spec
        self.merger = merger
        self.evaluator = evaluator
        self.slots = list(merger.grouping.slots)
        self.grid = spec.uniform_grid()
        self.storage_url = safe_url(getattr(storage, "url", storage))
        self.live_running = live_running
        self.name = name or study_name(spec.name)
        directions = ["maximize"] if spec.mode == "constrained" else ["maximize", "minimize"]
        try:
            if storage is None:
                self.storage, names = optuna.storages.InMemoryStorage(), set()
            else:
                self.storage = storage_at(storage) if isinstance(storage, str) else storage
                names = set(optuna.get_all_study_names(self.storage))
            if self.name in names and not resume:
                raise ConflictError(f"study {self.name!r} already exists in "
                                    f"{self.storage_url}: resume it (--resume) or choose "
                                    "another name (--study)")
            self.study = optuna.create_study(storage=self.storage, study_name=self.name,
                                             sampler=make_sampler(spec),
                                             directions=directions, load_if_exists=resume)
        except (ValueError, ImportError, SQLAlchemyError,
                optuna.exceptions.StorageInternalError) as exc:
            raise SpecError(f"cannot open the Optuna storage {self.storage_url}: {exc}",
                            field="storage") from exc
        self.study_id = self.storage.get_study_id_from_name(self.name)
        stored = self.study.user_attrs.get("hmaopt")
        if (stored is not None and isinstance(stored.get("uniform_grid"), list)
                and spec.search.baseline is None and spec.baseline_mode() == "bisection"):
            # a study begun on a grid (before bisection was the default) resumes on it
            spec = spec.model_copy(update={"search": spec.search.model_copy(
                update={"baseline": "grid"})})
            self.spec = spec
        baseline = self.grid if spec.baseline_mode() == "grid" else "bisection"
        # a study begun with positional parameter names (ratio_0...) resumes under them
        legacy = stored is not None and "params" not in stored
        names = (legacy_param_names if legacy else param_names)(self.slots, spec.mean_ratio)
        job = {"version": __version__, "spec": spec.model_dump(mode="json"),
               "slots": self.slots, "budget": spec.tax.budget, "mode": spec.mode,
               "uniform_grid": baseline, "ratio_convention": RATIO_CONVENTION,
               "params": names}
        if stored is not None:
            changed = [k for k in ("slots", "budget", "mode", "uniform_grid", "params")
                       if stored.get(k, names if k == "params" else None) != job[k]]
            if changed:
                raise ConflictError(f"study {self.name!r} was run with another {', '.join(changed)}: "
                                    "a resumed study must keep them; start a new study (--study)")
        self.space = RatioSpace(self.slots, spec.ratio_bounds, spec.mean_ratio, names=names)
        self.study.set_user_attr("hmaopt", job)
        set_metric_names(self.study, spec.mode)
        # where the merge lives in the process that last opened the study (memory mode, bytes)
        self.study.set_user_attr("placement", merger.placement())
        #: this process's search-data measurements by trial number (per-record values)
        self.measured: dict[int, object] = {}
        self.on_trial: Callable[[TrialRecord], None] | None = None
        self.worker: str | None = None  # the answer stage's trials' owner (result)
        self.stages = Stages(self)
        self.stages.enqueue_initial()

    # ------------------------------------------------------------------ setup

    def taken(self, kind: str) -> list[optuna.trial.FrozenTrial]:
        """Trials of ``kind`` done or waiting; in a shared study running ones too (the trials
        of dead workers have been failed)."""
        states = _TAKEN + (TrialState.WAITING,) if self.live_running else \
            _FINISHED + (TrialState.WAITING,)
        return [t for t in self.study.get_trials(deepcopy=False, states=states)
                if t.user_attrs.get("kind") == kind]

    def refine_warm_start(self) -> float | None:
        """Enqueue the next point on the warm-start ray when one is due (workers/ray.py);
        called before each ask, under the ask lock. Returns the scale enqueued."""
        return self.stages.warm.refine()

    # ------------------------------------------------------------------ the driver

    def finished(self) -> int:
        """Trials complete or pruned."""
        return self.storage.get_n_trials(self.study_id, _FINISHED)

    def claim(self, worker: str | None = None) -> optuna.Trial | None:
        """The next trial, or None once ``n_trials`` are finished (in a shared study: finished
        or running, the cap across workers). Call it under the job's "ask" lock where
        workers share the study; ``worker`` is stored on the trial (its owner)."""
        states = _TAKEN if self.live_running else _FINISHED
        cap = self.spec.search.n_trials
        taken = self.storage.get_n_trials(self.study_id, states)
        # the answer stage's trials (past the cap) are read only when the cap looks reached
        if taken >= cap and taken - self.answer_stage_trials(states) >= cap:
            return None
        self.stages.before_ask()
        if self.stages.exhausted():  # strategy gradient: its stages have run
            return None
        trial = self.study.ask()
        if worker is not None:
            trial.set_user_attr("worker", worker)
        return trial

    def answer_stage_trials(self, states=_FINISHED) -> int:
        """Trials in ``states`` the answer stage added (:meth:`run_uniform`): not counted in
        ``n_trials``, so a study resumed with a higher cap gets the sampler trials asked
        for."""
        return sum(bool(t.user_attrs.get("answer_stage"))
                   for t in self.study.get_trials(deepcopy=False, states=states))

    def fail_orphans(self, hooks: TrialHooks) -> bool:
        """Fail the RUNNING trials of dead workers (their grid points go back in); True while
        trials of live workers still run (wait for them: one may fail and free a slot)."""
        alive = hooks.alive_workers() if hooks.alive_workers is not None else set()
        failed, left = fail_stale_trials(self.study, lambda w: w not in alive,
                                         hooks.stale_seconds)
        for t in failed:
            log.warning("search %s: trial %d of dead worker %s failed; it runs again",
                        self.name, t.number, t.user_attrs.get("worker"))
        if any(t.user_attrs.get("kind") == "uniform" for t in failed):
            with hooks.lock("setup"):
                self.stages.requeue_baseline()
        return bool(failed) or left > 0

    def run(self, hooks: TrialHooks | None = None, **hook_fields) -> None:
        """Run trials until the cap or ``hooks.should_stop``: claim under the ask lock, run,
        hand the record to ``hooks.on_trial``. Where the study is shared and the cap is
        reached, wait while other live workers' trials run. ``hook_fields`` build the hooks
        when none are given (``should_stop=``, ``on_trial=``...)."""
        hooks = hooks or TrialHooks(**hook_fields)
        while not hooks.should_stop():
            if self.stages.gradient_due():
                with hooks.lock("gradient"):
                    self.stages.run_gradient(hooks.on_batch)
                continue
            with hooks.lock("ask"):
                trial = self.claim(hooks.worker)
            if trial is None:
                if self.live_running and self.fail_orphans(hooks):
                    time.sleep(hooks.poll_seconds)
                    continue
                log.info("search %s: %d trials finished", self.name, self.finished())
                return
            try:
                record = self.run_trial(on_batch=hooks.on_batch, trial=trial)
            except Exception as exc:
                if hooks.on_error is not None:
                    hooks.on_error(exc)
                raise
            if hooks.on_trial is not None:
                hooks.on_trial(record)
        log.info("search %s stopped after %d trials", self.name, self.finished())

    def run_trial(self, on_batch=None, trial=None) -> TrialRecord:
        """Merge, evaluate, tell one trial (claimed here unless an asked ``trial`` is given)."""
        if trial is None:
            self.stages.before_ask()
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
                                        prune_margin=spec.search.prune_margin,
                                        prune_confidence=spec.search.prune_confidence,
                                        on_batch=on_batch)
            bad = [k for k, v in (("tax", m.tax), ("reward", m.reward))
                   if v is not None and not math.isfinite(v)]
            if bad:
                raise EvaluationError(f"trial {trial.number} (ratios {ratios}): {bad[0]} is "
                                      f"{m.tax if bad[0] == 'tax' else m.reward}; check the "
                                      "data and the models for NaN/inf")
            bound = upper_bound(m.tax, m.tax_se, spec.tax.confidence)
            feasible = not m.pruned and bound <= budget
            attrs = {"kind": kind, "ratios": dict(zip(self.slots, ratios)), "reward": m.reward,
                     "tax": m.tax, "feasible": feasible, "metrics": m.metrics,
                     "task_tax": m.task_tax, "stage": m.stage, "merge_seconds": merge_s,
                     "eval_seconds": m.seconds, "reward_se": m.reward_se, "tax_se": m.tax_se,
                     "n_reward": m.n_reward, "n_tax": m.n_tax, "tax_bound": bound}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            set_tax_constraint(self.storage, self.study_id, trial.number, bound - budget)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        record = TrialRecord(trial.number, kind, list(ratios), m.reward, m.tax, feasible, m.stage,
                             m.metrics, merge_s, m.seconds, trial.user_attrs.get("uniform_ratio"),
                             dict(m.task_tax), m.reward_se, m.tax_se, m.n_reward, m.n_tax)
        if not m.pruned:  # the per-record values behind the figures, for paired gains
            self.measured[trial.number] = m
        with warnings.catch_warnings():  # CMA-ES: "constraints set but not used" (see _objective)
            warnings.filterwarnings("ignore", message="Constraints have been set")
            if m.pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                best, spread = best_feasible_reward(self.records()) if not feasible else (0, 0)
                self.study.tell(trial, told_values(
                    spec.mode, reward=m.reward, tax=m.tax, bound=bound, budget=budget,
                    feasible=feasible, best_feasible=best, spread=spread))
        return record

    def run_uniform(self, alpha: float, on_batch=None) -> TrialRecord:
        """One more uniform trial at ``alpha``, run now whatever the cap (the answer stage's
        baseline on the pooled records: workers/answer.py). The trial is created RUNNING with
        its fixed parameters, so no waiting trial of the queue is taken in its place; its
        ``answer_stage`` attribute says where it came from. ``self.on_trial`` (set by
        :meth:`result`) records it as the driver's trials are. A finished answer-stage trial
        at ``alpha`` (a result computed again, after a crash) is reused, not run twice."""
        for t in self.study.get_trials(deepcopy=False, states=_FINISHED):
            if t.user_attrs.get("answer_stage") and t.user_attrs.get("uniform_ratio") == alpha:
                found = TrialRecord.from_attrs(t.number, t.user_attrs)
                if found is not None:
                    return found
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            system_attrs={"fixed_params": self.space.uniform_params(alpha)},
            user_attrs={"kind": "uniform", "uniform_ratio": alpha, "answer_stage": True,
                        # its owner: a peer's fail_orphans fails only a dead worker's trial
                        **({"worker": self.worker} if self.worker is not None else {})})
        # through the study's own storage: for a database it is Optuna's caching wrapper,
        # which must know the trial before its parameters are set (Study.ask does the same)
        trial_id = self.study._storage.create_new_trial(self.study_id, template_trial=template)
        log.info("search %s: the answer stage adds uniform α %.6g (pooled tax budget)",
                 self.name, alpha)
        record = self.run_trial(on_batch=on_batch, trial=optuna.Trial(self.study, trial_id))
        if self.on_trial is not None:
            self.on_trial(record)
        return record

    # ------------------------------------------------------------------ results

    def records(self) -> list[TrialRecord]:
        """The finished trials' records, in trial order."""
        found = (TrialRecord.from_attrs(t.number, t.user_attrs)
                 for t in self.study.get_trials(deepcopy=False, states=_FINISHED))
        return [r for r in found if r is not None]

    def best(self, kind: str | None = None) -> TrialRecord | None:
        """The feasible trial of highest reward (of ``kind`` only when given)."""
        return best_of(self.records(), kind)

    def pareto(self) -> list[TrialRecord]:
        """Feasible trials not dominated in (higher reward, lower tax)."""
        return pareto_of(self.records())

    def measure_holdout(self, record: TrialRecord | None, on_batch=None) -> dict | None:
        """A trial's merge measured on the holdout data (None without a trial or holdout)."""
        if record is None or not self.evaluator.has_holdout:
            return None
        self.merger.apply(record.ratios)
        m = self.evaluator.evaluate_holdout(on_batch=on_batch)
        return part_dict(m, self.spec.tax.budget, self.spec.tax.confidence)

    def result(self, *, base_cached: bool, base_seconds: float, total_seconds: float,
               on_batch=None, on_trial: Callable[[TrialRecord], None] | None = None,
               worker: str | None = None) -> SearchResult:
        """Choose the answer (finalists on the validation data, held-out figures, paired
        gains: workers/answer.py) and store the result in the study. ``on_trial`` gets the
        trials the answer stage adds (:meth:`run_uniform`), as the driver's hook does;
        ``worker`` is stored on them as their owner (the service's finalizer)."""
        self.on_trial, self.worker = on_trial, worker
        answer = choose(self, self.records(), on_batch)
        records = self.records()  # with the answer stage's trials
        counts, seconds = summary(records, base_seconds=base_seconds, total_seconds=total_seconds)
        result = SearchResult(
            self.name, self.storage_url, self.spec.mode, self.spec.tax.budget, self.slots,
            answer.best, answer.uniform, answer.best_holdout, answer.uniform_holdout,
            pareto_of(records), counts, seconds, base_cached, records,
            best_validation=answer.best_validation, uniform_validation=answer.uniform_validation,
            gain_interval=answer.gain, holdout_gain_interval=answer.holdout_gain,
            chosen_by=answer.chosen_by, finalists=answer.finalists, flags=answer.flags,
            per_record=answer.per_record, gradient=self.study.user_attrs.get("gradient"))
        self.study.set_user_attr("result", jsonable(result.to_dict()))
        return result


def run_search(spec: JobSpec, *, storage: str | None = None, name: str | None = None,
               resume: bool = False, device: str | None = "auto", progress: bool = False,
               cache_dir: str | Path | None = None, should_stop=None, on_trial=None,
               log_fn: Callable[[str], None] | None = None) -> SearchResult:
    """One process's search (``hmaopt search``): load the models, measure θ_base (cached),
    drive the study with the one driver, re-measure on the holdout."""
    say = log_fn or (lambda _msg: None)
    started = time.perf_counter()
    merger, evaluator = load_job(spec, device=device)
    search = Search(spec, merger, evaluator, storage=storage, name=name, resume=resume)
    t0 = time.perf_counter()
    cached = measure_base(merger, evaluator, cache_dir=cache_dir or get_settings().cache_dir)
    base_seconds = time.perf_counter() - t0
    say(f"θ_base figures {'from cache' if cached else 'measured'} ({base_seconds:.1f} s)")
    bar = _bar(spec.search.n_trials, search.finished()) if progress else None

    def after(record: TrialRecord) -> None:
        if on_trial is not None:
            on_trial(record)
        if bar is not None:
            best = search.best()
            bar.set_postfix_str(f"best {best.reward:.4g} @ tax {best.tax:.3f}" if best
                                else "none feasible", refresh=False)
            bar.update(1)

    try:
        search.run(TrialHooks(should_stop=should_stop or (lambda: False), on_trial=after))
    finally:
        if bar is not None:
            bar.close()
    say("re-measuring the best ratios and the best uniform ratio on the holdout data")
    return search.result(base_cached=cached, base_seconds=base_seconds,
                         total_seconds=time.perf_counter() - started, on_trial=on_trial)


def _bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", dynamic_ncols=True)
