"""The worker process: ``hmaopt worker``'s row in ``hmaopt_workers``, its heartbeat and
maintenance threads, and the RQ loop that hands it job runs.

``hmaopt worker --device cuda:N`` is one process per GPU. It runs RQ's ``SimpleWorker``: jobs
execute in the worker process itself, never in a forked child, so CUDA is never initialised
before a fork (there is none); the models of a job are loaded once per run (workers/loop.py).

Liveness. The heartbeat thread refreshes ``heartbeat_at`` every ``HMAOPT_HEARTBEAT_SECONDS``
(and RQ's own heartbeat of the job in hand); the maintenance thread runs a recovery pass
(workers/recovery.py) every ``HMAOPT_MAINTENANCE_SECONDS``. A worker that learns it was
declared dead while alive (a long pause) sets ``lost``: the run in hand is abandoned, the
worker itself goes on.
"""

from __future__ import annotations

import logging
import threading

from rq import SimpleWorker

from service import queue
from service.db import session_scope
from service.db import workers as worker_db
from service.errors import HmaoptError
from service.settings import Settings, get_settings
from service.status import WorkerState
from workers.recovery import maintain

log = logging.getLogger(__name__)


class _RqWorker(SimpleWorker):
    """SimpleWorker that keeps the job in hand visible to the heartbeat thread."""

    execution = None

    def execute_job(self, job, queue_):
        execution = self.prepare_execution(job)
        self.execution = (job, execution)
        try:
            self.perform_job(job, queue_, execution)
        finally:
            self.execution = None
        self.set_state("idle")

    @property
    def stop_requested(self) -> bool:
        return bool(self._stop_requested)


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
        self.rq_worker: _RqWorker | None = None
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

    @property
    def state(self) -> WorkerState:
        return WorkerState.BUSY if self.job_id else WorkerState.IDLE

    def heartbeat(self) -> None:
        with session_scope(self.url) as session:
            alive = worker_db.heartbeat(session, self.id, state=self.state, job_id=self.job_id)
        if not alive:
            # declared dead while alive (a long pause): its trials were failed and its job
            # re-enqueued, so the run in hand is abandoned; the worker itself goes on
            log.warning("worker %s: was declared dead; abandoning job %s, reporting alive "
                        "again", self.name, self.job_id)
            self.lost = self.job_id is not None
            with session_scope(self.url) as session:
                worker_db.revive(session, self.id, self.state)
        rq = self.rq_worker
        if rq is not None and rq.execution is not None:
            job, execution = rq.execution
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
        return self.rq_worker is not None and self.rq_worker.stop_requested

    def close(self) -> None:
        self._stop.set()
        with session_scope(self.url) as session:
            worker_db.stop(session, self.id)
        WorkerProcess.current = None

    # the RQ loop -----------------------------------------------------------------------
    def work(self, *, burst: bool = False) -> None:
        conn = queue.redis_client(queue.redis_url(self.settings))
        self.rq_worker = _RqWorker([self.settings.queue_name], connection=conn,
                                   name=f"{queue.WORKER_PREFIX}{self.id}")
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
