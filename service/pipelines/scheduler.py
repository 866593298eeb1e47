"""The pipeline scheduler: `hmaopt scheduler`, and a thread of the embedded `hmaopt serve`.
Its one job is to move pipelines' runs along, one step per pass; what a step decides about
promotion (and rollbacks) is service.pipelines.promotion's.

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
   - running -> the job ended -> deciding (service.pipelines.promotion): promoted only if the best merge is feasible (tax
     within budget, the holdout tax not over it beyond its noise) and its reward beats the champion's by more than the
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
import threading
from contextlib import contextmanager
from datetime import datetime

from service import queue
from service.admission import admit_job
from service.db import jobs as job_db
from service.db import pipelines as pipe_db
from service.db import session_scope
from service.db.models import Pipeline, PipelineRun, utcnow
from service.errors import ConflictError, DependencyUnavailableError, HmaoptError
from service.modelconfig import num_layers
from service.pipelines import promotion, webhooks
from service.pipelines.promotion import (
    ALIAS,
    SAME_DATA_KEYS,
    request_rollback,
    rollback,
    rollback_target,
    switch_alias,
)
from service.pipelines.sources import check_pipeline, newest_complete
from service.pipelines.spec import PipelineSpec, apply_warm_start
from service.settings import Settings
from service.spec import JobSpec
from service.status import RUN_TRANSIENT, TERMINAL, JobStatus
from service.status import PipelineRunStatus as Status

log = logging.getLogger(__name__)

#: re-exported from service.pipelines.promotion (and sources) for the callers of this module
__all__ = ["ALIAS", "SAME_DATA_KEYS", "STALE_SECONDS", "TRANSIENT", "Scheduler",
           "check_pipeline", "request_rollback", "rollback", "rollback_target",
           "start_thread", "switch_alias"]

#: statuses a scheduler holds only while it works on the run; held longer than
#: STALE_SECONDS, its scheduler stopped mid-step and the run is failed
TRANSIENT = tuple(sorted(RUN_TRANSIENT))
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
        for run_id, status in self._runs((Status.PENDING, Status.RUNNING, Status.REMEASURING,
                                          Status.PROMOTING)):
            try:
                if status == Status.PENDING:
                    self.start(run_id, now)
                elif status in (Status.RUNNING, Status.REMEASURING):
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
                if pipe_db.move_run(s, run_id, old, Status.FAILED):
                    self._fail(run_id, f"the scheduler stopped while the run was {old}; "
                               "trigger the pipeline again", now)
        return [run_id for run_id, _ in stale]

    def rollbacks(self, now: datetime) -> None:
        """Carry out the rollbacks the API recorded (the scheduler may write the folders)."""
        with session_scope(self.url) as s:
            ids = pipe_db.rollbacks_requested(s)
        for pid in ids:
            try:
                promotion.rollback(self.settings, pid, now)
            except HmaoptError as exc:
                log.warning("pipeline %s: rollback refused: %s", pid, exc)
                with session_scope(self.url) as s:
                    pipe_db.clear_rollback(s, pid)

    def run_forever(self, stop: threading.Event) -> None:
        log.info("scheduler: a pass every %.0f s", self.settings.scheduler_seconds)
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:
                log.warning("scheduler pass failed (next in %.0f s): %s",
                            self.settings.scheduler_seconds, exc)
            stop.wait(self.settings.scheduler_seconds)

    def _runs(self, statuses: tuple[Status, ...]) -> list[tuple[str, Status]]:
        with session_scope(self.url) as s:
            return pipe_db.runs_in(s, statuses)

    # ------------------------------------------------------------------ 1. due runs
    def claim_due(self, now: datetime) -> list[str]:
        with session_scope(self.url) as s:
            due = pipe_db.due_pipelines(s, now)
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
                    status=Status.SKIPPED if skip else Status.PENDING,
                    reason=(f"missed: no scheduler was running at {latest.isoformat()}"
                            if skip else None))
                if run is not None:
                    claimed.append(run.id)
                    log.info("pipeline %s: run %s for %s (%s)", pid, run.id, latest,
                             run.status)
                    if skip:
                        webhooks.emit_run(s, pipe_db.pipeline_by_id(s, pid), "run.skipped",
                                          run, now)
                pipe_db.advance_due(s, pid, next_due, now)
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
            if not pipe_db.move_run(s, run_id, Status.PENDING, Status.STARTING):
                return
        with self._failing(run_id, now):
            self._start(run_id, now)

    def _start(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = pipe_db.pipeline_by_id(s, run.pipeline_id)
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
            resolved = admit_job(job, self.settings)
            row, _ = job_db.create_job(s, resolved.model_dump(mode="json"),
                                       n_trials=job.search.n_trials, parallel=job.search.workers,
                                       submitted_by=f"pipeline:{p.name}")
            run.job_id, run.warm_start, run.status = row.id, warm, Status.RUNNING
            webhooks.emit_run(s, p, "run.started", run, now)
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
        prev = pipe_db.last_rewarded(s, p.id, exclude=run.id)
        job = job_db.find_job(s, prev.job_id) if prev is not None else None
        best = ((job.result or {}).get("best") or {}) if job is not None else {}
        if not best.get("ratios"):
            return None
        if job.spec.get("groups") != spec.job.groups.model_dump(mode="json") or (
                num_layers(run.checkpoint) != (job.layout or {}).get("num_layers")):
            log.info("pipeline run %s: no warm start (the grouping or the layer count changed "
                     "since run %s)", run.id, prev.id)
            return None
        uniform = (job.result.get("best_uniform") or {}).get("ratio")
        return {"from_run": prev.id, "ratios": best["ratios"], "uniform": uniform}

    def follow(self, run_id: str, now: datetime, status: Status = Status.RUNNING) -> None:
        """A running run whose job ended, or a run whose champion re-measure ended: decide."""
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            job = job_db.find_job(s, run.job_id if status == Status.RUNNING
                                  else run.champion_job_id)
            if job is None or JobStatus(job.status) not in TERMINAL:
                return
            if not pipe_db.move_run(s, run_id, status, Status.DECIDING):
                return
        with self._failing(run_id, now):
            try:
                self.decide(run_id, now)
            except DependencyUnavailableError as exc:  # Redis: decide again on the next pass
                log.warning("pipeline run %s: %s; decided again on the next pass", run_id, exc)
                with session_scope(self.url) as s:
                    pipe_db.move_run(s, run_id, Status.DECIDING, status)

    def decide(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            promotion.decide(self.settings, s, run_id, now)

    def finish_promotion(self, run_id: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            if not promotion.export_ended(s, run_id):
                return
            if not pipe_db.move_run(s, run_id, Status.PROMOTING, Status.SWITCHING):
                return
        with (self._failing(run_id, now, "promotion failed: ",
                            expected=(HmaoptError, OSError)),
              session_scope(self.url) as s):
            promotion.switch(s, run_id, now)

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
        run.status, run.reason, run.finished_at = Status.SKIPPED, reason, now
        webhooks.emit_run(s, p, "run.skipped", run, now)
        log.info("pipeline %s run %s skipped: %s", p.name, run.id, reason)

    def _fail(self, run_id: str, reason: str, now: datetime) -> None:
        with session_scope(self.url) as s:
            run = pipe_db.get_run(s, run_id)
            p = pipe_db.pipeline_by_id(s, run.pipeline_id)
            run.status, run.reason, run.finished_at = Status.FAILED, reason, now
            webhooks.emit_run(s, p, "run.failed", run, now)
        log.warning("pipeline run %s failed: %s", run_id, reason)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def start_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=Scheduler(settings).run_forever, args=(stop,),
                              name="hmaopt-scheduler", daemon=True)
    thread.start()
    return thread
