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

Redis outages. RQ's loop retries an unreachable Redis only while it waits for a job; any other
Redis error makes it quit. :meth:`WorkerProcess.work` runs it again once Redis answers
(waits from ``service.queue.retry_waits``): a worker never exits because Redis is away.

Stopping. The first SIGTERM (or SIGINT) sets ``stop_signalled``: an idle worker exits, a busy
one stops its trial at the next evaluation batch and puts the job back in the queue
(workers/loop.py); a second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from rq import SimpleWorker
from rq.exceptions import StopRequested

from service import queue
from service.db import session_scope
from service.db import workers as worker_db
from service.settings import Settings, get_settings
from service.status import WorkerState
from workers.recovery import maintain

log = logging.getLogger(__name__)


class _RqWorker(SimpleWorker):
    """SimpleWorker that keeps the job in hand visible to the heartbeat thread; the signal
    handlers are the WorkerProcess's (installed once for the process's life)."""

    execution = None

    def execute_job(self, job, queue_):
        execution = self.prepare_execution(job)
        self.execution = (job, execution)
        try:
            self.perform_job(job, queue_, execution)
        finally:
            self.execution = None
        self.set_state("idle")

    def _install_signal_handlers(self) -> None:
        pass


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
        self.stop_signalled = False
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
        return self.stop_signalled

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signalled:  # the second one: now
            log.warning("worker %s: %s again, exiting now", self.name,
                        signal.Signals(signum).name)
            raise SystemExit(128 + signum)
        self.stop_signalled = True
        rq = self.rq_worker
        if rq is not None:
            rq._stop_requested = True  # RQ's loop ends after the run in hand
        busy = self.job_id is not None or (rq is not None and rq.execution is not None)
        log.warning("worker %s: %s, %s", self.name, signal.Signals(signum).name,
                    "stopping the trial at the next evaluation batch; the job goes back to "
                    "the queue" if busy else "exiting")
        if not busy:
            raise StopRequested()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def close(self) -> None:
        self._stop.set()
        with session_scope(self.url) as session:
            worker_db.stop(session, self.id)
        WorkerProcess.current = None

    # the RQ loop -----------------------------------------------------------------------
    def work(self, *, burst: bool = False) -> None:
        """Take job runs until stopped (or, ``burst``, until the queue is empty); RQ's loop is
        started again whenever a Redis outage ended it."""
        self.install_signal_handlers()
        self.start_threads()
        try:
            maintain(self.settings)
        except Exception as exc:  # Redis away, say: the maintenance thread tries again
            log.warning("worker %s: first maintenance pass failed: %s", self.name, exc)
        url = queue.redis_url(self.settings)
        conn = queue.redis_client(url)
        level = logging.getLevelName(logging.getLogger().level)
        while not self.stop_signalled:
            try:
                self.rq_worker = _RqWorker([self.settings.queue_name], connection=conn,
                                           name=f"{queue.WORKER_PREFIX}{self.id}")
                log.info("worker %s: waiting for jobs on queue %s", self.name,
                         self.settings.queue_name)
                self.rq_worker.work(burst=burst, logging_level=level, with_scheduler=False)
            except StopRequested:
                return
            except Exception as exc:
                if not queue.transport_down(exc) and not isinstance(exc, ValueError):
                    raise
                log.warning("worker %s: Redis error: %s", self.name, exc)
            if self.stop_signalled:
                return
            try:
                conn.ping()
                if burst:
                    return
                # RQ quit on something else than an outage (it logged it): not at once
                log.warning("worker %s: RQ's loop ended; starting it again", self.name)
                time.sleep(self.settings.redis_retry_seconds)
            except StopRequested:
                return
            except Exception as exc:
                if not queue.transport_down(exc):
                    raise
                self._wait_for_redis(conn)
            self._forget_rq_worker()

    def _wait_for_redis(self, conn) -> None:
        """Wait (with backoff) until Redis answers again, or the worker is stopped."""
        log.warning("worker %s: Redis is unreachable; waiting for it (the worker stays up)",
                    self.name)
        t0 = time.monotonic()
        for wait in queue.retry_waits(self.settings):
            if self.stop_signalled:
                return
            try:
                time.sleep(wait)
                conn.ping()
                log.warning("worker %s: Redis is back after %.1f s", self.name,
                            time.monotonic() - t0)
                return
            except StopRequested:
                return
            except Exception as exc:
                if not queue.transport_down(exc):
                    raise

    def _forget_rq_worker(self) -> None:
        """RQ's record of the previous loop (left "alive" when Redis failed under it), so
        that the next one may register under the same name."""
        rq, self.rq_worker = self.rq_worker, None
        if rq is None:
            return
        try:
            rq.register_death()
        except Exception as exc:
            log.debug("worker %s: RQ register_death: %s", self.name, exc)


def current_worker() -> WorkerProcess:
    """The process's worker (a plain ``rq worker`` gets one registered on first use)."""
    if WorkerProcess.current is None:
        WorkerProcess(get_settings()).start_threads()
    return WorkerProcess.current
