"""The worker: takes job runs from the RQ queue and runs their search, trial by trial.

``hmaopt worker --device cuda:N`` is one process per GPU. It runs RQ's ``SimpleWorker``: jobs
execute in the worker process itself, never in a forked child, so CUDA is never initialised
before a fork (there is none); the models of a job are loaded once per run.

Liveness. Every worker has a row in ``hmaopt_workers`` and refreshes ``heartbeat_at`` every
``HMAOPT_HEARTBEAT_SECONDS`` from a thread. Every worker also runs a maintenance thread that,
every ``HMAOPT_MAINTENANCE_SECONDS``:

- declares dead the workers silent for ``HMAOPT_WORKER_STALE_SECONDS`` (exactly one
  maintainer wins each), fails the Optuna trials they left RUNNING, and enqueues a new run of
  their job, which resumes the study: finished trials are kept, the interrupted one re-runs;
- enqueues again the unfinished jobs that Redis has lost (service.queue.reconcile).

A run (:func:`run_job`) claims trials under a Redis lock while fewer than ``n_trials`` are
complete, pruned or running, so several workers can share one job with a global cap. It
checks for cancellation between trials and at every evaluation batch.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

from service import queue
from service.db import jobs as job_db
from service.db import session_scope
from service.db import workers as worker_db
from service.errors import HmaoptError
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.status import JobStatus

log = logging.getLogger(__name__)

#: seconds a worker that found no free trial waits before looking again
IDLE_POLL_SECONDS = 0.5
#: seconds the lock around "count trials, ask one" is held at most
ASK_LOCK_SECONDS = 30


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


# ------------------------------------------------------------------------------ the process

class WorkerProcess:
    """One ``hmaopt worker``: its database row, heartbeat and maintenance threads."""

    current: WorkerProcess | None = None

    def __init__(self, settings: Settings, device: str = "auto", name: str | None = None):
        self.settings = settings
        self.device = device
        self.url = settings.database()
        with session_scope(self.url) as session:
            row = worker_db.register(session, device=device, name=name)
            self.id, self.name = row.id, row.name
        self.job_id: str | None = None
        self.lost = False
        self.rq_worker = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="hmaopt-heartbeat", daemon=True),
                         threading.Thread(target=self._maintain, name="hmaopt-maintenance",
                                          daemon=True)]
        WorkerProcess.current = self

    # threads ---------------------------------------------------------------------------
    def start_threads(self) -> None:
        for t in self._threads:
            t.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:  # a DB hiccup must not kill liveness for good
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)

    def heartbeat(self) -> None:
        with session_scope(self.url) as session:
            alive = worker_db.heartbeat(session, self.id,
                                        state="busy" if self.job_id else "idle",
                                        job_id=self.job_id)
        if not alive:
            # declared dead while alive (a long pause): its trials were failed and its job
            # re-enqueued, so the run in hand is abandoned; the worker itself goes on
            log.warning("worker %s: was declared dead; abandoning job %s, reporting alive "
                        "again", self.name, self.job_id)
            self.lost = self.job_id is not None
            with session_scope(self.url) as session:
                from service.db.models import Worker

                row = session.get(Worker, self.id)
                if row is not None:
                    row.state = "busy" if self.job_id else "idle"
                    row.stopped_at = None
        rq = self.rq_worker
        if rq is not None and getattr(rq, "_hmaopt_execution", None) is not None:
            job, execution = rq._hmaopt_execution
            try:
                rq.maintain_heartbeats(job, execution)
            except Exception as exc:
                log.debug("worker %s: RQ heartbeat failed: %s", self.name, exc)

    def _maintain(self) -> None:
        while not self._stop.wait(self.settings.maintenance_seconds):
            try:
                maintain(self.settings)
            except Exception as exc:
                log.warning("worker %s: maintenance failed: %s", self.name, exc)

    @property
    def stopping(self) -> bool:
        return bool(self.rq_worker is not None and self.rq_worker._stop_requested)

    def close(self) -> None:
        self._stop.set()
        with session_scope(self.url) as session:
            worker_db.stop(session, self.id)
        WorkerProcess.current = None

    # the RQ loop -----------------------------------------------------------------------
    def work(self, *, burst: bool = False) -> None:
        from rq import SimpleWorker

        class _Worker(SimpleWorker):
            def execute_job(self, job, queue_):
                execution = self.prepare_execution(job)
                self._hmaopt_execution = (job, execution)
                try:
                    self.perform_job(job, queue_, execution)
                finally:
                    self._hmaopt_execution = None
                self.set_state("idle")

        conn = queue.redis_client(queue.redis_url(self.settings))
        self.rq_worker = _Worker([self.settings.queue_name], connection=conn,
                                 name=f"{queue.WORKER_PREFIX}{self.id}")
        self.rq_worker._hmaopt_execution = None
        self.start_threads()
        try:
            maintain(self.settings)
        except HmaoptError as exc:
            log.warning("worker %s: first maintenance pass failed: %s", self.name, exc)
        log.info("worker %s: waiting for jobs on queue %s", self.name, self.settings.queue_name)
        self.rq_worker.work(burst=burst, logging_level=logging.getLevelName(
            logging.getLogger().level), with_scheduler=False)


def current_worker() -> WorkerProcess:
    """The process's worker (a plain ``rq worker`` gets one registered on first use)."""
    if WorkerProcess.current is None:
        WorkerProcess(get_settings()).start_threads()
    return WorkerProcess.current


# ------------------------------------------------------------------------------ maintenance

def maintain(settings: Settings) -> None:
    """One maintenance pass: recover the jobs of dead workers, re-enqueue lost jobs."""
    recover_dead_workers(settings)
    queue.reconcile(settings)


def recover_dead_workers(settings: Settings) -> list[str]:
    """Declare silent workers dead, fail their running trials, re-enqueue their jobs.

    A dead worker keeps its ``job_id`` until its job is recovered, so a recovery that fails
    midway (Redis down, say) is retried on the next pass.
    """
    url = settings.database()
    with session_scope(url) as session:
        for w in worker_db.stale(session, settings.worker_stale_seconds):
            if worker_db.declare_dead(session, w.id):  # exactly one maintainer wins
                log.warning("worker %s: no heartbeat for %.0f s, declared dead", w.name,
                            settings.worker_stale_seconds)
    with session_scope(url) as session:
        dead = [(w.id, w.name, w.job_id) for w in worker_db.unrecovered(session)]
    recovered = []
    for wid, name, job_id in dead:
        conn = queue.redis_client(queue.redis_url(settings))
        lock = conn.lock(queue.Keys.lock(job_id, f"recover-{wid}"), timeout=60)
        if not lock.acquire(blocking=False):
            continue  # another maintainer is on it
        try:
            _recover(settings, wid, name, job_id)
            recovered.append(job_id)
        finally:
            try:
                lock.release()
            except Exception:
                pass
    return recovered


def _recover(settings: Settings, wid: str, name: str, job_id: str) -> None:
    url = settings.database()
    failed = fail_trials_of(settings, job_id, wid)
    with session_scope(url) as session:
        job = job_db.get_job(session, job_id)
        enqueue = not JobStatus(job.status).terminal
        others = [w for w in worker_db.alive(session, job_id=job_id) if w.id != wid]
        orphaned = job.export_status == "running" and not others
        lost_export = f"the worker exporting it ({name}) died; export again"
        if orphaned:  # it died exporting: nobody else will finish it
            job.export_status, job.export_error = "failed", lost_export
        if enqueue:
            if job.finalizer == wid:  # it died writing the result: another worker will
                job.finalizer = None
            if not others:
                job_db.set_status(session, job_id, JobStatus.QUEUED, expect={JobStatus.RUNNING})
    if orphaned:
        queue.publish(settings, job_id, "export", {"status": "failed", "error": lost_export})
    if enqueue:
        queue.publish(settings, job_id, "worker_lost", {"worker": name, "failed_trials": failed})
        queue.enqueue_runs(settings, job_id, 1)
    with session_scope(url) as session:
        worker_db.mark_recovered(session, wid)


def _storage(url: str):
    import optuna

    from service.db.session import engine_kwargs

    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))


def fail_trials_of(settings: Settings, job_id: str, worker_id: str) -> list[int]:
    """Fail the RUNNING trials a dead worker left in the job's study; their numbers.

    A trial with no worker yet (asked, not yet attributed) is failed only once it is older
    than the stale limit: a live worker attributes it within milliseconds.
    """
    from datetime import datetime, timedelta
    import optuna
    from optuna.trial import TrialState

    from workers.search import study_name

    storage = _storage(settings.database())
    try:
        study = optuna.load_study(study_name=study_name(job_id), storage=storage)
    except KeyError:  # the worker died before creating the study
        return []
    failed = []
    cutoff = datetime.now() - timedelta(seconds=settings.worker_stale_seconds)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner == worker_id or (owner is None and t.datetime_start is not None
                                  and t.datetime_start < cutoff):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed.append(t.number)
    if failed:
        log.warning("job %s: failed trial(s) %s of dead worker %s; they run again", job_id,
                    failed, worker_id)
    return failed


# ------------------------------------------------------------------------------ a run

def run_job(job_id: str) -> str:
    """The RQ entry point: run (or resume, or join) the search of one job."""
    return JobRun(job_id).run()


class JobRun:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.settings = get_settings()
        self.url = self.settings.database()
        self.worker = current_worker()

    # helpers ---------------------------------------------------------------------------
    def publish(self, kind: str, data: dict) -> None:
        queue.publish(self.settings, self.job_id, kind, data)

    def set_status(self, status: JobStatus, *, expect, error: str | None = None) -> bool:
        with session_scope(self.url) as session:
            moved = job_db.set_status(session, self.job_id, status, expect=expect, error=error)
        if moved:
            log.info("worker %s: job %s %s", self.worker.name, self.job_id, status.value)
            self.publish("status", {"status": status.value, "error": error})
        return moved

    def cancelled(self) -> bool:
        """Cancelled, or finished by another worker (e.g. failed): stop either way."""
        if queue.cancel_flagged(self.settings, self.job_id):
            return True
        with session_scope(self.url) as session:
            job = job_db.get_job(session, self.job_id)
            return job.cancel_requested or JobStatus(job.status).terminal

    def check_batch(self, *_args) -> None:
        """on_batch hook: stop at a batch boundary when the job was cancelled."""
        if self.worker.lost:
            raise WorkerLost()
        if queue.cancel_flagged(self.settings, self.job_id):
            raise JobCancelled()

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
            with session_scope(self.url) as session:
                others = [w for w in worker_db.alive(session, job_id=self.job_id)
                          if w.id != self.worker.id]
            if not others:
                self.set_status(JobStatus.QUEUED, expect={JobStatus.RUNNING})
            queue.enqueue_runs(self.settings, self.job_id, 1)
            return "worker stopping: job re-enqueued"
        except HmaoptError as exc:
            log.error("worker %s: job %s failed: %s", self.worker.name, self.job_id, exc)
            self.set_status(JobStatus.FAILED, expect={JobStatus.QUEUED, JobStatus.RUNNING},
                            error=str(exc))
            return "failed"
        except Exception as exc:
            log.exception("worker %s: job %s failed", self.worker.name, self.job_id)
            self.set_status(JobStatus.FAILED, expect={JobStatus.QUEUED, JobStatus.RUNNING},
                            error=f"internal error: {type(exc).__name__}: {exc} "
                                  f"(at {traceback.extract_tb(exc.__traceback__)[-1].name})")
            return "failed"
        finally:
            self.worker.job_id = None
            try:
                with session_scope(self.url) as session:  # a result not written is free
                    job_db.release_finalizer(session, self.job_id, self.worker.id)
                self.worker.heartbeat()
            except Exception as exc:
                log.warning("worker %s: cleanup after job %s: %s", self.worker.name,
                            self.job_id, exc)

    def _search(self, spec: JobSpec) -> str:
        from workers.search import Search, load_job, measure_base, study_name

        t0 = time.perf_counter()
        merger, evaluator = load_job(spec, device=self.worker.device)
        conn = queue.redis_client(queue.redis_url(self.settings))
        # opening the storage may create Optuna's tables: one process at a time
        with conn.lock(queue.Keys.lock("all", "optuna-schema"), timeout=60,
                       blocking_timeout=120):
            storage = _storage(self.url)
        with conn.lock(queue.Keys.lock(self.job_id, "setup"), timeout=120,
                       blocking_timeout=300):
            search = Search(spec, merger, evaluator, storage=storage,
                            name=study_name(self.job_id), resume=True, live_running=True)
            self._backfill(search)
        with session_scope(self.url) as session:
            job = job_db.get_job(session, self.job_id)
            fresh = job.layout is None
            if fresh:
                job.layout = merger.grouping.describe()
        if fresh:
            self.publish("layout", merger.grouping.describe())
        t1 = time.perf_counter()
        cached = measure_base(merger, evaluator, cache_dir=self.settings.cache_dir,
                              on_batch=self.check_batch)
        base_seconds = time.perf_counter() - t1
        log.info("worker %s: job %s θ_base %s (%.1f s)", self.worker.name, self.job_id,
                 "from cache" if cached else "measured", base_seconds)
        while True:
            if self.worker.stopping:
                raise WorkerStopping()
            if self.cancelled():
                raise JobCancelled()
            trial = self._claim(search, conn)
            if trial is None:
                if self._others_running(search):
                    time.sleep(IDLE_POLL_SECONDS)
                    continue
                break
            try:
                record = search.run_trial(on_batch=self.check_batch, trial=trial)
            except Exception:
                self.worker.heartbeat()  # learn now whether we were declared dead
                if self.worker.lost:  # the trial was failed by maintenance under our feet
                    raise WorkerLost() from None
                raise
            if self.worker.lost:
                raise WorkerLost()
            self._record(search, record)
        with session_scope(self.url) as session:
            mine = job_db.claim_finalizer(session, self.job_id, self.worker.id)
        if not mine:
            return "trials done; another worker writes the result"
        result = search.result(base_cached=cached, base_seconds=base_seconds,
                               total_seconds=time.perf_counter() - t0,
                               on_batch=self.check_batch)
        from workers.search import jsonable

        payload = jsonable(result.to_dict())
        if self.worker.lost:
            raise WorkerLost()
        with session_scope(self.url) as session:
            job = job_db.refresh_progress(session, self.job_id)
            if JobStatus(job.status) is not JobStatus.RUNNING:  # cancelled or failed meanwhile
                return f"job {job.status} meanwhile; result not written"
            job.result = payload
        if not self.set_status(JobStatus.SUCCEEDED, expect={JobStatus.RUNNING}):
            return "job changed state; not exported"
        if spec.export is not None and result.best is not None:
            export_job(self.job_id, spec.export.dir)
        return "succeeded" if result.feasible else "succeeded: no feasible merge"

    def _claim(self, search, conn):
        """Ask a trial when fewer than n_trials are complete, pruned or running (global cap)."""
        from optuna.trial import TrialState

        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        with conn.lock(queue.Keys.lock(self.job_id, "ask"), timeout=ASK_LOCK_SECONDS,
                       blocking_timeout=ASK_LOCK_SECONDS * 2):
            study = search.study
            if study._storage.get_n_trials(study._study_id, live) >= search.spec.search.n_trials:
                return None
            search.refine_warm_start()
            trial = study.ask()
            trial.set_user_attr("worker", self.worker.id)
        log.debug("worker %s: job %s trial %d", self.worker.name, self.job_id, trial.number)
        return trial

    def _others_running(self, search) -> bool:
        """True while trials run on live workers. A RUNNING trial whose worker is dead is
        failed here (it runs again), so a waiting worker never waits on a ghost."""
        from datetime import datetime, timedelta

        from optuna.trial import TrialState

        with session_scope(self.url) as session:
            alive = worker_db.alive_ids(session)
        recent = datetime.now() - timedelta(seconds=self.settings.worker_stale_seconds)
        waiting = False
        for t in search.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker")
            if owner in alive or (owner is None and t.datetime_start
                                  and t.datetime_start >= recent):
                waiting = True
            else:
                log.warning("worker %s: job %s trial %d of dead worker %s failed; it runs "
                            "again", self.worker.name, self.job_id, t.number, owner)
                search.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                if t.user_attrs.get("kind") == "uniform":  # its grid point goes back in
                    conn = queue.redis_client(queue.redis_url(self.settings))
                    with conn.lock(queue.Keys.lock(self.job_id, "setup"), timeout=120,
                                   blocking_timeout=300):
                        search._enqueue_baseline()
                waiting = True  # look again: the freed slot is claimable
        return waiting

    def _backfill(self, search) -> None:
        """Copy finished trials the read model lacks (a worker died between tell and record)."""
        with session_scope(self.url) as session:
            for rec in search.records():
                job_db.add_trial(session, self.job_id, **_row(search, rec))
            job_db.refresh_progress(session, self.job_id)

    def _record(self, search, rec) -> None:
        from workers.search import jsonable

        row = _row(search, rec) | {"worker_id": self.worker.id}
        with session_scope(self.url) as session:
            job_db.add_trial(session, self.job_id, **row)
            progress = job_db.progress(job_db.refresh_progress(session, self.job_id))
        log.info("worker %s: job %s trial %d %s reward %s tax %.4f ratio %s", self.worker.name,
                 self.job_id, rec.number, rec.kind, rec.reward, rec.tax, rec.ratios)
        self.publish("trial", jsonable({**row, "finished_at": None, **progress}))


def _row(search, rec) -> dict:
    """The hmaopt_trials columns of a TrialRecord."""
    from workers.search import jsonable

    return jsonable({
        "number": rec.number, "kind": rec.kind, "state": "pruned" if rec.stage == 1 else "complete",
        "ratios": dict(zip(search.slots, rec.ratios)), "reward": rec.reward, "tax": rec.tax, "feasible": rec.feasible,
        "stage": rec.stage, "metrics": rec.metrics, "task_tax": rec.task_tax,
        "uniform_ratio": rec.uniform_ratio, "merge_seconds": rec.merge_seconds,
        "eval_seconds": rec.eval_seconds})


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
    from workers.export import export_merge

    url = settings.database()
    with session_scope(url) as session:
        job = job_db.get_job(session, job_id)
        spec, ratios = JobSpec.model_validate(job.spec), job.best_ratios
        job.export_status, job.export_dir, job.export_error = "running", out_dir, None
    queue.publish(settings, job_id, "export", {"status": "running", "dir": out_dir})
    try:
        if not ratios:
            raise HmaoptError("the job has no feasible trial to export")
        from pathlib import Path

        if overwrite and Path(out_dir).exists() and not (Path(out_dir) / "hma_manifest.json").exists():
            raise HmaoptError(f"{out_dir} exists and is not an hmaopt export (no "
                              "hma_manifest.json): refusing to overwrite it")
        result = export_merge(spec.base_model, spec.aligned_model, out_dir, spec.groups,
                              list(ratios.values()), max_shard_bytes=settings.max_shard_bytes,
                              allow_pickle=settings.allow_pickle, overwrite=overwrite)
    except Exception as exc:  # recorded for the caller; the worker goes on
        log.error("job %s: export to %s failed: %s", job_id, out_dir, exc)
        if _finish_export(url, job_id, out_dir, status="failed", export_error=str(exc)):
            queue.publish(settings, job_id, "export", {"status": "failed", "error": str(exc)})
        return "failed"
    if not _finish_export(url, job_id, out_dir, status="succeeded",
                          export_manifest=result.manifest):
        return "export no longer this worker's (declared dead meanwhile); not recorded"
    queue.publish(settings, job_id, "export", {"status": "succeeded", "dir": str(result.out)})
    return str(result.out)


def _finish_export(url: str, job_id: str, out_dir: str, *, status: str, **fields) -> bool:
    """Record the end of an export still ``running`` into ``out_dir``: the recovery may have
    failed it meanwhile (this worker was declared dead), and another export may have started."""
    from sqlalchemy import update

    from service.db.models import Job

    with session_scope(url) as session:
        done = session.execute(update(Job).where(
            Job.id == job_id, Job.export_status == "running", Job.export_dir == out_dir)
            .values(export_status=status, **fields))
        return done.rowcount == 1
