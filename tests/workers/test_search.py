"""The search loop on a tiny real job: baseline first, attributes, constraint, reload, resume."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from service.errors import ConflictError, SpecError
from service.spec import JobSpec
from tests.models import make_tiny_job
from workers.search import Search, TrialHooks, load_job, measure_base, run_search, study_name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_job(tmp_path_factory.mktemp("search"))


def _search(spec_dict, **kwargs) -> Search:
    spec = JobSpec.model_validate(spec_dict)
    merger, ev = load_job(spec, device="cpu")
    measure_base(merger, ev)
    return Search(spec, merger, ev, **kwargs)


def test_run_search_stores_a_reloadable_study(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = run_search(JobSpec.model_validate(tiny), storage=url, cache_dir=tmp_path)
    study = optuna.load_study(study_name="hmaopt:tiny", storage=url)
    trials = study.get_trials()
    assert len(trials) == 6
    # the uniform baseline comes first, in full
    first = trials[:3]
    assert [t.user_attrs["kind"] for t in first] == ["uniform"] * 3
    assert [t.user_attrs["uniform_ratio"] for t in first] == [0.0, 0.5, 1.0]
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["stage"] == 2 for t in first)
    assert first[0].user_attrs["tax"] == pytest.approx(0.0, abs=1e-9)
    for t in trials:
        a = t.user_attrs
        assert set(a) >= {"kind", "ratios", "reward", "tax", "feasible", "metrics", "task_tax",
                          "stage", "merge_seconds", "eval_seconds"}
        assert list(a["ratios"]) == ["block0", "block1"]
        assert list(t.constraints.values()) == [pytest.approx(a["tax"] - 0.5)]
        assert a["feasible"] == (t.state == TrialState.COMPLETE and a["tax"] <= 0.5)
    # the answer is never worse than the best feasible uniform ratio
    assert result.best is not None and result.uniform is not None
    assert result.best.tax <= 0.5
    assert result.best.reward >= result.uniform.reward
    assert result.gain == pytest.approx(result.best.reward - result.uniform.reward)
    assert result.best_holdout is not None and result.uniform_holdout is not None
    stored = study.user_attrs["result"]
    assert stored["best"]["trial"] == result.best.number
    assert stored["ratio_convention"].startswith("ratio = weight on the aligned")
    assert study.user_attrs["hmaopt"]["slots"] == ["block0", "block1"]
    # a second run of the same job finds θ_base in the cache, and the study name taken
    with pytest.raises(ConflictError, match="already exists"):
        run_search(JobSpec.model_validate(tiny), storage=url, cache_dir=tmp_path)


def test_resume_continues_to_n_trials_without_repeating_the_baseline(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _search(tiny, storage=url)
    stops = iter([False, False, False, False, True])
    s.run(should_stop=lambda: next(stops))
    assert s.finished() == 4
    again = _search(tiny, storage=url, resume=True)
    again.run()
    trials = again.study.get_trials()
    assert len(trials) == 6
    assert sum(t.user_attrs.get("kind") == "uniform" for t in trials) == 3


def test_pruning_records_partial_figures(tiny):
    spec = {**tiny, "tax": {**tiny["tax"], "budget": 0.0},
            "search": {**tiny["search"], "prune_margin": 0.0, "n_trials": 8}}
    s = _search(spec)
    s.run()
    pruned = [t for t in s.study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned, "with budget 0 and margin 0 some trial must be pruned after stage 1"
    for t in pruned:
        assert t.user_attrs["kind"] in ("search", "walk")  # the baseline is never pruned
        assert t.user_attrs["stage"] == 1 and t.user_attrs["reward"] is None
        assert t.user_attrs["tax"] > 0 and t.user_attrs["metrics"]
        assert not t.user_attrs["feasible"]
        # pruned beyond its noise (search.prune_confidence 0.95 reaches the evaluator)
        assert t.user_attrs["tax"] - 1.6449 * t.user_attrs["tax_se"] > 0


def test_mean_ratio_keeps_every_trial_on_the_constraint(tiny):
    s = _search({**tiny, "mean_ratio": 0.4, "search": {**tiny["search"], "n_trials": 5}})
    assert s.grid == [0.4]
    s.run()
    for t in s.study.get_trials():
        ratios = list(t.user_attrs["ratios"].values())
        assert sum(ratios) / len(ratios) == pytest.approx(0.4, abs=1e-9)
        assert set(t.params) == {"w:block0", "w:block1"}


@pytest.mark.parametrize("sampler", ["gp", "cmaes", "nsga2", "random", "local"])
def test_every_sampler_runs(tiny, sampler):
    s = _search({**tiny, "search": {**tiny["search"], "sampler": sampler, "n_trials": 5}})
    s.run()
    assert s.finished() == 5
    assert s.best("uniform") is not None


def test_the_local_sampler_starts_at_the_tuned_uniform_ratio(tiny):
    """sampler local on a real job: the first proposal after the bisection lies within a few
    small steps (local_sigma 0.01) of the best feasible uniform α, and so do the ones after
    (each around the best feasible trial at its time)."""
    s = _search({**tiny, "tax": {**tiny["tax"], "budget": 0.3},
                 "search": {**tiny["search"], "sampler": "local", "local_sigma": 0.01,
                            "n_trials": 12, "pruning": False}})
    s.run()
    records = sorted(s.records(), key=lambda r: r.number)
    proposals = [r for r in records if r.kind == "search"]
    assert proposals and len(proposals) == 12 - sum(r.kind == "uniform" for r in records)
    for p in proposals:
        best = max((r for r in records if r.number < p.number and r.feasible),
                   key=lambda r: r.reward)
        assert all(abs(a - b) <= 0.06 for a, b in zip(p.ratios, best.ratios)), (p, best)
    alpha = s.best("uniform").uniform_ratio
    assert 0 < alpha < 1 and all(abs(v - alpha) <= 0.06 for v in proposals[0].ratios)


def test_pareto_mode_has_two_objectives_and_a_front(tiny):
    s = _search({**tiny, "mode": "pareto", "search": {**tiny["search"], "sampler": "nsga2"}})
    s.run()
    assert s.study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                  optuna.study.StudyDirection.MINIMIZE]
    front = s.pareto()
    assert front
    for a in front:  # no feasible trial dominates a front member
        for b in s.records():
            if b.feasible and b.reward is not None:
                assert not (b.reward > a.reward and b.tax < a.tax)


def test_resume_refuses_a_changed_job_and_reruns_an_interrupted_baseline_point(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _search(tiny, storage=url)
    s.run_trial()
    interrupted = s.study.ask()  # a worker died here: the trial stays RUNNING
    assert interrupted.user_attrs["uniform_ratio"] == 0.5
    with pytest.raises(ConflictError, match="budget"):
        _search({**tiny, "tax": {**tiny["tax"], "budget": 0.2}}, storage=url, resume=True)
    again = _search(tiny, storage=url, resume=True)
    again.run()
    done = [t.user_attrs["uniform_ratio"] for t in again.study.get_trials()
            if t.state == TrialState.COMPLETE and t.user_attrs.get("kind") == "uniform"]
    assert sorted(done) == [0.0, 0.5, 1.0]


def test_spec_errors(tiny):
    with pytest.raises(SpecError, match="n_trials"):
        _search({**tiny, "search": {**tiny["search"], "n_trials": 3}})
    with pytest.raises(SpecError, match="uniform_grid"):
        _search({**tiny, "ratio_bounds": [0.6, 0.9], "search": {**tiny["search"],
                                                                 "uniform_grid": [0.0, 0.5]}})
    with pytest.raises(SpecError, match="storage"):
        _search(tiny, storage="nosuchdb://x")
    with pytest.raises(SpecError, match="cmaes"):
        _search({**tiny, "mode": "pareto", "search": {**tiny["search"], "sampler": "cmaes"}})


def test_study_names_come_from_one_builder():
    assert study_name("job-1") == "hmaopt:job-1"


def test_warm_start_vectors_run_right_after_the_baseline(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    warm = [{"block0": 0.25, "block1": 0.75}, {"block0": 0.9, "block1": 0.1}]
    spec = {**tiny, "search": {**tiny["search"], "n_trials": 6, "warm_start": warm}}
    run_search(JobSpec.model_validate(spec), storage=url, cache_dir=tmp_path)
    trials = optuna.load_study(study_name="hmaopt:tiny", storage=url).get_trials()
    assert [t.user_attrs["kind"] for t in trials] == ["uniform"] * 3 + ["warm"] * 2 + ["search"]
    assert [t.user_attrs["ratios"] for t in trials[3:5]] == warm
    # resuming does not run them again
    s = _search(spec, storage=url, name="hmaopt:tiny", resume=True)
    assert not s.study.get_trials(states=(TrialState.WAITING,))


def test_warm_start_ray_is_refined_toward_the_budget(tiny):
    """The secant between the scales on both sides of the budget, then within the new bracket;
    extrapolated up to the ratio bounds when every scale is under it; none once close."""
    v = {"block0": 0.8, "block1": 0.6}
    spec = {**tiny, "tax": {**tiny["tax"], "budget": 0.1},
            "search": {**tiny["search"], "n_trials": 10, "warm_start_refine": 2,
                       "warm_start": [v, {k: x / 2 for k, x in v.items()}]}}

    def tell_next(s, tax):  # finish the next waiting trial as if it measured ``tax``
        trial = s.study.ask()
        s.space.suggest(trial)  # the enqueued ratios become its params
        trial.set_user_attr("tax", tax)
        s.study.tell(trial, 0.0)
        return trial

    def ray_after(taxes, job=spec):
        s = _search(job)
        for _ in s.grid:  # the uniform grid
            tell_next(s, 0.0)
        for tax in taxes:  # the warm vectors: scale 1, then 0.5
            assert s.refine_warm_start() is None  # not before the ray's points are done
            tell_next(s, tax)
        return s

    s = ray_after([0.2, 0.05])
    assert s.refine_warm_start() == pytest.approx(0.5 + 0.05 * 0.5 / 0.15)
    assert s.refine_warm_start() is None  # one at a time
    first = tell_next(s, 0.09)
    assert first.user_attrs["refine"] and first.user_attrs["kind"] == "warm"
    assert [first.params["block0"], first.params["block1"]] == pytest.approx(
        [0.8 * 2 / 3, 0.6 * 2 / 3])
    second = s.refine_warm_start()
    # the secant (2/3 + 0.01 (1/3) / 0.11 = 0.697) is held a tenth of the bracket inside it
    assert second == pytest.approx(2 / 3 + 0.1 * (1 / 3))
    tell_next(s, 0.0999)
    assert s.refine_warm_start() is None  # warm_start_refine: 2 done

    s = ray_after([0.06, 0.03])  # under the budget all along: up to the bounds (1 / 0.8)
    assert s.refine_warm_start() == pytest.approx(1.25)
    s = ray_after([0.0996, 0.05])  # within 0.5 % of the budget already: nothing to refine
    assert s.refine_warm_start() is None
    s = ray_after([0.5, 0.3])  # both over: between the base (scale 0, tax 0) and scale 0.5
    assert s.refine_warm_start() == pytest.approx(0.5 * 0.1 / 0.3)
    s = ray_after([0.09, 0.101])  # uneven: over at 0.5, under at 1: on up from 1 (via the base)
    assert s.refine_warm_start() == pytest.approx(1 + 0.01 * 1 / 0.09)
    s = ray_after([0.2, 0.05], job={**spec, "ratio_bounds": [0.1, 1.0]})
    assert s.refine_warm_start() is None  # its points would be clipped off the ray


def test_warm_start_ray_after_a_crash_is_not_held_by_a_stale_running_trial(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    v = {"block0": 0.8, "block1": 0.6}
    spec = {**tiny, "tax": {**tiny["tax"], "budget": 0.1},
            "search": {**tiny["search"], "n_trials": 10, "warm_start_refine": 1,
                       "warm_start": [v, {k: x / 2 for k, x in v.items()}]}}
    s = _search(spec, storage=url, name="hmaopt:crash")
    for tax in [0.0] * len(s.grid) + [0.2, 0.05]:
        trial = s.study.ask()
        s.space.suggest(trial)
        trial.set_user_attr("tax", tax)
        s.study.tell(trial, 0.0)
    s.refine_warm_start()
    s.study.ask()  # the refine point starts, and the process dies with it RUNNING
    resumed = _search(spec, storage=url, name="hmaopt:crash", resume=True)
    # the point that never finished runs again, as the warm vectors do on resume
    assert resumed.refine_warm_start() == pytest.approx(0.5 + 0.05 * 0.5 / 0.15)
    s = _search(spec, storage=url, name="hmaopt:crash2")
    for tax in [0.0] * len(s.grid):
        trial = s.study.ask()
        s.space.suggest(trial)
        trial.set_user_attr("tax", tax)
        s.study.tell(trial, 0.0)
    s.study.ask()  # the first warm point starts, and the process dies with it RUNNING
    trial = s.study.ask()
    s.space.suggest(trial)
    trial.set_user_attr("tax", 0.05)
    s.study.tell(trial, 0.0)
    resumed = _search(spec, storage=url, name="hmaopt:crash2", resume=True)
    assert resumed.refine_warm_start() is None  # the interrupted warm point is enqueued again
    trial = resumed.study.ask()
    resumed.space.suggest(trial)
    assert trial.user_attrs["ray_scale"] == 1.0
    trial.set_user_attr("tax", 0.2)
    resumed.study.tell(trial, 0.0)
    # and the stale RUNNING one does not hold the ray (a service study, live_running, waits)
    assert resumed.refine_warm_start() == pytest.approx(0.5 + 0.05 * 0.5 / 0.15)


def test_warm_start_refine_runs_after_the_warm_vectors(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    v = {"block0": 0.8, "block1": 0.6}
    spec = {**tiny, "search": {**tiny["search"], "n_trials": 7, "warm_start_refine": 3,
                               "warm_start": [v, {k: x / 2 for k, x in v.items()}]}}
    run_search(JobSpec.model_validate(spec), storage=url, cache_dir=tmp_path)
    trials = optuna.load_study(study_name="hmaopt:tiny", storage=url).get_trials()
    kinds = [(t.user_attrs["kind"], t.user_attrs.get("ray_scale")) for t in trials]
    assert kinds[:5] == [("uniform", None)] * 3 + [("warm", 1.0), ("warm", 0.5)]
    # this tiny pair taxes less at scale 1 than at 0.5, far under its budget: the ray goes
    # up to the ratio bounds (scale 1 / 0.8) once, and then has nowhere further to go
    assert kinds[5] == ("warm", pytest.approx(1.25)) and trials[5].user_attrs["refine"]
    assert list(trials[5].user_attrs["ratios"].values()) == pytest.approx([1.0, 0.75])
    assert kinds[6][0] == "search"


def test_warm_start_with_other_slots_is_a_clear_error(tiny):
    spec = {**tiny, "search": {**tiny["search"], "warm_start": [{"layer0": 0.5}]}}
    with pytest.raises(SpecError, match="warm_start names slots") as err:
        _search(spec)
    assert err.value.field == "search.warm_start"
    with pytest.raises(ValueError, match="warm_start ratios must"):
        JobSpec.model_validate({**tiny, "search": {**tiny["search"], "warm_start": [{"b": 2}]}})


# ------------------------------------------------------------------ the driver, shared studies

def _shared(tiny, url, n_trials=5, **kwargs):
    """A service-style Search on a shared study (another worker may hold one like it)."""
    spec = {**tiny, "search": {**tiny["search"], "n_trials": n_trials}}
    return _search(spec, storage=url, name="hmaopt:shared", resume=True, live_running=True,
                   **kwargs)


def test_claim_caps_finished_and_running_trials_across_workers(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    a, b = _shared(tiny, url), _shared(tiny, url)
    waiting = [t for t in b.study.get_trials() if t.state == TrialState.WAITING]
    assert len(waiting) == 3  # the grid enqueued once, not once per worker
    held = [a.claim("w-a"), b.claim("w-b"), a.claim("w-a")]
    assert [t.user_attrs["uniform_ratio"] for t in held] == [0.0, 0.5, 1.0]
    assert held[1].user_attrs["worker"] == "w-b"
    a.run_trial(trial=held[0])
    a.run_trial(trial=b.claim("w-b"))  # the 4th of 5: 1 finished + 3 running, then this
    assert b.claim("w-b") is not None  # 5 taken now
    assert a.claim("w-a") is None and b.claim("w-b") is None  # the cap holds for both
    # the one-process (CLI) rule counts only finished trials: the running ones are leftovers
    cli = _search({**tiny, "search": {**tiny["search"], "n_trials": 5}}, storage=url,
                  name="hmaopt:shared", resume=True)
    assert cli.finished() == 2 and cli.claim() is not None


def test_orphans_of_dead_workers_fail_and_their_grid_point_goes_back(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _shared(tiny, url)
    mine, theirs = s.claim("w-live"), s.claim("w-dead")
    hooks = TrialHooks(alive_workers=lambda: {"w-live"})
    assert s.fail_orphans(hooks)  # one failed, one still running: wait and look again
    states = {t.number: t.state for t in s.study.get_trials()}
    assert states[theirs.number] == TrialState.FAIL and states[mine.number] == TrialState.RUNNING
    waiting = [t.user_attrs["uniform_ratio"] for t in s.study.get_trials()
               if t.state == TrialState.WAITING]
    assert 0.5 in waiting  # the dead worker's grid point is enqueued again
    s.run_trial(trial=mine)
    assert not s.fail_orphans(hooks)  # nothing running: nothing to wait for


def test_run_waits_for_live_workers_then_ends_with_every_trial_done(tiny, tmp_path):
    """The driver under a shared study: at the cap it waits while a live peer's trial runs,
    fails a dead peer's trial and runs it itself, and stops when all n_trials are done."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _shared(tiny, url, n_trials=4)
    peer_dead = s.claim("w-dead")
    peer_live = s.claim("w-live")
    seen, polls = [], []

    def alive():
        polls.append(1)
        if len(polls) == 2:  # the live peer finishes its trial while we wait
            s.run_trial(trial=peer_live)
        return {"w-me", "w-live"}

    s.run(TrialHooks(worker="w-me", alive_workers=alive, poll_seconds=0,
                     on_trial=lambda rec: seen.append(rec.number)))
    finished = [t for t in s.study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(finished) == 4 and s.finished() == 4
    assert peer_dead.number not in {t.number for t in finished}  # failed, re-run as another
    assert sorted(t.user_attrs["uniform_ratio"] for t in finished
                  if t.user_attrs["kind"] == "uniform") == [0.0, 0.5, 1.0]
    assert peer_live.number not in seen and len(seen) == 3  # our own trials only
    assert all(t.user_attrs["worker"] == "w-me" for t in finished
               if t.number in seen)


def test_hooks_stop_between_trials_and_see_a_failing_trial(tiny):
    s = _search({**tiny, "search": {**tiny["search"], "n_trials": 5}})
    errors = []

    def boom(*_args):
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        s.run(TrialHooks(on_batch=boom, on_error=errors.append))
    assert [str(e) for e in errors] == ["device lost"]
    assert [t.state for t in s.study.get_trials()][:1] == [TrialState.FAIL]
    calls = []
    s.run(TrialHooks(should_stop=lambda: calls.append(1) or len(calls) > 2))
    assert s.finished() == 2 and len(calls) == 3


# ------------------------------------------------------------------ the baseline by bisection

@pytest.mark.parametrize("tax_of,boundary", [
    (lambda a: 0.3 * a * a, (0.1 / 0.3) ** 0.5),   # convex
    (lambda a: 0.25 * a ** 0.5, 0.16),             # concave
    (lambda a: 0.05 * a, None),                    # feasible everywhere: α 1 at once
])
def test_bisection_finds_the_largest_feasible_alpha_in_few_evaluations(tiny, tax_of, boundary):
    spec = {**tiny, "tax": {**tiny["tax"], "budget": 0.1},
            "search": {**tiny["search"], "uniform_grid": None, "n_trials": 12}}
    s = _search(spec)
    assert s.spec.baseline_mode() == "bisection"
    measured = []
    while not s.stages.baseline_complete():
        trial = s.claim()
        alpha = trial.user_attrs["uniform_ratio"]
        assert trial.user_attrs["kind"] == "uniform"
        s.space.suggest(trial)
        trial.set_user_attr("tax", tax_of(alpha))
        s.study.tell(trial, 0.0)
        measured.append(alpha)
    assert len(measured) <= 6, measured
    best = max(a for a in measured if tax_of(a) <= 0.1)
    if boundary is None:
        assert measured == [1.0]
    else:
        # as close as a 0.1 grid at least: within 0.05 of the boundary, never over it
        assert boundary - 0.05 <= best <= boundary, measured


def test_a_new_best_sampler_trial_is_walked_along_its_ray_to_the_budget(tiny):
    spec = {**tiny, "tax": {**tiny["tax"], "budget": 0.1},
            "search": {**tiny["search"], "n_trials": 12, "walk_steps": 2}}
    s = _search(spec)

    def tell(trial, tax, reward=0.0):
        ratios = s.space.suggest(trial)
        for key, value in {"tax": tax, "reward": reward, "feasible": tax <= 0.1,
                           "ratios": dict(zip(s.slots, ratios)), "stage": 2}.items():
            trial.set_user_attr(key, value)
        s.study.tell(trial, reward)
        return ratios

    for _ in s.grid:
        tell(s.claim(), 0.2, -1.0)  # the uniform points, all over the budget
    s.study.enqueue_trial({"block0": 0.4, "block1": 0.3})  # as a sampler would propose
    best = s.claim()
    ratios = tell(best, 0.04, 1.0)  # the sampler's first trial: the best feasible one
    first = s.claim()
    assert first.user_attrs["kind"] == "walk" and first.user_attrs["walk_from"] == best.number
    scale = first.user_attrs["ray_scale"]
    cap = min(1.0 / v for v in ratios if v > 0)
    assert scale == pytest.approx(min(cap, 0.1 / 0.04))  # from the base's (0, 0) through it
    walked = tell(first, 0.12, 1.5)  # over: the next step is the secant inside the bracket
    assert walked == pytest.approx([min(1.0, v * scale) for v in ratios])
    second = s.claim()
    assert second.user_attrs["kind"] == "walk"
    assert 1.0 < second.user_attrs["ray_scale"] < scale
    tell(second, 0.099, 1.2)
    assert s.claim().user_attrs.get("kind", "search") == "search"  # walk_steps 2: done


def test_the_answer_stage_adds_a_uniform_trial_past_the_cap_without_taking_a_queued_one(
        tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = _search({**tiny, "search": {**tiny["search"], "n_trials": 4}}, storage=url)
    s.run()
    assert s.finished() == 4 and s.claim() is None
    s.study.enqueue_trial(s.space.uniform_params(0.9), user_attrs={"kind": "warm"})
    seen = []
    s.on_trial = seen.append
    record = s.run_uniform(0.25)
    assert record.kind == "uniform" and record.ratios == [0.25, 0.25] and seen == [record]
    trials = s.study.get_trials()
    added = trials[record.number]
    assert added.state == TrialState.COMPLETE and added.params == s.space.uniform_params(0.25)
    assert added.user_attrs["answer_stage"] and added.user_attrs["uniform_ratio"] == 0.25
    assert list(added.constraints.values()) == [pytest.approx(added.user_attrs["tax"] - 0.5)]
    # the queued trial is still queued, and the study reloads with the trial in its records
    assert [t.user_attrs["kind"] for t in trials if t.state == TrialState.WAITING] == ["warm"]
    again = _search({**tiny, "search": {**tiny["search"], "n_trials": 4}}, storage=url,
                    resume=True)
    assert [r.number for r in again.records()][-1] == record.number
    # a result computed again (after a crash) reuses the trial instead of running it twice
    assert again.run_uniform(0.25).number == record.number
    assert len(again.study.get_trials()) == len(trials)
