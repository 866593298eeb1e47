"""The pipeline scheduler: `hmaopt scheduler`, and a thread of the embedded `hmaopt serve`.

Every ``HMAOPT_SCHEDULER_SECONDS`` a pass (:meth:`Scheduler.tick`):

1. Due runs. For each active pipeline whose ``next_due_at`` has come, the latest cron time
   not after now is claimed by inserting its run row: (pipeline, scheduled time) is unique,
   so of two schedulers on one database exactly one gets it. A time that passed before this
   scheduler started and is older than ``HMAOPT_SCHEDULER_GRACE_SECONDS`` was missed (no
   scheduler ran): ``missed: run_once``
   runs it once (trigger ``catch_up``), ``skip`` records it as skipped; earlier missed
   times are not run. ``next_due_at`` moves to the next cron time after now.
2. Runs move on, each step taken by the one scheduler whose compare-and-set of the run's
   status succeeds:
   - pending -> the newest complete checkpoint of the source; the same one as the last
     processed run's -> skipped; else a normal job (the template with that checkpoint, warm
     started with the previous run's best ratios and best uniform α) -> running;
   - running -> the job ended -> deciding: promoted only if the best merge is feasible (tax
     within budget, holdout tax too) and its reward beats the champion's by more than the
     margin on the same evaluation data (when the job's reward or tax section changed since
     the champion's, a small job re-measures the champion's merge first: remeasuring); else
     kept, with the reason;
   - promoting -> the export of the best merge into ``<promote.dir>/<run id>`` finished ->
     the ``current`` alias switched to it atomically -> succeeded, the run is the champion.
3. Runs left in a transient status (starting, deciding, switching) for STALE_SECONDS are
   failed; rollbacks requested over the API are carried out here (this process may write the
   promote folders).
4. Webhook deliveries that are due are sent (service.pipelines.webhooks), for at most
   DELIVERY_BUDGET_SECONDS per pass.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from service import queue
from service.db import jobs as job_db
from service.db import pipelines as pipe_db
from service.db import session_scope
from service.db.models import Job, Pipeline, PipelineRun, Promotion, Trial, utcnow
from service.errors import ConflictError, DependencyUnavailableError, HmaoptError
from service.paths import check_output, resolve_job_paths, resolve_path
from service.pipelines import webhooks
from service.pipelines.sources import newest_complete
from service.pipelines.spec import PipelineSpec, apply_warm_start
from service.settings import Settings
from service.spec import JobSpec
from service.status import TERMINAL, JobStatus

log = logging.getLogger(__name__)

#: the alias inside a promote folder that names the champion's merge
ALIAS = "current"
#: job-spec sections that make two runs' rewards comparable when equal
SAME_DATA_KEYS = ("reward", "tax")
#: statuses a scheduler holds only while it works on the run; held longer than
#: STALE_SECONDS, its scheduler stopped mid-step and the run is failed
TRANSIENT = ("starting", "deciding", "switching")
STALE_SECONDS = 600
#: seconds of webhook delivery per pass at most (the rest waits for the next pass)
DELIVERY_BUDGET_SECONDS = 10.0


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.database()
        #: scheduled times before this passed while this scheduler was not running
        self.started = utcnow()

    # ------------------------------------------------------------------ the pass
    def tick(self, now: datetime | None = None) -> None:
        now = now or utcnow()
        self.claim_due(now)
        self.rollbacks(now)
        self.reap(now)
        for run_id, status in self._runs(("pending", "running", "remeasuring", "promoting")):
            try:
                if status == "pending":
                    self.start(run_id, now)
                elif status in ("running", "remeasuring"):
                    self.follow(run_id, now, status)
                else:
                    self.finish_promotion(run_id, now)
            except Exception as exc:  # one run's trouble never stops the others
                log.exception("pipeline run %s: %s", run_id, exc)
        webhooks.deliver_due(self.settings, now, budget_seconds=DELIVERY_BUDGET_SECONDS)

    def reap(self, now: datetime) -> list[str]:
        """Fail the runs a scheduler left in a transient status (it stopped mid-step)."""
        from datetime import timedelta

        with session_scope(self.url) as s:
            stale = pipe_db.stale_runs(s, TRANSIENT, now - timedelta(seconds=STALE_SECONDS))
        for run_id, old in stale:
            with session_scope(self.url) as s:
                if pipe_db.move_run(s, run_id, old, "failed"):
                    self._fail(run_id, f"the scheduler stopped while the run was {old}; "
                               "trigger the pipeline again", now)
        return [run_id for run_id, _ in stale]

    def rollbacks(self, now: datetime) -> None:
        """Carry out the rollbacks the API recorded (the scheduler may write the folders)."""
        with session_scope(self.url) as s:
            ids = list(s.scalars(select(Pipeline.id).where(
                Pipeline.rollback_requested_at.is_not(None))))
        for pid in ids:
            try:
                rollback(self.settings, pid, now)
            except HmaoptError as exc:
                log.warning("pipeline %s: rollback refused: %s", pid, exc)
                with session_scope(self.url) as s:
                    s.get(Pipeline, pid).rollback_requested_at = None

    def run_forever(self, stop: threading.Event) -> None:
        log.info("scheduler: a pass every %.0f s", self.settings.scheduler_seconds)
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:
                log.warning("scheduler pass failed (next in %.0f s): %s",
                            self.settings.scheduler_seconds, exc)
            stop.wait(self.settings.scheduler_seconds)

    def _runs(self, statuses: tuple[str, ...]) -> list[tuple[str, str]]:
        with session_scope(self.url) as s:
            return pipe_db.runs_in(s, statuses)

    # ------------------------------------------------------------------ 1. due runs
    def claim_due(self, now: datetime) -> list[str]:
        with session_scope(self.url) as s:
            due = [(p.id, p.spec["schedule"], p.next_due_at) for p in s.scalars(
                select(Pipeline).where(Pipeline.paused.is_(False),
                                       Pipeline.next_due_at <= now))]
        claimed = []
        for pid, schedule, next_due in due:
            times = pipe_db.due_between(schedule, next_due, now)
            latest = times[-1]
            # missed: it passed while no scheduler ran (before this one started), not merely
            # during a slow pass of this one
            missed = (latest < self.started and (now - latest).total_seconds()
                      > self.settings.scheduler_grace_seconds)
            skip = missed and schedule.get("missed", "run_once") == "skip"
            with session_scope(self.url) as s:
                run = pipe_db.claim_run(
                    s, pid, latest, "catch_up" if missed else "schedule",
                    status="skipped" if skip else "pending",
                    reason=(f"missed: no scheduler was running at {latest.isoformat()}"
                            if skip else None))
                if run is not None:
                    claimed.append(run.id)
                    log.info("pipeline %s: run %s for %s (%s)", pid, run.id, latest,
                             run.status)
                    if skip:
                        p = s.get(Pipeline, pid)
                        webhooks.emit(s, p, "run.skipped", _run_data(run), run.id, now)
                p = s.get(Pipeline, pid)
                if p.next_due_at == next_due:
                    p.next_due_at = pipe_db.next_due(schedule, now)
        return claimed

    def trigger(self, pipeline_ref: str, now: datetime | None = None) -> str:
        """A manual run, now (`POST /v1/pipelines/{name}/trigger`)."""
        now = now or utcnow()
        with session_scope(self.url) as s:
            p = pipe_db.get_pipeline(s, pipeline_ref)
            run = pipe_db.claim_run(s, p.id, now, "manual")
            if run is None:
                raise ConflictError(f"pipeline {p.name} was triggered at this very moment")
            return run.id

    # ------------------------------------------------------------------ 2. runs
    def start(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            if not pipe_db.move_run(s, run_id, "pending", "starting"):
                return
        with self._failing(run_id, now):
            self._start(run_id, now)

    def _start(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = s.get(Pipeline, run.pipeline_id)
            spec = PipelineSpec.model_validate(p.spec)
            found, passed = newest_complete(spec.aligned, self.settings, "aligned")
            if found is None:
                where = spec.aligned.dir or spec.aligned.path
                return self._skip(s, p, run, f"no complete checkpoint in {where} yet"
                                  + (f" ({'; '.join(passed)})" if passed else ""), now)
            base = spec.job.base_model
            base_fp = ""
            if spec.base is not None:
                found_base, passed_base = newest_complete(spec.base, self.settings, "base")
                if found_base is None:
                    return self._skip(s, p, run, "no complete base checkpoint yet"
                                      + (f" ({'; '.join(passed_base)})" if passed_base else ""),
                                      now)
                base, base_fp = found_base.path, found_base.fingerprint
            fingerprint = _digest(found.fingerprint + base_fp)
            last = pipe_db.last_processed(s, p.id, exclude=run.id)
            run.checkpoint, run.base_checkpoint, run.fingerprint = found.path, base, fingerprint
            if last is not None and last.fingerprint == fingerprint and run.trigger != "manual":
                return self._skip(s, p, run, f"checkpoint {found.path} was already processed "
                                  f"by run {last.id}", now)
            job_spec = spec.job.model_dump(mode="json")
            job_spec.update(aligned_model=found.path, base_model=base, export=None,
                            name=f"{p.name}-{run.scheduled_for:%Y%m%dT%H%M%S}")
            warm = self._warm_start(s, p, spec, run) if spec.warm_start else None
            if warm:
                job_spec = apply_warm_start(job_spec, warm["ratios"], warm["uniform"],
                                            spec.warm_start_scales, spec.warm_start_refine)
            job = JobSpec.model_validate(job_spec)
            job.check()
            resolved = resolve_job_paths(job, self.settings)
            row, _ = job_db.create_job(s, resolved.model_dump(mode="json"),
                                       n_trials=job.search.n_trials, parallel=job.search.workers,
                                       submitted_by=f"pipeline:{p.name}")
            run.job_id, run.warm_start, run.status = row.id, warm, "running"
            webhooks.emit(s, p, "run.started", _run_data(run), run.id, now)
            s.commit()
            job_id, parallel = row.id, row.parallel
        try:
            queue.enqueue_runs(self.settings, job_id, parallel)
        except DependencyUnavailableError as exc:  # the row is the truth: maintenance
            log.warning("pipeline run %s: job %s not enqueued yet (%s); the maintenance "
                        "loop enqueues it", run_id, job_id, exc)
        queue.publish(self.settings, job_id, "status", {"status": JobStatus.QUEUED.value})
        log.info("pipeline run %s: job %s on %s", run_id, job_id, found.path)

    def _warm_start(self, s, p: Pipeline, spec: PipelineSpec, run: PipelineRun) -> dict | None:
        """The previous run's best ratios and best uniform α, when its job found them."""
        prev = s.scalar(select(PipelineRun).where(
            PipelineRun.pipeline_id == p.id, PipelineRun.id != run.id,
            PipelineRun.status == "succeeded", PipelineRun.reward.is_not(None))
            .order_by(PipelineRun.created_at.desc()).limit(1))
        job = s.get(Job, prev.job_id) if prev is not None else None
        best = ((job.result or {}).get("best") or {}) if job is not None else {}
        if not best.get("ratios"):
            return None
        if job.spec.get("groups") != spec.job.groups.model_dump(mode="json") or (
                _num_layers(run.checkpoint) != (job.layout or {}).get("num_layers")):
            log.info("pipeline run %s: no warm start (the grouping or the layer count changed "
                     "since run %s)", run.id, prev.id)
            return None
        uniform = (job.result.get("best_uniform") or {}).get("ratio")
        return {"from_run": prev.id, "ratios": best["ratios"], "uniform": uniform}

    def follow(self, run_id: str, now: datetime, status: str = "running") -> None:
        """A running run whose job ended, or a run whose champion re-measure ended: decide."""
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            job = s.get(Job, run.job_id if status == "running" else run.champion_job_id)
            if job is None or JobStatus(job.status) not in TERMINAL:
                return
            if not pipe_db.move_run(s, run_id, status, "deciding"):
                return
        with self._failing(run_id, now):
            try:
                self.decide(run_id, now)
            except DependencyUnavailableError as exc:  # Redis: decide again on the next pass
                log.warning("pipeline run %s: %s; decided again on the next pass", run_id, exc)
                with session_scope(self.url) as s:
                    pipe_db.move_run(s, run_id, "deciding", status)

    def decide(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = s.get(Pipeline, run.pipeline_id)
            job = s.get(Job, run.job_id)
            spec = PipelineSpec.model_validate(p.spec)
            if JobStatus(job.status) is not JobStatus.SUCCEEDED:
                run.status, run.finished_at = "failed", now
                run.reason = f"job {job.id} {job.status}" + (f": {job.error}" if job.error else "")
                webhooks.emit(s, p, "run.failed", _run_data(run), run.id, now)
                return
            if job.export_status in ("queued", "running"):  # someone's export: wait for it
                run.status = "running"
                return
            result = job.result or {}
            best = result.get("best")
            budget = job.spec["tax"]["budget"]
            if best is not None:
                holdout = best.get("holdout") or {}
                run.reward, run.tax, run.gain = best["reward"], best["tax"], result.get("gain")
                run.holdout_reward, run.holdout_tax = holdout.get("reward"), holdout.get("tax")
            champion = s.get(PipelineRun, p.champion_run_id) if p.champion_run_id else None
            run.champion_run_id = champion.id if champion is not None else None
            reason = None
            if best is None:
                reason = f"no feasible merge within the tax budget {budget}"
            elif run.holdout_tax is not None and run.holdout_tax > budget:
                reason = (f"its holdout tax {run.holdout_tax:.4g} is over the budget {budget} "
                          f"(search tax {run.tax:.4g})")
            elif champion is not None:
                same = _same_data(s.get(Job, champion.job_id), job)
                if same:
                    run.champion_reward = champion.reward
                elif run.champion_job_id is None:  # measure the champion on this run's data
                    run.champion_job_id = self._remeasure(s, p, run, champion, job)
                    run.status = "remeasuring"
                    return
                else:
                    remeasured = s.get(Job, run.champion_job_id)
                    point = s.scalar(select(Trial).where(
                        Trial.job_id == remeasured.id, Trial.kind == "uniform",
                        Trial.uniform_ratio == 1.0))
                    if remeasured.status != JobStatus.SUCCEEDED or point is None:
                        reason = (f"re-measuring the champion (run {champion.id}) on this "
                                  f"run's data failed: job {remeasured.id} {remeasured.status}"
                                  + (f": {remeasured.error}" if remeasured.error else ""))
                    elif point.feasible:
                        run.champion_reward = point.reward
                    else:  # the champion is over the budget on this data: any feasible wins
                        run.champion_reward = None
                if (reason is None and run.champion_reward is not None
                        and not run.reward > run.champion_reward + spec.promote.margin):
                    reason = (f"reward {run.reward:.6g} does not beat the champion's "
                              f"{run.champion_reward:.6g} (run {champion.id}"
                              f"{'' if same else ', re-measured on this data'}) by more than "
                              f"the margin {spec.promote.margin}")
            if reason is not None:
                run.status, run.decision, run.reason, run.finished_at = (
                    "succeeded", "kept", reason, now)
                webhooks.emit(s, p, "run.finished", _run_data(run), run.id, now)
                return
            out = resolve_path("promote.dir", str(Path(spec.promote.dir) / run.id),
                               self.settings.model_roots, must_exist=False, kind="model")
            check_output("promote.dir", out, JobSpec.model_validate(job.spec))
            job.export_status, job.export_dir, job.export_error = "queued", out, None
            run.status, run.promoted_dir = "promoting", out
            run.reason = ("no champion yet" if champion is None else
                          f"the champion (run {champion.id}) is over the tax budget on this "
                          "run's data" if run.champion_reward is None else
                          f"reward {run.reward:.6g} beats the champion's "
                          f"{run.champion_reward:.6g} (run {champion.id}) by more than "
                          f"{spec.promote.margin}")
            # before the commit: when Redis fails, nothing of this decision is kept
            queue.enqueue_export(self.settings, job.id, out)

    def _remeasure(self, s, p: Pipeline, run: PipelineRun, champion: PipelineRun,
                   job: Job) -> str:
        """Queue a small job that measures the champion's merge on this run's data: the
        champion's checkpoint as the aligned model at α = 1 (its uniform point; a job needs
        one sampled trial more). Its best uniform reward is the champion's reward here."""
        spec = dict(job.spec)
        spec.update(name=f"{p.name}-champion-{champion.id[:8]}-on-{run.id[:8]}",
                    aligned_model=champion.promoted_dir, export=None,
                    search={**spec["search"], "uniform_grid": [1.0], "n_trials": 2,
                            "warm_start": None, "workers": 1})
        checked = JobSpec.model_validate(spec)
        checked.check()
        resolved = resolve_job_paths(checked, self.settings)
        row, _ = job_db.create_job(s, resolved.model_dump(mode="json"), n_trials=2,
                                   submitted_by=f"pipeline:{p.name}")
        s.commit()
        queue.enqueue_runs(self.settings, row.id, 1)
        log.info("pipeline run %s: the champion %s is re-measured on its data by job %s",
                 run.id, champion.id, row.id)
        return row.id

    def finish_promotion(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            job = s.get(Job, run.job_id)
            if job.export_status in ("queued", "running"):
                return
            if not pipe_db.move_run(s, run_id, "promoting", "switching"):
                return
        with self._failing(run_id, now, "promotion failed: ", expected=(HmaoptError, OSError)):
            self._switch(run_id, now)

    def _switch(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = s.get(Pipeline, run.pipeline_id, with_for_update=True)
            job = s.get(Job, run.job_id)
            exported = (job.export_status == "succeeded" and job.export_dir == run.promoted_dir
                        and (Path(run.promoted_dir) / "hma_manifest.json").is_file())
            if not exported:
                run.status, run.finished_at = "failed", now
                run.reason = ("the export of the best merge failed: "
                              f"{job.export_error or 'its folder or manifest is missing'}")
                webhooks.emit(s, p, "run.failed", _run_data(run), run.id, now)
                return
            if p.champion_run_id != run.champion_run_id:  # another run was promoted meanwhile
                now_champ = s.get(PipelineRun, p.champion_run_id)
                margin = PipelineSpec.model_validate(p.spec).promote.margin
                same = _same_data(s.get(Job, now_champ.job_id), job)
                if not same or not run.reward > now_champ.reward + margin:
                    run.status, run.decision, run.finished_at = "succeeded", "kept", now
                    run.reason = (f"run {now_champ.id} was promoted while this one was "
                                  "exported, and this one does not beat it by more than the "
                                  f"margin on the same data (reward {run.reward:.6g} vs "
                                  f"{now_champ.reward:.6g})")
                    webhooks.emit(s, p, "run.finished", _run_data(run), run.id, now)
                    return
                run.champion_run_id, run.champion_reward = now_champ.id, now_champ.reward
            switch_alias(Path(run.promoted_dir))
            s.add(Promotion(pipeline_id=p.id, run_id=run.id, action="promote",
                            dir=run.promoted_dir, previous_run_id=p.champion_run_id,
                            created_at=now))
            p.champion_run_id = run.id
            run.status, run.decision, run.finished_at = "succeeded", "promoted", now
            webhooks.emit(s, p, "run.finished", _run_data(run), run.id, now)
            webhooks.emit(s, p, "run.promoted", _run_data(run), run.id, now)
        log.info("pipeline run %s promoted: %s", run_id, run.promoted_dir)

    @contextmanager
    def _failing(self, run_id: str, now: datetime, prefix: str = "",
                 expected: tuple[type[BaseException], ...] = (HmaoptError,)):
        """A step that fails the run on any error: an expected one with its message,
        anything else as an internal error (re-raised, so that the log has it)."""
        try:
            yield
        except expected as exc:
            self._fail(run_id, f"{prefix}{exc}", now)
        except BaseException as exc:
            self._fail(run_id, f"{prefix}internal error ({type(exc).__name__}; see the "
                       "scheduler's log)", now)
            raise

    def _skip(self, s, p: Pipeline, run: PipelineRun, reason: str, now: datetime) -> None:
        run.status, run.reason, run.finished_at = "skipped", reason, now
        webhooks.emit(s, p, "run.skipped", _run_data(run), run.id, now)
        log.info("pipeline %s run %s skipped: %s", p.name, run.id, reason)

    def _fail(self, run_id: str, reason: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = s.get(Pipeline, run.pipeline_id)
            run.status, run.reason, run.finished_at = "failed", reason, now
            webhooks.emit(s, p, "run.failed", _run_data(run), run.id, now)
        log.warning("pipeline run %s failed: %s", run_id, reason)


def rollback_target(s, p: Pipeline) -> PipelineRun:
    """The champion before the current one (ConflictError when there is none)."""
    if p.champion_run_id is None:
        raise ConflictError(f"pipeline {p.name} has no champion to roll back")
    made = s.scalar(select(Promotion).where(
        Promotion.pipeline_id == p.id, Promotion.run_id == p.champion_run_id,
        Promotion.action == "promote").order_by(Promotion.id.desc()).limit(1))
    if made is None or made.previous_run_id is None:
        raise ConflictError(f"pipeline {p.name}: run {p.champion_run_id} is the first "
                            "champion; there is none before it")
    previous = s.get(PipelineRun, made.previous_run_id)
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
        s.add(Promotion(pipeline_id=p.id, run_id=previous.id, action="rollback",
                        dir=previous.promoted_dir, previous_run_id=p.champion_run_id,
                        created_at=now))
        old, p.champion_run_id = p.champion_run_id, previous.id
        return {"pipeline": p.name, "champion_run": previous.id, "dir": previous.promoted_dir,
                "replaced_run": old}


def switch_alias(target: Path) -> Path:
    """Point ``<promote dir>/current`` at ``target`` (a sibling) in one atomic rename."""
    alias = target.parent / ALIAS
    tmp = target.parent / f".{ALIAS}.{os.getpid()}.{threading.get_ident()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)  # relative: the folder can move as a whole
    os.replace(tmp, alias)
    return alias


def _same_data(a: Job, b: Job) -> bool:
    """Whether two jobs' rewards are comparable: the same reward and tax sections."""
    return all(a.spec.get(k) == b.spec.get(k) for k in SAME_DATA_KEYS)


def _num_layers(checkpoint: str | None) -> int | None:
    """The decoder layer count of a checkpoint's config.json (None when unreadable)."""
    import json

    from workers.architectures import LAYER_COUNT_KEYS

    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    for source in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(source.get(key), int):
                return source[key]
    return None


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _run_data(run: PipelineRun) -> dict:
    return {"run_id": run.id, "scheduled_for": run.scheduled_for.isoformat(),
            "trigger": run.trigger, "status": run.status, "job_id": run.job_id,
            "checkpoint": run.checkpoint, "decision": run.decision, "reason": run.reason,
            "reward": run.reward, "tax": run.tax, "holdout_reward": run.holdout_reward,
            "holdout_tax": run.holdout_tax, "gain": run.gain,
            "champion_reward": run.champion_reward, "promoted_dir": run.promoted_dir}


def check_pipeline(spec: PipelineSpec, settings: Settings) -> None:
    """What can be checked before the first run: the sources and the promote folder inside
    the model roots, the template's other paths inside their roots."""
    for field, source in (("aligned", spec.aligned), ("base", spec.base)):
        if source is None:
            continue
        raw = source.dir or source.path
        sub = "dir" if source.dir else "path"
        resolved = resolve_path(f"{field}.{sub}", raw, settings.model_roots, kind="model")
        if source.dir and not Path(resolved).is_dir():
            from service.errors import SpecError

            raise SpecError(f"{raw} is not a folder", field=f"{field}.dir")
    promote = Path(resolve_path("promote.dir", spec.promote.dir, settings.model_roots,
                                must_exist=False, kind="model"))
    for field, source in (("aligned", spec.aligned), ("base", spec.base)):
        if source is not None and source.dir is not None:
            folder = Path(resolve_path(f"{field}.dir", source.dir, settings.model_roots,
                                       kind="model"))
            if promote == folder or promote.is_relative_to(folder):
                from service.errors import PathNotAllowedError

                raise PathNotAllowedError(f"promote.dir: {spec.promote.dir} lies in the "
                                          f"{field} source folder: a promoted merge would be "
                                          "taken as the next checkpoint")
    job = spec.job.model_copy(update={"aligned_model": _any_checkpoint(spec, settings)})
    if spec.base is not None:
        job = job.model_copy(update={"base_model": job.aligned_model})
    job.check()
    resolve_job_paths(job, settings)


def _any_checkpoint(spec: PipelineSpec, settings: Settings) -> str:
    """A path that exists for the template's aligned_model check (the source itself)."""
    raw = spec.aligned.dir or spec.aligned.path
    return resolve_path("aligned", raw, settings.model_roots, kind="model")


def start_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=Scheduler(settings).run_forever, args=(stop,),
                              name="hmaopt-scheduler", daemon=True)
    thread.start()
    return thread


