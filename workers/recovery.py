"""Recovery of dead workers' work, in the manner of rq's ``maintenance.py``: one pass, run
by every worker's maintenance thread (the API runs the re-enqueue part).

A pass (:func:`maintain`):

- declares dead the workers silent for ``HMAOPT_WORKER_STALE_SECONDS`` (exactly one
  maintainer wins each);
- per dead worker not yet recovered, under a Redis lock: fails the Optuna trials it left
  RUNNING (:func:`workers.study.fail_stale_trials`, the one place that does), fails the
  export it was writing when no live worker is on the job, puts an unfinished job back to
  ``queued`` and enqueues a new run of it, which resumes the study (finished trials are
  kept, the interrupted one runs again);
- enqueues again the unfinished jobs that Redis has lost (``service.queue.reconcile``).

A dead worker keeps its ``job_id`` until its job is recovered, so a recovery that fails
midway (Redis down, say) is retried on the next pass.
"""

from __future__ import annotations

import logging

from service import queue
from service.db import jobs as job_db
from service.db import session_scope
from service.db import workers as worker_db
from service.settings import Settings
from service.status import ExportStatus
from workers.study import fail_stale_trials, load_study

log = logging.getLogger(__name__)

#: seconds a maintainer holds the lock on one dead worker's recovery at most
RECOVER_LOCK_SECONDS = 60


def maintain(settings: Settings) -> None:
    """One maintenance pass: recover the jobs of dead workers, re-enqueue lost jobs."""
    recover_dead_workers(settings)
    queue.reconcile(settings)


def recover_dead_workers(settings: Settings) -> list[str]:
    """Declare silent workers dead and recover their jobs; the ids of the jobs recovered."""
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
        lock = conn.lock(queue.Keys.lock(job_id, f"recover-{wid}"),
                         timeout=RECOVER_LOCK_SECONDS)
        if not lock.acquire(blocking=False):
            continue  # another maintainer is on it
        try:
            recover(settings, wid, name, job_id)
            recovered.append(job_id)
        finally:
            try:
                lock.release()
            except Exception:
                pass
    return recovered


def recover(settings: Settings, worker_id: str, name: str, job_id: str) -> None:
    """Recover one dead worker's job: its trials, its export, its place in the queue."""
    url = settings.database()
    failed = fail_trials_of(settings, job_id, worker_id)
    lost_export = f"the worker exporting it ({name}) died; export again"
    with session_scope(url) as session:
        enqueue, orphaned = job_db.recover_job(session, job_id, worker_id,
                                               export_error=lost_export)
    if orphaned:
        queue.publish(settings, job_id, "export",
                      {"status": ExportStatus.FAILED.value, "error": lost_export})
    if enqueue:
        queue.publish(settings, job_id, "worker_lost", {"worker": name, "failed_trials": failed})
        try:
            queue.enqueue_runs(settings, job_id, 1)
        except Exception as exc:  # the job is queued in the database: the reconcile has it
            if not queue.transport_down(exc):
                raise
            log.warning("job %s: not enqueued now (%s); the reconcile enqueues it when Redis "
                        "is back", job_id, exc)
    with session_scope(url) as session:
        worker_db.mark_recovered(session, worker_id)


def fail_trials_of(settings: Settings, job_id: str, worker_id: str) -> list[int]:
    """Fail the RUNNING trials a dead worker left in the job's study; their numbers."""
    study = load_study(job_id, settings.database())
    if study is None:  # the worker died before creating the study
        return []
    failed, _ = fail_stale_trials(study, lambda owner: owner == worker_id,
                                  settings.worker_stale_seconds)
    numbers = [t.number for t in failed]
    if numbers:
        log.warning("job %s: failed trial(s) %s of dead worker %s; they run again", job_id,
                    numbers, worker_id)
    return numbers
