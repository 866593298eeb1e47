"""A job run on a worker: the RQ entry points ``run_job`` and ``export_job``.

A run (:class:`JobRun`) loads the job's models once, opens the job's shared study and
drives it with the one trial driver (:meth:`workers.search.Search.run`), supplying the
worker's hooks: the cancel flag and the worker's stop (between trials and at every
evaluation batch), the Redis locks of the job ("ask": the trial cap across workers is
checked and a trial asked under it; "setup": enqueueing), the live workers (a RUNNING trial
of a dead one is failed and runs again), and recording each trial in ``hmaopt_trials`` with
its event. The worker that finishes last writes the result (one finaliser) and exports.

Outages of Redis never fail the job: a lock that cannot be reached is waited for (backoff,
checking for a stop or a cancel in the database), events are dropped (the database keeps the
record), and a Redis error that escapes anyway puts the job back in the queue as a SIGTERM
does (:meth:`JobRun.requeue`; the reconcile enqueues it when Redis cannot hear of it now).
SIGTERM stops the trial in hand at its next evaluation batch (as a cancel does); the trial
is told FAIL and runs again, the finished ones are kept.

The process around it is workers/process.py; dead workers' runs are recovered by
workers/recovery.py. ``recover_dead_workers`` and ``current_worker`` are re-exported here.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from redis.exceptions import LockError

from service import queue
from service.db import jobs as job_db
from service.db import session_scope
from service.db import workers as worker_db
from service.errors import ConflictError, HmaoptError
from service.paths import check_model_paths
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.status import ExportStatus, JobStatus
from workers.process import WorkerProcess, current_worker
from workers.recovery import recover_dead_workers
from workers.results import TrialRecord, jsonable
from workers.search import (Search, TrialHooks, load_job, measure_base, storage_at,
                            study_name)

__all__ = ["JobCancelled", "JobRun", "WorkerLost", "WorkerProcess", "WorkerStopping",
           "current_worker", "export_job", "recover_dead_workers", "run_job"]

log = logging.getLogger(__name__)

#: seconds the lock around "count trials, ask one" is held at most
ASK_LOCK_SECONDS = 30
#: seconds the lock around a study's set-up (and its re-enqueued grid points) is held at most
SETUP_LOCK_SECONDS = 120
#: seconds the gradient stage (one worker runs it; the others wait, then read its result)
GRADIENT_LOCK_SECONDS = 3600
#: (held at most, waited for at most) per lock of a job
LOCK_SECONDS = {"ask": (ASK_LOCK_SECONDS, 2 * ASK_LOCK_SECONDS),
                "setup": (SETUP_LOCK_SECONDS, 300),
                "gradient": (GRADIENT_LOCK_SECONDS, GRADIENT_LOCK_SECONDS),
                "optuna-schema": (60, 120)}


class JobCancelled(BaseException):
    """Raised at a batch boundary or between trials when the job was cancelled.

    A BaseException, so that no evaluator's ``except Exception`` swallows it; the trial in
    hand is told FAIL by Search.run_trial.
    """


class WorkerStopping(BaseException):
    """The worker was asked to stop (SIGTERM): the job goes back to the queue."""


class WorkerLost(BaseException):
    """This worker was declared dead (silent too long) while running: maintenance has failed
    its trials and re-enqueued the job, so the run is abandoned as it stands."""


def run_job(job_id: str) -> str:
    """The RQ entry point: run (or resume, or join) the search of one job."""
    return JobRun(job_id).run()


class JobRun:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.settings = get_settings()
        self.url = self.settings.database()
        self.worker = current_worker()
        self.conn = queue.redis_client(queue.redis_url(self.settings))

    # hooks -----------------------------------------------------------------------------
    def publish(self, kind: str, data: dict) -> None:
        queue.publish(self.settings, self.job_id, kind, data)

    def set_status(self, status: JobStatus, *, expect, error: str | None = None) -> bool:
        with session_scope(self.url) as session:
            moved = job_db.set_status(session, self.job_id, status, expect=expect, error=error)
        if moved:
            log.info("worker %s: job %s %s", self.worker.name, self.job_id, status.value)
            self.publish("status", {"status": status.value, "error": error})
        return moved

    @contextmanager
    def lock(self, name: str, *, job: str | None = None):
        """The job's Redis lock ``name`` ("ask", "setup", "gradient"; of every job with
        ``job="all"``). Waiting longer than its patience is logged and waiting goes on
        (checking for a stop or a cancel): a slow peer must not fail the job; nor does Redis
        being away: it is tried again with backoff (HMAOPT_REDIS_RETRY_SECONDS). A lock that
        expired while held (work longer than its timeout), or that Redis lost, is logged at
        release, not raised: the database, not the lock, keeps the trials."""
        held, wait = LOCK_SECONDS[name]
        lock = self.conn.lock(queue.Keys.lock(job or self.job_id, name), timeout=held)
        waits, down_since = queue.retry_waits(self.settings), None
        while True:
            try:
                if lock.acquire(blocking_timeout=wait):
                    break
                log.warning("worker %s: job %s waited %d s for its %s lock; waiting on",
                            self.worker.name, self.job_id, wait, name)
            except Exception as exc:
                if not queue.transport_down(exc):
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("worker %s: job %s: Redis unreachable for its %s lock (%s); "
                                "trying again until it answers", self.worker.name,
                                self.job_id, name, exc)
                time.sleep(next(waits))
            self.should_stop()
        if down_since is not None:
            log.warning("worker %s: job %s: Redis back after %.1f s; going on",
                        self.worker.name, self.job_id, time.monotonic() - down_since)
        try:
            yield lock
        finally:
            try:
                lock.release()
            except LockError as exc:
                log.warning("worker %s: job %s %s lock expired while held (%s)",
                            self.worker.name, self.job_id, name, exc)
            except Exception as exc:
                if not queue.transport_down(exc):
                    raise
                log.warning("worker %s: job %s %s lock not released (Redis unreachable: %s); "
                            "it expires in %d s", self.worker.name, self.job_id, name, exc, held)

    def should_stop(self) -> bool:
        """Between trials: raise when the worker stops or the job was cancelled, or was
        finished by another worker (e.g. failed)."""
        if self.worker.stopping:
            raise WorkerStopping()
        if queue.cancel_flagged(self.settings, self.job_id):
            raise JobCancelled()
        with session_scope(self.url) as session:
            job = job_db.get_job(session, self.job_id)
            if job.cancel_requested or JobStatus(job.status).terminal:
                raise JobCancelled()
        return False

    def check_batch(self, *_args) -> None:
        """on_batch hook: stop at a batch boundary when the job was cancelled or the worker
        is stopping (SIGTERM)."""
        if self.worker.lost:
            raise WorkerLost()
        if self.worker.stopping:
            raise WorkerStopping()
        if queue.cancel_flagged(self.settings, self.job_id):
            raise JobCancelled()

    def on_error(self, _exc: BaseException) -> None:
        self.worker.heartbeat()  # learn now whether we were declared dead
        if self.worker.lost:  # the trial was failed by maintenance under our feet
            raise WorkerLost() from None

    def alive_workers(self) -> set[str]:
        with session_scope(self.url) as session:
            return worker_db.alive_ids(session)

    def record(self, search: Search, rec: TrialRecord) -> None:
        """on_trial hook: the hmaopt_trials row, the job's progress, the "trial" event."""
        if self.worker.lost:
            raise WorkerLost()
        row = rec.row(search.slots) | {"worker_id": self.worker.id}
        with session_scope(self.url) as session:
            job_db.add_trial(session, self.job_id, **row)
            progress = job_db.progress(job_db.refresh_progress(session, self.job_id))
        log.info("worker %s: job %s trial %d %s reward %s tax %.4f ratio %s", self.worker.name,
                 self.job_id, rec.number, rec.kind, rec.reward, rec.tax, rec.ratios)
        self.publish("trial", jsonable({**row, "finished_at": None, **progress}))

    # the run ---------------------------------------------------------------------------
    def run(self) -> str:
        with session_scope(self.url) as session:
            job = job_db.get_job(session, self.job_id)
            status, cancel, spec = JobStatus(job.status), job.cancel_requested, job.spec
        if status.terminal:
            return f"job already {status.value}"
        if cancel:
            self.set_status(JobStatus.CANCELLED, expect={JobStatus.QUEUED, JobStatus.RUNNING})
            return "cancelled"
        if not self.set_status(JobStatus.RUNNING, expect={JobStatus.QUEUED, JobStatus.RUNNING}):
            return "job changed state"
        self.worker.job_id, self.worker.lost = self.job_id, False
        self.worker.heartbeat()
        try:
            return self._search(JobSpec.model_validate(spec))
        except WorkerLost:
            log.warning("worker %s: job %s abandoned (declared dead meanwhile)",
                        self.worker.name, self.job_id)
            return "abandoned: this worker was declared dead"
        except JobCancelled:
            self.set_status(JobStatus.CANCELLED, expect={JobStatus.QUEUED, JobStatus.RUNNING})
            return "cancelled"
        except WorkerStopping:
            self.requeue("worker stopping")
            return "worker stopping: job re-enqueued"
        except Exception as exc:
            if queue.transport_down(exc):  # never the job's failure
                log.warning("worker %s: job %s: Redis unreachable (%s); the job goes back to "
                            "the queue", self.worker.name, self.job_id, exc)
                self.requeue("Redis outage")
                return "Redis outage: job re-enqueued"
            return self._failed(exc)
        finally:
            self.worker.job_id = None
            try:
                with session_scope(self.url) as session:  # a result not written is free
                    job_db.release_finalizer(session, self.job_id, self.worker.id)
                self.worker.heartbeat()
            except Exception as exc:
                log.warning("worker %s: cleanup after job %s: %s", self.worker.name,
                            self.job_id, exc)

    def _failed(self, exc: Exception) -> str:
        if isinstance(exc, HmaoptError):
            log.error("worker %s: job %s failed: %s", self.worker.name, self.job_id, exc)
            self.set_status(JobStatus.FAILED, expect={JobStatus.QUEUED, JobStatus.RUNNING},
                            error=str(exc))
            return "failed"
        log.error("worker %s: job %s failed", self.worker.name, self.job_id, exc_info=exc)
        self.set_status(JobStatus.FAILED, expect={JobStatus.QUEUED, JobStatus.RUNNING},
                        error=f"internal error: {type(exc).__name__}: {exc} "
                              f"(at {traceback.extract_tb(exc.__traceback__)[-1].name})")
        return "failed"

    def requeue(self, why: str) -> None:
        """Put the job back in the queue (this worker stops, or Redis failed under it): back
        to queued unless another live worker is on it, and a new run enqueued; when Redis
        cannot take it now, the reconcile (API and workers) enqueues it once Redis is back."""
        with session_scope(self.url) as session:
            others = [w for w in worker_db.alive(session, job_id=self.job_id)
                      if w.id != self.worker.id]
        if not others:
            self.set_status(JobStatus.QUEUED, expect={JobStatus.RUNNING})
        try:
            queue.enqueue_runs(self.settings, self.job_id, 1)
        except Exception as exc:
            if not queue.transport_down(exc):
                raise
            log.warning("worker %s: job %s (%s) not enqueued now (%s): the reconcile "
                        "enqueues it when Redis is back", self.worker.name, self.job_id, why,
                        exc)

    def _open(self, spec: JobSpec, merger, evaluator) -> Search:
        """The job's shared study, set up once across workers; the read model backfilled."""
        # opening the storage may create Optuna's tables: one process at a time
        with self.lock("optuna-schema", job="all"):
            storage = storage_at(self.url)
        with self.lock("setup"):
            search = Search(spec, merger, evaluator, storage=storage,
                            name=study_name(self.job_id), resume=True, live_running=True)
            with session_scope(self.url) as session:  # trials told but not recorded (a
                for rec in search.records():          # worker died in between)
                    job_db.add_trial(session, self.job_id, **rec.row(search.slots))
                job_db.refresh_progress(session, self.job_id)
        layout = merger.grouping.describe()
        with session_scope(self.url) as session:
            fresh = job_db.set_layout(session, self.job_id, layout)
        if fresh:
            self.publish("layout", layout)
        return search

    def _search(self, spec: JobSpec) -> str:
        t0 = time.perf_counter()
        merger, evaluator = load_job(spec, device=self.worker.device, confine=True)
        search = self._open(spec, merger, evaluator)
        t1 = time.perf_counter()
        cached = measure_base(merger, evaluator, cache_dir=self.settings.cache_dir,
                              on_batch=self.check_batch)
        base_seconds = time.perf_counter() - t1
        log.info("worker %s: job %s θ_base %s (%.1f s)", self.worker.name, self.job_id,
                 "from cache" if cached else "measured", base_seconds)
        search.run(TrialHooks(
            should_stop=self.should_stop, lock=self.lock, on_batch=self.check_batch,
            on_trial=lambda rec: self.record(search, rec), on_error=self.on_error,
            worker=self.worker.id, alive_workers=self.alive_workers,
            stale_seconds=self.settings.worker_stale_seconds))
        with session_scope(self.url) as session:
            mine = job_db.claim_finalizer(session, self.job_id, self.worker.id)
        if not mine:
            return "trials done; another worker writes the result"
        result = search.result(base_cached=cached, base_seconds=base_seconds,
                               total_seconds=time.perf_counter() - t0,
                               on_batch=self.check_batch,
                               on_trial=lambda rec: self.record(search, rec),
                               worker=self.worker.id)
        if self.worker.lost:
            raise WorkerLost()
        with session_scope(self.url) as session:
            status = job_db.write_result(session, self.job_id,
                                         jsonable(result.to_dict(per_record=True)))
        if status is not JobStatus.RUNNING:  # cancelled or failed meanwhile
            return f"job {status.value} meanwhile; result not written"
        if not self.set_status(JobStatus.SUCCEEDED, expect={JobStatus.RUNNING}):
            return "job changed state; not exported"
        if spec.export is not None and result.best is not None:
            export_job(self.job_id, spec.export.dir)
        return "succeeded" if result.feasible else "succeeded: no feasible merge"


# ------------------------------------------------------------------------------ export

def export_job(job_id: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the best merge of a finished job as a checkpoint with its manifest."""
    settings = get_settings()
    worker = current_worker()
    held = worker.job_id  # the job's own run when it exports at its end
    worker.job_id = job_id
    worker.heartbeat()  # the worker row names the job: if it dies, recovery fails the export
    try:
        return _export(settings, job_id, out_dir, overwrite)
    finally:
        worker.job_id = held
        if held is None:
            try:
                worker.heartbeat()
            except Exception as exc:
                log.warning("worker %s: heartbeat after the export of job %s: %s",
                            worker.name, job_id, exc)


def _export(settings: Settings, job_id: str, out_dir: str, overwrite: bool) -> str:
    from workers import export  # looked up at call time (tests stand in for the writer)

    url = settings.database()
    with session_scope(url) as session:
        spec, ratios = job_db.start_export(session, job_id, out_dir)
        provenance = export.job_provenance(job_db.get_job(session, job_id))
    spec = JobSpec.model_validate(spec)
    queue.publish(settings, job_id, "export", {"status": ExportStatus.RUNNING.value,
                                               "dir": out_dir})
    try:
        if not ratios:
            raise ConflictError("the job has no feasible trial to export")
        check_model_paths(spec, settings)  # as at submission: a link swapped in since
        if overwrite and Path(out_dir).exists() and \
                not (Path(out_dir) / "hma_manifest.json").exists():
            raise ConflictError(f"{out_dir} exists and is not an hmaopt export (no "
                                "hma_manifest.json): refusing to overwrite it")
        result = export.export_merge(spec.base_model, spec.aligned_model, out_dir, spec.groups,
                                     list(ratios.values()),
                                     max_shard_bytes=settings.max_shard_bytes,
                                     allow_pickle=settings.allow_pickle, overwrite=overwrite,
                                     job=provenance)
    except Exception as exc:  # recorded for the caller; the worker goes on
        log.error("job %s: export to %s failed: %s", job_id, out_dir, exc)
        with session_scope(url) as session:
            ended = job_db.finish_export(session, job_id, out_dir, ExportStatus.FAILED,
                                         export_error=str(exc))
        if ended:
            queue.publish(settings, job_id, "export", {"status": ExportStatus.FAILED.value,
                                                       "error": str(exc)})
        return "failed"
    with session_scope(url) as session:
        ended = job_db.finish_export(session, job_id, out_dir, ExportStatus.SUCCEEDED,
                                     export_manifest=result.manifest)
    if not ended:
        return "export no longer this worker's (declared dead meanwhile); not recorded"
    queue.publish(settings, job_id, "export", {"status": ExportStatus.SUCCEEDED.value,
                                               "dir": str(result.out)})
    return str(result.out)
