"""Promotion and rollback of a pipeline's merges: whether a finished run's best merge beats
the champion (promote-if-better, on the same evaluation data), its export into
``<promote.dir>/<run id>``, the atomic switch of the ``<promote.dir>/current`` alias, and
rollbacks to the champion before.

The scheduler (service.pipelines.scheduler) calls these for the runs it moves along; the
API only records a rollback (:func:`request_rollback`): the promote folders are the
scheduler's to write.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime
from pathlib import Path

from service import queue, stats
from service.db import jobs as job_db
from service.db import pipelines as pipe_db
from service.db import session_scope
from service.db.models import Job, Pipeline, PipelineRun, utcnow
from service.errors import ConflictError
from service.paths import resolve_job_paths, resolve_path
from service.pipelines.spec import PipelineSpec
from service.pipelines.webhooks import emit_run
from service.settings import Settings
from service.spec import JobSpec
from service.status import ExportStatus, JobStatus, PipelineRunStatus

log = logging.getLogger(__name__)

#: the alias inside a promote folder that names the champion's merge
ALIAS = "current"
#: job-spec sections that make two runs' rewards comparable when equal
SAME_DATA_KEYS = ("reward", "tax")


# ------------------------------------------------------------------------------ decide

def decide(settings: Settings, s, run_id: str, now: datetime) -> None:
    """A run whose job ended (status deciding): failed (the job did not succeed), kept
    (not feasible, or not better than the champion by the margin on the same data, with
    the reason), remeasuring (the champion must first be measured on this run's data), or
    promoting (its export queued)."""
    run = pipe_db.get_run(s, run_id)
    p = pipe_db.pipeline_by_id(s, run.pipeline_id)
    job = job_db.get_job(s, run.job_id)
    spec = PipelineSpec.model_validate(p.spec)
    if JobStatus(job.status) is not JobStatus.SUCCEEDED:
        run.status, run.finished_at = PipelineRunStatus.FAILED, now
        run.reason = f"job {job.id} {job.status}" + (f": {job.error}" if job.error else "")
        emit_run(s, p, "run.failed", run, now)
        return
    if job.export_status is not None and ExportStatus(job.export_status).active:
        run.status = PipelineRunStatus.RUNNING  # someone's export: wait for it
        return
    result = job.result or {}
    best = result.get("best")
    budget = job.spec["tax"]["budget"]
    if best is not None:
        holdout = best.get("holdout") or {}
        run.reward, run.tax, run.gain = best["reward"], best["tax"], result.get("gain")
        run.holdout_reward, run.holdout_tax = holdout.get("reward"), holdout.get("tax")
    champion = pipe_db.find_run(s, p.champion_run_id)
    run.champion_run_id = champion.id if champion is not None else None
    reason = None
    # The search chose the answer feasible on its own data, often at the budget's edge, so a
    # holdout tax a little over the budget is what its noise predicts half the time: only a
    # tax over it beyond the noise (its lower bound at promote.confidence; the tax itself
    # without an SE) refutes the search. The result's flag says either case.
    se = holdout.get("tax_se") if best is not None else None
    lower = (stats.lower_bound_of(run.holdout_tax, se, spec.promote.confidence)
             if best is not None and run.holdout_tax is not None else None)
    if best is None:
        reason = f"no feasible merge within the tax budget {budget}"
    elif lower is not None and lower > budget:
        reason = (f"its holdout tax {run.holdout_tax:.4g} is over the budget {budget} "
                  + (f"beyond its noise (SE {se:.2g}, lower bound {lower:.4g} at "
                     f"{spec.promote.confidence:.0%}) " if se else "")
                  + f"(search tax {run.tax:.4g})")
    elif champion is not None:
        same = same_data(job_db.get_job(s, champion.job_id), job)
        if same:
            run.champion_reward = champion.reward
        elif run.champion_job_id is None:  # measure the champion on this run's data
            run.champion_job_id = remeasure_champion(settings, s, p, run, champion, job)
            run.status = PipelineRunStatus.REMEASURING
            return
        else:
            reason = _remeasured(s, run, champion)
        paired = None
        if reason is None and run.champion_reward is not None:
            paired = paired_gain(result, champion_records(s, run, champion, same),
                                 spec.promote.confidence)
        if paired is not None and not paired[1] > spec.promote.margin:
            reason = (f"its holdout gain over the champion (run {champion.id}"
                      f"{'' if same else ', re-measured on this data'}) is {paired[0]:+.4g}, "
                      f"whose lower bound {paired[1]:+.4g} at {spec.promote.confidence:.0%} "
                      f"does not clear the margin {spec.promote.margin} (paired over "
                      f"{paired[2]} prompts)")
        elif (reason is None and paired is None and run.champion_reward is not None
                and not run.reward > run.champion_reward + spec.promote.margin):
            reason = (f"reward {run.reward:.6g} does not beat the champion's "
                      f"{run.champion_reward:.6g} (run {champion.id}"
                      f"{'' if same else ', re-measured on this data'}) by more than "
                      f"the margin {spec.promote.margin}")
    flags = "; ".join(f["message"] for f in result.get("flags") or [])
    if reason is not None:
        run.status, run.decision, run.reason, run.finished_at = (
            PipelineRunStatus.SUCCEEDED, "kept", reason + (f" (flags: {flags})" if flags
                                                           else ""), now)
        emit_run(s, p, "run.finished", run, now)
        return
    out = resolve_path("promote.dir", str(Path(spec.promote.dir) / run.id),
                       settings.model_roots, must_exist=False, kind="model")
    run.status, run.promoted_dir = PipelineRunStatus.PROMOTING, out
    run.reason = ("no champion yet" if champion is None else
                  f"the champion (run {champion.id}) is over the tax budget on this "
                  "run's data" if run.champion_reward is None else
                  f"its holdout gain over the champion (run {champion.id}) is "
                  f"{paired[0]:+.4g}, lower bound {paired[1]:+.4g} at "
                  f"{spec.promote.confidence:.0%} over {paired[2]} prompts: more than "
                  f"{spec.promote.margin}" if paired is not None else
                  f"reward {run.reward:.6g} beats the champion's "
                  f"{run.champion_reward:.6g} (run {champion.id}) by more than "
                  f"{spec.promote.margin}") + (f" (flags: {flags})" if flags else "")
    # before the commit: when Redis fails, nothing of this decision is kept
    queue.request_export(settings, s, job, out, field="promote.dir")


def champion_records(s, run: PipelineRun, champion: PipelineRun, same: bool) -> list | None:
    """The champion's holdout reward per prompt on this run's data: its own job's answer
    (same data), or its re-measure's uniform point at α = 1; None when not recorded (a
    champion from before per-record results)."""
    job = job_db.get_job(s, champion.job_id if same else run.champion_job_id)
    per_record = (job.result or {}).get("per_record") or {}
    return (per_record.get("best" if same else "best_uniform") or {}).get("holdout_reward")


def paired_gain(result: dict, champion: list | None,
                confidence: float) -> tuple[float, float, int] | None:
    """(holdout gain of a run's answer over the champion, its one-sided lower bound at
    ``confidence``, prompts), paired prompt by prompt; None without both per-record sets."""
    mine = ((result.get("per_record") or {}).get("best") or {}).get("holdout_reward")
    if mine is None or champion is None or len(mine) != len(champion) or len(mine) < 2:
        return None
    iv = stats.paired_interval(mine, champion, level=2 * confidence - 1)
    return iv.mean, iv.lo, iv.n


def _remeasured(s, run: PipelineRun, champion: PipelineRun) -> str | None:
    """Take the champion's reward from its re-measure on this run's data (None: over the
    budget there, so any feasible merge wins); the reason to keep it when that failed."""
    remeasured = job_db.get_job(s, run.champion_job_id)
    point = job_db.uniform_trial(s, remeasured.id, 1.0)
    if remeasured.status != JobStatus.SUCCEEDED or point is None:
        return (f"re-measuring the champion (run {champion.id}) on this run's data failed: "
                f"job {remeasured.id} {remeasured.status}"
                + (f": {remeasured.error}" if remeasured.error else ""))
    run.champion_reward = point.reward if point.feasible else None
    return None


def remeasure_champion(settings: Settings, s, p: Pipeline, run: PipelineRun,
                       champion: PipelineRun, job: Job) -> str:
    """Queue a small job that measures the champion's merge on this run's data: the
    champion's checkpoint as the aligned model at α = 1 (its uniform point; a job needs
    one sampled trial more). Its best uniform reward is the champion's reward here."""
    spec = dict(job.spec)
    spec.update(name=f"{p.name}-champion-{champion.id[:8]}-on-{run.id[:8]}",
                aligned_model=champion.promoted_dir, export=None, ratio_bounds=[0.0, 1.0],
                mean_ratio=None,
                search={**spec["search"], "uniform_grid": [1.0], "n_trials": 2,
                        "warm_start": None, "workers": 1, "baseline": "grid",
                        "strategy": "optuna", "walk_steps": 0,
                        "pooled_uniform_trials": 0})  # only its α 1 point is read
    resolved = resolve_job_paths(JobSpec.model_validate(spec), settings)
    row, _ = job_db.create_job(s, resolved.model_dump(mode="json"), n_trials=2,
                               submitted_by=f"pipeline:{p.name}")
    s.commit()
    queue.enqueue_runs(settings, row.id, 1)
    log.info("pipeline run %s: the champion %s is re-measured on its data by job %s",
             run.id, champion.id, row.id)
    return row.id


def same_data(a: Job, b: Job) -> bool:
    """Whether two jobs' rewards are comparable: the same reward and tax sections, and the
    same split of the data (its holdout and validation parts pair record by record)."""
    split = ("holdout_fraction", "validation_fraction")
    return (all(a.spec.get(k) == b.spec.get(k) for k in SAME_DATA_KEYS)
            and all((a.spec.get("search") or {}).get(k) == (b.spec.get("search") or {}).get(k)
                    for k in split))


# ------------------------------------------------------------------------------ switch

def export_ended(s, run_id: str) -> bool:
    """Whether the export of a promoting run's merge has ended (either way)."""
    job = job_db.get_job(s, pipe_db.get_run(s, run_id).job_id)
    return job.export_status is None or not ExportStatus(job.export_status).active


def switch(s, run_id: str, now: datetime) -> None:
    """A run whose export ended (status switching): under the pipeline's row lock, the
    alias switched to its merge (succeeded, promoted), unless the export failed (failed)
    or another run was promoted meanwhile that this one does not beat (succeeded, kept)."""
    run = pipe_db.get_run(s, run_id)
    p = pipe_db.pipeline_by_id(s, run.pipeline_id, lock=True)
    job = job_db.get_job(s, run.job_id)
    exported = (job.export_status == ExportStatus.SUCCEEDED
                and job.export_dir == run.promoted_dir
                and (Path(run.promoted_dir) / "hma_manifest.json").is_file())
    if not exported:
        run.status, run.finished_at = PipelineRunStatus.FAILED, now
        run.reason = ("the export of the best merge failed: "
                      f"{job.export_error or 'its folder or manifest is missing'}")
        emit_run(s, p, "run.failed", run, now)
        return
    if p.champion_run_id != run.champion_run_id:  # another run was promoted meanwhile
        now_champ = pipe_db.get_run(s, p.champion_run_id)
        margin = PipelineSpec.model_validate(p.spec).promote.margin
        same = same_data(job_db.get_job(s, now_champ.job_id), job)
        if not same or not run.reward > now_champ.reward + margin:
            run.status, run.decision, run.finished_at = PipelineRunStatus.SUCCEEDED, "kept", now
            run.reason = (f"run {now_champ.id} was promoted while this one was "
                          "exported, and this one does not beat it by more than the "
                          f"margin on the same data (reward {run.reward:.6g} vs "
                          f"{now_champ.reward:.6g})")
            emit_run(s, p, "run.finished", run, now)
            return
        run.champion_run_id, run.champion_reward = now_champ.id, now_champ.reward
    switch_alias(Path(run.promoted_dir))
    pipe_db.add_promotion(s, p.id, run.id, "promote", run.promoted_dir,
                          previous_run_id=p.champion_run_id, now=now)
    p.champion_run_id = run.id
    run.status, run.decision, run.finished_at = PipelineRunStatus.SUCCEEDED, "promoted", now
    emit_run(s, p, "run.finished", run, now)
    emit_run(s, p, "run.promoted", run, now)
    log.info("pipeline run %s promoted: %s", run_id, run.promoted_dir)


def switch_alias(target: Path) -> Path:
    """Point ``<promote dir>/current`` at ``target`` (a sibling) in one atomic rename."""
    alias = target.parent / ALIAS
    tmp = target.parent / f".{ALIAS}.{os.getpid()}.{threading.get_ident()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)  # relative: the folder can move as a whole
    os.replace(tmp, alias)
    return alias


# ------------------------------------------------------------------------------ rollback

def rollback_target(s, p: Pipeline) -> PipelineRun:
    """The champion before the current one (ConflictError when there is none)."""
    if p.champion_run_id is None:
        raise ConflictError(f"pipeline {p.name} has no champion to roll back")
    made = pipe_db.promotion_of(s, p.id, p.champion_run_id)
    if made is None or made.previous_run_id is None:
        raise ConflictError(f"pipeline {p.name}: run {p.champion_run_id} is the first "
                            "champion; there is none before it")
    previous = pipe_db.get_run(s, made.previous_run_id)
    if previous.promoted_dir is None or not Path(previous.promoted_dir).is_dir():
        raise ConflictError(f"pipeline {p.name}: the previous champion's merge "
                            f"({previous.promoted_dir}) is gone")
    return previous


def request_rollback(settings: Settings, pipeline_ref: str) -> dict:
    """Record a rollback for the scheduler to carry out (the API may not write the promote
    folders: they are the scheduler's)."""
    with session_scope(settings.database()) as s:
        p = pipe_db.get_pipeline(s, pipeline_ref, lock=True)
        previous = rollback_target(s, p)
        p.rollback_requested_at = utcnow()
        return {"pipeline": p.name, "status": "requested", "champion_run": previous.id,
                "dir": previous.promoted_dir, "replaced_run": p.champion_run_id}


def rollback(settings: Settings, pipeline_ref: str, now: datetime | None = None) -> dict:
    """Switch the pipeline's alias back to the champion before the current one."""
    now = now or utcnow()
    with session_scope(settings.database()) as s:
        p = pipe_db.get_pipeline(s, pipeline_ref, lock=True)
        p.rollback_requested_at = None
        previous = rollback_target(s, p)
        switch_alias(Path(previous.promoted_dir))
        pipe_db.add_promotion(s, p.id, previous.id, "rollback", previous.promoted_dir,
                              previous_run_id=p.champion_run_id, now=now)
        old, p.champion_run_id = p.champion_run_id, previous.id
        return {"pipeline": p.name, "champion_run": previous.id, "dir": previous.promoted_dir,
                "replaced_run": old}
